//! The hub: the one owner of the server's shared state.
//!
//! It holds the slab of connected clients' queue senders, the sequence counter and the ring of
//! recent emergencies kept for catch-up. Tasks reach it as `Rc<RefCell<Hub>>` on the single
//! executor thread; every method is synchronous, so no borrow is ever held across an `.await`.
//! Subscribing registers the client and snapshots its replay in the same call, which is why
//! replay and live events never overlap or leave a gap.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use async_channel::{Receiver, Sender, TrySendError};
use async_tungstenite::tungstenite::Utf8Bytes;
use serde_json::value::RawValue;
use slab::Slab;

use crate::auth::Identity;
use crate::journal::Stored;
use crate::protocol::{self, ClientInfo, HistoryRange, ReplayInfo, Source};
use crate::timestamp::rfc3339_millis;

pub type SharedHub = Rc<RefCell<Hub>>;

/// The hub's bounds, taken from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct HubLimits {
    /// Emergencies kept for catch-up.
    pub history: usize,
    /// Bytes of serialized emergencies kept for catch-up.
    pub history_bytes: usize,
    /// Events queued per client before it is dropped as too slow.
    pub queue: usize,
    /// Connected clients.
    pub max_clients: usize,
    /// Age after which an emergency leaves the history.
    pub history_max_age: Duration,
}

/// Where a reconnecting client left off: `?since=N`, and `&stream=ID` if it knows the history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resume {
    pub since: u64,
    pub stream: Option<String>,
}

/// Why the hub closed a client's queue; the session turns it into a close code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Farewell {
    /// Its queue was full: it fell `queue` events behind.
    TooSlow,
    /// The server is shutting down.
    ShuttingDown,
    /// Its token is no longer in the subscribe token file.
    Revoked,
}

/// Why the hub refused a subscriber or a publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `max_clients` are connected.
    Full,
    /// The server is shutting down.
    ShuttingDown,
}

/// The result of one publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub seq: u64,
    /// Clients whose queue took the emergency.
    pub queued_to: usize,
}

/// A connected client as the hub sees it.
struct Subscriber {
    /// Unique for the server's lifetime, unlike slab keys, which are reused.
    client_id: u64,
    peer: SocketAddr,
    /// The token it connected with, when subscribe tokens are configured.
    identity: Option<Identity>,
    connected_at: SystemTime,
    queue: Sender<Utf8Bytes>,
    farewell: Rc<Cell<Option<Farewell>>>,
}

/// One retained emergency: its seq and its envelope, serialized once and shared by reference.
struct Retained {
    seq: u64,
    json: Utf8Bytes,
    received_at: SystemTime,
}

pub struct Hub {
    limits: HubLimits,
    /// The identity of this history: from the data dir, or new at each start in memory.
    stream_id: Rc<str>,
    /// Connected clients; only the hub inserts and removes.
    subscribers: Slab<Subscriber>,
    next_client_id: u64,
    /// The last seq assigned; 0 before the first emergency.
    last_seq: u64,
    /// Consecutive seqs, oldest first, bounded by `limits.history` and `limits.history_bytes`.
    history: VecDeque<Retained>,
    history_bytes: usize,
    /// Set at shutdown: no new subscribers, every queue closed.
    shutting_down: bool,
}

/// What a client gets from `Hub::subscribe`. Dropping it unsubscribes.
pub struct Subscription {
    pub client_id: u64,
    /// The history's identity, for the welcome.
    pub stream: Rc<str>,
    /// Live events, all with seq greater than `seq`.
    pub events: Receiver<Utf8Bytes>,
    /// Retained events to send before the live ones, oldest first.
    pub replay: Vec<Utf8Bytes>,
    pub replay_info: Option<ReplayInfo>,
    /// The last seq at the moment of subscribing.
    pub seq: u64,
    pub history: HistoryRange,
    /// Set by the hub when it closes `events`, to say why.
    pub farewell: Rc<Cell<Option<Farewell>>>,
    /// Held for its `Drop`, which unsubscribes.
    #[allow(dead_code)]
    membership: Membership,
}

/// Removes the client's slab entry when its session ends, whichever side ended it.
struct Membership {
    hub: SharedHub,
    key: usize,
    client_id: u64,
}

impl Drop for Membership {
    fn drop(&mut self) {
        match self.hub.try_borrow_mut() {
            Ok(mut hub) => hub.unsubscribe(self.key, self.client_id),
            Err(_) => log::error!("client {} left while the hub was busy", self.client_id),
        }
    }
}

impl Hub {
    pub fn new(limits: HubLimits, stream_id: &str) -> SharedHub {
        Rc::new(RefCell::new(Hub {
            limits,
            stream_id: stream_id.into(),
            subscribers: Slab::new(),
            next_client_id: 1,
            last_seq: 0,
            history: VecDeque::new(),
            history_bytes: 0,
            shutting_down: false,
        }))
    }

    /// Assigns the next seq, serializes the envelope once, queues it to every client and keeps
    /// it for catch-up. A client whose queue is full is dropped instead of waited for. Refused
    /// once shutdown has begun, since nobody could receive it any more.
    pub fn publish(&mut self, data: &RawValue, source: Source) -> Result<Receipt, Refusal> {
        if self.shutting_down {
            return Err(Refusal::ShuttingDown);
        }
        let seq = self.last_seq + 1;
        let received_at = SystemTime::now();
        let envelope = protocol::envelope_json(seq, received_at, source, data);
        Ok(self.deliver(Stored { seq, received_at, envelope }))
    }

    /// Queues an emergency whose seq is assigned (by `publish`, or by the journal when it was
    /// committed) to every client and keeps it for catch-up. Also after shutdown has begun: a
    /// committed emergency must reach the history.
    pub fn deliver(&mut self, stored: Stored) -> Receipt {
        let Stored { seq, received_at, envelope } = stored;
        self.last_seq = seq;
        let json = Utf8Bytes::from(envelope);
        let mut queued_to = 0;
        self.subscribers.retain(|_, subscriber| match subscriber.queue.try_send(json.clone()) {
            Ok(()) => {
                queued_to += 1;
                true
            }
            Err(TrySendError::Full(_)) => {
                // The session logs the disconnection, with the reason set here.
                subscriber.farewell.set(Some(Farewell::TooSlow));
                subscriber.queue.close();
                false
            }
            // The session has ended; its Membership finds the entry gone, which is fine.
            Err(TrySendError::Closed(_)) => false,
        });
        self.retain(Retained { seq, json, received_at });
        Receipt { seq, queued_to }
    }

    /// Loads the history a data dir held at start.
    pub fn restore(&mut self, last_seq: u64, retained: Vec<Stored>) {
        for stored in retained {
            let Stored { seq, received_at, envelope } = stored;
            self.retain(Retained { seq, json: Utf8Bytes::from(envelope), received_at });
        }
        self.last_seq = last_seq;
    }

    /// Drops history entries older than `history_max_age`.
    pub fn expire(&mut self, now: SystemTime) {
        while let Some(oldest) = self.history.front() {
            if now.duration_since(oldest.received_at).unwrap_or_default() <= self.limits.history_max_age {
                break;
            }
            if let Some(oldest) = self.history.pop_front() {
                self.history_bytes -= oldest.json.len();
            }
        }
    }

    pub fn stream_id(&self) -> &str {
        &self.stream_id
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// Registers a client and snapshots what it must be replayed (`since` given) in one step.
    pub fn subscribe(
        hub: &SharedHub,
        peer: SocketAddr,
        identity: Option<Identity>,
        resume: Option<&Resume>,
    ) -> Result<Subscription, Refusal> {
        let mut this = hub.borrow_mut();
        if this.shutting_down {
            return Err(Refusal::ShuttingDown);
        }
        if this.subscribers.len() >= this.limits.max_clients {
            return Err(Refusal::Full);
        }
        let (replay, replay_info) = match resume {
            Some(resume) => {
                let (entries, info) = this.retained_after(resume);
                (entries.cloned().collect(), Some(info))
            }
            None => (Vec::new(), None),
        };
        let (queue, events) = async_channel::bounded(this.limits.queue);
        let farewell = Rc::new(Cell::new(None));
        let client_id = this.next_client_id;
        this.next_client_id += 1;
        let key = this.subscribers.insert(Subscriber {
            client_id,
            peer,
            identity,
            connected_at: SystemTime::now(),
            queue,
            farewell: Rc::clone(&farewell),
        });
        Ok(Subscription {
            client_id,
            stream: Rc::clone(&this.stream_id),
            events,
            replay,
            replay_info,
            seq: this.last_seq,
            history: this.history_range(),
            farewell,
            membership: Membership { hub: Rc::clone(hub), key, client_id },
        })
    }

    /// Retained envelopes with seq greater than `since`, oldest first, and what that means for
    /// a client resuming from `since`.
    /// A client resuming from another history (`stream` differs) or from a seq this server has
    /// not reached (it lost its history) gets everything retained.
    pub fn retained_after(&self, resume: &Resume) -> (impl Iterator<Item = &Utf8Bytes>, ReplayInfo) {
        let since = resume.since;
        let stream_changed = resume.stream.as_deref().is_some_and(|stream| stream != &*self.stream_id);
        let reset = !stream_changed && since > self.last_seq;
        let first_seq = self.history_range().first_seq;
        let (start, missed) = if stream_changed || reset {
            (0, 0)
        } else {
            let missed = first_seq.saturating_sub(1).saturating_sub(since);
            (self.history.partition_point(|retained| retained.seq <= since), missed)
        };
        let info = ReplayInfo { since, count: self.history.len() - start, missed, reset, stream_changed };
        (self.history.range(start..).map(|retained| &retained.json), info)
    }

    /// Closes every client's queue so each session drains it and says goodbye; refuses new ones.
    pub fn shut_down(&mut self) {
        self.shutting_down = true;
        for (_, subscriber) in &self.subscribers {
            subscriber.farewell.set(Some(Farewell::ShuttingDown));
            subscriber.queue.close();
        }
    }

    /// Closes the queue of every client whose token `still_valid` rejects; returns how many.
    pub fn revoke(&mut self, still_valid: impl Fn(&str) -> bool) -> usize {
        let before = self.subscribers.len();
        self.subscribers.retain(|_, subscriber| match &subscriber.identity {
            Some(identity) if !still_valid(&identity.token) => {
                subscriber.farewell.set(Some(Farewell::Revoked));
                subscriber.queue.close();
                false
            }
            _ => true,
        });
        before - self.subscribers.len()
    }

    /// The connected clients, for `/healthz`.
    pub fn clients(&self) -> Vec<ClientInfo> {
        self.subscribers
            .iter()
            .map(|(_, subscriber)| ClientInfo {
                client_id: subscriber.client_id,
                name: subscriber.identity.as_ref().map(|identity| identity.name.to_string()),
                peer: subscriber.peer.to_string(),
                connected_at: rfc3339_millis(subscriber.connected_at),
                queued: subscriber.queue.len(),
            })
            .collect()
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

    pub fn history_range(&self) -> HistoryRange {
        HistoryRange {
            first_seq: self.history.front().map_or(self.last_seq + 1, |retained| retained.seq),
            last_seq: self.last_seq,
            count: self.history.len(),
        }
    }

    fn unsubscribe(&mut self, key: usize, client_id: u64) {
        // The key may already be gone (dropped as too slow) and even reused by a newer client.
        if self.subscribers.get(key).is_some_and(|s| s.client_id == client_id) {
            self.subscribers.remove(key);
        }
    }

    /// Appends to history and drops the oldest entries beyond either bound, always keeping the
    /// newest so a resuming client can get at least the last emergency.
    fn retain(&mut self, retained: Retained) {
        self.history_bytes += retained.json.len();
        self.history.push_back(retained);
        while self.history.len() > 1
            && (self.history.len() > self.limits.history || self.history_bytes > self.limits.history_bytes)
        {
            if let Some(oldest) = self.history.pop_front() {
                self.history_bytes -= oldest.json.len();
            }
        }
    }
}

impl Subscription {
    /// The client's slab key, for tests of the hub's bookkeeping.
    #[cfg(test)]
    fn key(&self) -> usize {
        self.membership.key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Hub {
        fn publish_ok(&mut self, data: &RawValue, source: Source) -> Receipt {
            self.publish(data, source).unwrap()
        }
    }

    fn limits() -> HubLimits {
        HubLimits {
            history: 3,
            history_bytes: 1 << 20,
            queue: 2,
            max_clients: 2,
            history_max_age: Duration::from_secs(3600),
        }
    }

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).unwrap()
    }

    fn peer() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    fn seqs(entries: &[Utf8Bytes]) -> Vec<u64> {
        entries
            .iter()
            .map(|json| serde_json::from_str::<serde_json::Value>(json).unwrap()["seq"].as_u64().unwrap())
            .collect()
    }

    #[test]
    fn seqs_grow_by_one_and_data_is_verbatim() {
        let hub = Hub::new(limits(), "stream-a");
        let client = Hub::subscribe(&hub, peer(), None, None).unwrap();
        let first = hub.borrow_mut().publish_ok(&raw(r#"{"b": 1,  "a":[ ]}"#), Source::Unix);
        let second = hub.borrow_mut().publish_ok(&raw("{}"), Source::Http);
        assert_eq!((first.seq, second.seq), (1, 2));
        assert_eq!(first.queued_to, 1);
        let json = client.events.try_recv().unwrap();
        assert!(json.contains(r#""data":{"b": 1,  "a":[ ]}"#), "{json}");
        assert!(json.starts_with(r#"{"type":"emergencia","seq":1,"received_at":""#), "{json}");
    }

    #[test]
    fn replay_covers_exactly_what_was_missed() {
        let hub = Hub::new(limits(), "stream-a");
        for _ in 0..5 {
            hub.borrow_mut().publish_ok(&raw("{}"), Source::Unix);
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
            let client = Hub::subscribe(&hub, peer(), None, Some(&Resume { since, stream: None })).unwrap();
            assert_eq!(seqs(&client.replay), expected, "since={since}");
            let info = client.replay_info.unwrap();
            assert_eq!(
                (info.missed, info.reset, info.count),
                (missed, reset, expected.len()),
                "since={since}"
            );
        }
    }

    #[test]
    fn a_client_from_another_history_gets_everything() {
        let hub = Hub::new(limits(), "stream-a");
        for _ in 0..5 {
            hub.borrow_mut().publish_ok(&raw("{}"), Source::Unix);
        }
        let elsewhere = Resume { since: 4, stream: Some("stream-b".into()) };
        let client = Hub::subscribe(&hub, peer(), None, Some(&elsewhere)).unwrap();
        assert_eq!(seqs(&client.replay), [3, 4, 5]);
        let info = client.replay_info.unwrap();
        assert!(info.stream_changed && !info.reset && info.missed == 0);
        let same = Resume { since: 4, stream: Some("stream-a".into()) };
        let client = Hub::subscribe(&hub, peer(), None, Some(&same)).unwrap();
        assert_eq!(seqs(&client.replay), [5]);
    }

    #[test]
    fn old_entries_expire_by_age() {
        let hub = Hub::new(limits(), "stream-a");
        hub.borrow_mut().publish_ok(&raw("{}"), Source::Unix);
        let later = SystemTime::now() + Duration::from_secs(3601);
        hub.borrow_mut().expire(later);
        let range = hub.borrow().history_range();
        assert_eq!((range.count, range.first_seq, range.last_seq), (0, 2, 1));
        assert_eq!(hub.borrow().history_bytes(), 0);
    }

    #[test]
    fn a_full_queue_drops_only_that_client() {
        let hub = Hub::new(limits(), "stream-a");
        let slow = Hub::subscribe(&hub, peer(), None, None).unwrap();
        let fast = Hub::subscribe(&hub, peer(), None, None).unwrap();
        for _ in 0..3 {
            hub.borrow_mut().publish_ok(&raw("{}"), Source::Unix);
            fast.events.try_recv().unwrap();
        }
        assert_eq!(slow.farewell.get(), Some(Farewell::TooSlow));
        assert!(slow.events.is_closed());
        assert_eq!(fast.farewell.get(), None);
        assert_eq!(hub.borrow().client_count(), 1);
    }

    #[test]
    fn a_reused_key_is_not_removed_by_the_old_client() {
        let hub = Hub::new(limits(), "stream-a");
        let slow = Hub::subscribe(&hub, peer(), None, None).unwrap();
        for _ in 0..3 {
            hub.borrow_mut().publish_ok(&raw("{}"), Source::Unix);
        }
        let newcomer = Hub::subscribe(&hub, peer(), None, None).unwrap();
        assert_eq!(newcomer.key(), slow.key());
        drop(slow);
        assert_eq!(hub.borrow().client_count(), 1);
        drop(newcomer);
        assert_eq!(hub.borrow().client_count(), 0);
    }

    #[test]
    fn clients_are_capped_and_refused_at_shutdown() {
        let hub = Hub::new(limits(), "stream-a");
        let _a = Hub::subscribe(&hub, peer(), None, None).unwrap();
        let b = Hub::subscribe(&hub, peer(), None, None).unwrap();
        assert_eq!(Hub::subscribe(&hub, peer(), None, None).err(), Some(Refusal::Full));
        drop(b);
        hub.borrow_mut().shut_down();
        assert_eq!(Hub::subscribe(&hub, peer(), None, None).err(), Some(Refusal::ShuttingDown));
        assert_eq!(hub.borrow_mut().publish(&raw("{}"), Source::Http), Err(Refusal::ShuttingDown));
        assert_eq!(hub.borrow().last_seq(), 0);
    }

    #[test]
    fn revoking_closes_only_the_revoked_tokens() {
        let hub = Hub::new(limits(), "stream-a");
        let identity =
            |name: &str| Some(Identity { name: name.into(), token: format!("{name}-token").into() });
        let kept = Hub::subscribe(&hub, peer(), identity("kept"), None).unwrap();
        let revoked = Hub::subscribe(&hub, peer(), identity("revoked"), None).unwrap();
        assert_eq!(hub.borrow_mut().revoke(|token| token == "kept-token"), 1);
        assert_eq!(revoked.farewell.get(), Some(Farewell::Revoked));
        assert!(revoked.events.is_closed());
        assert_eq!(kept.farewell.get(), None);
        let clients = hub.borrow().clients();
        assert_eq!(clients.len(), 1);
        assert_eq!(clients[0].name.as_deref(), Some("kept"));
    }

    #[test]
    fn history_is_bounded_by_bytes_too() {
        let hub = Hub::new(HubLimits { history_bytes: 1, ..limits() }, "stream-a");
        for _ in 0..3 {
            hub.borrow_mut().publish_ok(&raw("{}"), Source::Unix);
        }
        let range = hub.borrow().history_range();
        assert_eq!((range.first_seq, range.last_seq, range.count), (3, 3, 1));
    }
}
