//! resq-push: a WebSocket push server for emergency dispatch sites.
//!
//! The folders are the layers, and dependencies point down this list only (ARCHITECTURE.md,
//! "The dependency rule"; `tests/architecture.rs` checks it):
//!
//! - `server`: the composition root, imported by `main` alone.
//! - transports: `http` (requests and handlers), `ws` (the handshake and the session; may use
//!   `http`), `unix` (the Unix-socket publishers).
//! - `app`: `App`, what every connection task sees.
//! - `tls`: the encrypted transport under `http` and `ws`: certificate, handshake, `Transport`.
//! - `ingest`: the one publish path (check, store, hand to the hub).
//! - `store` (the SQLite journal) and `runtime` (scheduler, tasks, connection caps, deadlines).
//! - `core`: the hub and its subscriptions; synchronous, no I/O.
//! - `protocol` (JSON on the wire), `auth` (tokens, origins), `config` (flags and limits).
//! - `support`: leaves (metrics, logger, timestamps, a bounded join).
//!
//! Every module is private: the library exports the few items the binary needs, below, and
//! nothing else. The `fuzzing` feature (off by default) adds `fuzz_api`, the parsers the fuzz
//! targets in `fuzz/` call.

mod app;
mod auth;
mod config;
mod core;
#[cfg(feature = "fuzzing")]
pub mod fuzz_api;
mod http;
mod ingest;
mod protocol;
mod runtime;
mod server;
mod store;
mod support;
mod tls;
mod unix;
mod ws;

pub use auth::Access;
pub use config::{CommandLine, Config};
pub use http::ca_cert::read_ca_cert;
pub use server::{Control, TlsListener, serve};
pub use store::engine::{Credentials, EngineSettings, Follow, StreamSettings};
pub use store::journal::{Retention, open_as as open_journal};
pub use store::{Storage, start as start_engine};
pub use support::logger::{error_past_filter, init as init_logging};
pub use tls::{CertificateFiles, ServerCertificate};
pub use unix::bind as bind_unix_socket;
