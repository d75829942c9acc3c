//! Leaf utilities that know nothing of the server: counters and their page, the log backend,
//! timestamps, a bounded join, giving memory back. Nothing here imports another layer.

pub mod join;
pub mod logger;
pub mod memory;
pub mod metrics;
pub mod timestamp;
