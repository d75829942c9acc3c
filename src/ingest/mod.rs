//! The publish path that every ingest transport (HTTP POST, the Unix socket) and the journal's
//! delivery share: checking a submission, storing it, and handing it to the hub.
//!
//! A submission is accepted only if it is one JSON object within the size limit; anything else is
//! rejected with a precise message and nothing is published. Every emergency reaches the hub
//! through `Publisher::hand_over`: wait for room in the fan-out, deliver, count.

use std::cell::Cell;
use std::rc::Rc;

use async_channel::Receiver;
use serde_json::value::RawValue;

use crate::core::Receipt;
use crate::core::handle::HubHandle;
use crate::core::hub::{Hub, Refusal};
use crate::protocol::Source;
use crate::runtime::scheduler::FanOut;
use crate::store::journal::{Committed, Journal, StorageError};
use crate::support::metrics::Metrics;

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

impl From<StorageError> for Rejection {
    fn from(error: StorageError) -> Rejection {
        match error {
            StorageError::Busy => Rejection::StorageBusy,
            StorageError::Failed(detail) => Rejection::StorageFailed(detail),
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
    Storing(Receiver<Result<Receipt, StorageError>>),
}

/// The one way into the history, shared by every ingest path.
pub struct Publisher {
    hub: HubHandle,
    /// Where accepted emergencies are committed before they are acknowledged; `None` when the
    /// history is in memory only.
    journal: Option<Journal>,
    /// Paces publishing to the sessions' fan-out (see `hand_over`).
    fan_out: Rc<FanOut>,
    metrics: Rc<Metrics>,
    /// `--max-body-bytes`.
    max_bytes: usize,
    /// Cleared when shutdown begins: from then on every submission is refused.
    accepting: Cell<bool>,
}

impl Publisher {
    pub fn new(
        hub: HubHandle,
        journal: Option<Journal>,
        fan_out: Rc<FanOut>,
        metrics: Rc<Metrics>,
        max_bytes: usize,
    ) -> Publisher {
        Publisher { hub, journal, fan_out, metrics, max_bytes, accepting: Cell::new(true) }
    }

    /// The first step of shutdown: every submission from now on is refused as
    /// `Rejection::ShuttingDown`, and the journal commits what it has queued and stops, so that
    /// `deliver_committed` ends once everything accepted is in the hub.
    pub fn stop_accepting(&self) {
        self.accepting.set(false);
        if let Some(journal) = &self.journal {
            journal.close();
        }
    }

    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    /// Checks a submission and hands it to the history: to the hub at once when the history is
    /// in memory (after waiting for room), to the journal when it is durable. The journal's path
    /// never waits, so a publisher can stage a burst of lines and have them committed together.
    pub async fn stage(&self, bytes: &[u8], source: Source) -> Result<Staged, Rejection> {
        let data = parse_emergency(bytes, self.max_bytes)?;
        if !self.accepting.get() {
            return Err(Rejection::ShuttingDown);
        }
        match &self.journal {
            Some(journal) => Ok(Staged::Storing(journal.append(data.to_owned(), source)?)),
            None => {
                let published = self.hand_over(|hub| hub.publish(data, source)).await;
                published.map(Staged::Published).map_err(|_: Refusal| Rejection::ShuttingDown)
            }
        }
    }

    /// Waits until a staged submission is accepted (committed and broadcast) or refused.
    pub async fn settle(&self, staged: Staged, source: Source) -> Result<Receipt, Rejection> {
        let outcome = match staged {
            Staged::Published(receipt) => Ok(receipt),
            Staged::Storing(outcome) => match outcome.recv().await {
                Ok(outcome) => outcome.map_err(Rejection::from),
                Err(_) => Err(Rejection::StorageFailed("the storage thread stopped".into())),
            },
        };
        if outcome.is_ok() {
            self.metrics.count("resq_push_published_total", source.label());
        }
        outcome
    }

    /// Stages one submission and waits for its outcome.
    pub async fn submit(&self, bytes: &[u8], source: Source) -> Result<Receipt, Rejection> {
        let staged = self.stage(bytes, source).await?;
        self.settle(staged, source).await
    }

    /// Hands what the journal committed to the hub, in seq order, and answers each publisher.
    /// Ends when the journal has stopped and everything it committed is delivered.
    pub async fn deliver_committed(&self, committed: Receiver<Committed>) {
        while let Ok(Committed(batch)) = committed.recv().await {
            for (stored, reply) in batch {
                let delivered = self.hand_over(|hub| Ok(hub.deliver(stored))).await;
                let _ =
                    reply.try_send(delivered.map_err(|_| StorageError::Failed("refused by the hub".into())));
            }
            smol::future::yield_now().await;
        }
    }

    /// The one way an emergency reaches the hub: wait for room in the fan-out, hand it over with
    /// no await in between (so nothing else publishes after the check), count it.
    async fn hand_over(
        &self,
        deliver: impl FnOnce(&mut Hub) -> Result<Receipt, Refusal>,
    ) -> Result<Receipt, Refusal> {
        self.fan_out.room().await;
        let receipt = self.hub.with(deliver)?;
        self.fan_out.published();
        Ok(receipt)
    }
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
