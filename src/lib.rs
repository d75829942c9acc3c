//! resq-push: a WebSocket push server for emergency dispatch sites.
//!
//! Module map: `server` (accept loops, connection tasks, shutdown) → `routes` (HTTP requests) →
//! `session` (one WebSocket client); `unix_ingest` and `routes` publish through `ingest` into the
//! `hub`, which owns clients, sequence numbers and history. `protocol` holds every JSON message,
//! `config` every limit. See ARCHITECTURE.md.

pub mod auth;
pub mod config;
mod deadline;
mod http;
mod hub;
mod ingest;
pub mod journal;
pub mod logger;
mod metrics;
mod protocol;
mod routes;
mod scheduler;
pub mod server;
mod session;
mod slots;
mod timestamp;
pub mod unix_ingest;
