//! What the executor and cluster mode's engine (`nats`) exchange, as plain data compiled in every
//! build (a build without the cargo feature `cluster` refuses `--nats` before any is made): the
//! settings, the status, the commit of a publish, and how an emergency is carried in the
//! engine's stream: its object as the message body, what the envelope needs beside it in
//! headers, and the envelope every box builds from them.
//!
//! The envelope holds the seq, which only the engine assigns (at its commit), so the publishing
//! box cannot serialize it beforehand. Every box builds it from the stored message instead, with
//! the same function from the same bytes: the same seq, `received_at` (the publishing box's
//! clock, to the millisecond, in a header) and source give byte-identical envelopes on every box.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::value::RawValue;

use crate::core::Stored;
use crate::protocol::{self, Source};
use crate::store::journal::Cacher;

/// How a box proves itself to NATS: read from files by `main`, never from the command line.
#[derive(Clone)]
pub enum Credentials {
    None,
    Token(String),
    UserPassword { user: String, password: String },
    CredsFile(PathBuf),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credentials::None => "None",
            Credentials::Token(_) => "Token(..)",
            Credentials::UserPassword { .. } => "UserPassword(..)",
            Credentials::CredsFile(_) => "CredsFile(..)",
        })
    }
}

/// Everything the engine needs from the flags.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub urls: Vec<String>,
    pub stream: StreamSettings,
    pub credentials: Credentials,
    pub ca_cert: Option<PathBuf>,
    /// `--nats-timeout`: for a publish's ack, and for binding the stream at start.
    pub timeout: Duration,
    pub box_name: String,
}

/// The names and retention of the site's streams. `<NAME>` holds the emergencies on
/// `<NAME>.emergencias` and nothing else, so that its stream sequence is resq-push's dense
/// `seq`; acks and closes go to a stream of their own, `<NAME>_RECEIPTS` on `<NAME>.receipts`.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    pub name: String,
    pub replicas: usize,
    /// `--history`: emergencies kept.
    pub max_messages: usize,
    /// `--history-max-age`.
    pub max_age: Duration,
}

impl StreamSettings {
    pub fn emergencies_subject(&self) -> String {
        format!("{}.emergencias", self.name)
    }

    pub fn receipts_subject(&self) -> String {
        format!("{}.receipts", self.name)
    }

    pub fn receipts_stream(&self) -> String {
        format!("{}_RECEIPTS", self.name)
    }
}

/// The engine's commit of one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PubAcked {
    pub seq: u64,
    /// Its `Nats-Msg-Id` was stored already, as `seq`, within the duplicate window.
    pub duplicate: bool,
}

/// What the publisher hears back: the commit, or why there is none.
pub type EngineReply = Result<PubAcked, String>;

/// What `/healthz` and `/metrics` show of the engine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStatus {
    pub connected: bool,
    /// The identity of the stream followed, once bound.
    pub stream_id: Option<String>,
    /// The last seq the follower took from the stream.
    pub last_seq: u64,
    /// Why the last attempt to bind or follow the stream failed, until one succeeds.
    pub last_error: Option<String>,
}

/// Where the follower starts: the cache, its stream identity and the last seq it holds.
#[derive(Debug)]
pub struct Follow {
    pub cacher: Cacher,
    pub stream_id: String,
    pub last_seq: u64,
}

/// JetStream's deduplication header: the idempotency key, or a fresh id per request.
pub const MESSAGE_ID: &str = "Nats-Msg-Id";
/// When the publishing box received the emergency, Unix milliseconds.
pub const RECEIVED_AT: &str = "Resq-Received-At";
/// `http` or `unix`.
pub const SOURCE: &str = "Resq-Source";
/// The box that published it, for the operator reading the stream.
pub const BOX: &str = "Resq-Box";

/// What a box publishes to the stream for one submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub message_id: String,
    pub received_at_ms: u64,
    pub source: Source,
    /// The emergency's object, exactly as it will be in the envelope.
    pub data: String,
}

impl Publication {
    /// The headers beside the body, as (name, value) pairs.
    pub fn headers(&self, box_name: &str) -> [(&'static str, String); 4] {
        [
            (MESSAGE_ID, self.message_id.clone()),
            (RECEIVED_AT, self.received_at_ms.to_string()),
            (SOURCE, self.source.label().to_owned()),
            (BOX, box_name.to_owned()),
        ]
    }
}

/// Unix milliseconds of `time` (0 before 1970): the resolution the envelope shows.
pub fn unix_millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| since.as_millis() as u64)
}

/// The emergency the stream holds at `seq`, from its headers and body. A message that is not a
/// resq-push emergency (published to the subject by something else) still takes its seq, so
/// seqs stay dense: its envelope says what it is instead of carrying it.
pub fn decode(seq: u64, received_at: Option<&str>, source: Option<&str>, body: &[u8]) -> Stored {
    let millis = received_at.and_then(|text| text.parse::<u64>().ok()).unwrap_or(0);
    let received_at = UNIX_EPOCH + Duration::from_millis(millis);
    let source = if source == Some("unix") { Source::Unix } else { Source::Http };
    let data = std::str::from_utf8(body)
        .ok()
        .and_then(|text| serde_json::from_str::<&RawValue>(text).ok())
        .filter(|value| value.get().starts_with('{'));
    let envelope = match data {
        Some(data) => protocol::envelope_json(seq, received_at, source, data),
        None => {
            let placeholder = RawValue::from_string(r#"{"error":"not a resq-push emergency"}"#.to_owned())
                .unwrap_or_else(|_| unreachable!("a literal object"));
            protocol::envelope_json(seq, received_at, source, &placeholder)
        }
    };
    Stored { seq, received_at, envelope }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_box_builds_the_same_envelope_as_the_journal_would() {
        let received_at = UNIX_EPOCH + Duration::from_millis(1_764_000_000_123);
        let data = RawValue::from_string(r#"{"tipo":"incendio"}"#.to_owned()).unwrap();
        let local = protocol::envelope_json(7, received_at, Source::Unix, &data);
        let publication = Publication {
            message_id: "k".into(),
            received_at_ms: unix_millis(received_at),
            source: Source::Unix,
            data: data.get().to_owned(),
        };
        let headers = publication.headers("box-a");
        let followed = decode(7, Some(&headers[1].1), Some(&headers[2].1), publication.data.as_bytes());
        assert_eq!(followed.envelope, local);
        assert_eq!((followed.seq, followed.received_at), (7, received_at));
    }

    #[test]
    fn a_message_that_is_no_emergency_keeps_its_seq() {
        for body in [&b"not json"[..], b"[1]", b"\xff"] {
            let stored = decode(3, None, None, body);
            assert_eq!(stored.seq, 3);
            assert!(stored.envelope.contains(r#""seq":3"#), "{}", stored.envelope);
            assert!(stored.envelope.contains("not a resq-push emergency"), "{}", stored.envelope);
        }
    }
}
