//! Every JSON message the server writes, in one place: the wire protocol that clients rely on.
//!
//! Clients must ignore fields and message `type`s they do not know; that rule is how the protocol
//! grows (acks, per-tablet status) without breaking deployed tablets.

use std::time::SystemTime;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::support::timestamp::rfc3339_millis;

/// The first text frame on every WebSocket connection.
pub const WELCOME_MESSAGE: &str = "Conectado! listo para recibir emergencias";

/// Which ingest path accepted an emergency.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Http,
    Unix,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Http => "http",
            Source::Unix => "unix",
        }
    }
}

/// The most an envelope adds around its `data`: `{"type":"emergencia","seq":...,"data":}`.
const ENVELOPE_MEMBERS_BYTES: usize = 128;

/// Serializes one emergency's envelope, once; clients and history share the result. Sized up
/// front: grown by doubling, a large emergency's envelope would hold up to twice its size.
pub fn envelope_json(seq: u64, received_at: SystemTime, source: Source, data: &RawValue) -> String {
    let received_at = rfc3339_millis(received_at);
    let envelope = EmergencyEnvelope { kind: "emergencia", seq, received_at: &received_at, source, data };
    let mut json = Vec::with_capacity(data.get().len() + ENVELOPE_MEMBERS_BYTES);
    serde_json::to_writer(&mut json, &envelope)
        .unwrap_or_else(|_| unreachable!("an envelope always serializes"));
    String::from_utf8(json).unwrap_or_else(|_| unreachable!("serde_json writes UTF-8"))
}

/// One emergency as pushed to tablets and stored in history: `{"type":"emergencia",...}`.
#[derive(Serialize)]
struct EmergencyEnvelope<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub seq: u64,
    pub received_at: &'a str,
    pub source: Source,
    /// The submitted JSON object, byte for byte.
    pub data: &'a RawValue,
}

/// The retained history: seqs `first_seq..=last_seq`; empty when `count` is 0.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryRange {
    pub first_seq: u64,
    pub last_seq: u64,
    pub count: usize,
}

/// What a `?since=N` connection or poll gets replayed.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayInfo {
    /// The `since` the client asked for.
    pub since: u64,
    /// Emergencies replayed before live ones.
    pub count: usize,
    /// Emergencies after `since` that are no longer retained: the client cannot get them here.
    pub missed: u64,
    /// `since` was ahead of this server's last seq (the server restarted): everything retained
    /// is replayed.
    pub reset: bool,
    /// The client's `stream` is not this server's history (data dir wiped, another box):
    /// everything retained is replayed, and the client's seqs mean nothing here.
    pub stream_changed: bool,
}

/// The welcome frame: `{"type":"connection",...}`.
#[derive(Serialize)]
pub struct Welcome {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub message: &'static str,
    /// Server-assigned id of this connection, as it appears in the server's logs.
    pub client_id: u64,
    /// The identity of this history; send it back as `&stream=` when resuming.
    pub stream: String,
    /// The last seq assigned so far (0 before the first emergency).
    pub seq: u64,
    pub history: HistoryRange,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay: Option<ReplayInfo>,
    pub ping_interval_ms: u128,
    pub pong_timeout_ms: u128,
}

/// The answer to a client's `ping` text.
pub const PONG: &str = r#"{"type":"pong"}"#;

/// The answer to one publish, on either ingest path.
#[derive(Serialize, Debug)]
pub struct PublishReply<'a> {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// How many connected clients this publish told of the emergency (those not dropped as too
    /// slow); 0 for a duplicate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queued_to: Option<usize>,
    /// Present, and true, only when the publish was a retry of the emergency already stored as
    /// `seq` under the same idempotency key: nothing new was stored or broadcast.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
}

impl PublishReply<'_> {
    pub fn accepted(stream: &str, seq: u64, queued_to: usize, duplicate: bool) -> String {
        let reply = PublishReply {
            ok: true,
            stream: Some(stream),
            seq: Some(seq),
            queued_to: Some(queued_to),
            duplicate,
            error: None,
        };
        to_json(&reply)
    }
}

/// An error body or line: `{"ok":false,"error":"..."}`.
pub fn error_json(message: &str) -> String {
    let reply = PublishReply {
        ok: false,
        stream: None,
        seq: None,
        queued_to: None,
        duplicate: false,
        error: Some(message),
    };
    to_json(&reply)
}

/// `GET /healthz`.
#[derive(Serialize)]
pub struct Health<'a> {
    /// `ok`, or `failing` when storage fails (answered with 503).
    pub status: &'static str,
    pub version: &'static str,
    pub uptime_s: u64,
    pub started_at: String,
    pub storage: StorageHealth,
    pub stream: &'a str,
    pub clients: usize,
    pub seq: u64,
    pub history: HistoryRange,
    pub client_list: Vec<ClientInfo>,
}

/// Whether emergencies can be stored, in `/healthz`.
#[derive(Serialize, Debug)]
pub struct StorageHealth {
    /// `ok`, `failing` or `in_memory`.
    pub state: &'static str,
    /// While failing: when the failures began, their cause and the latest error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// One connected client in `/healthz`.
#[derive(Serialize, Debug)]
pub struct ClientInfo {
    pub client_id: u64,
    /// The name of its token, when subscribe tokens are configured.
    pub name: Option<String>,
    pub peer: String,
    pub connected_at: String,
    /// Emergencies published that it has not been sent yet.
    pub queued: u64,
}

/// Serializes one of the types above. They hold only strings, numbers and already-valid raw
/// JSON, for which serde_json cannot fail.
pub fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| unreachable!("protocol types always serialize"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_is_allocated_once_at_its_size() {
        let data = RawValue::from_string(format!(r#"{{"pad":"{}"}}"#, "p".repeat(60_000))).unwrap();
        let envelope = envelope_json(u64::MAX, SystemTime::now(), Source::Http, &data);
        assert!(envelope.ends_with(&format!(r#""data":{}}}"#, data.get())), "{}", &envelope[..120]);
        assert_eq!(envelope.capacity(), data.get().len() + ENVELOPE_MEMBERS_BYTES, "it grew");
    }
}
