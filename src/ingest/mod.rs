//! The publish path that every ingest transport (HTTP POST, the Unix socket) and the journal's
//! delivery share: checking a submission, storing it, and handing it to the hub.
//!
//! A submission is accepted only if it is one JSON object within the size limit, in the JSON that
//! strict parsers take (`strict`); anything else is rejected with a precise message and nothing is
//! published. Its idempotency key, if it has one
//! (a top-level `"idempotency_key"` member, or the HTTP header), goes with it to wherever its seq
//! is assigned, which decides whether it is new, a retry, or a conflicting reuse of the key. Every
//! new emergency reaches the hub through `Publisher::hand_over`: wait for room in the fan-out,
//! deliver, count; a retry never does.
//!
//! What publishes hold in flight is bounded by `--max-inflight-bytes` (`Publisher::reserve`), and
//! a submission's bytes become the stored object without a copy when they are exactly the object.

pub mod escalation;
mod strict;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use async_channel::{Receiver, Sender};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::core::handle::Ingress;
use crate::core::hub::Refusal;
use crate::core::idempotency::{BodyDigest, Fingerprint, IdempotencyKey};
use crate::core::receipts::{AckRequest, CloseRequest};
use crate::core::receipts::{Applied, ReceiptEvent};
use crate::core::{Outcome, Receipt, Stored};
use crate::protocol::{Counts, PublishReply, Source};
use crate::runtime::budget::{ByteBudget, Reservation};
use crate::runtime::scheduler::FanOut;
use crate::store::engine::{EngineError, EngineReply, Publication, is_cluster_wide, unix_millis};
use crate::store::journal::{Cached, Committed, FailureCause, Journal, StorageError};
use crate::store::{ClusterOnly, Engine, in_cluster};
use crate::support::metrics::Metrics;

/// The member of an emergency that holds its idempotency key.
pub const KEY_MEMBER: &str = "idempotency_key";
/// Longest a publish waits for room in `--max-inflight-bytes` before it is refused as busy: a
/// commit frees its share in milliseconds, so a longer wait means the disk does not keep up.
pub const INFLIGHT_WAIT: Duration = Duration::from_secs(2);
/// Longest an HTTP ack or a close waits for its commit before it is answered "storage failed"
/// (the event stays queued and is stored by a later commit: a retry is answered from it).
pub const RECORD_WAIT: Duration = Duration::from_secs(5);
/// Deliveries are held for the journal at most this long, riding with the next ack, close or
/// escalation if one comes first: a fan-out to every tablet is one transaction, not one per
/// tablet. A `kill -9` loses at most this much of delivery marks (never an ack).
pub const DELIVERY_FLUSH: Duration = Duration::from_millis(500);
/// Deliveries held at most: past it they go to the journal at once.
pub const MAX_HELD_DELIVERIES: usize = 16 * 1024;
/// Cluster mode: batches of acks and closes the engine refused, waiting to be asked for again
/// (`Publisher::abandon_refused_receipts`); past it one is dropped, and stays pending until
/// the tablet's retry finds it so, which only a restart clears.
const REFUSED_RECEIPTS: usize = 256;

/// Receipt events the engine did not commit, and why.
type RefusedReceipts = (Vec<ReceiptEvent>, String);

/// Why a submission was not published. `Display` gives the message sent back to the publisher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// Nothing but whitespace.
    Empty,
    /// Longer than `--max-body-bytes`.
    TooLarge { limit: usize },
    /// Not valid JSON (serde_json's message says where), or a lone surrogate escape.
    InvalidJson(String),
    /// A number beyond a double's range, and where.
    NumberOutOfRange(String),
    /// Valid JSON, but not an object.
    NotAnObject,
    /// The `"idempotency_key"` member is not a valid key.
    InvalidKey(String),
    /// The `Idempotency-Key` header and the `"idempotency_key"` member name different keys.
    KeyMismatch,
    /// The key is already stored as seq `seq`, with another body.
    KeyConflict { seq: u64 },
    /// The server is shutting down and accepts nothing more.
    ShuttingDown,
    /// `journal::MAX_QUEUED` submissions are already waiting for the disk.
    StorageBusy,
    /// `--max-inflight-bytes` stayed spent for `INFLIGHT_WAIT`.
    Overloaded,
    /// Writing to the data dir failed; nothing was stored.
    StorageFailed(String),
    /// Cluster mode: the engine did not commit it (not connected, no ack within
    /// `--nats-timeout`), and why.
    EngineUnavailable(String),
    /// Cluster mode: sent to the engine, which did not answer (no ack within `--nats-timeout`):
    /// it may have stored it.
    EngineUncertain(String),
    /// Cluster mode: the engine committed it as `seq`, but this box's follower did not bring it
    /// back within `within`, so no tablet here can have it yet.
    NotFollowed { seq: u64, within: Duration },
}

impl Rejection {
    /// Whether the server, not the submission, is at fault: the publisher should retry.
    pub fn is_temporary(&self) -> bool {
        matches!(
            self,
            Rejection::ShuttingDown
                | Rejection::StorageBusy
                | Rejection::Overloaded
                | Rejection::StorageFailed(_)
                | Rejection::EngineUnavailable(_)
                | Rejection::EngineUncertain(_)
                | Rejection::NotFollowed { .. }
        )
    }

    /// The reason's name in metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Rejection::Empty => "empty",
            Rejection::TooLarge { .. } => "too_large",
            Rejection::InvalidJson(_) | Rejection::NumberOutOfRange(_) => "invalid_json",
            Rejection::NotAnObject => "not_an_object",
            Rejection::InvalidKey(_) => "invalid_key",
            Rejection::KeyMismatch => "key_mismatch",
            Rejection::KeyConflict { .. } => "key_conflict",
            Rejection::ShuttingDown => "shutting_down",
            Rejection::StorageBusy => "storage_busy",
            Rejection::Overloaded => "busy",
            Rejection::StorageFailed(_) => "storage_failed",
            Rejection::EngineUnavailable(_) | Rejection::EngineUncertain(_) => "engine_unavailable",
            Rejection::NotFollowed { .. } => "not_followed",
        }
    }
}

impl From<StorageError> for Rejection {
    fn from(error: StorageError) -> Rejection {
        match error {
            StorageError::Busy => Rejection::StorageBusy,
            StorageError::Failed { detail, .. } => Rejection::StorageFailed(detail),
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Empty => f.write_str("empty body: send one JSON object"),
            Rejection::TooLarge { limit } => write!(f, "emergency larger than {limit} bytes"),
            Rejection::InvalidJson(detail) => write!(f, "invalid JSON: {detail}"),
            Rejection::NumberOutOfRange(detail) => write!(f, "number out of range: {detail}"),
            Rejection::NotAnObject => f.write_str("the emergency must be a JSON object"),
            Rejection::InvalidKey(detail) => write!(f, "invalid {KEY_MEMBER} member: {detail}"),
            Rejection::KeyMismatch => {
                write!(f, "the Idempotency-Key header and the {KEY_MEMBER} member name different keys")
            }
            Rejection::KeyConflict { seq } => write!(
                f,
                "idempotency key conflict: the key is already used by seq {seq}, with another body; \
                 nothing was stored"
            ),
            Rejection::ShuttingDown => f.write_str("server shutting down: publish again after it restarts"),
            Rejection::StorageBusy => f.write_str("storage busy: publish again shortly"),
            Rejection::Overloaded => f.write_str(
                "server busy: --max-inflight-bytes of emergencies already in flight; publish again shortly",
            ),
            Rejection::StorageFailed(detail) => write!(f, "storage failed, nothing was stored: {detail}"),
            Rejection::EngineUnavailable(reason) => {
                write!(f, "engine unavailable: {reason}; nothing was stored")
            }
            Rejection::EngineUncertain(reason) => write!(
                f,
                "engine unavailable: {reason}; it may have been stored: retry with the same Idempotency-Key"
            ),
            Rejection::NotFollowed { seq, within } => write!(
                f,
                "engine unavailable: stored as seq {seq}, but this box has not received it back within \
                 {within:?}; publish again with the same idempotency key to be answered from it"
            ),
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
    if !value.get().starts_with('{') {
        return Err(Rejection::NotAnObject);
    }
    strict::check(value.get()).map_err(|problem| not_strict(bytes, problem))?;
    Ok(value)
}

/// The rejection of what strict parsers refuse, saying where in `bytes` (the object, perhaps with
/// whitespace around it) as serde_json does: line, and column in bytes.
fn not_strict(bytes: &[u8], problem: strict::NotStrict<'_>) -> Rejection {
    let leading = bytes.len() - bytes.trim_ascii_start().len();
    let place = |at: usize| {
        let before = &bytes[..(leading + at).min(bytes.len())];
        let line = before.iter().filter(|&&byte| byte == b'\n').count() + 1;
        let column = before.len() - before.iter().rposition(|&byte| byte == b'\n').map_or(0, |n| n + 1) + 1;
        format!("at line {line} column {column}")
    };
    match problem {
        strict::NotStrict::LoneSurrogate { escape, at } => {
            Rejection::InvalidJson(format!("lone surrogate {escape} {}", place(at)))
        }
        strict::NotStrict::NumberOutOfRange { number, at } => {
            let shown = match number.get(..40) {
                Some(start) if number.len() > 40 => format!("{start}..."),
                _ => number.to_owned(),
            };
            Rejection::NumberOutOfRange(format!("{shown} {}", place(at)))
        }
    }
}

/// A checked submission: the emergency, and its key with the digest of its body, if keyed.
#[derive(Debug)]
pub struct Submission<'a> {
    pub data: &'a RawValue,
    pub fingerprint: Option<Fingerprint>,
}

/// Checks a submission (see `parse_emergency`) and finds its idempotency key: `header`, or its
/// `"idempotency_key"` member, which stays in the emergency. Given both, they must agree.
pub fn parse_submission(
    bytes: &[u8],
    max_bytes: usize,
    header: Option<IdempotencyKey>,
) -> Result<Submission<'_>, Rejection> {
    let data = parse_emergency(bytes, max_bytes)?;
    let key = match (header, key_member(data)?) {
        (Some(header), Some(member)) if header != member => return Err(Rejection::KeyMismatch),
        (header, member) => header.or(member),
    };
    Ok(Submission { data, fingerprint: key.map(|key| Fingerprint::new(key, data.get())) })
}

/// Checks a submission (see `parse_submission`) and takes it as the object to store: its own
/// bytes when they are exactly the object, a copy of the object only when whitespace is around it.
pub fn owned_submission(
    bytes: Vec<u8>,
    max_bytes: usize,
    header: Option<IdempotencyKey>,
) -> Result<(Box<RawValue>, Option<Fingerprint>), Rejection> {
    let Submission { data, fingerprint } = parse_submission(&bytes, max_bytes, header)?;
    if data.get().len() != bytes.len() {
        return Ok((data.to_owned(), fingerprint));
    }
    let invalid = |detail: String| Rejection::InvalidJson(detail);
    let text = String::from_utf8(bytes).map_err(|e| invalid(e.to_string()))?;
    let data = RawValue::from_string(text).map_err(|e| invalid(e.to_string()))?;
    Ok((data, fingerprint))
}

/// The object's `"idempotency_key"` member, if it has one at its top level. Present, it must be
/// a valid key: `null` or a number is a mistake, not the absence of a key.
fn key_member(data: &RawValue) -> Result<Option<IdempotencyKey>, Rejection> {
    #[derive(Deserialize)]
    struct Member<'a> {
        #[serde(borrow, default, deserialize_with = "present")]
        idempotency_key: Option<&'a RawValue>,
    }
    fn present<'de, D: Deserializer<'de>>(value: D) -> Result<Option<&'de RawValue>, D::Error> {
        <&RawValue>::deserialize(value).map(Some)
    }
    // The name can only be written as itself or with `\u` escapes: without either in the text,
    // there is no such member, and most emergencies are spared a second parse.
    if !data.get().contains(KEY_MEMBER) && !data.get().contains("\\u") {
        return Ok(None);
    }
    let invalid = |detail: String| Rejection::InvalidKey(detail);
    let member: Member<'_> = serde_json::from_str(data.get()).map_err(|e| invalid(e.to_string()))?;
    let Some(raw) = member.idempotency_key else { return Ok(None) };
    let text: String = serde_json::from_str(raw.get()).map_err(|_| invalid("must be a string".into()))?;
    IdempotencyKey::parse(&text).map(Some).map_err(|e| invalid(e.to_string()))
}

/// What became of a close (`Publisher::close`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseOutcome {
    /// No such emergency retained.
    Unknown,
    /// Closed, now (`already` false: stored and broadcast) or before.
    Closed { already: bool },
}

/// What became of an ack that came without a connection (`Publisher::ack`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckOutcome {
    Unknown,
    Acked { duplicate: bool, counts: Counts },
}

/// A close command line on the Unix socket: `{"type":"cerrar","seq":N,...}`, the other members
/// kept as the close's detail. `None` when the line is not one (it is then an emergency).
pub fn parse_close_command(bytes: &[u8]) -> Option<Result<(u64, Option<String>), Rejection>> {
    // Most lines are emergencies: only those that could be a command are parsed twice.
    if !bytes.windows(8).any(|window| window == b"\"cerrar\"") {
        return None;
    }
    let mut object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(bytes).ok()?;
    if object.get("type").and_then(serde_json::Value::as_str) != Some("cerrar") {
        return None;
    }
    object.remove("type");
    let Some(seq) = object.remove("seq").and_then(|seq| seq.as_u64()) else {
        return Some(Err(Rejection::InvalidJson("a cerrar line needs \"seq\": a whole number".into())));
    };
    let detail = (!object.is_empty()).then(|| serde_json::Value::Object(object).to_string());
    Some(Ok((seq, detail)))
}

/// A close's optional body: a JSON object (kept as its text), or nothing.
pub fn parse_close_detail(body: &[u8]) -> Result<Option<String>, Rejection> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let object = parse_emergency(body, usize::MAX)?;
    Ok(Some(object.get().to_owned()))
}

/// What a publisher is told of a submission the history holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub seq: u64,
    /// Clients this submission was queued to: 0 for a duplicate, which queues nothing.
    pub queued_to: usize,
    /// A retry of the emergency already stored as `seq` under the same key and body.
    pub duplicate: bool,
}

impl Accepted {
    /// A decision as the publisher sees it: a conflict is a refusal.
    fn from_outcome(outcome: Outcome<Receipt>) -> Result<Accepted, Rejection> {
        match outcome {
            Outcome::New(Receipt { seq, queued_to }) => Ok(Accepted { seq, queued_to, duplicate: false }),
            Outcome::Duplicate { seq } => Ok(Accepted { seq, queued_to: 0, duplicate: true }),
            Outcome::Conflict { seq } => Err(Rejection::KeyConflict { seq }),
        }
    }
}

/// How the transports' log line of a publish names it: `published seq N`, or `duplicate of seq N`
/// for a retry, which published nothing.
impl std::fmt::Display for Accepted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.duplicate {
            write!(f, "duplicate of seq {}", self.seq)
        } else {
            write!(f, "published seq {}", self.seq)
        }
    }
}

/// What a submission does when `journal::MAX_QUEUED` are already waiting for the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenBusy {
    /// Refused as `Rejection::StorageBusy`: an HTTP request, which cannot be held indefinitely.
    Refuse,
    /// Waits for a place: a Unix publisher, which reads no more of its socket meanwhile, so that
    /// its own writes wait in the kernel (back-pressure) instead of its lines being refused.
    Wait,
}

/// A checked submission on its way into the history.
#[derive(Debug)]
pub enum Staged {
    /// In-memory history: decided (and if new, published) at once.
    Published(Outcome<Receipt>),
    /// Durable history: waiting for the journal to decide and commit it.
    Storing(Receiver<Result<Outcome<Receipt>, StorageError>>),
    /// Cluster mode: waiting for the engine's commit; with the submission's key and digest.
    Replicating(Receiver<EngineReply>, Option<Fingerprint>, ClusterOnly),
}

/// The one way into the history, shared by every ingest path.
pub struct Publisher {
    /// The one way into the hub.
    ingress: Ingress,
    /// Where accepted emergencies are committed before they are acknowledged; `None` when the
    /// history is in memory only.
    journal: Option<Journal>,
    /// Paces publishing to the sessions' fan-out (see `hand_over`).
    fan_out: Rc<FanOut>,
    pub(crate) metrics: Rc<Metrics>,
    /// `--max-body-bytes`.
    max_bytes: usize,
    /// `--max-inflight-bytes`: what publishes hold from their body's first byte to their answer.
    in_flight: Rc<ByteBudget>,
    /// Cleared when shutdown begins: from then on every submission is refused.
    accepting: Cell<bool>,
    /// Deliveries not yet sent to the journal (durable only): see `DELIVERY_FLUSH`.
    held_deliveries: RefCell<Vec<ReceiptEvent>>,
    /// Rung when the first delivery is held: the flush waits for it rather than ticking, so an
    /// idle server sleeps (BENCHMARKS.md, "the idle server's wake-ups").
    deliveries_held: (Sender<()>, Receiver<()>),
    /// Rung when an emergency is added to the hub: escalation sleeps until the next deadline, or
    /// until this when it has none, rather than ticking (`escalation::run`).
    emergency_added: (Sender<()>, Receiver<()>),
    /// Cluster mode: the engine and what the publisher keeps for it.
    cluster: Option<Cluster>,
    /// Cluster mode: publishes the engine did not take, for `/metrics`.
    engine_failures: Cell<u64>,
}

/// Cluster mode: the engine, which assigns the seqs (the journal is then its cache), and what
/// the publisher keeps for it. It cannot be made in the edge build, whose `Engine` cannot.
struct Cluster {
    engine: Engine,
    /// Publishers whose emergency the engine committed, by seq, waiting for this box's
    /// follower to bring it into the hub (as many as `--max-inflight-bytes` lets in).
    followers: RefCell<BTreeMap<u64, Vec<Sender<usize>>>>,
    /// Numbers the message ids of publishes without an idempotency key.
    unkeyed: Cell<u64>,
    /// Acks and closes (from sessions, which do not wait) that the engine refused.
    refused_receipts: (Sender<RefusedReceipts>, Receiver<RefusedReceipts>),
}

impl Drop for Cluster {
    /// Nothing to do, but in the edge build a point never reached: an `Option<Cluster>` keeps
    /// its `Some` there (a `Cluster` is not zero-sized), and this is what leaves the code that
    /// would drop its fields out of the binary.
    fn drop(&mut self) {
        Engine::cluster_only(&self.engine);
    }
}

impl Cluster {
    /// Answers the publishers waiting for `receipt`'s seq, and any waiting for an earlier one
    /// (a seq the stream no longer has: queued to nobody here).
    fn wake_followers(&self, receipt: Receipt) {
        let mut followers = self.followers.borrow_mut();
        if followers.first_key_value().is_none_or(|(&first, _)| first > receipt.seq) {
            return;
        }
        let later = followers.split_off(&(receipt.seq + 1));
        for (seq, waiting) in std::mem::replace(&mut *followers, later) {
            let queued_to = if seq == receipt.seq { receipt.queued_to } else { 0 };
            for sender in waiting {
                let _ = sender.try_send(queued_to);
            }
        }
    }
}

impl Publisher {
    pub fn new(
        ingress: Ingress,
        journal: Option<Journal>,
        fan_out: Rc<FanOut>,
        metrics: Rc<Metrics>,
        max_bytes: usize,
        max_inflight_bytes: usize,
    ) -> Publisher {
        let in_flight = ByteBudget::new(max_inflight_bytes);
        Publisher {
            ingress,
            journal,
            fan_out,
            metrics,
            max_bytes,
            in_flight,
            accepting: Cell::new(true),
            held_deliveries: RefCell::default(),
            deliveries_held: async_channel::bounded(1),
            emergency_added: async_channel::bounded(1),
            cluster: None,
            engine_failures: Cell::new(0),
        }
    }

    /// Cluster mode: publishes go to `engine`, and the journal is its cache.
    pub fn with_engine(self, engine: Engine) -> Publisher {
        let cluster = Cluster {
            engine,
            followers: RefCell::default(),
            unkeyed: Cell::new(0),
            refused_receipts: async_channel::bounded(REFUSED_RECEIPTS),
        };
        Publisher { cluster: Some(cluster), ..self }
    }

    /// Cluster mode's engine and state. Never any in a build without the cargo feature
    /// `cluster`, as the compiler sees: every cluster path behind it is left out of the edge
    /// binary (an `.await` behind it goes through `ClusterOnly::run`, or its states stay).
    fn cluster(&self) -> Option<&Cluster> {
        if cfg!(feature = "cluster") { self.cluster.as_ref() } else { None }
    }

    /// Cluster mode's engine (`cluster`).
    pub fn engine(&self) -> Option<&Engine> {
        self.cluster().map(|cluster| &cluster.engine)
    }

    /// Publishes the engine did not take.
    pub fn engine_failures(&self) -> u64 {
        self.engine_failures.get()
    }

    /// Takes `bytes` of `--max-inflight-bytes` for a publish about to hold them (a body about
    /// to be read, lines about to be staged), waiting behind earlier ones until `until` or for
    /// `INFLIGHT_WAIT`, whichever is sooner. Dropping the reservation gives them back.
    pub async fn reserve(&self, bytes: usize, until: Instant) -> Result<Reservation, Rejection> {
        let until = until.min(Instant::now() + INFLIGHT_WAIT);
        self.in_flight.reserve(bytes, until).await.ok_or(Rejection::Overloaded)
    }

    /// The first step of shutdown: every submission from now on is refused as
    /// `Rejection::ShuttingDown`, and the journal commits what it has queued and stops, so that
    /// `deliver_committed` ends once everything accepted is in the hub.
    pub fn stop_accepting(&self) {
        self.accepting.set(false);
        self.flush_deliveries();
        if let Some(journal) = &self.journal {
            journal.close();
        }
    }

    /// The hub it publishes to, for what reads or marks receipts (escalation).
    pub fn hub(&self) -> &crate::core::handle::HubHandle {
        self.ingress.hub()
    }

    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    /// Checks a submission and hands it to the history: to the hub at once when the history is
    /// in memory (after waiting for room), to the journal when it is durable. The journal's path
    /// does not wait for the commit, so a publisher can stage a burst of lines and have them
    /// committed together; it waits only for a place in the queue, and only if `when_busy` says
    /// so. `key` is the one the transport was given beside the body (the HTTP header).
    pub async fn stage(
        &self,
        bytes: Vec<u8>,
        source: Source,
        key: Option<IdempotencyKey>,
        when_busy: WhenBusy,
    ) -> Result<Staged, Rejection> {
        let (data, fingerprint) = owned_submission(bytes, self.max_bytes, key)?;
        if !self.accepting.get() {
            return Err(Rejection::ShuttingDown);
        }
        if let Some(cluster) = self.cluster() {
            let replicating = self.replicate(cluster, data, source, fingerprint, when_busy);
            return in_cluster(replicating, cluster.engine.cluster_only()).await;
        }
        match &self.journal {
            Some(journal) => {
                let place = match (journal.try_place(), when_busy) {
                    (Ok(place), _) => place,
                    (Err(_), WhenBusy::Wait) => journal.place().await,
                    (Err(busy), WhenBusy::Refuse) => return Err(self.refused_by_storage(busy)),
                };
                // Shutdown may have begun while it waited.
                if !self.accepting.get() {
                    return Err(Rejection::ShuttingDown);
                }
                match journal.append(place, data, source, fingerprint) {
                    Ok(outcome) => Ok(Staged::Storing(outcome)),
                    Err(error) => Err(self.refused_by_storage(error)),
                }
            }
            None => {
                let published = self.hand_over(|ingress| ingress.publish(&data, source, fingerprint)).await;
                published.map(Staged::Published).map_err(|_: Refusal| Rejection::ShuttingDown)
            }
        }
    }

    /// Cluster mode: hands the submission to the engine, with its key as the message id (so a
    /// retry through any box is stored once), or a fresh one; when `--nats-queue` publishes
    /// already wait, waits for room or is refused, as `when_busy` says.
    async fn replicate(
        &self,
        cluster: &Cluster,
        data: Box<RawValue>,
        source: Source,
        fingerprint: Option<Fingerprint>,
        when_busy: WhenBusy,
    ) -> Result<Staged, Rejection> {
        let engine = &cluster.engine;
        let message_id = match &fingerprint {
            Some(fingerprint) => fingerprint.key.as_str().to_owned(),
            None => {
                cluster.unkeyed.set(cluster.unkeyed.get() + 1);
                let started = unix_millis(self.metrics.started_at());
                format!("{}-{started}-{}", engine.box_name(), cluster.unkeyed.get())
            }
        };
        let data = String::from(Box::<str>::from(data));
        let publication =
            Publication { message_id, received_at_ms: unix_millis(SystemTime::now()), source, data };
        let acked = match when_busy {
            WhenBusy::Refuse => engine.publish(publication),
            WhenBusy::Wait => engine.publish_when_room(publication).await,
        };
        let acked = acked.map_err(|reason| self.engine_failed(reason))?;
        Ok(Staged::Replicating(acked, fingerprint, engine.cluster_only()))
    }

    fn engine_failed(&self, reason: String) -> Rejection {
        self.engine_failures.set(self.engine_failures.get() + 1);
        Rejection::EngineUnavailable(reason)
    }

    /// Cluster mode: waits for the engine's commit, then for this box's hub to have it. A
    /// duplicate (the engine knew its message id, the key) whose stored object differs is a
    /// conflict, as on one box; one that left this box's history is taken as a retry.
    async fn replicated(
        &self,
        cluster: &Cluster,
        acked: Receiver<EngineReply>,
        fingerprint: Option<Fingerprint>,
    ) -> Result<Outcome<Receipt>, Rejection> {
        let acked = match acked.recv().await {
            Ok(Ok(acked)) => acked,
            Ok(Err(EngineError { reason, maybe_stored: false })) => return Err(self.engine_failed(reason)),
            Ok(Err(EngineError { reason, maybe_stored: true })) => {
                self.engine_failures.set(self.engine_failures.get() + 1);
                return Err(Rejection::EngineUncertain(reason));
            }
            Err(_) => return Err(self.engine_failed("the nats thread has stopped".into())),
        };
        let queued_to = self.followed(cluster, acked.seq).await?;
        if !acked.duplicate {
            return Ok(Outcome::New(Receipt { seq: acked.seq, queued_to }));
        }
        let stored = self.hub().with(|hub| hub.published_data(acked.seq).map(BodyDigest::of));
        Ok(match (fingerprint, stored) {
            (Some(fingerprint), Some(stored)) => fingerprint.against(acked.seq, &stored),
            _ => Outcome::Duplicate { seq: acked.seq },
        })
    }

    /// Waits until the follower has brought `seq` into the hub: the clients it was queued to.
    async fn followed(&self, cluster: &Cluster, seq: u64) -> Result<usize, Rejection> {
        let within = cluster.engine.timeout();
        let known = self.hub().with(|hub| (hub.last_seq() >= seq).then(|| hub.queued_to(seq)));
        if let Some(queued_to) = known {
            return Ok(queued_to.unwrap_or(0));
        }
        let (sender, receiver) = async_channel::bounded(1);
        cluster.followers.borrow_mut().entry(seq).or_default().push(sender);
        match crate::runtime::deadline::within(within, receiver.recv()).await {
            Ok(Ok(queued_to)) => Ok(queued_to),
            // The stream was recreated meanwhile: the seq it was stored as is gone with it.
            Ok(Err(_)) => Err(self.engine_failed(format!("the stream was recreated after seq {seq}"))),
            Err(_) => Err(Rejection::NotFollowed { seq, within }),
        }
    }

    /// Waits until a staged submission is accepted (committed and broadcast, or found to be a
    /// retry of one that was) or refused.
    pub async fn settle(&self, staged: Staged, source: Source) -> Result<Accepted, Rejection> {
        let outcome = match staged {
            Staged::Published(outcome) => Ok(outcome),
            Staged::Storing(outcome) => match outcome.recv().await {
                Ok(outcome) => outcome.map_err(|error| self.refused_by_storage(error)),
                Err(_) => Err(self.refused_by_storage(StorageError::Failed {
                    cause: FailureCause::Stopped,
                    detail: "the storage thread stopped".into(),
                })),
            },
            Staged::Replicating(acked, fingerprint, only) => match self.cluster() {
                Some(cluster) => in_cluster(self.replicated(cluster, acked, fingerprint), only).await,
                // Only `replicate` makes one, with the engine.
                None => Err(self.engine_failed("not in cluster mode".into())),
            },
        };
        let accepted = outcome.and_then(Accepted::from_outcome);
        match accepted {
            Ok(Accepted { duplicate: false, .. }) => {
                self.metrics.count("resq_push_published_total", source.label())
            }
            Ok(Accepted { duplicate: true, .. }) => {
                self.metrics.count("resq_push_duplicates_total", source.label())
            }
            Err(_) => {}
        }
        accepted
    }

    /// Counts a submission that storage did not take, by cause, and says why to its publisher.
    fn refused_by_storage(&self, error: StorageError) -> Rejection {
        self.metrics.count("resq_push_storage_failures_total", error.cause().label());
        Rejection::from(error)
    }

    /// The reply to an accepted submission, on either ingest path.
    pub fn reply(&self, accepted: Accepted) -> String {
        let Accepted { seq, queued_to, duplicate } = accepted;
        self.ingress
            .hub()
            .with(|hub| PublishReply::accepted(hub.stream_id(), seq, queued_to, hub.counts(seq), duplicate))
    }

    /// Stores receipt events and then applies them to the hub, which broadcasts what they
    /// change: durably, in the journal's next transaction (the broadcast follows the commit);
    /// in memory, at once. Does not wait.
    /// Deliveries are held (`DELIVERY_FLUSH`) and go with the next other event.
    /// In cluster mode acks and closes go to the engine first, and come back to the journal
    /// once it has them (`Engine::publish_receipts`).
    pub fn record(&self, events: Vec<ReceiptEvent>) {
        let (wide, events) = self.cluster_wide(events);
        if let (Some(cluster), false) = (self.cluster(), wide.is_empty())
            && let Err((events, reason)) =
                cluster.engine.publish_receipts(wide, None, cluster.refused_receipts.0.clone())
        {
            self.receipts_refused(&events, &reason);
        }
        if events.is_empty() {
            return;
        }
        let Some(journal) = &self.journal else { return self.apply(events) };
        if events.iter().all(ReceiptEvent::is_held) {
            let mut held = self.held_deliveries.borrow_mut();
            if held.is_empty() {
                // Full means a flush is already due.
                let _ = self.deliveries_held.0.try_send(());
            }
            held.extend(events);
            if held.len() < MAX_HELD_DELIVERIES {
                return;
            }
            drop(held);
            return self.flush_deliveries();
        }
        let asked_for = events.clone();
        if let Err(error) = journal.record(self.with_held_deliveries(events), None) {
            self.log_not_stored("receipts", &error);
            self.abandon(&asked_for);
        }
    }

    /// Cluster mode: the acks and closes among `events` (those every box applies), and the rest.
    fn cluster_wide(&self, events: Vec<ReceiptEvent>) -> (Vec<ReceiptEvent>, Vec<ReceiptEvent>) {
        match self.engine() {
            Some(_) => events.into_iter().partition(is_cluster_wide),
            None => (Vec::new(), events),
        }
    }

    fn receipts_refused(&self, events: &[ReceiptEvent], reason: &str) {
        let seqs: Vec<u64> = events.iter().map(ReceiptEvent::seq).collect();
        log::warn!("acks or closes of seqs {seqs:?} not committed by the engine ({reason}): asked for again");
        self.engine_failures.set(self.engine_failures.get() + 1);
        self.abandon(events);
    }

    /// Cluster mode: clears what the engine refused of the sessions' acks, so that a tablet's
    /// retry counts; runs as long as the server.
    pub async fn abandon_refused_receipts(&self) {
        let Some(cluster) = self.cluster() else { return };
        while let Ok((events, reason)) = cluster.refused_receipts.1.recv().await {
            self.receipts_refused(&events, &reason);
        }
    }

    /// Cluster mode: commits acks and closes in the engine, then waits until they are stored
    /// and applied here, for at most `limit` (else `--nats-timeout` twice).
    async fn record_in_cluster(
        &self,
        engine: &Engine,
        events: Vec<ReceiptEvent>,
        limit: Option<Duration>,
    ) -> Result<(), Rejection> {
        let (done, applied) = async_channel::bounded(1);
        let (refused, refusal) = async_channel::bounded(1);
        if let Err((events, reason)) = engine.publish_receipts(events, Some(done), refused) {
            self.receipts_refused(&events, &reason);
            return Err(Rejection::EngineUnavailable(reason));
        }
        // Once committed, `applied` answers and `refused` is dropped unused; refused, the
        // reason is sent before `done` is dropped, so it is there once `applied` ends.
        let answer = async {
            match applied.recv().await {
                Ok(()) => Ok(()),
                Err(_) => Err(refusal.recv().await.ok()),
            }
        };
        let limit = limit.unwrap_or(engine.timeout() * 2);
        match crate::runtime::deadline::within(limit, answer).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(Some((events, reason)))) => {
                self.receipts_refused(&events, &reason);
                Err(Rejection::EngineUnavailable(reason))
            }
            Ok(Err(None)) => Err(Rejection::StorageFailed("the nats thread stopped".into())),
            // Still on its way: a later answer applies it, and a retry is answered from it.
            Err(_) => Err(Rejection::EngineUncertain(format!("no answer within {limit:?}"))),
        }
    }

    /// Completes once an emergency was added to the hub since the last call.
    pub async fn emergency_added(&self) {
        if self.emergency_added.1.recv().await.is_err() {
            smol::future::pending::<()>().await;
        }
    }

    /// Sends the held deliveries to the journal (and in cluster mode to the other boxes).
    pub fn flush_deliveries(&self) {
        let held = std::mem::take(&mut *self.held_deliveries.borrow_mut());
        self.share_deliveries(&held);
        if let (Some(journal), false) = (&self.journal, held.is_empty())
            && let Err(error) = journal.record(held, None)
        {
            self.log_not_stored("deliveries", &error);
        }
    }

    /// An error, unless the server is shutting down: then the journal has closed, and the last
    /// deliveries of every session leaving are not stored (one line each would be noise).
    fn log_not_stored(&self, what: &str, error: &StorageError) {
        if self.accepting.get() {
            log::error!("{what} not stored: {error:?}");
        } else {
            log::debug!("{what} not stored at shutdown: {error:?}");
        }
    }

    /// Sends the held deliveries `DELIVERY_FLUSH` after the first of them was held (unless
    /// another event took them first); runs as long as the server. With nothing held it waits
    /// without a timer.
    pub async fn flush_deliveries_periodically(&self) {
        while self.deliveries_held.1.recv().await.is_ok() {
            smol::Timer::after(DELIVERY_FLUSH).await;
            self.flush_deliveries();
        }
    }

    /// The held deliveries, then `events`: they go to the journal together (and the
    /// deliveries in cluster mode to the other boxes).
    fn with_held_deliveries(&self, events: Vec<ReceiptEvent>) -> Vec<ReceiptEvent> {
        let mut all = std::mem::take(&mut *self.held_deliveries.borrow_mut());
        self.share_deliveries(&all);
        all.extend(events);
        all
    }

    /// Cluster mode: this box's deliveries among `held`, one receipts message per flush, so
    /// that every box's consoles count them ("seen by 2 of 3" whichever box each tablet is on).
    fn share_deliveries(&self, held: &[ReceiptEvent]) {
        let delivered = || held.iter().filter(|event| matches!(event, ReceiptEvent::Delivered { .. }));
        if let Some(engine) = self.engine()
            && delivered().next().is_some()
        {
            engine.publish_deliveries(delivered().cloned().collect());
        }
    }

    /// As `record`, and waits until the events are stored and applied (a close, an escalation,
    /// whose answer or command must follow the commit), for at most `limit` if given.
    pub async fn record_and_wait(
        &self,
        events: Vec<ReceiptEvent>,
        limit: Option<Duration>,
    ) -> Result<(), Rejection> {
        let (wide, events) = self.cluster_wide(events);
        if let (Some(engine), false) = (self.engine(), wide.is_empty()) {
            in_cluster(self.record_in_cluster(engine, wide, limit), engine.cluster_only()).await?;
            if events.is_empty() {
                return Ok(());
            }
        }
        let Some(journal) = &self.journal else {
            self.apply(events);
            return Ok(());
        };
        let (done, applied) = async_channel::bounded(1);
        let asked_for = events.clone();
        let events = self.with_held_deliveries(events);
        journal.record(events, Some(done)).map_err(|error| {
            self.abandon(&asked_for);
            self.refused_by_storage(error)
        })?;
        let stored = async { applied.recv().await.ok() };
        let stored = match limit {
            Some(limit) => crate::runtime::deadline::within(limit, stored).await.map_err(|_| {
                Rejection::StorageFailed(format!("not stored within {limit:?}; it will be by a later commit"))
            })?,
            None => stored.await,
        };
        // Past `limit` the events are still queued and a later commit applies them; without an
        // answer at all the storage thread stopped and they are lost.
        stored.ok_or_else(|| {
            self.abandon(&asked_for);
            self.refused_by_storage(StorageError::Failed {
                cause: FailureCause::Stopped,
                detail: "the storage thread stopped".into(),
            })
        })
    }

    /// Closes emergency `seq`: stored, then broadcast to every client, before this returns.
    /// Closing twice is harmless.
    pub async fn close(&self, seq: u64, detail: Option<String>) -> Result<CloseOutcome, Rejection> {
        let request = self.ingress.hub().with(|hub| hub.close(seq, detail, SystemTime::now()));
        match request {
            CloseRequest::Unknown => Ok(CloseOutcome::Unknown),
            CloseRequest::AlreadyClosed => Ok(CloseOutcome::Closed { already: true }),
            CloseRequest::First(event) => {
                self.record_and_wait(vec![event], Some(RECORD_WAIT)).await?;
                Ok(CloseOutcome::Closed { already: false })
            }
        }
    }

    /// An ack from a tablet without a connection (HTTP): stored and broadcast before this
    /// returns, when it is the tablet's first.
    pub async fn ack(&self, tablet: &str, named: bool, seq: u64) -> Result<AckOutcome, Rejection> {
        let hub = self.ingress.hub();
        let duplicate = match hub.with(|hub| hub.ack_from(tablet, named, seq, SystemTime::now())) {
            AckRequest::Unknown => return Ok(AckOutcome::Unknown),
            AckRequest::Repeated | AckRequest::Uncounted => true,
            AckRequest::First(event) => {
                self.record_and_wait(vec![event], Some(RECORD_WAIT)).await?;
                false
            }
        };
        Ok(AckOutcome::Acked { duplicate, counts: hub.with(|hub| hub.counts(seq)) })
    }

    /// Clears the pending marks of events that will never be stored, so that they can be asked
    /// for again (a retried ack counts, a close closes, an escalation falls due again).
    fn abandon(&self, events: &[ReceiptEvent]) {
        self.ingress.hub().with(|hub| hub.abandon(events));
    }

    /// Applies stored events to the hub and counts what they changed.
    fn apply(&self, events: Vec<ReceiptEvent>) {
        for applied in self.ingress.hub().with(|hub| hub.apply(events)) {
            match applied {
                Applied::Ack { first_ack_after, .. } => {
                    self.metrics.count("resq_push_acks_total", "first");
                    if let Some(after) = first_ack_after {
                        self.metrics.observe_first_ack(after);
                    }
                }
                Applied::Closed { .. } => self.metrics.count("resq_push_closes_total", "closed"),
                Applied::Escalated { .. } => self.metrics.count("resq_push_escalations_total", "unacked"),
                Applied::Nothing => {}
            }
        }
    }

    /// Hands what the journal committed to the hub, in seq order, and answers each publisher.
    /// Ends when the journal has stopped and everything it committed is delivered.
    pub async fn deliver_committed(&self, committed: Receiver<Committed>) {
        while let Ok(Committed { outcomes, events, waiting, cached }) = committed.recv().await {
            let followed = cached.as_ref().is_some_and(|cached| !cached.emergencies.is_empty());
            let carrying = if outcomes.is_empty() && !followed { "receipts" } else { "emergencies" };
            self.metrics.count("resq_push_journal_commits_total", carrying);
            let followed_deliveries = match cached {
                Some(cached) => {
                    let only = cached.only;
                    in_cluster(self.deliver_cached(cached), only).await
                }
                None => Vec::new(),
            };
            for (outcome, reply) in outcomes {
                let answer = match outcome {
                    Outcome::New(stored) => Ok(Outcome::New(self.deliver_new(stored).await)),
                    // Its original came before it, in this batch or an earlier one, so it is in
                    // the hub already: the publisher of a retry hears "ok" only once a tablet can
                    // see the emergency, as the original's publisher does.
                    Outcome::Duplicate { seq } => Ok(Outcome::Duplicate { seq }),
                    Outcome::Conflict { seq } => Ok(Outcome::Conflict { seq }),
                };
                let _ = reply.try_send(answer);
            }
            self.apply(events);
            if !followed_deliveries.is_empty() {
                self.ingress.hub().with(|hub| hub.apply_followed_deliveries(followed_deliveries));
            }
            for done in waiting {
                let _ = done.try_send(());
            }
            smol::future::yield_now().await;
        }
    }

    /// Cluster mode: a new stream (`reset`) first, then what the follower brought from the
    /// engine, for which no publisher here waits; the other boxes' deliveries, for after the
    /// commit's events.
    async fn deliver_cached(&self, cached: Cached) -> Vec<ReceiptEvent> {
        let Cached { reset, emergencies, followed_deliveries, .. } = cached;
        if let Some(stream_id) = reset {
            let told = self.hub().with(|hub| hub.reset(&stream_id));
            // Their seqs were of the stream that is gone: they hear it was recreated.
            if let Some(cluster) = self.cluster() {
                cluster.followers.borrow_mut().clear();
            }
            log::warn!("history {stream_id}: the engine's stream was recreated; {told} clients reconnect");
        }
        for stored in emergencies {
            self.deliver_new(stored).await;
        }
        followed_deliveries
    }

    /// A new emergency the journal committed, into the hub; its queued_to recorded, and in
    /// cluster mode its publisher, waiting for it here, answered.
    async fn deliver_new(&self, stored: Stored) -> Receipt {
        let receipt = self.hand_over(|ingress| ingress.deliver(stored)).await;
        let Receipt { seq, queued_to: clients } = receipt;
        self.record(vec![ReceiptEvent::Queued { seq, clients }]);
        if let Some(cluster) = self.cluster() {
            cluster.wake_followers(receipt);
        }
        receipt
    }

    /// The one way an emergency reaches the hub: wait for room in the fan-out, hand it over with
    /// no await in between (so nothing else publishes after the check), count it if it was new.
    async fn hand_over<T: HandedOver>(&self, deliver: impl FnOnce(&Ingress) -> T) -> T {
        self.fan_out.room().await;
        let handed = deliver(&self.ingress);
        if handed.is_new() {
            self.fan_out.published();
            // Full means escalation has yet to look at the last one.
            let _ = self.emergency_added.0.try_send(());
        }
        handed
    }
}

/// What the hub gives back for an emergency handed to it: whether that added one to the history.
trait HandedOver {
    fn is_new(&self) -> bool;
}

/// What the journal committed: always new, and the hub cannot refuse it.
impl HandedOver for Receipt {
    fn is_new(&self) -> bool {
        true
    }
}

/// A submission the hub decides (in memory): new, a retry, a conflict, or refused at shutdown.
impl HandedOver for Result<Outcome<Receipt>, Refusal> {
    fn is_new(&self) -> bool {
        matches!(self, Ok(Outcome::New(_)))
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

    #[test]
    fn what_strict_parsers_refuse_is_refused_naming_the_problem() {
        for (body, message) in [
            (r#"{"a":"\ud800"}"#, r"invalid JSON: lone surrogate \ud800 at line 1 column 7"),
            (r#"{"a":"x\uDBFF"}"#, r"invalid JSON: lone surrogate \uDBFF at line 1 column 8"),
            (r#"{"a":"\udc00 after"}"#, r"invalid JSON: lone surrogate \udc00 at line 1 column 7"),
            (r#"{"a":"\ud800\n"}"#, r"invalid JSON: lone surrogate \ud800 at line 1 column 7"),
            (r#"{"a":"\ud800\ud800"}"#, r"invalid JSON: lone surrogate \ud800 at line 1 column 7"),
            ("{\n\"\\ud83d\":1}", r"invalid JSON: lone surrogate \ud83d at line 2 column 2"),
            (r#"{"n":1e400}"#, "number out of range: 1e400 at line 1 column 6"),
            (r#" {"n":[0,-1.5E+309]}"#, "number out of range: -1.5E+309 at line 1 column 10"),
        ] {
            assert_eq!(rejection(body.as_bytes(), 100).to_string(), message, "{body}");
        }
    }

    #[test]
    fn what_strict_parsers_take_is_taken_as_it_was_sent() {
        for body in [
            r#"{"emoji":"\ud83d\ude00","upper":"\uD83D\uDE00"}"#,
            r#"{"escaped":"\\ud800","quote":"\"\\","text":"1e400"}"#,
            r#"{"max":1.7976931348623157e308,"tiny":1e-400,"big":123456789012345678901234567890}"#,
            r#"{"n":-0.0,"e":5E-3,"i":-12,"t":true,"f":false,"z":null}"#,
        ] {
            assert_eq!(parse_emergency(body.as_bytes(), 200).map(RawValue::get), Ok(body), "{body}");
        }
    }

    fn key(text: &str) -> Option<IdempotencyKey> {
        Some(IdempotencyKey::parse(text).unwrap())
    }

    fn submission_key(bytes: &[u8], header: Option<IdempotencyKey>) -> Result<Option<String>, Rejection> {
        let submission = parse_submission(bytes, 1000, header)?;
        Ok(submission.fingerprint.map(|fingerprint| fingerprint.key.as_str().to_owned()))
    }

    #[test]
    fn the_key_is_the_header_or_the_top_level_member() {
        assert_eq!(submission_key(b"{}", None), Ok(None));
        assert_eq!(submission_key(b"{}", key("h")), Ok(Some("h".into())));
        assert_eq!(submission_key(br#"{"idempotency_key":"m"}"#, None), Ok(Some("m".into())));
        assert_eq!(submission_key(br#"{"idempotency_key":"\u006d"}"#, None), Ok(Some("m".into())));
        assert_eq!(submission_key(br#"{"idempotency_key":"m"}"#, key("m")), Ok(Some("m".into())));
        assert_eq!(submission_key(br#"{"idempotency_key":"m"}"#, key("h")), Err(Rejection::KeyMismatch));
        assert_eq!(submission_key(br#"{"a":{"idempotency_key":5}}"#, None), Ok(None));
        let escaped_name = br#"{"calle":"Jos\u00e9","idempotency\u005fkey":"e"}"#;
        assert_eq!(submission_key(escaped_name, None), Ok(Some("e".into())));
    }

    #[test]
    fn a_member_that_is_not_a_key_is_refused() {
        for bad in [
            r#"{"idempotency_key":null}"#,
            r#"{"idempotency_key":7}"#,
            r#"{"idempotency_key":""}"#,
            r#"{"idempotency_key":"two words"}"#,
            r#"{"idempotency_key":"a","idempotency_key":"a"}"#,
        ] {
            let refused = submission_key(bad.as_bytes(), None);
            assert!(matches!(refused, Err(Rejection::InvalidKey(_))), "{bad}: {refused:?}");
        }
        let message = submission_key(br#"{"idempotency_key":7}"#, None).unwrap_err().to_string();
        assert_eq!(message, "invalid idempotency_key member: must be a string");
    }

    #[test]
    fn a_submission_that_is_exactly_the_object_is_kept_without_a_copy() {
        let bytes = br#"{"tipo":"incendio"}"#.to_vec();
        let address = bytes.as_ptr();
        let (data, _) = owned_submission(bytes, 100, None).unwrap();
        assert_eq!(data.get().as_ptr(), address);
        let (spaced, _) = owned_submission(b" {\"a\":1}\n".to_vec(), 100, None).unwrap();
        assert_eq!(spaced.get(), "{\"a\":1}");
    }

    #[test]
    fn the_digest_is_of_the_object_without_the_whitespace_around_it() {
        let digest =
            |bytes: &[u8]| parse_submission(bytes, 100, key("k")).unwrap().fingerprint.unwrap().digest;
        assert_eq!(digest(b"{\"a\":1}"), digest(b" {\"a\":1}\r\n"));
        assert_ne!(digest(b"{\"a\":1}"), digest(b"{\"a\": 1}"));
    }

    fn in_memory_publisher() -> Publisher {
        use std::time::Duration;

        use crate::core::handle::HubHandle;
        use crate::core::hub::{Hub, HubLimits};
        use crate::runtime::scheduler::Scheduler;

        let limits = HubLimits {
            history: 10,
            history_bytes: 1 << 20,
            queue: 10,
            max_clients: 10,
            history_max_age: Duration::from_secs(3600),
            status_queue: 10,
            receipts: crate::core::receipts::ReceiptLimits {
                max_open: 10,
                max_open_bytes: 1 << 20,
                max_unnamed: 10,
            },
            ack_timeout: None,
        };
        let (_, ingress) = HubHandle::new(Hub::new(limits, "stream-a"));
        let fan_out = Rc::clone(&Scheduler::new(5).fan_out);
        Publisher::new(ingress, None, fan_out, Rc::new(Metrics::default()), 1000, 1 << 20)
    }

    #[test]
    fn the_reply_to_an_accepted_submission_names_the_history() {
        let publisher = in_memory_publisher();
        let staged = smol::block_on(publisher.stage(b"{}".to_vec(), Source::Http, None, WhenBusy::Refuse));
        let accepted = smol::block_on(publisher.settle(staged.unwrap(), Source::Http)).unwrap();
        assert_eq!(
            publisher.reply(accepted),
            r#"{"ok":true,"stream":"stream-a","seq":1,"queued_to":0,"delivered":0,"acked":0}"#
        );
        let retry = Accepted { seq: 1, queued_to: 0, duplicate: true };
        assert_eq!(
            publisher.reply(retry),
            r#"{"ok":true,"stream":"stream-a","seq":1,"queued_to":0,"delivered":0,"acked":0,"duplicate":true}"#
        );
    }
}
