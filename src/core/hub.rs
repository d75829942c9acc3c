//! The hub: the one owner of the server's shared state.
//!
//! It holds the slab of connected clients, the sequence counter and the ring of recent
//! emergencies. The ring is also every client's queue: a client is a cursor into it (the last
//! seq it has been handed) and a `Doorbell` that the hub rings when something new arrives. Each
//! emergency is serialized once, kept once, and its bytes are shared by every client's write; a
//! client costs the same memory however far behind it is.
//!
//! Every method is synchronous and tasks reach the hub only through `HubHandle`, so no borrow
//! is ever held across an `.await`. Subscribing places the cursor in the same call that
//! registers the client, which is why replay and live events never overlap or leave a gap: they
//! are one sequence read from one place.

use std::collections::{HashMap, VecDeque};
use std::mem;
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use serde_json::value::RawValue;
use slab::Slab;

use crate::auth::Identity;
use crate::core::clock::{Reading, RetentionClock};
use crate::core::doorbell::{Doorbell, Farewell};
use crate::core::idempotency::{Fingerprint, IdempotencyKey, KeyIndex};
use crate::core::notices::Notices;
use crate::core::receipts::{
    self, AckRequest, Applied, CloseRequest, ReceiptEvent, ReceiptLimits, Receipts, Tablet,
};
use crate::core::{Outcome, Outgoing, Receipt, SharedEnvelope, Stored};
use crate::protocol::{self, Counts, HistoryRange, ReplayInfo, Source};
use crate::support::logger::WarningThrottle;

/// Named tablets the roster remembers between their connections (last heard, delivered, acked):
/// the subscribe tokens' names, bounded in case a token file holds thousands.
pub const MAX_ROSTER: usize = 4096;

/// The hub's bounds, taken from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct HubLimits {
    /// Emergencies kept for catch-up.
    pub history: usize,
    /// Bytes of serialized emergencies kept for catch-up.
    pub history_bytes: usize,
    /// Live events a client may fall behind before it is dropped as too slow.
    pub queue: usize,
    /// Connected clients.
    pub max_clients: usize,
    /// Age after which an emergency leaves the history.
    pub history_max_age: Duration,
    /// Status notices a client may fall behind before it is dropped as too slow.
    pub status_queue: usize,
    pub receipts: ReceiptLimits,
    /// `--ack-timeout`: when an unacked emergency escalates; `None`: never.
    pub ack_timeout: Option<Duration>,
}

/// Where a reconnecting client left off: `?since=N`, and `&stream=ID` if it knows the history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resume {
    pub since: u64,
    pub stream: Option<String>,
}

/// Why the hub refused a subscriber or a publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `max_clients` are connected.
    Full,
    /// The server is shutting down.
    ShuttingDown,
}

/// A connected client, as the hub can tell of it (for `/healthz`).
#[derive(Debug)]
pub struct ConnectedClient {
    pub client_id: u64,
    /// The name of its token, when subscribe tokens are configured.
    pub name: Option<Rc<str>>,
    pub peer: SocketAddr,
    pub connected_at: SystemTime,
    /// Emergencies published that it has not been sent yet.
    pub queued: u64,
    /// When it last sent anything (a frame, a pong).
    pub last_heard: SystemTime,
}

/// A client as its log lines name it, and what it was sent.
#[derive(Clone, Debug)]
pub struct ClientSummary {
    pub name: Option<Rc<str>>,
    pub peer: SocketAddr,
    /// Emergencies written to it in full.
    pub sent: u64,
    /// Why the hub closed its doorbell, once it has.
    pub farewell: Option<Farewell>,
}

/// What the roster remembers of a named tablet across its connections.
#[derive(Clone, Copy, Debug, Default)]
pub struct TabletRecord {
    pub last_heard: Option<SystemTime>,
    pub last_delivered_seq: Option<u64>,
    pub last_acked_seq: Option<u64>,
}

/// What a new client is sent around the history's replay: the open emergencies the replay does
/// not cover, first, and the status of what it is sent, after. Positions in the receipts, walked
/// as the session takes them (so a client holds no list, whatever a reconnect storm costs):
/// seqs, not copies. Dropped once sent.
struct Backlog {
    /// The next seq to look at for an open emergency to send, up to `open_last`.
    next_open: u64,
    open_last: u64,
    /// The next seq to look at for a status to send, up to `status_last` (the last seq when it
    /// subscribed): one with news that is open, or after `replayed_after` (it is replayed).
    next_status: u64,
    status_last: u64,
    replayed_after: u64,
}

/// A connected client as the hub sees it.
struct Subscriber {
    /// Unique for the server's lifetime, unlike slab keys, which are reused.
    client_id: u64,
    peer: SocketAddr,
    /// The token it connected with, when subscribe tokens are configured.
    identity: Option<Identity>,
    connected_at: SystemTime,
    /// Rung when there is something after `cursor`; closed to end the session.
    doorbell: Doorbell,
    /// The last seq handed to its session for writing.
    cursor: u64,
    /// The last seq when it subscribed: what came after is live, what came before is replay.
    live_from: u64,
    /// Who its receipts are for: its token's name (the roster's `Rc` of it), else
    /// `client-ID@PEER` (its own), made only once it gets a receipt: past
    /// `--max-unnamed-receipts` per emergency most connections without a name never do, and do
    /// not keep 48 bytes of name each.
    tablet: Option<Rc<str>>,
    /// Whether `tablet` is the hub's one `Rc` for that name (not when the roster was full).
    tablet_by_pointer: bool,
    /// The position in `Hub::notices` of the next notice its session takes.
    notice_cursor: u64,
    /// Sent before and after its replay; `None` once sent.
    backlog: Option<Box<Backlog>>,
    last_heard: SystemTime,
    /// Emergencies written to it in full, by its session or the express lane.
    sent: u64,
    /// Whether the express lane may write for it: a fan-out to a parked client touches only this
    /// entry.
    stance: Stance,
    /// Whether the express list (or the lane, working through it) holds an entry for it: a
    /// client woken and parked again before the lane came is not listed twice.
    on_list: bool,
}

/// Where a client's session is, as far as the express lane (`ws::express`) goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stance {
    /// Running, or waiting for something else than the doorbell (a write, a read): only the
    /// session may write to its client.
    Busy,
    /// Waiting for the doorbell with everything written: what comes may be written for it.
    Parked,
    /// Parked, and listed for the express lane: a ring adds nothing until it is served.
    Listed,
}

impl Subscriber {
    /// Live events published that its session has not taken yet.
    fn lag(&self, last_seq: u64) -> u64 {
        last_seq.saturating_sub(self.cursor.max(self.live_from))
    }

    /// Closes its doorbell with the reason; the hub then drops it, and keeps its summary in
    /// `departed` until its session ends.
    fn say_farewell(&self, farewell: Farewell, departed: &mut HashMap<u64, ClientSummary>) {
        self.doorbell.close(farewell);
        departed.insert(self.client_id, ClientSummary { farewell: Some(farewell), ..self.summary() });
    }

    fn summary(&self) -> ClientSummary {
        let name = self.identity.as_ref().map(|identity| Rc::clone(&identity.name));
        ClientSummary { name, peer: self.peer, sent: self.sent, farewell: self.doorbell.farewell() }
    }

    fn named(&self) -> bool {
        self.identity.is_some()
    }

    /// Who a receipt of `seq` for this client is for, its unnamed label made now if it has
    /// none yet; `None` if it has none and `seq` takes no more unnamed receipts (so it has none).
    fn receipt_tablet<'a>(
        &'a mut self,
        receipts: &Receipts,
        seq: u64,
        unnamed_prefix: &str,
    ) -> Option<Tablet<'a>> {
        if self.tablet.is_none() {
            if !receipts.takes_unnamed(seq) {
                return None;
            }
            self.tablet = Some(format!("{unnamed_prefix}client-{}@{}", self.client_id, self.peer).into());
        }
        let named = self.named();
        Some(Tablet { name: self.tablet.as_ref()?, named, by_pointer: self.tablet_by_pointer })
    }

    /// Rings its doorbell; a parked one is listed for the express lane instead.
    fn ring(&mut self, key: usize, express: &mut ExpressList) {
        match self.stance {
            Stance::Busy => self.doorbell.ring(),
            Stance::Parked => {
                self.stance = Stance::Listed;
                if !mem::replace(&mut self.on_list, true) {
                    express.list(key, self.client_id);
                }
            }
            Stance::Listed => {}
        }
    }
}

/// The parked clients something was queued for, which the express lane (`ws::express`) writes to
/// without waking their sessions. A client has one entry at most, here or in the lane's hands,
/// until the lane has taken it (`Subscriber::on_list`): no more than `max_clients` in all.
#[derive(Default)]
struct ExpressList {
    listed: Vec<(usize, u64)>,
    /// The express lane's task, waiting for the list to fill.
    waker: Option<Waker>,
}

impl ExpressList {
    fn list(&mut self, key: usize, client_id: u64) {
        if self.listed.is_empty()
            && let Some(waker) = self.waker.take()
        {
            waker.wake();
        }
        self.listed.push((key, client_id));
    }
}

/// One retained emergency: its seq and its envelope, serialized once and shared by reference.
struct Retained {
    seq: u64,
    json: SharedEnvelope,
    received_at: SystemTime,
    /// Its idempotency key, when the hub assigned its seq (in memory) and it came with one.
    key: Option<IdempotencyKey>,
}

pub struct Hub {
    limits: HubLimits,
    /// The identity of this history: from the data dir, or new at each start in memory.
    stream_id: Rc<str>,
    /// Connected clients; only the hub inserts and removes.
    subscribers: Slab<Subscriber>,
    next_client_id: u64,
    /// Before the label of a connection without a name: in cluster mode `BOX/`.
    unnamed_prefix: Rc<str>,
    /// The last seq assigned; 0 before the first emergency.
    last_seq: u64,
    /// Consecutive seqs, oldest first: the catch-up history, bounded by `limits.history`,
    /// `limits.history_bytes` and `limits.history_max_age`, except that an entry a connected
    /// client has yet to be sent stays until it is (at most `queue` live events per client).
    history: VecDeque<Retained>,
    history_bytes: usize,
    /// The newest emergency's `received_at`, kept even once it has left the history.
    newest_received_at: SystemTime,
    /// Whether the wall clock can be trusted to expire by.
    clock: RetentionClock,
    /// The keys of the emergencies in `history` that the hub assigned seqs to (in memory; the
    /// journal decides for a durable history). Bounded by `history`: a key goes with its entry.
    keys: KeyIndex,
    /// Set at shutdown: no new subscribers, every doorbell closed.
    shutting_down: bool,
    /// Who was sent and who acked each emergency of the history, and each open one.
    receipts: Receipts,
    /// Acks, closes and escalations broadcast, until every client has taken them.
    notices: Notices,
    /// Named tablets, connected or not (at most `MAX_ROSTER`).
    roster: HashMap<Rc<str>, TabletRecord>,
    /// The open cap, once reached, is reached at every publish: one line per period says so.
    open_cap_warnings: WarningThrottle,
    express: ExpressList,
    /// Clients dropped (too slow, revoked, a new history) whose sessions have not ended yet, by
    /// client id: at most `max_clients`, each removed as its session unsubscribes.
    departed: HashMap<u64, ClientSummary>,
}

/// What the welcome tells a new client about the history, as of its subscription.
pub struct Greeting {
    pub stream: Rc<str>,
    /// The last seq when it subscribed; live events come after it.
    pub seq: u64,
    pub history: HistoryRange,
    /// What it will be replayed first, when it resumed with `since`.
    pub replay: Option<ReplayInfo>,
    /// The open emergencies it is sent before anything else, oldest first.
    pub open: Vec<u64>,
}

impl Hub {
    pub fn new(limits: HubLimits, stream_id: &str) -> Hub {
        Hub {
            // Room for every client at once, reserved, not touched: a slab that doubles as
            // clients connect leaves each old buffer behind as a hole in the heap (BENCHMARKS.md,
            // "Idle clients: where each byte and wake-up goes").
            subscribers: Slab::with_capacity(limits.max_clients),
            limits,
            stream_id: stream_id.into(),
            next_client_id: 1,
            unnamed_prefix: Rc::from(""),
            last_seq: 0,
            history: VecDeque::new(),
            history_bytes: 0,
            newest_received_at: SystemTime::UNIX_EPOCH,
            clock: RetentionClock::new(limits.history_max_age),
            keys: KeyIndex::default(),
            shutting_down: false,
            receipts: Receipts::new(limits.receipts),
            notices: Notices::default(),
            roster: HashMap::new(),
            open_cap_warnings: WarningThrottle::default(),
            express: ExpressList::default(),
            departed: HashMap::new(),
        }
    }

    /// Assigns the next seq, serializes the envelope once and delivers it; unless the
    /// submission's key names an emergency still in the history: then it is a duplicate or a
    /// conflict, and nothing is delivered. Refused once shutdown has begun, since nobody could
    /// receive it any more. Reached through `Ingress` only.
    pub(super) fn publish(
        &mut self,
        data: &RawValue,
        source: Source,
        fingerprint: Option<Fingerprint>,
    ) -> Result<Outcome<Receipt>, Refusal> {
        if self.shutting_down {
            return Err(Refusal::ShuttingDown);
        }
        if let Some(known) = fingerprint.as_ref().and_then(|fingerprint| self.keys.recall(fingerprint)) {
            return Ok(known);
        }
        let seq = self.last_seq + 1;
        // Never before the previous emergency, so the history stays in order if the clock steps back.
        let received_at = SystemTime::now().max(self.newest_received_at);
        let envelope = protocol::envelope_json(seq, received_at, source, data);
        let key = fingerprint.map(|fingerprint| {
            let key = fingerprint.key.clone();
            self.keys.remember(fingerprint, seq);
            key
        });
        Ok(Outcome::New(self.append(Stored { seq, received_at, envelope }, key)))
    }

    /// Appends an emergency whose seq the journal assigned when it committed it to the history
    /// and rings every client's doorbell. Also after shutdown has begun: a committed emergency
    /// must reach the history. Reached through `Ingress` only.
    pub(super) fn deliver(&mut self, stored: Stored) -> Receipt {
        self.append(stored, None)
    }

    /// Appends an emergency with its seq to the history and rings every client's doorbell. A
    /// client more than `queue` live events behind is dropped instead of waited for.
    fn append(&mut self, stored: Stored, key: Option<IdempotencyKey>) -> Receipt {
        let Stored { seq, received_at, envelope } = stored;
        self.last_seq = seq;
        self.newest_received_at = self.newest_received_at.max(received_at);
        let json = SharedEnvelope::from(envelope);
        self.history_bytes += json.len();
        self.history.push_back(Retained { seq, json: Rc::clone(&json), received_at, key });
        let queue = self.limits.queue as u64;
        let mut queued_to = 0;
        let (express, departed) = (&mut self.express, &mut self.departed);
        self.subscribers.retain(|key, subscriber| {
            if subscriber.lag(seq) > queue {
                // The session logs the disconnection, with the reason set here.
                subscriber.say_farewell(Farewell::TooSlow, departed);
                return false;
            }
            subscriber.ring(key, express);
            queued_to += 1;
            true
        });
        let history_from = self.history.front().map_or(seq, |oldest| oldest.seq);
        if let Some(let_go) = self.receipts.published(seq, received_at, json, queued_to, history_from)
            && self.limits.receipts.max_open > 0
        {
            self.open_cap_warnings.note(&format!(
                "--max-open ({}) or --max-open-bytes reached: seq {let_go} is no longer open nor resent \
                 to fresh tablets (close emergencies once dealt with)",
                self.limits.receipts.max_open
            ));
        }
        self.trim(|_| false);
        Receipt { seq, queued_to }
    }

    /// Loads the history a data dir held at start, oldest first. Only its newest unbroken run of
    /// seqs is kept: the ring holds consecutive seqs, and a resuming client is told of the rest
    /// as `missed` instead of skipping a gap in silence. It takes the hub by value: once shared,
    /// the hub gets emergencies through `Ingress` only.
    ///
    /// The receipts stored with them (`events`) are applied first; open emergencies outside that
    /// run keep their receipts and are still sent to fresh tablets.
    pub fn restored(mut self, last_seq: u64, retained: Vec<Stored>, events: Vec<ReceiptEvent>) -> Hub {
        let mut shared = Vec::with_capacity(retained.len());
        for Stored { seq, received_at, envelope } in retained {
            let json = SharedEnvelope::from(envelope);
            self.receipts.restored(seq, received_at, Rc::clone(&json));
            shared.push((seq, received_at, json));
        }
        // One `Rc` per tablet (the roster's for a name, one per row for a connection's label), so
        // that receipts are found by pointer from here on.
        let mut last: Option<(u64, Rc<str>)> = None;
        for event in events {
            self.remember_receipt(&event);
            let name = match &event {
                ReceiptEvent::Delivered { seq, tablet, .. } | ReceiptEvent::Acked { seq, tablet, .. } => {
                    let name = match &last {
                        Some((last_seq, name)) if last_seq == seq && **name == **tablet => Rc::clone(name),
                        _ if !receipts::is_named(tablet) => Rc::from(tablet.as_str()),
                        _ => self.canonical_name(&Rc::from(tablet.as_str())).0,
                    };
                    last = Some((*seq, Rc::clone(&name)));
                    Some(name)
                }
                ReceiptEvent::Queued { .. }
                | ReceiptEvent::Closed { .. }
                | ReceiptEvent::Escalated { .. }
                | ReceiptEvent::CommandStarted { .. } => None,
            };
            let _ = self.receipts.apply_as(event, name);
        }
        for (seq, received_at, json) in shared {
            if self.history.back().is_some_and(|newest| newest.seq + 1 != seq) {
                for dropped in self.history.drain(..) {
                    self.receipts.history_dropped(dropped.seq);
                }
                self.history_bytes = 0;
            }
            self.history_bytes += json.len();
            self.newest_received_at = self.newest_received_at.max(received_at);
            self.history.push_back(Retained { seq, json, received_at, key: None });
        }
        let oldest_in_ring = self.history.front().map_or(u64::MAX, |retained| retained.seq);
        let let_go = self.receipts.enforce_open_cap(oldest_in_ring);
        if !let_go.is_empty() && self.limits.receipts.max_open > 0 {
            log::warn!(
                "more than --max-open emergencies are open: {} of the oldest are no longer resent",
                let_go.len()
            );
        }
        let older: Vec<u64> =
            self.receipts.ledgers().map(|l| l.seq).take_while(|&seq| seq < oldest_in_ring).collect();
        for seq in older {
            self.receipts.history_dropped(seq);
        }
        self.last_seq = last_seq;
        self.trim(|_| false);
        self
    }

    /// Drops history entries older than `history_max_age` by the clock read now, if it can be
    /// trusted (`RetentionClock`).
    pub fn expire(&mut self, reading: Reading) {
        let Some(now) = self.clock.expiry_now(reading) else { return };
        let max_age = self.limits.history_max_age;
        self.trim(|oldest| now.duration_since(oldest.received_at).unwrap_or_default() > max_age);
    }

    /// Hands `push` what a client has not been sent (see `Subscription::take_pending`), in this
    /// order: the open emergencies of its backlog, the history after its cursor, the statuses of
    /// its backlog, then the notices after its notice cursor. Returns how many.
    pub(super) fn take_pending(
        &mut self,
        key: usize,
        client_id: u64,
        max_frames: usize,
        max_bytes: usize,
        mut push: impl FnMut(Outgoing),
    ) -> usize {
        let Some(subscriber) = self.subscribers.get_mut(key).filter(|s| s.client_id == client_id) else {
            return 0;
        };
        let (mut taken, mut bytes) = (0, 0);
        let mut room = |json: &SharedEnvelope| {
            let fits = taken < max_frames && bytes < max_bytes;
            if fits {
                taken += 1;
                bytes += json.len();
            }
            fits
        };
        if let Some(backlog) = &mut subscriber.backlog {
            let open = self.receipts.ledgers_in(backlog.next_open, backlog.open_last);
            for ledger in open.filter(|ledger| ledger.is_open()) {
                if !room(&ledger.envelope) {
                    return taken;
                }
                push(Outgoing { json: Rc::clone(&ledger.envelope), seq: Some(ledger.seq) });
                backlog.next_open = ledger.seq + 1;
            }
            backlog.next_open = backlog.open_last + 1;
        }
        // `trim` keeps every entry after a subscriber's cursor, so this never skips one.
        let start = self.history.partition_point(|retained| retained.seq <= subscriber.cursor);
        for retained in self.history.range(start..) {
            if !room(&retained.json) {
                return taken;
            }
            push(Outgoing { json: Rc::clone(&retained.json), seq: Some(retained.seq) });
            subscriber.cursor = retained.seq;
        }
        if let Some(backlog) = &mut subscriber.backlog {
            let replayed_after = backlog.replayed_after;
            let news = self
                .receipts
                .ledgers_in(backlog.next_status, backlog.status_last)
                .filter(|ledger| ledger.has_news() && (ledger.is_open() || ledger.seq > replayed_after));
            for ledger in news {
                let json: SharedEnvelope = protocol::to_json(&ledger.status(false)).into();
                if !room(&json) {
                    return taken;
                }
                push(Outgoing { json, seq: None });
                backlog.next_status = ledger.seq + 1;
            }
            subscriber.backlog = None;
        }
        while let Some(json) = self.notices.get(subscriber.notice_cursor) {
            if !room(&json) {
                break;
            }
            push(Outgoing { json, seq: None });
            subscriber.notice_cursor += 1;
        }
        taken
    }

    pub fn stream_id(&self) -> &str {
        &self.stream_id
    }

    /// Registers a client and places its cursor (see `Subscription::open`): its slab key, its
    /// client id, its doorbell and its welcome.
    pub(super) fn subscribe(
        &mut self,
        peer: SocketAddr,
        identity: Option<Identity>,
        resume: Option<&Resume>,
    ) -> Result<(usize, u64, Greeting), Refusal> {
        if self.shutting_down {
            return Err(Refusal::ShuttingDown);
        }
        if self.subscribers.len() >= self.limits.max_clients {
            return Err(Refusal::Full);
        }
        let (cursor, replay) = match resume {
            Some(resume) => {
                let (start, info) = self.replay_start(resume);
                let cursor = self.history.get(start).map_or(self.last_seq, |retained| retained.seq - 1);
                (cursor, Some(info))
            }
            None => (self.last_seq, None),
        };
        let client_id = self.next_client_id;
        self.next_client_id += 1;
        let (tablet, tablet_by_pointer) = match &identity {
            Some(identity) => {
                let (name, by_pointer) = self.canonical_name(&identity.name);
                (Some(name), by_pointer)
            }
            None => (None, true),
        };
        let since = resume.filter(|_| replay.is_some_and(|info| !info.reset && !info.stream_changed));
        // Open ones it already had (up to `since`) get a status, not the emergency again.
        let open_from = since.map_or(1, |resume| resume.since.saturating_add(1));
        let open: Vec<u64> =
            self.receipts.ledgers_in(open_from, cursor).filter(|l| l.is_open()).map(|l| l.seq).collect();
        let backlog = Backlog {
            next_open: open.first().copied().unwrap_or(cursor + 1),
            open_last: cursor,
            next_status: 1,
            status_last: self.last_seq,
            replayed_after: cursor,
        };
        let has_backlog = !open.is_empty() || self.receipts.ledgers().any(|ledger| ledger.has_news());
        let now = SystemTime::now();
        let key = self.subscribers.insert(Subscriber {
            client_id,
            peer,
            identity,
            connected_at: now,
            doorbell: Doorbell::default(),
            cursor,
            live_from: self.last_seq,
            tablet,
            tablet_by_pointer,
            notice_cursor: self.notices.end(),
            backlog: has_backlog.then(|| Box::new(backlog)),
            last_heard: now,
            sent: 0,
            stance: Stance::Busy,
            on_list: false,
        });
        let greeting = Greeting {
            stream: Rc::clone(&self.stream_id),
            seq: self.last_seq,
            history: self.history_range(),
            replay,
            open,
        };
        Ok((key, client_id, greeting))
    }

    /// Retained envelopes with seq greater than `since`, oldest first, and what that means for
    /// a client resuming from `since`.
    pub fn retained_after(&self, resume: &Resume) -> (impl Iterator<Item = &str>, ReplayInfo) {
        let (start, info) = self.replay_start(resume);
        (self.history.range(start..).map(|retained| &*retained.json), info)
    }

    /// The history index a client resuming from `resume` starts at, and what it gets.
    /// A client resuming from another history (`stream` differs) or from a seq this server has
    /// not reached (it lost its history) gets everything retained.
    fn replay_start(&self, resume: &Resume) -> (usize, ReplayInfo) {
        let since = resume.since;
        let stream_changed = resume.stream.as_deref().is_some_and(|stream| stream != &*self.stream_id);
        let reset = !stream_changed && since > self.last_seq;
        let floor = self.catch_up_start();
        let first_seq = self.history_range().first_seq;
        let (start, missed) = if stream_changed || reset {
            (floor, 0)
        } else {
            let missed = first_seq.saturating_sub(1).saturating_sub(since);
            (self.history.partition_point(|retained| retained.seq <= since).max(floor), missed)
        };
        let info = ReplayInfo { since, count: self.history.len() - start, missed, reset, stream_changed };
        (start, info)
    }

    /// Closes every client's doorbell so each session sends what it has not yet sent and says
    /// goodbye; refuses new ones.
    pub fn shut_down(&mut self) {
        self.shutting_down = true;
        for (_, subscriber) in &mut self.subscribers {
            // Closed, not dropped: each session still takes what it has not been sent, itself.
            subscriber.stance = Stance::Busy;
            subscriber.doorbell.close(Farewell::ShuttingDown);
        }
    }

    /// Cluster mode: connections without a name are labelled `BOX/client-...`, distinct from
    /// every other box's.
    pub fn with_box_name(mut self, box_name: &str) -> Hub {
        self.unnamed_prefix = format!("{box_name}/").into();
        self
    }

    /// What comes before an unnamed connection's label (`""`, or `BOX/` in cluster mode).
    pub fn unnamed_prefix(&self) -> &str {
        &self.unnamed_prefix
    }

    /// Cluster mode: the engine's stream was recreated, with `stream_id`. The history, the
    /// receipts and the notices start over empty, and every client is told to reconnect: it
    /// resumes with the old stream and is told `stream_changed`. Returns how many were told.
    pub fn reset(&mut self, stream_id: &str) -> usize {
        let mut fresh = Hub::new(self.limits, stream_id);
        fresh.departed = mem::take(&mut self.departed);
        // The express lane waits on this hub's list: it must hear of the fresh one's.
        fresh.express.waker = self.express.waker.take();
        for (_, subscriber) in &self.subscribers {
            subscriber.say_farewell(Farewell::StreamChanged, &mut fresh.departed);
        }
        let told = self.subscribers.len();
        // A session still holding an old key must not unsubscribe a newer client.
        fresh.next_client_id = self.next_client_id;
        fresh.unnamed_prefix = Rc::clone(&self.unnamed_prefix);
        fresh.shutting_down = self.shutting_down;
        std::mem::swap(&mut fresh.clock, &mut self.clock);
        *self = fresh;
        told
    }

    /// The object an emergency of the history carries, as it was published, if it is retained:
    /// its envelope's last member (`protocol::envelope_json` writes `data` last, after members
    /// that hold no text of the publisher's).
    pub fn published_data(&self, seq: u64) -> Option<&str> {
        let index = self.history.binary_search_by_key(&seq, |retained| retained.seq).ok()?;
        let envelope: &str = &self.history[index].json;
        let start = envelope.find("\"data\":")? + "\"data\":".len();
        envelope.get(start..envelope.len().checked_sub(1)?)
    }

    /// The clients an emergency of the history was queued to when it came, if it is retained.
    pub fn queued_to(&self, seq: u64) -> Option<usize> {
        self.receipts.get(seq).map(|ledger| ledger.queued_to)
    }

    /// Drops every client whose token `still_valid` rejects; returns how many.
    pub fn revoke(&mut self, still_valid: impl Fn(&str) -> bool) -> usize {
        let before = self.subscribers.len();
        let departed = &mut self.departed;
        self.subscribers.retain(|_, subscriber| match &subscriber.identity {
            Some(identity) if !still_valid(&identity.token) => {
                subscriber.say_farewell(Farewell::Revoked, departed);
                false
            }
            _ => true,
        });
        before - self.subscribers.len()
    }

    /// The connected clients, for `/healthz`.
    pub fn clients(&self) -> impl Iterator<Item = ConnectedClient> + '_ {
        self.subscribers.iter().map(|(_, subscriber)| ConnectedClient {
            client_id: subscriber.client_id,
            name: subscriber.identity.as_ref().map(|identity| Rc::clone(&identity.name)),
            peer: subscriber.peer,
            connected_at: subscriber.connected_at,
            queued: self.last_seq.saturating_sub(subscriber.cursor),
            last_heard: subscriber.last_heard,
        })
    }

    /// Who a client is and what it was sent, while it is subscribed and, once the hub dropped it,
    /// until its session ends.
    pub fn summary(&self, key: usize, client_id: u64) -> Option<ClientSummary> {
        match self.subscriber(key, client_id) {
            Some(subscriber) => Some(subscriber.summary()),
            None => self.departed.get(&client_id).cloned(),
        }
    }

    pub fn history_bytes(&self) -> usize {
        self.history_bytes
    }

    pub fn client_count(&self) -> usize {
        self.subscribers.len()
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The catch-up history: what the bounds keep, without the older entries kept only until
    /// lagging clients have been sent them.
    pub fn history_range(&self) -> HistoryRange {
        let floor = self.catch_up_start();
        HistoryRange {
            first_seq: self.history.get(floor).map_or(self.last_seq + 1, |retained| retained.seq),
            last_seq: self.last_seq,
            count: self.history.len() - floor,
        }
    }

    /// Where the catch-up history starts in the ring: entries before it are beyond the bounds
    /// and kept only for clients still to be sent them. Replay and polls never start earlier,
    /// or clients resuming one after another could keep old entries forever.
    fn catch_up_start(&self) -> usize {
        let (mut start, mut bytes) = (0, self.history_bytes);
        while self.history.len() - start > 1
            && (self.history.len() - start > self.limits.history || bytes > self.limits.history_bytes)
        {
            bytes -= self.history[start].json.len();
            start += 1;
        }
        start
    }

    pub(super) fn unsubscribe(&mut self, key: usize, client_id: u64) {
        // The key may already be gone (dropped as too slow) and even reused by a newer client.
        if self.subscribers.get(key).is_some_and(|s| s.client_id == client_id) {
            self.subscribers.remove(key);
        } else {
            self.departed.remove(&client_id);
        }
    }

    /// Drops the oldest entries while the history is beyond a bound or `expired` says so,
    /// always keeping the newest (a resuming client gets at least the last emergency) and
    /// every entry a connected client has yet to be sent.
    fn trim(&mut self, expired: impl Fn(&Retained) -> bool) {
        let oldest_unsent = self.subscribers.iter().map(|(_, s)| s.cursor + 1).min().unwrap_or(u64::MAX);
        while let Some(oldest) = self.history.front() {
            let over_bounds = self.history.len() > 1
                && (self.history.len() > self.limits.history
                    || self.history_bytes > self.limits.history_bytes);
            if oldest.seq >= oldest_unsent || !(over_bounds || expired(oldest)) {
                break;
            }
            self.history_bytes -= oldest.json.len();
            if let Some(key) = &oldest.key {
                self.keys.forget(key, oldest.seq);
            }
            self.receipts.history_dropped(oldest.seq);
            self.history.pop_front();
        }
    }
}

/// Receipts, notices and the roster: acks, deliveries, closes and escalations.
/// The express lane's side: `ws::express` takes the listed clients and writes for them.
impl Hub {
    /// Ready once a parked client is listed; the waker is kept until one is.
    pub fn poll_listed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.express.listed.is_empty() {
            return Poll::Ready(());
        }
        self.express.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Moves the listed clients to the end of `into` (key and client id), oldest first.
    pub fn take_listed(&mut self, into: &mut Vec<(usize, u64)>) {
        into.append(&mut self.express.listed);
    }

    /// As `take_pending`, for a client that is still listed (not woken since, still connected);
    /// `None` for any other, which its session serves. Until `express_served`, it stays listed.
    pub fn take_listed_pending(
        &mut self,
        key: usize,
        client_id: u64,
        max_frames: usize,
        max_bytes: usize,
        push: impl FnMut(Outgoing),
    ) -> Option<usize> {
        let subscriber = self.subscriber_mut(key, client_id)?;
        subscriber.on_list = false;
        if subscriber.stance != Stance::Listed {
            return None;
        }
        Some(self.take_pending(key, client_id, max_frames, max_bytes, push))
    }

    /// The express lane wrote for a listed client: everything, so it is parked again
    /// (`all_written`), or not: its session is woken to finish.
    pub fn express_served(&mut self, key: usize, client_id: u64, all_written: bool) {
        let Some(subscriber) = self.subscriber_mut(key, client_id) else { return };
        subscriber.on_list = false;
        if all_written {
            subscriber.stance = Stance::Parked;
        } else {
            subscriber.stance = Stance::Busy;
            subscriber.doorbell.ring();
        }
    }

    /// Whether its session waits parked and nothing is listed for it: the express lane may write
    /// to it now.
    pub fn is_parked(&self, key: usize, client_id: u64) -> bool {
        self.subscriber(key, client_id).is_some_and(|subscriber| subscriber.stance == Stance::Parked)
    }

    /// The express lane began a write for a parked client outside the list (a ping) and left the
    /// rest to its session: woken, it finishes it first. An entry on the list stays as it is.
    pub fn wake_to_finish(&mut self, key: usize, client_id: u64) {
        if let Some(subscriber) = self.subscriber_mut(key, client_id) {
            subscriber.stance = Stance::Busy;
            subscriber.doorbell.ring();
        }
    }

    /// Its session is about to wait for the doorbell with everything it was handed written: the
    /// express lane may write for it until it wakes.
    pub fn park(&mut self, key: usize, client_id: u64) {
        if let Some(subscriber) = self.subscriber_mut(key, client_id) {
            subscriber.stance = Stance::Parked;
        }
    }

    /// Its session woke (for whatever reason) and may write again: the express lane keeps off.
    /// Listed and not yet served, it finds its doorbell rung instead.
    pub fn unpark(&mut self, key: usize, client_id: u64) {
        if let Some(subscriber) = self.subscriber_mut(key, client_id)
            && mem::replace(&mut subscriber.stance, Stance::Busy) == Stance::Listed
        {
            subscriber.doorbell.mark_rung();
        }
    }

    /// Ready once the client's doorbell was rung since it was last polled, or closed; a client
    /// the hub dropped stays closed until its session ends.
    pub fn poll_rung(&self, key: usize, client_id: u64, cx: &mut Context<'_>) -> Poll<()> {
        match self.subscriber(key, client_id) {
            Some(subscriber) => subscriber.doorbell.poll_rung(cx),
            None => Poll::Ready(()),
        }
    }

    /// Why the hub closed the client's doorbell, once it has.
    pub fn farewell(&self, key: usize, client_id: u64) -> Option<Farewell> {
        self.summary(key, client_id).and_then(|summary| summary.farewell)
    }

    /// Whether the client's doorbell was rung and not yet polled, for tests of the hub.
    #[cfg(test)]
    pub(crate) fn is_rung(&self, key: usize, client_id: u64) -> bool {
        self.subscriber(key, client_id).is_some_and(|s| s.doorbell.is_rung())
    }

    /// The client under `key`, if it is still `client_id`: keys are reused.
    fn subscriber(&self, key: usize, client_id: u64) -> Option<&Subscriber> {
        self.subscribers.get(key).filter(|s| s.client_id == client_id)
    }

    fn subscriber_mut(&mut self, key: usize, client_id: u64) -> Option<&mut Subscriber> {
        self.subscribers.get_mut(key).filter(|s| s.client_id == client_id)
    }
}

impl Hub {
    /// Records that a client was written `seqs` in full; returns the events to store (first
    /// deliveries only).
    pub fn delivered(
        &mut self,
        key: usize,
        client_id: u64,
        seqs: &[u64],
        at: SystemTime,
    ) -> Vec<ReceiptEvent> {
        let Hub { subscribers, receipts, unnamed_prefix, .. } = self;
        let Some(subscriber) = subscribers.get_mut(key).filter(|s| s.client_id == client_id) else {
            return Vec::new();
        };
        subscriber.sent += seqs.len() as u64;
        let mut events = Vec::new();
        for &seq in seqs {
            // The name borrowed, not cloned: at a fan-out, its count is one more line to load.
            if let Some(tablet) = subscriber.receipt_tablet(receipts, seq, unnamed_prefix) {
                events.extend(receipts.delivered(seq, tablet, at));
            }
        }
        if let (Some(newest), Some(name)) = (events.last(), subscriber.tablet.clone()) {
            self.update_roster(&name, |record| record.last_delivered_seq = Some(newest.seq()));
        }
        events
    }

    /// A client sent something: it is alive, as of `at`.
    pub fn heard(&mut self, key: usize, client_id: u64, at: SystemTime) {
        let Some(subscriber) = self.subscriber_mut(key, client_id) else {
            return;
        };
        subscriber.last_heard = at;
        if subscriber.identity.is_some()
            && let Some(tablet) = subscriber.tablet.clone()
        {
            self.update_roster(&tablet, |record| record.last_heard = Some(at));
        }
    }

    /// A connected client acks `seq`.
    pub fn ack_from_client(&mut self, key: usize, client_id: u64, seq: u64, at: SystemTime) -> AckRequest {
        let Hub { subscribers, receipts, unnamed_prefix, .. } = self;
        let Some(subscriber) = subscribers.get_mut(key).filter(|s| s.client_id == client_id) else {
            return AckRequest::Unknown;
        };
        match subscriber.receipt_tablet(receipts, seq, unnamed_prefix) {
            Some(tablet) => receipts.begin_ack(seq, tablet, at),
            None if receipts.knows(seq) => AckRequest::Uncounted,
            None => AckRequest::Unknown,
        }
    }

    /// A tablet acks `seq` without a connection (`POST /emergencias/{seq}/ack`). A named
    /// tablet is heard from: an SSE page cannot send on its stream, so its acks are all it says.
    pub fn ack_from(&mut self, tablet: &str, named: bool, seq: u64, at: SystemTime) -> AckRequest {
        let (name, by_pointer) = match named {
            true => self.canonical_name(&Rc::from(tablet)),
            false => (Rc::from(tablet), false),
        };
        if named {
            self.update_roster(&name, |record| record.last_heard = Some(at));
        }
        self.receipts.begin_ack(seq, Tablet { name: &name, named, by_pointer }, at)
    }

    /// A publisher closes `seq`; `detail` is a JSON object's text. An emergency published but
    /// no longer retained is not open any more: closing it again is harmless.
    pub fn close(&mut self, seq: u64, detail: Option<String>, at: SystemTime) -> CloseRequest {
        match self.receipts.begin_close(seq, detail, at) {
            CloseRequest::Unknown if (1..=self.last_seq).contains(&seq) => CloseRequest::AlreadyClosed,
            request => request,
        }
    }

    /// Forgets that `events` were asked for: they will never be stored (`Receipts::abandon`).
    pub fn abandon(&mut self, events: &[ReceiptEvent]) {
        for event in events {
            self.receipts.abandon(event);
        }
    }

    /// The escalations due at `now` under `--ack-timeout` (none without it).
    pub fn due_escalations(&mut self, now: SystemTime) -> Vec<ReceiptEvent> {
        match self.limits.ack_timeout {
            Some(timeout) => self.receipts.due_escalations(now, timeout),
            None => Vec::new(),
        }
    }

    /// Escalated emergencies, still unanswered, whose command never started: the server
    /// stopped first. Their commands run at start.
    pub fn commands_owed(&self) -> Vec<u64> {
        self.receipts.commands_owed()
    }

    /// When the next escalation may fall due.
    pub fn next_escalation(&self) -> Option<SystemTime> {
        self.receipts.next_deadline(self.limits.ack_timeout?)
    }

    /// Applies events the journal stored (or, in memory, at once) and broadcasts what they
    /// change: each serialized once, queued to every client as a notice.
    pub fn apply(&mut self, events: Vec<ReceiptEvent>) -> Vec<Applied> {
        let mut applied = Vec::new();
        for event in events {
            // A delivery is in the receipts from the moment it was written (`delivered`), the
            // clients an emergency was queued to from its publish.
            if event.is_held() {
                continue;
            }
            self.remember_receipt(&event);
            let name = match &event {
                ReceiptEvent::Acked { tablet, .. } => self.shared_name(tablet),
                _ => None,
            };
            let change = self.receipts.apply_as(event, name);
            let notice = match &change {
                Applied::Nothing => continue,
                Applied::Ack { seq, tablet, at, acked, delivered, .. } => {
                    protocol::to_json(&protocol::AckNotice {
                        kind: "ack",
                        seq: *seq,
                        by: tablet,
                        acked: *acked,
                        delivered: *delivered,
                        at: protocol::timestamp(*at),
                    })
                }
                Applied::Closed { seq, closure } => {
                    let notice = protocol::to_json(&protocol::ClosedNotice {
                        kind: "closed",
                        seq: *seq,
                        at: protocol::timestamp(closure.at),
                        close: closure.detail.as_deref(),
                    });
                    if self.history.front().is_none_or(|oldest| oldest.seq > *seq) {
                        self.receipts.history_dropped(*seq);
                    }
                    notice
                }
                Applied::Escalated { seq, at, delivered } => protocol::to_json(&protocol::UnackedNotice {
                    kind: "unacked",
                    seq: *seq,
                    ack_timeout_s: self.limits.ack_timeout.unwrap_or_default().as_secs_f64(),
                    delivered: *delivered,
                    at: protocol::timestamp(*at),
                }),
            };
            self.broadcast_notice(notice.into());
            applied.push(change);
        }
        applied
    }

    /// Cluster mode: applies other boxes' deliveries (from the engine's receipts stream), each
    /// under the hub's one `Rc` of a named tablet, as at a restart; a repeated one changes
    /// nothing.
    pub fn apply_followed_deliveries(&mut self, events: Vec<ReceiptEvent>) {
        for event in events {
            let ReceiptEvent::Delivered { tablet, .. } = &event else { continue };
            let name = self.shared_name(tablet);
            self.remember_receipt(&event);
            self.receipts.apply_as(event, name);
        }
    }

    /// The hub's one `Rc` of a named tablet, for a receipt that arrives by its name alone (an
    /// ack or a delivery another box stored, a stored ack): its receipt is then the one the
    /// tablet's connection here finds by pointer, not a second one that would count it twice.
    /// `None` for a connection's label, or when the roster is full (found by name then).
    fn shared_name(&mut self, tablet: &str) -> Option<Rc<str>> {
        if !receipts::is_named(tablet) {
            return None;
        }
        let (name, one) = self.canonical_name(&Rc::from(tablet));
        one.then_some(name)
    }

    /// Keeps the roster's last delivered and acked seqs of a named tablet.
    fn remember_receipt(&mut self, event: &ReceiptEvent) {
        match event {
            ReceiptEvent::Delivered { seq, tablet, .. } => {
                let seq = *seq;
                self.update_roster(tablet, |record| {
                    record.last_delivered_seq = record.last_delivered_seq.max(Some(seq));
                });
            }
            ReceiptEvent::Acked { seq, tablet, .. } => {
                let seq = *seq;
                self.update_roster(tablet, |record| {
                    record.last_acked_seq = record.last_acked_seq.max(Some(seq))
                });
            }
            ReceiptEvent::Queued { .. }
            | ReceiptEvent::Closed { .. }
            | ReceiptEvent::Escalated { .. }
            | ReceiptEvent::CommandStarted { .. } => {}
        }
    }

    /// Updates the record of a named tablet the roster knows, or may still take.
    fn update_roster(&mut self, tablet: &str, update: impl FnOnce(&mut TabletRecord)) {
        if let Some(record) = self.roster.get_mut(tablet) {
            update(record);
        } else if self.roster.len() < MAX_ROSTER && receipts::is_named(tablet) {
            let mut record = TabletRecord::default();
            update(&mut record);
            self.roster.insert(tablet.into(), record);
        }
    }

    /// The hub's one `Rc` for a named tablet: the roster's key, added if there is room; and
    /// whether it is one (a full roster gives back `name` itself, found by comparing names).
    fn canonical_name(&mut self, name: &Rc<str>) -> (Rc<str>, bool) {
        if let Some((key, _)) = self.roster.get_key_value(&**name) {
            return (Rc::clone(key), true);
        }
        if self.roster.len() < MAX_ROSTER {
            self.roster.insert(Rc::clone(name), TabletRecord::default());
            return (Rc::clone(name), true);
        }
        (Rc::clone(name), false)
    }

    /// Queues a notice to every client; one more than `status_queue` notices behind is dropped.
    fn broadcast_notice(&mut self, json: SharedEnvelope) {
        self.notices.push(json);
        let end = self.notices.end();
        let limit = self.limits.status_queue as u64;
        let (express, departed) = (&mut self.express, &mut self.departed);
        self.subscribers.retain(|key, subscriber| {
            if end - subscriber.notice_cursor > limit {
                subscriber.say_farewell(Farewell::TooSlow, departed);
                return false;
            }
            subscriber.ring(key, express);
            true
        });
        let oldest_unsent = self.subscribers.iter().map(|(_, s)| s.notice_cursor).min().unwrap_or(end);
        self.notices.trim(oldest_unsent);
    }

    /// `GET /emergencias/{seq}`: the envelope and its status with the timeline.
    pub fn status_json(&self, seq: u64) -> Option<String> {
        let ledger = self.receipts.get(seq)?;
        let emergency: &RawValue = serde_json::from_str(&ledger.envelope).ok()?;
        Some(protocol::to_json(&protocol::EmergencyStatus { emergency, status: ledger.status(true) }))
    }

    /// The delivered and acked counts of `seq`, as known now.
    pub fn counts(&self, seq: u64) -> Counts {
        self.receipts.get(seq).map_or_else(Counts::default, |ledger| Counts {
            delivered: ledger.delivered,
            acked: ledger.acked,
        })
    }

    /// The envelope of an emergency the receipts hold (for the escalation command).
    /// The envelope of an escalated emergency whose command still has a reason to run: nobody
    /// acked it and it is not closed, though an ack or a close may have been stored with the
    /// escalation.
    pub fn unanswered_envelope(&self, seq: u64) -> Option<SharedEnvelope> {
        let ledger = self.receipts.get(seq).filter(|ledger| ledger.unanswered())?;
        Some(Rc::clone(&ledger.envelope))
    }

    /// What the roster remembers of a named tablet.
    pub fn tablet_record(&self, name: &str) -> TabletRecord {
        self.roster.get(name).copied().unwrap_or_default()
    }

    pub fn open_count(&self) -> usize {
        self.receipts.open_count()
    }

    pub fn open_unacked(&self) -> usize {
        self.receipts.open_unacked()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use super::*;
    use crate::core::clock::tests::{HOUR, MINUTE, SECOND, YEARS, reading_after};
    use crate::core::handle::HubHandle;
    use crate::core::subscription::Subscription;
    use crate::support::timestamp::rfc3339_millis;

    fn new_hub(limits: HubLimits, stream_id: &str) -> HubHandle {
        HubHandle::new(Hub::new(limits, stream_id)).0
    }

    impl Hub {
        fn publish_ok(&mut self, data: &RawValue, source: Source) -> Receipt {
            match self.publish(data, source, None) {
                Ok(Outcome::New(receipt)) => receipt,
                other => panic!("not published: {other:?}"),
            }
        }
    }

    fn keyed(key: &str, body: &str) -> Option<Fingerprint> {
        Some(Fingerprint::new(IdempotencyKey::parse(key).unwrap(), body))
    }

    fn limits() -> HubLimits {
        HubLimits {
            history: 3,
            history_bytes: 1 << 20,
            queue: 2,
            max_clients: 2,
            history_max_age: Duration::from_secs(3600),
            status_queue: 4,
            // These tests are of the history: no open emergency is resent.
            receipts: ReceiptLimits { max_open: 0, max_open_bytes: 1 << 20, max_unnamed: 4 },
            ack_timeout: None,
        }
    }

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).unwrap()
    }

    fn peer() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    fn subscribe(hub: &HubHandle, resume: Option<&Resume>) -> (Subscription, Greeting) {
        Subscription::open(hub, peer(), None, resume).unwrap()
    }

    /// The envelopes the client has not been sent yet, taken as its session would.
    fn take_all(client: &Subscription) -> Vec<serde_json::Value> {
        let mut batch = Vec::new();
        client.take_pending(usize::MAX, usize::MAX, |out| batch.push(out.json));
        batch.iter().map(|json| serde_json::from_str(json).unwrap()).collect()
    }

    /// What the express lane would take for `client` now, if anything (`None`: not listed).
    fn take_listed(hub: &HubHandle, client: &Subscription) -> Option<Vec<u64>> {
        let (key, client_id) = (client.key(), client.client_id);
        let mut seqs = Vec::new();
        let taken = hub.borrow().take_listed_pending(key, client_id, 32, 1 << 20, |out| seqs.extend(out.seq));
        taken.map(|_| seqs)
    }

    fn listed(hub: &HubHandle) -> Vec<(usize, u64)> {
        let mut listed = Vec::new();
        hub.borrow().take_listed(&mut listed);
        listed
    }

    #[test]
    fn a_parked_client_is_listed_once_for_the_express_lane_and_not_woken() {
        let hub = new_hub(limits(), "s");
        let (client, _) = subscribe(&hub, None);
        let (busy, _) = subscribe(&hub, None);
        client.park();
        hub.borrow().publish_ok(&raw("{}"), Source::Unix);
        hub.borrow().publish_ok(&raw("{}"), Source::Unix);
        assert!(!client.is_rung() && busy.is_rung());
        assert_eq!(listed(&hub), [(client.key(), client.client_id)]);
        assert_eq!(take_listed(&hub, &busy), None, "a busy client is its session's to serve");
        assert_eq!(take_listed(&hub, &client), Some(vec![1, 2]));
        hub.borrow().express_served(client.key(), client.client_id, true);
        hub.borrow().publish_ok(&raw("{}"), Source::Unix);
        assert_eq!(listed(&hub).len(), 1, "served, it is parked again");
        assert_eq!(take_listed(&hub, &client), Some(vec![3]));
        hub.borrow().express_served(client.key(), client.client_id, false);
        assert!(client.is_rung(), "what the lane hands back wakes the session");
        assert_eq!(take_listed(&hub, &client), None);
    }

    #[test]
    fn the_express_lane_still_hears_of_listed_clients_after_a_reset() {
        let hub = new_hub(limits(), "s");
        let woken = Arc::new(CountingWaker::default());
        let waker = Waker::from(Arc::clone(&woken));
        assert!(hub.borrow().poll_listed(&mut Context::from_waker(&waker)).is_pending());
        hub.borrow().reset("t");
        let (client, _) = subscribe(&hub, None);
        client.park();
        hub.borrow().publish_ok(&raw("{}"), Source::Unix);
        assert_eq!(woken.0.load(Ordering::SeqCst), 1, "the lane was not woken");
        assert_eq!(listed(&hub), [(client.key(), client.client_id)]);
    }

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_client_woken_and_parked_again_before_the_lane_comes_is_listed_once() {
        let hub = new_hub(limits(), "s");
        let (client, _) = subscribe(&hub, None);
        for _ in 0..3 {
            client.park();
            hub.borrow().publish_ok(&raw("{}"), Source::Unix);
            client.unpark();
            assert_eq!(take_all(&client).len(), 1, "woken, it serves itself");
        }
        client.park();
        hub.borrow().publish_ok(&raw("{}"), Source::Unix);
        assert_eq!(listed(&hub), [(client.key(), client.client_id)]);
        assert_eq!(take_listed(&hub, &client), Some(vec![4]));
    }

    #[test]
    fn a_listed_client_that_wakes_serves_itself() {
        let hub = new_hub(limits(), "s");
        let (client, _) = subscribe(&hub, None);
        client.park();
        hub.borrow().publish_ok(&raw("{}"), Source::Unix);
        client.unpark();
        assert!(client.is_rung(), "it finds its doorbell rung");
        assert_eq!(take_listed(&hub, &client), None, "the lane keeps off");
        assert_eq!(take_all(&client).len(), 1);
        client.park();
        hub.borrow().shut_down();
        assert!(client.is_rung() && client.farewell().is_some());
        assert_eq!(take_listed(&hub, &client), None, "a closed doorbell is never listed");
    }

    #[test]
    fn the_object_published_is_read_back_from_its_envelope() {
        let hub = new_hub(limits(), "s");
        let data = r#"{"data":"x","nested":{"data":1}}"#;
        hub.borrow().publish_ok(&raw(data), Source::Unix);
        assert_eq!(hub.borrow().published_data(1), Some(data));
        assert_eq!(hub.borrow().published_data(2), None);
    }

    /// Cluster mode: a named tablet's ack stored by another box, applied here before the
    /// tablet's own ack here, is the same tablet's receipt: its ack here is a repeat.
    #[test]
    fn an_ack_from_another_box_is_the_same_tablet_as_its_ack_here() {
        let mut limits = limits();
        limits.receipts.max_open = 4;
        let hub = new_hub(limits, "s");
        hub.borrow().publish_ok(&raw("{}"), Source::Http);
        let at = SystemTime::now();
        let remote = ReceiptEvent::Acked { seq: 1, tablet: "tablet-1".into(), at };
        assert_eq!(hub.borrow().apply(vec![remote]).len(), 1);
        assert_eq!(hub.borrow().ack_from("tablet-1", true, 1, at), AckRequest::Repeated);
        assert_eq!(hub.borrow().counts(1).acked, 1);
    }

    #[test]
    fn a_reset_starts_the_history_over_under_the_new_identity_and_tells_every_client() {
        let hub = new_hub(limits(), "old");
        hub.borrow().publish_ok(&raw("{}"), Source::Http);
        let (client, _) = subscribe(&hub, None);
        assert_eq!(hub.borrow().reset("new"), 1);
        assert_eq!(client.farewell(), Some(Farewell::StreamChanged));
        let hub = hub.borrow();
        assert_eq!((hub.stream_id(), hub.last_seq(), hub.client_count()), ("new", 0, 0));
    }

    fn pending_seqs(client: &Subscription) -> Vec<u64> {
        take_all(client).iter().map(|json| json["seq"].as_u64().unwrap()).collect()
    }

    #[test]
    fn seqs_grow_by_one_and_data_is_verbatim() {
        let hub = new_hub(limits(), "stream-a");
        let (client, _) = subscribe(&hub, None);
        let first = hub.borrow().publish_ok(&raw(r#"{"b": 1,  "a":[ ]}"#), Source::Unix);
        let second = hub.borrow().publish_ok(&raw("{}"), Source::Http);
        assert_eq!((first.seq, second.seq), (1, 2));
        assert_eq!(first.queued_to, 1);
        assert!(client.is_rung());
        let mut batch = Vec::new();
        assert_eq!(client.take_pending(1, usize::MAX, |out| batch.push(out.json)), 1);
        let json = &batch[0];
        assert!(json.contains(r#""data":{"b": 1,  "a":[ ]}"#), "{json}");
        assert!(json.starts_with(r#"{"type":"emergencia","seq":1,"received_at":""#), "{json}");
        assert_eq!(pending_seqs(&client), [2]);
        assert_eq!(pending_seqs(&client), [] as [u64; 0]);
    }

    fn first<T: std::fmt::Debug>(request: T, event: impl FnOnce(T) -> Option<ReceiptEvent>) -> ReceiptEvent {
        let shown = format!("{request:?}");
        event(request).unwrap_or_else(|| panic!("not a first: {shown}"))
    }

    #[test]
    fn a_fresh_client_gets_the_open_ones_then_their_status_then_the_notices() {
        let receipts = ReceiptLimits { max_open: 10, max_open_bytes: 1 << 20, max_unnamed: 4 };
        let hub = new_hub(HubLimits { receipts, ..limits() }, "stream-a");
        for _ in 0..5 {
            hub.borrow().publish_ok(&raw("{}"), Source::Unix);
        }
        let now = SystemTime::now();
        let close = first(hub.borrow().close(2, None, now), |r| match r {
            CloseRequest::First(event) => Some(event),
            _ => None,
        });
        let ack = |seq, tablet: &str| {
            first(hub.borrow().ack_from(tablet, true, seq, now), |r| match r {
                AckRequest::First(event) => Some(event),
                _ => None,
            })
        };
        let acked = ack(4, "tablet-1");
        hub.borrow().apply(vec![close, acked]);
        // History 3: seqs 3..=5 are in it, 1 is open beyond it, 2 is closed.
        let (client, greeting) = subscribe(&hub, None);
        assert_eq!(greeting.open, [1, 3, 4, 5]);
        let later = ack(5, "tablet-2");
        hub.borrow().apply(vec![later]);
        let kinds: Vec<(String, u64)> = take_all(&client)
            .iter()
            .map(|json| (json["type"].as_str().unwrap().to_owned(), json["seq"].as_u64().unwrap()))
            .collect();
        // Statuses are read when sent, not when it subscribed: 5's already counts the later ack,
        // which its notice then repeats (counts are absolute, so that is harmless).
        let expected = [
            ("emergencia", 1),
            ("emergencia", 3),
            ("emergencia", 4),
            ("emergencia", 5),
            ("status", 4),
            ("status", 5),
            ("ack", 5),
        ];
        assert_eq!(kinds, expected.map(|(kind, seq)| (kind.to_owned(), seq)));
        assert_eq!(take_all(&client), [] as [serde_json::Value; 0]);
    }

    #[test]
    fn replay_covers_exactly_what_was_missed() {
        let hub = new_hub(limits(), "stream-a");
        for _ in 0..5 {
            hub.borrow().publish_ok(&raw("{}"), Source::Unix);
        }
        // History keeps seqs 3..=5.
        let cases = [
            (4, vec![5], 0, false),
            (2, vec![3, 4, 5], 0, false),
            (0, vec![3, 4, 5], 2, false),
            (5, vec![], 0, false),
            (9, vec![3, 4, 5], 0, true),
        ];
        for (since, expected, missed, reset) in cases {
            let (client, greeting) = subscribe(&hub, Some(&Resume { since, stream: None }));
            assert_eq!(pending_seqs(&client), expected, "since={since}");
            let info = greeting.replay.unwrap();
            assert_eq!(
                (info.missed, info.reset, info.count),
                (missed, reset, expected.len()),
                "since={since}"
            );
        }
    }

    #[test]
    fn a_client_from_another_history_gets_everything() {
        let hub = new_hub(limits(), "stream-a");
        for _ in 0..5 {
            hub.borrow().publish_ok(&raw("{}"), Source::Unix);
        }
        let elsewhere = Resume { since: 4, stream: Some("stream-b".into()) };
        let (client, greeting) = subscribe(&hub, Some(&elsewhere));
        assert_eq!(pending_seqs(&client), [3, 4, 5]);
        let info = greeting.replay.unwrap();
        assert!(info.stream_changed && !info.reset && info.missed == 0);
        let same = Resume { since: 4, stream: Some("stream-a".into()) };
        let (client, _) = subscribe(&hub, Some(&same));
        assert_eq!(pending_seqs(&client), [5]);
    }

    #[test]
    fn old_entries_expire_by_age() {
        let hub = new_hub(limits(), "stream-a");
        hub.borrow().publish_ok(&raw("{}"), Source::Unix);
        let later = Reading::now();
        hub.borrow().expire(Reading { wall: later.wall + Duration::from_secs(3601), ..later });
        let range = hub.borrow().history_range();
        assert_eq!((range.count, range.first_seq, range.last_seq), (0, 2, 1));
        assert_eq!(hub.borrow().history_bytes(), 0);
    }

    fn stored_at(seq: u64, received_at: SystemTime) -> Stored {
        Stored { seq, received_at, envelope: format!(r#"{{"seq":{seq}}}"#) }
    }

    #[test]
    fn a_clock_that_jumps_ahead_expires_nothing_until_it_has_kept_time_for_max_age() {
        let hub = new_hub(limits(), "stream-a");
        let start = Reading::now();
        hub.borrow().expire(start);
        hub.borrow().publish_ok(&raw("{}"), Source::Unix);
        let jumped = start.wall + YEARS;
        hub.borrow().expire(reading_after(start, MINUTE, jumped));
        assert_eq!(hub.borrow().history_range().count, 1);
        hub.borrow().expire(reading_after(start, MINUTE + HOUR - SECOND, jumped + HOUR - SECOND));
        assert_eq!(hub.borrow().history_range().count, 1);
        hub.borrow().expire(reading_after(start, MINUTE + HOUR, jumped + HOUR));
        assert_eq!(hub.borrow().history_range().count, 0);
    }

    #[test]
    fn a_clock_set_after_boot_expires_nothing_received_before_it_was_set() {
        // A board without a real-time clock boots in 1970 and stamps what it receives by it.
        let hub = new_hub(limits(), "stream-a");
        let boot = Reading { wall: SystemTime::UNIX_EPOCH + 10 * MINUTE, mono: Instant::now() };
        hub.borrow().expire(boot);
        hub.borrow().deliver(stored_at(1, boot.wall));
        hub.borrow().deliver(stored_at(2, boot.wall));
        let set = SystemTime::now();
        hub.borrow().expire(reading_after(boot, MINUTE, set));
        assert_eq!(hub.borrow().history_range().count, 2);
        hub.borrow().expire(reading_after(boot, MINUTE + HOUR, set + HOUR));
        assert_eq!(hub.borrow().history_range().count, 0);
    }

    #[test]
    fn a_clock_that_steps_back_never_stamps_an_emergency_before_the_one_before_it() {
        // Stamped an hour ahead of the clock as it reads now, that is before it stepped back.
        let before_the_step = SystemTime::now() + HOUR;
        let restored =
            Hub::new(limits(), "stream-a").restored(1, vec![stored_at(1, before_the_step)], Vec::new());
        let hub = HubHandle::new(restored).0;
        hub.borrow().publish_ok(&raw("{}"), Source::Unix);
        let hub = hub.borrow();
        let newest = hub.history.back().unwrap();
        assert_eq!(newest.received_at, before_the_step);
        assert!(newest.json.contains(&rfc3339_millis(before_the_step)), "{}", newest.json);
    }

    #[test]
    fn a_dropped_client_keeps_its_name_and_count_until_its_session_ends() {
        let hub = new_hub(limits(), "stream-a");
        let (slow, _) = subscribe(&hub, None);
        hub.borrow().publish_ok(&raw("{}"), Source::Unix);
        assert_eq!(pending_seqs(&slow), [1]);
        slow.delivered(&[1], SystemTime::now());
        for _ in 0..3 {
            hub.borrow().publish_ok(&raw("{}"), Source::Unix);
        }
        assert_eq!(slow.farewell(), Some(Farewell::TooSlow));
        assert_eq!(hub.borrow().client_count(), 0);
        assert_eq!(slow.sent(), 1);
        assert_eq!(slow.label(", SSE"), format!("client {} (127.0.0.1:9, SSE)", slow.client_id));
        let (key, client_id) = (slow.key(), slow.client_id);
        drop(slow);
        assert!(hub.borrow().summary(key, client_id).is_none(), "forgotten once its session ends");
    }

    #[test]
    fn falling_queue_events_behind_drops_only_that_client() {
        let hub = new_hub(limits(), "stream-a");
        let (slow, _) = subscribe(&hub, None);
        let (fast, _) = subscribe(&hub, None);
        for seq in 1..=3 {
            hub.borrow().publish_ok(&raw("{}"), Source::Unix);
            assert_eq!(pending_seqs(&fast), [seq]);
        }
        assert_eq!(slow.farewell(), Some(Farewell::TooSlow));
        assert_eq!(pending_seqs(&slow), [] as [u64; 0]);
        assert_eq!(fast.farewell(), None);
        assert_eq!(hub.borrow().client_count(), 1);
    }

    #[test]
    fn replay_does_not_count_as_falling_behind() {
        let hub = new_hub(HubLimits { history: 10, ..limits() }, "stream-a");
        for _ in 0..5 {
            hub.borrow().publish_ok(&raw("{}"), Source::Unix);
        }
        let (client, _) = subscribe(&hub, Some(&Resume { since: 0, stream: None }));
        for _ in 0..2 {
            hub.borrow().publish_ok(&raw("{}"), Source::Unix);
        }
        assert_eq!(client.farewell(), None);
        assert_eq!(pending_seqs(&client), [1, 2, 3, 4, 5, 6, 7]);
        hub.borrow().publish_ok(&raw("{}"), Source::Unix);
        for _ in 0..3 {
            hub.borrow().publish_ok(&raw("{}"), Source::Unix);
        }
        assert_eq!(client.farewell(), Some(Farewell::TooSlow));
    }

    #[test]
    fn history_keeps_what_a_client_has_not_been_sent() {
        // history 3, queue 2: the client may lag 2 live events, so up to 3 + 2 stay.
        let hub = new_hub(limits(), "stream-a");
        for _ in 0..3 {
            hub.borrow().publish_ok(&raw("{}"), Source::Unix);
        }
        let (client, _) = subscribe(&hub, Some(&Resume { since: 0, stream: None }));
        for _ in 0..2 {
            hub.borrow().publish_ok(&raw("{}"), Source::Unix);
        }
        assert_eq!(hub.borrow().history_range().count, 3);
        assert_eq!(hub.borrow().history.len(), 5);
        let mut batch = Vec::new();
        client.take_pending(4, usize::MAX, |out| batch.push(out.json));
        hub.borrow().publish_ok(&raw("{}"), Source::Unix);
        assert_eq!(hub.borrow().history_range().first_seq, 4);
        assert_eq!(pending_seqs(&client), [5, 6]);
        assert_eq!(client.farewell(), None);
    }

    #[test]
    fn a_restored_history_with_a_gap_keeps_its_newest_run_and_reports_the_rest_missed() {
        let stored = |seq| stored_at(seq, SystemTime::now());
        let retained = vec![stored(1), stored(2), stored(4), stored(5)];
        let hub = HubHandle::new(Hub::new(HubLimits { history: 10, ..limits() }, "stream-a").restored(
            5,
            retained,
            Vec::new(),
        ))
        .0;
        let range = hub.borrow().history_range();
        assert_eq!((range.first_seq, range.count), (4, 2));
        let (client, greeting) = subscribe(&hub, Some(&Resume { since: 2, stream: None }));
        assert_eq!(greeting.replay.unwrap().missed, 1);
        assert_eq!(pending_seqs(&client), [4, 5]);
        let (newcomer, _) = subscribe(&hub, None);
        assert_eq!(pending_seqs(&newcomer), [] as [u64; 0]);
    }

    #[test]
    fn resuming_clients_cannot_keep_old_entries_forever() {
        // history 3, queue 2. One client holds entry 1; later ones resuming from 0 start at the
        // catch-up history, not at what the first one holds.
        let hub = new_hub(HubLimits { max_clients: 10, ..limits() }, "stream-a");
        let mut clients = Vec::new();
        for _ in 0..10 {
            let (client, _) = subscribe(&hub, Some(&Resume { since: 0, stream: None }));
            clients.push(client);
            hub.borrow().publish_ok(&raw("{}"), Source::Unix);
        }
        assert!(hub.borrow().history.len() <= 3 + 2 + 1, "{} entries kept", hub.borrow().history.len());
    }

    #[test]
    fn a_batch_stops_at_its_limits() {
        let hub = new_hub(HubLimits { history: 10, queue: 10, ..limits() }, "stream-a");
        let (client, _) = subscribe(&hub, None);
        for _ in 0..5 {
            hub.borrow().publish_ok(&raw("{}"), Source::Unix);
        }
        let mut batch = Vec::new();
        assert_eq!(client.take_pending(2, usize::MAX, |out| batch.push(out.json)), 2);
        assert_eq!(client.take_pending(10, 1, |out| batch.push(out.json)), 1);
        assert_eq!(pending_seqs(&client), [4, 5]);
    }

    #[test]
    fn a_reused_key_is_not_removed_by_the_old_client() {
        let hub = new_hub(limits(), "stream-a");
        let (slow, _) = subscribe(&hub, None);
        for _ in 0..3 {
            hub.borrow().publish_ok(&raw("{}"), Source::Unix);
        }
        let (newcomer, _) = subscribe(&hub, None);
        assert_eq!(newcomer.key(), slow.key());
        drop(slow);
        assert_eq!(hub.borrow().client_count(), 1);
        drop(newcomer);
        assert_eq!(hub.borrow().client_count(), 0);
    }

    #[test]
    fn clients_are_capped_and_refused_at_shutdown() {
        let hub = new_hub(limits(), "stream-a");
        let _a = subscribe(&hub, None);
        let b = subscribe(&hub, None);
        assert_eq!(Subscription::open(&hub, peer(), None, None).err(), Some(Refusal::Full));
        drop(b);
        hub.borrow().shut_down();
        assert_eq!(Subscription::open(&hub, peer(), None, None).err(), Some(Refusal::ShuttingDown));
        assert_eq!(hub.borrow().publish(&raw("{}"), Source::Http, None), Err(Refusal::ShuttingDown));
        assert_eq!(hub.borrow().last_seq(), 0);
    }

    #[test]
    fn revoking_closes_only_the_revoked_tokens() {
        let hub = new_hub(limits(), "stream-a");
        let identity =
            |name: &str| Some(Identity { name: name.into(), token: format!("{name}-token").into() });
        let (kept, _) = Subscription::open(&hub, peer(), identity("kept"), None).unwrap();
        let (revoked, _) = Subscription::open(&hub, peer(), identity("revoked"), None).unwrap();
        assert_eq!(hub.borrow().revoke(|token| token == "kept-token"), 1);
        assert_eq!(revoked.farewell(), Some(Farewell::Revoked));
        assert_eq!(kept.farewell(), None);
        let before = SystemTime::now();
        let clients: Vec<ConnectedClient> = hub.borrow().clients().collect();
        assert_eq!(clients.len(), 1);
        assert_eq!(clients[0].name.as_deref(), Some("kept"));
        // Plain data: how it is shown is the transport's business.
        assert_eq!(clients[0].peer, peer());
        assert!(clients[0].connected_at <= before, "{:?}", clients[0].connected_at);
    }

    #[test]
    fn history_is_bounded_by_bytes_too() {
        let hub = new_hub(HubLimits { history_bytes: 1, ..limits() }, "stream-a");
        for _ in 0..3 {
            hub.borrow().publish_ok(&raw("{}"), Source::Unix);
        }
        let range = hub.borrow().history_range();
        assert_eq!((range.first_seq, range.last_seq, range.count), (3, 3, 1));
    }

    #[test]
    fn a_retry_under_its_key_is_not_published_again() {
        let hub = new_hub(limits(), "stream-a");
        let (client, _) = subscribe(&hub, None);
        let publish = |body: &str| hub.borrow().publish(&raw(body), Source::Unix, keyed("k", body));
        assert_eq!(publish("{}"), Ok(Outcome::New(Receipt { seq: 1, queued_to: 1 })));
        assert_eq!(pending_seqs(&client), [1]);
        assert_eq!(publish("{}"), Ok(Outcome::Duplicate { seq: 1 }));
        assert_eq!(publish(r#"{"other":1}"#), Ok(Outcome::Conflict { seq: 1 }));
        assert_eq!(pending_seqs(&client), [] as [u64; 0]);
        assert_eq!(hub.borrow().last_seq(), 1);
    }

    #[test]
    fn a_key_is_forgotten_when_its_emergency_leaves_the_history() {
        // history 3: the keys of at most the 3 newest stay.
        let hub = new_hub(limits(), "stream-a");
        for n in 0..10 {
            hub.borrow().publish(&raw("{}"), Source::Unix, keyed(&format!("k{n}"), "{}")).unwrap();
        }
        assert_eq!(hub.borrow().keys.len(), 3);
        let again = |key: &str| hub.borrow().publish(&raw("{}"), Source::Unix, keyed(key, "{}"));
        assert_eq!(again("k9"), Ok(Outcome::Duplicate { seq: 10 }));
        assert_eq!(again("k6"), Ok(Outcome::New(Receipt { seq: 11, queued_to: 0 })));
        let later = Reading::now();
        hub.borrow().expire(Reading { wall: later.wall + Duration::from_secs(3601), ..later });
        assert_eq!(hub.borrow().keys.len(), 0, "the keys expire with their emergencies");
    }
}
