//! What both ingest paths (HTTP POST and the Unix socket) share: checking a submission and
//! publishing it.
//!
//! A submission is accepted only if it is one JSON object within the size limit; anything else is
//! rejected with a precise message and nothing is published.

use serde_json::value::RawValue;

use crate::hub::{Receipt, Refusal};
use crate::protocol::Source;
use crate::server::Shared;

/// Why a submission was not published. `Display` gives the message sent back to the publisher.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejection {
    /// Nothing but whitespace.
    Empty,
    /// Longer than `--max-body-bytes`.
    TooLarge { limit: usize },
    /// Not valid JSON (serde_json's message says where).
    InvalidJson(String),
    /// Valid JSON, but not an object.
    NotAnObject,
    /// The server is shutting down and accepts nothing more.
    ShuttingDown,
}

impl Rejection {
    /// The reason's name in metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Rejection::Empty => "empty",
            Rejection::TooLarge { .. } => "too_large",
            Rejection::InvalidJson(_) => "invalid_json",
            Rejection::NotAnObject => "not_an_object",
            Rejection::ShuttingDown => "shutting_down",
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Empty => f.write_str("empty body: send one JSON object"),
            Rejection::TooLarge { limit } => write!(f, "emergency larger than {limit} bytes"),
            Rejection::InvalidJson(detail) => write!(f, "invalid JSON: {detail}"),
            Rejection::NotAnObject => f.write_str("the emergency must be a JSON object"),
            Rejection::ShuttingDown => f.write_str("server shutting down: publish again after it restarts"),
        }
    }
}

/// Checks that `bytes` hold exactly one JSON object and returns it byte for byte.
pub fn parse_emergency(bytes: &[u8], max_bytes: usize) -> Result<&RawValue, Rejection> {
    if bytes.len() > max_bytes {
        return Err(Rejection::TooLarge { limit: max_bytes });
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(Rejection::Empty);
    }
    let value: &RawValue =
        serde_json::from_slice(bytes).map_err(|e| Rejection::InvalidJson(e.to_string()))?;
    if value.get().starts_with('{') { Ok(value) } else { Err(Rejection::NotAnObject) }
}

/// Checks and publishes one submission. Callers yield to the executor after each one, so that
/// the sessions it woke write before the same connection publishes again.
pub fn submit(shared: &Shared, bytes: &[u8], source: Source) -> Result<Receipt, Rejection> {
    let data = parse_emergency(bytes, shared.config.max_body_bytes)?;
    let receipt =
        shared.hub.borrow_mut().publish(data, source).map_err(|_: Refusal| Rejection::ShuttingDown)?;
    shared.metrics.count("resq_push_published_total", source.label());
    Ok(receipt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_one_object_verbatim() {
        let value = parse_emergency(b" {\"a\":  [1, 2]}\n", 100).unwrap();
        assert_eq!(value.get(), "{\"a\":  [1, 2]}");
    }

    fn rejection(bytes: &[u8], max_bytes: usize) -> Rejection {
        parse_emergency(bytes, max_bytes).map(RawValue::get).unwrap_err()
    }

    #[test]
    fn rejects_everything_else_precisely() {
        assert_eq!(rejection(b" \r\n", 100), Rejection::Empty);
        assert_eq!(rejection(b"[1]", 100), Rejection::NotAnObject);
        assert_eq!(rejection(b"\"x\"", 100), Rejection::NotAnObject);
        assert_eq!(rejection(b"{}", 1), Rejection::TooLarge { limit: 1 });
        let invalid = rejection(b"{\"a\":", 100).to_string();
        assert!(invalid.starts_with("invalid JSON: EOF while parsing"), "{invalid}");
        let trailing = rejection(b"{} {}", 100).to_string();
        assert!(trailing.contains("trailing characters"), "{trailing}");
        assert!(matches!(rejection(b"\xff{}", 100), Rejection::InvalidJson(_)));
    }
}
