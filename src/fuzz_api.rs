//! What the fuzz targets in `fuzz/` call: every parser of what a peer or an operator hands the
//! server, the very functions the server calls. Built only with the `fuzzing` feature (off by
//! default), so the library's API stays what `main` needs. A thin export module: it holds nothing
//! but `pub use`s (`tests/architecture.rs` checks that, and that no layer uses it), so a target
//! can only test what the server runs. RELIABILITY.md says what each target checks.

/// `Config::from_args`, for a target to build the server's configuration from flags.
pub use argh::FromArgs;
/// The tungstenite whose header parser and codes the server reads client frames with.
pub use async_tungstenite;

pub use crate::auth::TokenSet;
pub use crate::config::{CommandLine, Config, IpBlock, parse_listen, parse_origin, parse_trusted_proxy};
pub use crate::core::hub::Resume;
pub use crate::core::idempotency::{IdempotencyKey, MAX_KEY_BYTES};
pub use crate::http::conn::{HeadError, MAX_HEADERS, Request, Response, parse_head, percent_decode};
pub use crate::http::credentials::parse_resume;
pub use crate::http::forwarded::client_address;
pub use crate::http::routes::{content_length, idempotency_key};
pub use crate::ingest::{
    KEY_MEMBER, Rejection, Submission, owned_submission, parse_emergency, parse_submission,
};
pub use crate::unix::lines::{Line, LineSplitter};
pub use crate::ws::reader::{ClientClose, ClientFrame, FrameReader, READ_CHUNK_BYTES};
pub use crate::ws::session::{ClientText, client_text};
