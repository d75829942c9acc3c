//! The domain core: clients, sequence numbers and the history, as synchronous state with no I/O.
//! Read this first.
//!
//! Nothing here knows of HTTP, WebSocket framing, SQLite or the configuration: the core hands out
//! serialized envelopes and doorbells, and the layers around it (stores, ingest, transports) do
//! the I/O. It uses only `support`, `protocol` (the envelope's JSON) and `auth::Identity`.

pub mod clock;
pub mod doorbell;
pub mod handle;
pub mod hub;
pub mod idempotency;
pub mod notices;
pub mod receipts;
pub mod subscription;

use std::rc::Rc;
use std::time::SystemTime;

/// An emergency's envelope, serialized once and shared by every client's write and every poll.
pub type SharedEnvelope = Rc<str>;

/// One frame a session is handed to write: an emergency (with its seq, so that its delivery can
/// be recorded once written) or a status message.
#[derive(Debug)]
pub struct Outgoing {
    pub json: SharedEnvelope,
    pub seq: Option<u64>,
}

/// One stored emergency, as the store or the hub stamped it.
#[derive(Debug)]
pub struct Stored {
    pub seq: u64,
    pub received_at: SystemTime,
    /// The envelope exactly as sent to clients.
    pub envelope: String,
}

/// The result of one publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub seq: u64,
    /// Clients told of the emergency (all but those dropped as too slow).
    pub queued_to: usize,
}

/// What the place that assigns seqs decided about one submission: a new emergency (`T` is its
/// `Stored` before delivery, its `Receipt` after), or, under an idempotency key it already holds,
/// not a new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome<T> {
    New(T),
    /// The same key and the same body as seq `seq`: a retry. Nothing is stored or broadcast.
    Duplicate {
        seq: u64,
    },
    /// The same key as seq `seq` with another body: refused. Nothing is stored or broadcast.
    Conflict {
        seq: u64,
    },
}

impl<T> Outcome<T> {
    pub fn map<U>(self, new: impl FnOnce(T) -> U) -> Outcome<U> {
        match self {
            Outcome::New(value) => Outcome::New(new(value)),
            Outcome::Duplicate { seq } => Outcome::Duplicate { seq },
            Outcome::Conflict { seq } => Outcome::Conflict { seq },
        }
    }
}
