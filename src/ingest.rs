//! What both ingest paths (HTTP POST and the Unix socket) share: checking a submission and
//! publishing it.
//!
//! A submission is accepted only if it is one JSON object within the size limit; anything else is
//! rejected with a precise message and nothing is published.

use async_channel::Receiver;
use serde_json::value::RawValue;

use crate::hub::{Receipt, Refusal};
use crate::protocol::Source;
use crate::server::Shared;

/// Why a submission was not published. `Display` gives the message sent back to the publisher.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// `journal::MAX_QUEUED` submissions are already waiting for the disk.
    StorageBusy,
    /// Writing to the data dir failed; nothing was stored.
    StorageFailed(String),
}

impl Rejection {
    /// Whether the server, not the submission, is at fault: the publisher should retry.
    pub fn is_temporary(&self) -> bool {
        matches!(self, Rejection::ShuttingDown | Rejection::StorageBusy | Rejection::StorageFailed(_))
    }

    /// The reason's name in metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Rejection::Empty => "empty",
            Rejection::TooLarge { .. } => "too_large",
            Rejection::InvalidJson(_) => "invalid_json",
            Rejection::NotAnObject => "not_an_object",
            Rejection::ShuttingDown => "shutting_down",
            Rejection::StorageBusy => "storage_busy",
            Rejection::StorageFailed(_) => "storage_failed",
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
            Rejection::StorageBusy => f.write_str("storage busy: publish again shortly"),
            Rejection::StorageFailed(detail) => write!(f, "storage failed, nothing was stored: {detail}"),
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

/// A checked submission on its way into the history.
#[derive(Debug)]
pub enum Staged {
    /// In-memory history: published at once.
    Published(Receipt),
    /// Durable history: waiting for the journal to commit it.
    Storing(Receiver<Result<Receipt, Rejection>>),
}

/// Waits, when the history is in memory and `stage` publishes at once, until the hub may take
/// another emergency (`FanOut`). With the journal, `server::deliver_committed` waits instead.
pub async fn wait_for_room(shared: &Shared) {
    if shared.journal.is_none() {
        shared.fan_out.room().await;
    }
}

/// Checks a submission and hands it to the history: to the hub at once when the history is in
/// memory, to the journal when it is durable. Never waits, so a publisher can stage a burst of
/// lines and have them committed together.
pub fn stage(shared: &Shared, bytes: &[u8], source: Source) -> Result<Staged, Rejection> {
    let data = parse_emergency(bytes, shared.config.max_body_bytes)?;
    if shared.hub.borrow().is_shutting_down() {
        return Err(Rejection::ShuttingDown);
    }
    match &shared.journal {
        Some(journal) => journal.append(data.to_owned(), source).map(Staged::Storing),
        None => {
            let receipt = shared
                .hub
                .borrow_mut()
                .publish(data, source)
                .map_err(|_: Refusal| Rejection::ShuttingDown)?;
            shared.fan_out.published();
            Ok(Staged::Published(receipt))
        }
    }
}

/// Waits until a staged submission is accepted (committed and broadcast) or refused.
pub async fn settle(shared: &Shared, staged: Staged, source: Source) -> Result<Receipt, Rejection> {
    let outcome = match staged {
        Staged::Published(receipt) => Ok(receipt),
        Staged::Storing(outcome) => outcome
            .recv()
            .await
            .unwrap_or_else(|_| Err(Rejection::StorageFailed("the storage thread stopped".into()))),
    };
    if outcome.is_ok() {
        shared.metrics.count("resq_push_published_total", source.label());
    }
    outcome
}

/// Stages one submission and waits for its outcome.
pub async fn submit(shared: &Shared, bytes: &[u8], source: Source) -> Result<Receipt, Rejection> {
    wait_for_room(shared).await;
    settle(shared, stage(shared, bytes, source)?, source).await
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
