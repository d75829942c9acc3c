//! Receipts: per emergency, which tablets were sent it in full (delivered) and which acked it,
//! whether it was closed and whether it escalated. Domain state with no I/O.
//!
//! A `Ledger` exists for every emergency the hub's history holds and for every emergency still
//! open, however old (up to `ReceiptLimits::max_open`): closed ones leave with their history
//! entry, open ones stay so that a fresh tablet is sent them first. A ledger holds at most one
//! receipt per tablet: the named ones (the subscribe tokens, a bounded roster) and at most
//! `max_unnamed` connections without a name. So the state is bounded by the history, the open
//! cap and the roster.
//!
//! Changes that other tablets are told of (an ack, a close, an escalation) are first asked for
//! (`begin_ack`, `begin_close`, `due_escalations`: marked pending, so each is stored once), then
//! stored by the journal, and only then applied (`apply`), which says what to broadcast:
//! what a tablet was told never precedes what is on disk.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::value::RawValue;

use crate::core::SharedEnvelope;
use crate::protocol::{Status, TimelineEntry};
use crate::support::timestamp::rfc3339_millis;

/// The bounds of the receipts, from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct ReceiptLimits {
    /// Open emergencies kept beyond the history (`--max-open`); past it the oldest open one is
    /// let go, with a warning.
    pub max_open: usize,
    /// Bytes of envelopes the open emergencies hold (`--max-open-bytes`); past it, likewise,
    /// though the newest open one is always kept.
    pub max_open_bytes: usize,
    /// Receipts per emergency of connections that have no token name (`--max-unnamed-receipts`).
    pub max_unnamed: usize,
}

/// One change to the receipts, as the journal stores it and the hub applies it. Plain data
/// (`Send`): it crosses to the storage thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReceiptEvent {
    /// The emergency was queued to `clients` connected clients when it was published (stored
    /// for `queued_to` after a restart).
    Queued { seq: u64, clients: usize },
    /// The emergency was written in full to the tablet's socket.
    Delivered { seq: u64, tablet: String, at: SystemTime },
    /// The tablet's first ack.
    Acked { seq: u64, tablet: String, at: SystemTime },
    /// Closed by a publisher, with its optional JSON object (`{"motivo":...}`).
    Closed { seq: u64, at: SystemTime, detail: Option<String> },
    /// Nobody acked it within `--ack-timeout`.
    Escalated { seq: u64, at: SystemTime },
    /// Its escalation's `--on-unacked` is about to start (stored before it does), or there is
    /// none to run: a restart runs the commands of the escalated ones without this mark.
    CommandStarted { seq: u64, at: SystemTime },
}

impl ReceiptEvent {
    /// Already in the receipts when it is made, and nobody waits for it: the journal may take
    /// it with the next transaction there is anyway.
    pub fn is_held(&self) -> bool {
        matches!(self, ReceiptEvent::Queued { .. } | ReceiptEvent::Delivered { .. })
    }

    pub fn seq(&self) -> u64 {
        match self {
            ReceiptEvent::Queued { seq, .. }
            | ReceiptEvent::Delivered { seq, .. }
            | ReceiptEvent::Acked { seq, .. }
            | ReceiptEvent::Closed { seq, .. }
            | ReceiptEvent::Escalated { seq, .. }
            | ReceiptEvent::CommandStarted { seq, .. } => *seq,
        }
    }
}

/// A close: when, and what the publisher said (a JSON object), if anything.
#[derive(Clone, Debug)]
pub struct Closure {
    pub at: SystemTime,
    pub detail: Option<Rc<RawValue>>,
}

/// One tablet's receipt of one emergency. Times are Unix milliseconds, 0 for "not yet": this is
/// held per tablet and emergency, so it is kept small.
#[derive(Clone, Debug)]
pub struct TabletReceipt {
    pub tablet: Rc<str>,
    delivered_ms: u64,
    acked_ms: u64,
    /// Asked for and sent to the journal, not yet applied.
    ack_pending: bool,
}

impl TabletReceipt {
    pub fn delivered_at(&self) -> Option<SystemTime> {
        from_millis(self.delivered_ms)
    }

    pub fn acked_at(&self) -> Option<SystemTime> {
        from_millis(self.acked_ms)
    }
}

/// Everything known of one emergency's receipts.
#[derive(Debug)]
pub struct Ledger {
    pub seq: u64,
    pub received_at: SystemTime,
    /// Its envelope, shared with the history: an open emergency is resent to fresh tablets
    /// after the history has let it go.
    pub envelope: SharedEnvelope,
    /// Clients it was queued to when published (`ReceiptEvent::Queued` after a restart; 0 if
    /// that was lost).
    pub queued_to: usize,
    pub tablets: Vec<TabletReceipt>,
    pub delivered: usize,
    pub acked: usize,
    /// Receipts of tablets without a name, for `max_unnamed`.
    unnamed: usize,
    pub closed: Option<Closure>,
    pub escalated_at: Option<SystemTime>,
    /// Its escalation's command was started (or there was none): `ReceiptEvent::CommandStarted`.
    command_started: bool,
    close_pending: bool,
    escalation_pending: bool,
    /// Let go over `max_open`: no longer open (resent, escalated), kept only for its history entry.
    abandoned: bool,
}

impl Ledger {
    fn new(seq: u64, received_at: SystemTime, envelope: SharedEnvelope, queued_to: usize) -> Ledger {
        Ledger {
            seq,
            received_at,
            envelope,
            queued_to,
            tablets: Vec::new(),
            delivered: 0,
            acked: 0,
            unnamed: 0,
            closed: None,
            escalated_at: None,
            command_started: false,
            close_pending: false,
            escalation_pending: false,
            abandoned: false,
        }
    }

    /// Its status as the protocol shows it: as a `status` message, or with the per-tablet
    /// timeline for `GET /emergencias/{seq}`.
    pub fn status(&self, with_timeline: bool) -> Status<'_> {
        let timeline = with_timeline.then(|| {
            let entries = self.tablets.iter().map(|receipt| TimelineEntry {
                tablet: &receipt.tablet,
                delivered_at: receipt.delivered_at().map(rfc3339_millis),
                acked_at: receipt.acked_at().map(rfc3339_millis),
            });
            entries.collect()
        });
        Status {
            kind: (!with_timeline).then_some("status"),
            seq: self.seq,
            queued_to: self.queued_to,
            delivered: self.delivered,
            acked: self.acked,
            acked_by: self.acked_by().collect(),
            closed: self.closed.is_some(),
            closed_at: self.closed.as_ref().map(|closure| rfc3339_millis(closure.at)),
            close: self.closed.as_ref().and_then(|closure| closure.detail.as_deref()),
            escalated: self.escalated_at.is_some(),
            escalated_at: self.escalated_at.map(rfc3339_millis),
            timeline,
        }
    }

    /// Not closed, and not let go over `--max-open`: resent to fresh tablets, may escalate.
    pub fn is_open(&self) -> bool {
        self.closed.is_none() && !self.abandoned
    }

    /// Not closed, nobody acked it, and no escalation, ack or close of it being stored: an ack
    /// or a close on its way to the disk when the deadline passes wins over the escalation. One
    /// let go over `--max-open` (not resent to fresh tablets) still escalates while the history
    /// holds it: the cap bounds what is resent, not who is alerted.
    fn may_escalate(&self) -> bool {
        self.closed.is_none()
            && self.acked == 0
            && self.escalated_at.is_none()
            && !self.escalation_pending
            && !self.close_pending
            && !self.tablets.iter().any(|receipt| receipt.ack_pending)
    }

    /// Nobody acked it and it is not closed: its escalation's command still has a reason to
    /// run (asked once its escalation is stored, for what was stored alongside).
    pub fn unanswered(&self) -> bool {
        self.acked == 0 && self.closed.is_none()
    }

    /// Escalated, its command never started, and still unanswered: a restart runs its command.
    pub fn command_owed(&self) -> bool {
        self.escalated_at.is_some() && !self.command_started && self.unanswered()
    }

    /// Whether there is anything to tell a tablet beyond the envelope itself.
    pub fn has_news(&self) -> bool {
        self.acked > 0 || self.closed.is_some() || self.escalated_at.is_some()
    }

    /// The tablets that acked it, in the order they did.
    pub fn acked_by(&self) -> impl Iterator<Item = &str> {
        let mut acked: Vec<&TabletReceipt> = self.tablets.iter().filter(|r| r.acked_ms != 0).collect();
        acked.sort_by_key(|receipt| receipt.acked_ms);
        acked.into_iter().map(|receipt| &*receipt.tablet)
    }

    /// The tablet's receipt, made if it has none and the unnamed cap allows. A `Tablet` whose
    /// name is the hub's one `Rc` for it is found by pointer alone: comparing names was the
    /// largest cost of a delivery at 1000 tablets (BENCHMARKS.md, "What acks cost").
    fn receipt_or_new(&mut self, tablet: Tablet<'_>, max_unnamed: usize) -> Option<&mut TabletReceipt> {
        let Tablet { name, named, by_pointer } = tablet;
        let index = self.tablets.iter().position(|receipt| Rc::ptr_eq(&receipt.tablet, name));
        let index = match index {
            None if !by_pointer => self.tablets.iter().position(|receipt| receipt.tablet == *name),
            found => found,
        };
        if let Some(index) = index {
            return self.tablets.get_mut(index);
        }
        let tablet = name;
        if !named && self.unnamed >= max_unnamed {
            return None;
        }
        if !named {
            self.unnamed += 1;
        }
        let receipt =
            TabletReceipt { tablet: Rc::clone(tablet), delivered_ms: 0, acked_ms: 0, ack_pending: false };
        self.tablets.push(receipt);
        self.tablets.last_mut()
    }
}

/// Who a receipt is for: a tablet's name, whether it is a token's name (not capped), and whether
/// `name` is the hub's one `Rc` for it (every receipt of it then holds that `Rc`).
#[derive(Clone, Copy, Debug)]
pub struct Tablet<'a> {
    pub name: &'a Rc<str>,
    pub named: bool,
    pub by_pointer: bool,
}

/// What an ack asked for turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum AckRequest {
    /// No such emergency (never published, or no longer retained).
    Unknown,
    /// This tablet acked it before (or its ack is being stored): counted once.
    Repeated,
    /// Past the unnamed cap: not recorded.
    Uncounted,
    /// The first: store this, then apply it.
    First(ReceiptEvent),
}

/// What a close asked for turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum CloseRequest {
    Unknown,
    /// Closed before, or its close is being stored.
    AlreadyClosed,
    First(ReceiptEvent),
}

/// What applying a stored event changed, for the hub to broadcast.
#[derive(Debug)]
pub enum Applied {
    /// Nothing anybody is told of (a delivery, or an event for a ledger gone meanwhile).
    Nothing,
    Ack {
        seq: u64,
        tablet: Rc<str>,
        at: SystemTime,
        acked: usize,
        delivered: usize,
        first_ack_after: Option<Duration>,
    },
    Closed {
        seq: u64,
        closure: Closure,
    },
    Escalated {
        seq: u64,
        at: SystemTime,
        delivered: usize,
    },
}

/// The receipts of every emergency the hub knows of, by seq.
#[derive(Debug)]
pub struct Receipts {
    limits: ReceiptLimits,
    ledgers: BTreeMap<u64, Ledger>,
    open: usize,
    /// Bytes of the open ones' envelopes (shared with the history while it holds them).
    open_bytes: usize,
}

impl Receipts {
    pub fn new(limits: ReceiptLimits) -> Receipts {
        Receipts { limits, ledgers: BTreeMap::new(), open: 0, open_bytes: 0 }
    }

    pub fn get(&self, seq: u64) -> Option<&Ledger> {
        self.ledgers.get(&seq)
    }

    /// Open emergencies, oldest first.
    pub fn open(&self) -> impl Iterator<Item = &Ledger> {
        self.ledgers.values().filter(|ledger| ledger.is_open())
    }

    pub fn open_count(&self) -> usize {
        self.open
    }

    /// The ledgers with seqs `first..=last`, oldest first.
    pub fn ledgers_in(&self, first: u64, last: u64) -> impl Iterator<Item = &Ledger> {
        // Half-open and never reversed: `BTreeMap::range` panics on a start past its end.
        let end = last.saturating_add(1).max(first);
        self.ledgers.range(first..end).map(|(_, ledger)| ledger)
    }

    /// Every ledger, oldest first.
    pub fn ledgers(&self) -> impl Iterator<Item = &Ledger> {
        self.ledgers.values()
    }

    /// A new emergency; `history_from` is the oldest seq the history holds. Returns the seq of
    /// an open emergency let go because more than `max_open` are open, if one was (the caller
    /// warns).
    pub fn published(
        &mut self,
        seq: u64,
        received_at: SystemTime,
        envelope: SharedEnvelope,
        queued_to: usize,
        history_from: u64,
    ) -> Option<u64> {
        self.opened(Ledger::new(seq, received_at, envelope, queued_to));
        self.enforce_open_cap(history_from).into_iter().next()
    }

    /// An emergency the data dir held at start; its stored events are applied after, then the
    /// open cap (`enforce_open_cap`).
    pub fn restored(&mut self, seq: u64, received_at: SystemTime, envelope: SharedEnvelope) {
        self.opened(Ledger::new(seq, received_at, envelope, 0));
    }

    fn opened(&mut self, ledger: Ledger) {
        self.open += 1;
        self.open_bytes += ledger.envelope.len();
        self.ledgers.insert(ledger.seq, ledger);
    }

    /// A ledger stops being open (closed or let go).
    fn no_longer_open(&mut self, seq: u64) {
        self.open -= 1;
        let bytes = self.ledgers.get(&seq).map_or(0, |ledger| ledger.envelope.len());
        self.open_bytes -= bytes;
    }

    /// Lets the oldest open emergencies go while more than `max_open` are, or they hold more
    /// than `max_open_bytes`: no longer open, and forgotten unless the history (from
    /// `history_from` on) still holds them. Returns their seqs.
    pub fn enforce_open_cap(&mut self, history_from: u64) -> Vec<u64> {
        let mut let_go = Vec::new();
        while self.open > self.limits.max_open
            || (self.open > 1 && self.open_bytes > self.limits.max_open_bytes)
        {
            let Some(seq) = self.open().map(|ledger| ledger.seq).next() else { break };
            self.no_longer_open(seq);
            if seq < history_from {
                self.ledgers.remove(&seq);
            } else if let Some(ledger) = self.ledgers.get_mut(&seq) {
                ledger.abandoned = true;
            }
            let_go.push(seq);
        }
        let_go
    }

    /// The history let `seq` go: its ledger goes too, unless it is still open.
    pub fn history_dropped(&mut self, seq: u64) {
        if self.ledgers.get(&seq).is_some_and(|ledger| !ledger.is_open()) {
            self.ledgers.remove(&seq);
        }
    }

    /// Whether `seq` is known and may still take a receipt of a tablet without a name.
    pub fn takes_unnamed(&self, seq: u64) -> bool {
        self.ledgers.get(&seq).is_some_and(|ledger| ledger.unnamed < self.limits.max_unnamed)
    }

    /// Whether `seq` has a ledger (it is retained, or open).
    pub fn knows(&self, seq: u64) -> bool {
        self.ledgers.contains_key(&seq)
    }

    /// Records that `seq` was written in full to `tablet`: the event to store, the first time.
    pub fn delivered(&mut self, seq: u64, tablet: Tablet<'_>, at: SystemTime) -> Option<ReceiptEvent> {
        let max_unnamed = self.limits.max_unnamed;
        let ledger = self.ledgers.get_mut(&seq)?;
        let receipt = ledger.receipt_or_new(tablet, max_unnamed)?;
        if receipt.delivered_ms != 0 {
            return None;
        }
        receipt.delivered_ms = millis(at);
        ledger.delivered += 1;
        Some(ReceiptEvent::Delivered { seq, tablet: tablet.name.to_string(), at })
    }

    /// A tablet acks `seq`: the event to store if it is its first.
    pub fn begin_ack(&mut self, seq: u64, tablet: Tablet<'_>, at: SystemTime) -> AckRequest {
        let max_unnamed = self.limits.max_unnamed;
        let Some(ledger) = self.ledgers.get_mut(&seq) else { return AckRequest::Unknown };
        let Some(receipt) = ledger.receipt_or_new(tablet, max_unnamed) else {
            return AckRequest::Uncounted;
        };
        if receipt.acked_ms != 0 || receipt.ack_pending {
            return AckRequest::Repeated;
        }
        receipt.ack_pending = true;
        AckRequest::First(ReceiptEvent::Acked { seq, tablet: tablet.name.to_string(), at })
    }

    /// A publisher closes `seq`: the event to store if it is the first close.
    pub fn begin_close(&mut self, seq: u64, detail: Option<String>, at: SystemTime) -> CloseRequest {
        let Some(ledger) = self.ledgers.get_mut(&seq) else { return CloseRequest::Unknown };
        if ledger.closed.is_some() || ledger.close_pending {
            return CloseRequest::AlreadyClosed;
        }
        ledger.close_pending = true;
        CloseRequest::First(ReceiptEvent::Closed { seq, at, detail })
    }

    /// Forgets that `event` was asked for (`begin_ack`, `begin_close`, `due_escalations`): it
    /// will never be stored (the journal refused it, or stopped), so it may be asked for again.
    pub fn abandon(&mut self, event: &ReceiptEvent) {
        let Some(ledger) = self.ledgers.get_mut(&event.seq()) else { return };
        match event {
            ReceiptEvent::Acked { tablet, .. } => {
                let pending = ledger.tablets.iter_mut().find(|r| r.ack_pending && *r.tablet == **tablet);
                if let Some(receipt) = pending {
                    receipt.ack_pending = false;
                }
            }
            ReceiptEvent::Closed { .. } => ledger.close_pending = false,
            ReceiptEvent::Escalated { .. } => ledger.escalation_pending = false,
            ReceiptEvent::Queued { .. }
            | ReceiptEvent::Delivered { .. }
            | ReceiptEvent::CommandStarted { .. } => {}
        }
    }

    /// Open, unacked emergencies received `timeout` or longer before `now` and not escalated
    /// yet: the events to store, each marked so that it is asked for once.
    pub fn due_escalations(&mut self, now: SystemTime, timeout: Duration) -> Vec<ReceiptEvent> {
        let mut due = Vec::new();
        for ledger in self.ledgers.values_mut() {
            let deadline = ledger.received_at + timeout;
            if deadline <= now && ledger.may_escalate() {
                ledger.escalation_pending = true;
                due.push(ReceiptEvent::Escalated { seq: ledger.seq, at: now });
            }
        }
        due
    }

    /// The earliest moment an escalation may fall due, if any could.
    pub fn next_deadline(&self, timeout: Duration) -> Option<SystemTime> {
        let waiting = self.ledgers.values().filter(|ledger| ledger.may_escalate());
        waiting.map(|ledger| ledger.received_at + timeout).min()
    }

    /// The seqs whose escalation's command is owed (`Ledger::command_owed`), oldest first.
    pub fn commands_owed(&self) -> Vec<u64> {
        self.ledgers.values().filter(|ledger| ledger.command_owed()).map(|ledger| ledger.seq).collect()
    }

    /// Open emergencies nobody has acked.
    pub fn open_unacked(&self) -> usize {
        self.open().filter(|ledger| ledger.acked == 0).count()
    }

    /// Applies a stored event; says what to broadcast (the hub gives the tablet's name: `apply_as`).
    #[cfg(test)]
    pub fn apply(&mut self, event: ReceiptEvent) -> Applied {
        self.apply_as(event, None)
    }

    /// As `apply`, a delivery or an ack being for `name` when given: the hub's one `Rc` of the
    /// tablet's name (restoring, so that its receipts are found by pointer afterwards).
    pub fn apply_as(&mut self, event: ReceiptEvent, name: Option<Rc<str>>) -> Applied {
        let max_unnamed = self.limits.max_unnamed;
        let by_pointer = name.is_some();
        let Some(ledger) = self.ledgers.get_mut(&event.seq()) else { return Applied::Nothing };
        match event {
            ReceiptEvent::Queued { clients, .. } => {
                ledger.queued_to = ledger.queued_to.max(clients);
                Applied::Nothing
            }
            ReceiptEvent::Delivered { tablet, at, .. } => {
                let named = is_named(&tablet);
                let name = name.unwrap_or_else(|| tablet.into());
                let tablet = Tablet { name: &name, named, by_pointer };
                if let Some(receipt) = ledger.receipt_or_new(tablet, max_unnamed)
                    && receipt.delivered_ms == 0
                {
                    receipt.delivered_ms = millis(at);
                    ledger.delivered += 1;
                }
                Applied::Nothing
            }
            ReceiptEvent::Acked { seq, tablet, at } => {
                // A live ack's receipt is pending: among the few that are, found at once.
                let pending = ledger.tablets.iter().position(|r| r.ack_pending && *r.tablet == *tablet);
                let named = is_named(&tablet);
                let name = name.unwrap_or_else(|| tablet.into());
                let receipt = match pending {
                    Some(index) => ledger.tablets.get_mut(index),
                    None => ledger.receipt_or_new(Tablet { name: &name, named, by_pointer }, max_unnamed),
                };
                let Some(receipt) = receipt else { return Applied::Nothing };
                receipt.ack_pending = false;
                if receipt.acked_ms != 0 {
                    return Applied::Nothing;
                }
                receipt.acked_ms = millis(at);
                let tablet = Rc::clone(&receipt.tablet);
                ledger.acked += 1;
                let first_ack_after =
                    (ledger.acked == 1).then(|| at.duration_since(ledger.received_at).unwrap_or_default());
                Applied::Ack {
                    seq,
                    tablet,
                    at,
                    acked: ledger.acked,
                    delivered: ledger.delivered,
                    first_ack_after,
                }
            }
            ReceiptEvent::Closed { seq, at, detail } => {
                ledger.close_pending = false;
                if ledger.closed.is_some() {
                    return Applied::Nothing;
                }
                let detail = detail.and_then(|text| RawValue::from_string(text).ok()).map(Rc::from);
                let closure = Closure { at, detail };
                let was_open = ledger.is_open();
                ledger.closed = Some(closure.clone());
                if was_open {
                    self.no_longer_open(seq);
                }
                Applied::Closed { seq, closure }
            }
            ReceiptEvent::Escalated { seq, at } => {
                ledger.escalation_pending = false;
                if ledger.escalated_at.is_some() {
                    return Applied::Nothing;
                }
                ledger.escalated_at = Some(at);
                Applied::Escalated { seq, at, delivered: ledger.delivered }
            }
            ReceiptEvent::CommandStarted { .. } => {
                ledger.command_started = true;
                Applied::Nothing
            }
        }
    }
}

/// Whether a stored receipt's tablet is a token's name: a connection without one is stored as
/// `client-...` (its own label, or `client-ADDRESS` for an HTTP ack; in cluster mode with its
/// box's name before it, `BOX/client-...`, so that two boxes' labels never meet), and stays
/// under the unnamed cap when it is restored.
pub fn is_named(tablet: &str) -> bool {
    let label = tablet.split_once('/').map_or(tablet, |(_, label)| label);
    !label.starts_with("client-")
}

fn millis(time: SystemTime) -> u64 {
    (time.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64).max(1)
}

fn from_millis(millis: u64) -> Option<SystemTime> {
    (millis != 0).then(|| UNIX_EPOCH + Duration::from_millis(millis))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipts(max_open: usize) -> Receipts {
        Receipts::new(ReceiptLimits { max_open, max_open_bytes: 1 << 20, max_unnamed: 1 })
    }

    fn publish(receipts: &mut Receipts, seq: u64) {
        receipts.published(seq, SystemTime::now(), "{}".into(), 3, 1);
    }

    fn first(request: AckRequest) -> ReceiptEvent {
        match request {
            AckRequest::First(event) => event,
            other => panic!("not a first ack: {other:?}"),
        }
    }

    #[test]
    fn an_ack_counts_once_and_only_once_stored() {
        let mut receipts = receipts(10);
        publish(&mut receipts, 1);
        let tablet: Rc<str> = "tablet-1".into();
        let now = SystemTime::now();
        assert!(
            receipts.delivered(1, Tablet { name: &tablet, named: true, by_pointer: false }, now).is_some()
        );
        assert!(
            receipts.delivered(1, Tablet { name: &tablet, named: true, by_pointer: false }, now).is_none()
        );
        let event =
            first(receipts.begin_ack(1, Tablet { name: &tablet, named: true, by_pointer: false }, now));
        assert_eq!(
            receipts.begin_ack(1, Tablet { name: &tablet, named: true, by_pointer: false }, now),
            AckRequest::Repeated,
            "while being stored"
        );
        assert!(matches!(receipts.apply(event.clone()), Applied::Ack { acked: 1, delivered: 1, .. }));
        assert!(matches!(receipts.apply(event), Applied::Nothing), "applied twice, counted once");
        assert_eq!(
            receipts.begin_ack(1, Tablet { name: &tablet, named: true, by_pointer: false }, now),
            AckRequest::Repeated
        );
        assert_eq!(
            receipts.begin_ack(9, Tablet { name: &tablet, named: true, by_pointer: false }, now),
            AckRequest::Unknown
        );
        assert_eq!(receipts.get(1).unwrap().acked_by().collect::<Vec<_>>(), ["tablet-1"]);
    }

    #[test]
    fn unnamed_receipts_are_capped() {
        let mut receipts = receipts(10);
        publish(&mut receipts, 1);
        let now = SystemTime::now();
        assert!(
            receipts
                .delivered(1, Tablet { name: &"client-1".into(), named: false, by_pointer: false }, now)
                .is_some()
        );
        assert!(
            receipts
                .delivered(1, Tablet { name: &"client-2".into(), named: false, by_pointer: false }, now)
                .is_none()
        );
        assert_eq!(
            receipts.begin_ack(1, Tablet { name: &"client-3".into(), named: false, by_pointer: false }, now),
            AckRequest::Uncounted
        );
        assert!(
            receipts
                .delivered(1, Tablet { name: &"tablet-1".into(), named: true, by_pointer: false }, now)
                .is_some(),
            "names are not capped"
        );
    }

    #[test]
    fn closed_ones_leave_with_the_history_and_open_ones_stay_up_to_the_cap() {
        let mut receipts = receipts(2);
        for seq in 1..=2 {
            publish(&mut receipts, seq);
        }
        let CloseRequest::First(close) = receipts.begin_close(1, None, SystemTime::now()) else { panic!() };
        assert_eq!(receipts.begin_close(1, None, SystemTime::now()), CloseRequest::AlreadyClosed);
        assert!(matches!(receipts.apply(close), Applied::Closed { seq: 1, .. }));
        receipts.history_dropped(1);
        receipts.history_dropped(2);
        assert!(receipts.get(1).is_none() && receipts.get(2).is_some());
        assert_eq!(receipts.published(3, SystemTime::now(), "{}".into(), 0, 3), None);
        assert_eq!(receipts.published(4, SystemTime::now(), "{}".into(), 0, 3), Some(2));
        assert_eq!(receipts.open().map(|ledger| ledger.seq).collect::<Vec<_>>(), [3, 4]);
        assert!(receipts.get(2).is_none(), "let go beyond the history: forgotten");
        assert_eq!(receipts.published(5, SystemTime::now(), "{}".into(), 0, 3), Some(3));
        assert!(receipts.get(3).is_some_and(|ledger| !ledger.is_open()), "in the history: kept, not open");
    }

    #[test]
    fn open_ones_are_bounded_by_bytes_too_but_the_newest_stays() {
        let mut receipts = Receipts::new(ReceiptLimits { max_open: 10, max_open_bytes: 4, max_unnamed: 1 });
        assert_eq!(receipts.published(1, SystemTime::now(), "abc".into(), 0, 1), None);
        assert_eq!(receipts.published(2, SystemTime::now(), "abc".into(), 0, 3), Some(1));
        assert_eq!(receipts.published(3, SystemTime::now(), "abcdefgh".into(), 0, 2), Some(2));
        assert_eq!(receipts.open().map(|ledger| ledger.seq).collect::<Vec<_>>(), [3]);
        assert!(receipts.get(2).is_some_and(|ledger| !ledger.is_open()), "kept for the history");
    }

    #[test]
    fn a_range_of_ledgers_may_be_empty_or_reversed() {
        let mut receipts = receipts(10);
        for seq in 1..=3 {
            publish(&mut receipts, seq);
        }
        let seqs =
            |first, last| receipts.ledgers_in(first, last).map(|ledger| ledger.seq).collect::<Vec<_>>();
        assert_eq!(seqs(2, 3), [2, 3]);
        assert_eq!(seqs(3, 2), [] as [u64; 0]);
        assert_eq!(seqs(1, u64::MAX), [1, 2, 3]);
    }

    #[test]
    fn an_escalation_falls_due_once_and_never_for_an_acked_one() {
        let mut receipts = receipts(10);
        let long_ago = SystemTime::now() - Duration::from_secs(60);
        receipts.published(1, long_ago, "{}".into(), 0, 1);
        receipts.published(2, long_ago, "{}".into(), 0, 1);
        let ack = first(receipts.begin_ack(
            2,
            Tablet { name: &"tablet-1".into(), named: true, by_pointer: false },
            long_ago,
        ));
        receipts.apply(ack);
        let timeout = Duration::from_secs(30);
        let due = receipts.due_escalations(SystemTime::now(), timeout);
        assert_eq!(due.iter().map(ReceiptEvent::seq).collect::<Vec<_>>(), [1]);
        assert!(receipts.due_escalations(SystemTime::now(), timeout).is_empty(), "asked for once");
        assert!(matches!(receipts.apply(due[0].clone()), Applied::Escalated { seq: 1, .. }));
        assert!(receipts.due_escalations(SystemTime::now(), timeout).is_empty());
        assert_eq!(receipts.next_deadline(timeout), None);
    }

    #[test]
    fn what_was_asked_for_and_never_stored_may_be_asked_for_again() {
        let mut receipts = receipts(10);
        let long_ago = SystemTime::now() - Duration::from_secs(60);
        receipts.published(1, long_ago, "{}".into(), 0, 1);
        receipts.published(2, long_ago, "{}".into(), 0, 1);
        let tablet = Tablet { name: &"tablet-1".into(), named: true, by_pointer: false };
        let timeout = Duration::from_secs(30);
        let escalations = receipts.due_escalations(SystemTime::now(), timeout);
        assert_eq!(escalations.len(), 2);
        let ack = first(receipts.begin_ack(1, tablet, SystemTime::now()));
        let CloseRequest::First(close) = receipts.begin_close(2, None, SystemTime::now()) else {
            panic!("not a first close")
        };
        for event in escalations.iter().chain([&ack, &close]) {
            receipts.abandon(event);
        }
        assert!(matches!(receipts.begin_ack(1, tablet, SystemTime::now()), AckRequest::First(_)));
        assert!(matches!(receipts.begin_close(2, None, SystemTime::now()), CloseRequest::First(_)));
        receipts.abandon(&ack);
        receipts.abandon(&close);
        assert_eq!(receipts.due_escalations(SystemTime::now(), timeout).len(), 2, "escalated again");
    }

    #[test]
    fn restored_receipts_of_unnamed_connections_stay_under_the_unnamed_cap() {
        let mut receipts = receipts(10);
        publish(&mut receipts, 1);
        let at = SystemTime::now();
        for tablet in ["client-1@127.0.0.1:5000", "client-2@127.0.0.1:5001", "tablet-1"] {
            receipts.apply(ReceiptEvent::Delivered { seq: 1, tablet: tablet.into(), at });
        }
        assert_eq!(receipts.get(1).unwrap().delivered, 2, "the unnamed cap is 1");
    }

    #[test]
    fn an_ack_or_a_close_being_stored_holds_the_escalation_back() {
        let mut receipts = receipts(10);
        let long_ago = SystemTime::now() - Duration::from_secs(60);
        receipts.published(1, long_ago, "{}".into(), 0, 1);
        receipts.published(2, long_ago, "{}".into(), 0, 1);
        let tablet = Tablet { name: &"tablet-1".into(), named: true, by_pointer: false };
        let ack = first(receipts.begin_ack(1, tablet, SystemTime::now()));
        let CloseRequest::First(close) = receipts.begin_close(2, None, SystemTime::now()) else {
            panic!("not a first close")
        };
        let timeout = Duration::from_secs(30);
        assert!(receipts.due_escalations(SystemTime::now(), timeout).is_empty());
        assert_eq!(receipts.next_deadline(timeout), None, "the timer would spin on them");
        receipts.apply(ack);
        receipts.apply(close);
        assert!(receipts.due_escalations(SystemTime::now(), timeout).is_empty());
        assert!(!receipts.get(1).unwrap().unanswered() && !receipts.get(2).unwrap().unanswered());
    }
}
