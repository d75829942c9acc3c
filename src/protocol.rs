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
    /// The still-open emergencies sent first, oldest first, before the replay and live ones.
    pub open: Vec<u64>,
    pub ping_interval_ms: u128,
    pub pong_timeout_ms: u128,
}

/// The answer to a client's `ping` text.
pub const PONG: &str = r#"{"type":"pong"}"#;

/// The heartbeat an SSE client is sent (it cannot send pings of its own).
pub const PING: &str = r#"{"type":"ping"}"#;

/// An SSE client's position (`Last-Event-ID`, or `since`) belongs to another history
/// (`stream_changed`) or is ahead of this server's last seq (`ahead`): sent before the welcome,
/// whose `replay` says the same.
#[derive(Serialize)]
pub struct ResetNotice<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub reason: &'static str,
    pub since: u64,
    /// This server's history, which the client now follows.
    pub stream: &'a str,
}

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
    /// Tablets it was written to in full, and tablets that acked it, as of the reply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acked: Option<usize>,
    /// Present, and true, only when the publish was a retry of the emergency already stored as
    /// `seq` under the same idempotency key: nothing new was stored or broadcast.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
}

impl PublishReply<'_> {
    pub fn accepted(stream: &str, seq: u64, queued_to: usize, counts: Counts, duplicate: bool) -> String {
        let reply = PublishReply {
            ok: true,
            stream: Some(stream),
            seq: Some(seq),
            queued_to: Some(queued_to),
            delivered: Some(counts.delivered),
            acked: Some(counts.acked),
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
        delivered: None,
        acked: None,
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
    pub tablets: TabletSummary,
    /// Why the status is `degraded`: fewer clients than `--min-subscribers`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Cluster mode: the engine's state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineHealth>,
    pub client_list: Vec<ClientInfo>,
}

/// `/healthz`'s `engine` in cluster mode.
#[derive(Serialize, Debug, Clone)]
pub struct EngineHealth {
    /// `connected` or `disconnected` (then `/healthz` is 503).
    pub state: &'static str,
    #[serde(rename = "box")]
    pub box_name: String,
    pub servers: Vec<String>,
    pub stream: String,
    /// The stream identity bound, once it is.
    pub stream_id: Option<String>,
    /// The last seq this box took from the stream.
    pub last_seq: u64,
    pub publish_failures: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// `/healthz`'s summary of the roster: named tablets expected (the subscribe tokens' names) and
/// how many of them are connected.
#[derive(Serialize, Debug, Clone, Copy)]
pub struct TabletSummary {
    pub expected: usize,
    pub connected: usize,
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

/// How many tablets were written an emergency in full, and how many acked it.
#[derive(Serialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub delivered: usize,
    pub acked: usize,
}

/// `{"type":"ack",...}`: a tablet's first ack of an emergency, to every client.
#[derive(Serialize)]
pub struct AckNotice<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub seq: u64,
    pub by: &'a str,
    pub acked: usize,
    pub delivered: usize,
    pub at: String,
}

/// `{"type":"unacked",...}`: nobody acked within `--ack-timeout`, to every client.
#[derive(Serialize)]
pub struct UnackedNotice {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub seq: u64,
    pub ack_timeout_s: f64,
    pub delivered: usize,
    pub at: String,
}

/// `{"type":"closed",...}`: a publisher closed an emergency, to every client.
#[derive(Serialize)]
pub struct ClosedNotice<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub seq: u64,
    pub at: String,
    pub close: Option<&'a RawValue>,
}

/// One emergency's status: in `GET /emergencias/{seq}` (with `timeline`) and, as
/// `{"type":"status",...}` without it, after a connection's welcome and replay.
#[derive(Serialize)]
pub struct Status<'a> {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub seq: u64,
    pub queued_to: usize,
    pub delivered: usize,
    pub acked: usize,
    pub acked_by: Vec<&'a str>,
    pub closed: bool,
    pub closed_at: Option<String>,
    pub close: Option<&'a RawValue>,
    pub escalated: bool,
    pub escalated_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeline: Option<Vec<TimelineEntry<'a>>>,
}

/// One tablet's receipt of an emergency, in `GET /emergencias/{seq}`.
#[derive(Serialize)]
pub struct TimelineEntry<'a> {
    pub tablet: &'a str,
    pub delivered_at: Option<String>,
    pub acked_at: Option<String>,
}

/// `GET /emergencias/{seq}`: the stored envelope and its status.
#[derive(Serialize)]
pub struct EmergencyStatus<'a> {
    pub emergency: &'a RawValue,
    pub status: Status<'a>,
}

/// The answer to `POST /emergencias/{seq}/ack`.
#[derive(Serialize)]
pub struct AckReply {
    pub ok: bool,
    pub seq: u64,
    pub acked: usize,
    pub delivered: usize,
    pub duplicate: bool,
}

/// The answer to a close, over HTTP or the Unix socket.
#[derive(Serialize)]
pub struct CloseReply {
    pub ok: bool,
    pub seq: u64,
    pub closed: bool,
    pub already_closed: bool,
}

/// `GET /tablets`.
#[derive(Serialize)]
pub struct Tablets {
    pub tablets: Vec<TabletInfo>,
    pub unnamed_connections: usize,
    pub min_subscribers: Option<usize>,
}

/// One named tablet in `GET /tablets`.
#[derive(Serialize, Debug)]
pub struct TabletInfo {
    pub name: String,
    pub connected: bool,
    pub connections: usize,
    pub connected_since: Option<String>,
    pub last_heard: Option<String>,
    pub last_delivered_seq: Option<u64>,
    pub last_acked_seq: Option<u64>,
}

/// An RFC 3339 timestamp, as every message carries them.
pub fn timestamp(time: SystemTime) -> String {
    rfc3339_millis(time)
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
