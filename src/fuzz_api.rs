//! What the fuzz targets in `fuzz/` call: every parser of what a peer or an operator hands the
//! server, as the server calls it. Built only with the `fuzzing` feature (off by default), so the
//! library's API stays what `main` needs; nothing in the crate uses this module
//! (`tests/architecture.rs` lets no layer name it). RELIABILITY.md says what each target checks.

use std::net::SocketAddr;

use argh::FromArgs;

/// The tungstenite the server reads client frames with (the same version and features).
pub use async_tungstenite;
pub use async_tungstenite::tungstenite::protocol::WebSocketConfig;

pub use crate::auth::TokenSet;
pub use crate::config::{CommandLine, Config, IpBlock};
pub use crate::core::idempotency::MAX_KEY_BYTES;
pub use crate::http::conn::{HeadError, MAX_HEADERS, Request, percent_decode};
pub use crate::ingest::{KEY_MEMBER, Rejection};
pub use crate::unix::lines::{Line, LineSplitter};

/// `http::conn::parse_head`: `None` while the head is incomplete, else the request and the head's
/// length.
pub fn parse_head(buffer: &[u8], max_bytes: usize) -> Result<Option<(Request, usize)>, HeadError> {
    crate::http::conn::parse_head(buffer, max_bytes)
}

/// `http::routes::content_length`: a POST's declared body length.
pub fn content_length(request: &Request) -> Result<Option<usize>, &'static str> {
    crate::http::routes::content_length(request)
}

/// `http::routes::idempotency_key`: the `Idempotency-Key` header, checked.
pub fn idempotency_key_header(request: &Request) -> Result<Option<String>, String> {
    crate::http::routes::idempotency_key(request).map(|key| key.map(|key| key.as_str().to_owned()))
}

/// `http::credentials::parse_resume`: `?since=` and `&stream=`, or the status of the refusal.
pub fn parse_resume(request: &Request, peer: SocketAddr) -> Result<Option<(u64, Option<String>)>, u16> {
    match crate::http::credentials::parse_resume(request, peer) {
        Ok(resume) => Ok(resume.map(|resume| (resume.since, resume.stream))),
        Err(refusal) => Err(refusal.status.code),
    }
}

/// `http::forwarded::client_address`: who a request is believed to come from.
pub fn client_address(trusted: &[IpBlock], peer: SocketAddr, request: &Request) -> SocketAddr {
    crate::http::forwarded::client_address(trusted, peer, request)
}

/// `ingest::parse_emergency`: the object's text, byte for byte, or why it is refused.
pub fn parse_emergency(bytes: &[u8], max_bytes: usize) -> Result<&str, Rejection> {
    crate::ingest::parse_emergency(bytes, max_bytes).map(|raw| raw.get())
}

/// `ingest::parse_submission` with an `Idempotency-Key` header value already checked (`None`
/// when absent; an invalid one is refused, as `http::routes` would): the object's text and the
/// key it is stored under.
pub fn parse_submission<'a>(
    bytes: &'a [u8],
    max_bytes: usize,
    header: Option<&str>,
) -> Result<(&'a str, Option<String>), Rejection> {
    let header = match header.map(crate::core::idempotency::IdempotencyKey::parse).transpose() {
        Ok(header) => header,
        Err(error) => return Err(Rejection::InvalidKey(error.to_string())),
    };
    let submission = crate::ingest::parse_submission(bytes, max_bytes, header)?;
    let key = submission.fingerprint.map(|fingerprint| fingerprint.key.as_str().to_owned());
    Ok((submission.data.get(), key))
}

/// Whether `text` is an idempotency key (`core::idempotency::IdempotencyKey::parse`).
pub fn is_valid_key(text: &str) -> bool {
    crate::core::idempotency::IdempotencyKey::parse(text).is_ok()
}

/// `config::parse_listen` (`--listen`).
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    crate::config::parse_listen(text)
}

/// `config::parse_origin` (`--allowed-origin`).
pub fn parse_origin(text: &str) -> Result<String, String> {
    crate::config::parse_origin(text)
}

/// `config::parse_trusted_proxy` (`--trusted-proxy`).
pub fn parse_trusted_proxy(text: &str) -> Result<IpBlock, String> {
    crate::config::parse_trusted_proxy(text)
}

/// The tungstenite settings a session reads its client with (`ws::handshake::websocket_config`),
/// for `--max-client-message-bytes` = `max_client_message_bytes` (at least 128, as the flag
/// requires).
pub fn websocket_config(max_client_message_bytes: usize) -> WebSocketConfig {
    let limit = max_client_message_bytes.max(128).to_string();
    let config = Config::from_args(&["resq-push"], &["--max-client-message-bytes", &limit])
        .unwrap_or_else(|_| unreachable!("a number of bytes is a valid --max-client-message-bytes"));
    crate::ws::handshake::websocket_config(&config)
}

/// `ws::session::is_ping_text`: whether a client's text message is an application ping.
pub fn is_ping_text(text: &str) -> bool {
    crate::ws::session::is_ping_text(text)
}
