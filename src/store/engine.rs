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

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::core::Stored;
use crate::core::receipts::ReceiptEvent;
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
    /// `--nats-queue`: commands waiting for the `nats` thread.
    pub queue: usize,
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

    /// The KV bucket of escalation claims (`nats::claims`).
    pub fn escalations_bucket(&self) -> String {
        format!("{}_ESCALATIONS", self.name)
    }
}

/// What became of a box's claim on running an escalation's command (cluster mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This box runs it.
    Won,
    /// Another box holds it until then: ask again after.
    Held { until: SystemTime },
    /// It has run.
    Done,
}

/// The engine's commit of one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PubAcked {
    pub seq: u64,
    /// Its `Nats-Msg-Id` was stored already, as `seq`, within the duplicate window.
    pub duplicate: bool,
}

/// Why the engine gave no commit for a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineError {
    pub reason: String,
    /// It was sent and no answer came (a PubAck timeout): the engine may have stored it.
    pub maybe_stored: bool,
}

impl EngineError {
    /// Refused before it was sent, or by an engine that had no stream to store it in.
    pub fn not_stored(reason: impl Into<String>) -> EngineError {
        EngineError { reason: reason.into(), maybe_stored: false }
    }

    pub fn maybe_stored(reason: impl Into<String>) -> EngineError {
        EngineError { reason: reason.into(), maybe_stored: true }
    }
}

/// What the publisher hears back: the commit, or why there is none.
pub type EngineReply = Result<PubAcked, EngineError>;

/// What `/healthz` and `/metrics` show of the engine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStatus {
    pub connected: bool,
    /// The identity of the stream followed, once bound.
    pub stream_id: Option<String>,
    /// The last seq the follower took from the stream.
    pub last_seq: u64,
    /// A write the engine committed proves its quorum, and nothing failed since (`nats::quorum`).
    pub stream_ok: bool,
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

/// Whether every box must apply `event` before it is stored (cluster mode): acks and closes go
/// through the engine's receipts stream first. Deliveries are this box's at once and shared
/// afterwards, in batches (`encode_deliveries`); queued counts stay this box's own.
pub fn is_cluster_wide(event: &ReceiptEvent) -> bool {
    matches!(event, ReceiptEvent::Acked { .. } | ReceiptEvent::Closed { .. })
}

/// One receipt event in the receipts stream, with the stream identity it belongs to (a
/// recreated stream's boxes ignore the old one's).
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
struct WireReceipt {
    stream: String,
    kind: String,
    seq: u64,
    at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tablet: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

/// Deliveries in one receipts message, at most: a message stays far below NATS's payload limit.
pub const DELIVERIES_PER_MESSAGE: usize = 2048;

/// One box's batch of deliveries in the receipts stream: (seq, tablet, at in Unix ms) each.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
struct WireDeliveries {
    stream: String,
    kind: String,
    #[serde(rename = "box")]
    box_name: String,
    deliveries: Vec<(u64, String, u64)>,
}

/// The deliveries among `events` as receipts messages of `box_name`, `DELIVERIES_PER_MESSAGE`
/// each at most.
pub fn encode_deliveries(stream: &str, box_name: &str, events: &[ReceiptEvent]) -> Vec<String> {
    let deliveries: Vec<(u64, String, u64)> = events
        .iter()
        .filter_map(|event| match event {
            ReceiptEvent::Delivered { seq, tablet, at } => Some((*seq, tablet.clone(), unix_millis(*at))),
            _ => None,
        })
        .collect();
    deliveries
        .chunks(DELIVERIES_PER_MESSAGE)
        .filter_map(|chunk| {
            let wire = WireDeliveries {
                stream: stream.to_owned(),
                kind: "delivered".into(),
                box_name: box_name.to_owned(),
                deliveries: chunk.to_vec(),
            };
            serde_json::to_string(&wire).ok()
        })
        .collect()
}

/// The receipt events of one receipts message of the stream `stream`: an ack or a close, or
/// the deliveries of another box than `own_box` (its own are applied and stored already).
pub fn decode_receipts(stream: &str, own_box: &str, body: &[u8]) -> Vec<ReceiptEvent> {
    let Ok(wire) = serde_json::from_slice::<WireDeliveries>(body) else {
        return decode_receipt(stream, body).into_iter().collect();
    };
    if wire.stream != stream || wire.kind != "delivered" || wire.box_name == own_box {
        return Vec::new();
    }
    let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
    wire.deliveries
        .into_iter()
        .map(|(seq, tablet, ms)| ReceiptEvent::Delivered { seq, tablet, at: at(ms) })
        .collect()
}

/// `event` as published to the receipts stream, with its message id (the same for a retry of
/// the same ack or close, so JetStream stores it once); `None` for an event that stays local.
pub fn encode_receipt(stream: &str, event: &ReceiptEvent) -> Option<(String, String)> {
    let (kind, seq, at, tablet, detail) = match event {
        ReceiptEvent::Acked { seq, tablet, at } => ("acked", *seq, *at, Some(tablet.clone()), None),
        ReceiptEvent::Closed { seq, at, detail } => ("closed", *seq, *at, None, detail.clone()),
        _ => return None,
    };
    let id = match &tablet {
        Some(tablet) => format!("{stream}-{kind}-{seq}-{tablet}"),
        None => format!("{stream}-{kind}-{seq}"),
    };
    let wire = WireReceipt {
        stream: stream.to_owned(),
        kind: kind.to_owned(),
        seq,
        at_ms: unix_millis(at),
        tablet,
        detail,
    };
    Some((id, serde_json::to_string(&wire).ok()?))
}

/// A receipt event read from the receipts stream, if it is one of the stream `stream`.
pub fn decode_receipt(stream: &str, body: &[u8]) -> Option<ReceiptEvent> {
    let wire: WireReceipt = serde_json::from_slice(body).ok()?;
    if wire.stream != stream {
        return None;
    }
    let at = UNIX_EPOCH + Duration::from_millis(wire.at_ms);
    match (wire.kind.as_str(), wire.tablet) {
        ("acked", Some(tablet)) => Some(ReceiptEvent::Acked { seq: wire.seq, tablet, at }),
        ("closed", _) => Some(ReceiptEvent::Closed { seq: wire.seq, at, detail: wire.detail }),
        _ => None,
    }
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
    fn acks_and_closes_cross_the_engine_as_they_were_and_only_for_their_stream() {
        let at = UNIX_EPOCH + Duration::from_millis(1_764_000_000_500);
        let ack = ReceiptEvent::Acked { seq: 4, tablet: "tablet-1".into(), at };
        let close = ReceiptEvent::Closed { seq: 4, at, detail: Some(r#"{"motivo":"x"}"#.into()) };
        for event in [ack, close] {
            assert!(is_cluster_wide(&event));
            let (id, body) = encode_receipt("s1", &event).unwrap();
            assert!(id.starts_with("s1-"), "{id}");
            assert_eq!(encode_receipt("s1", &event).unwrap().0, id, "a retry has the same id");
            assert_eq!(decode_receipt("s1", body.as_bytes()), Some(event));
            assert_eq!(decode_receipt("s2", body.as_bytes()), None);
        }
        let queued = ReceiptEvent::Queued { seq: 4, clients: 2 };
        assert!(!is_cluster_wide(&queued) && encode_receipt("s1", &queued).is_none());
        assert_eq!(decode_receipt("s1", b"garbage"), None);
    }

    #[test]
    fn deliveries_cross_the_engine_in_batches_to_the_other_boxes() {
        let at = UNIX_EPOCH + Duration::from_millis(1_764_000_000_500);
        let delivered = |seq| ReceiptEvent::Delivered { seq, tablet: format!("tablet-{seq}"), at };
        let mut events: Vec<ReceiptEvent> = (1..=DELIVERIES_PER_MESSAGE as u64 + 1).map(delivered).collect();
        events.push(ReceiptEvent::Queued { seq: 1, clients: 2 });
        let messages = encode_deliveries("s1", "a", &events);
        assert_eq!(messages.len(), 2);
        let decoded: Vec<ReceiptEvent> =
            messages.iter().flat_map(|body| decode_receipts("s1", "b", body.as_bytes())).collect();
        assert_eq!(decoded, events[..events.len() - 1]);
        assert!(decode_receipts("s1", "a", messages[0].as_bytes()).is_empty(), "its own box skips it");
        assert!(decode_receipts("s2", "b", messages[0].as_bytes()).is_empty());
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
