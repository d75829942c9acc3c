//! Caps on open connections of one kind (HTTP, Unix-socket publishers), with eviction.
//!
//! A connection holds a `SlotGuard` while it is open and marks itself idle while it waits for
//! input, trickling while its request body arrives below `--min-body-rate`, or lingering while it
//! closes after an error. When every slot is taken, a new connection closes a lingering one, else
//! the one trickling longest, else the one idle longest. A connection being served is never
//! closed: its head and, on pace, its body read, its publish committed, its response written. So
//! a flood holds slots only while the server serves it: a body in its first second
//! (`http::conn::BODY_RATE_GRACE`) or sent at the minimum rate, a publish waiting for the disk
//! (bounded by the journal's queue), an answer to a client that reads it slowly (up to
//! `--write-timeout`). Idle, trickling and refused connections cannot lock real clients out: a
//! real client sends its request right after connecting and is busy when the flood needs room.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Instant;

use async_channel::{Receiver, Sender};
use slab::Slab;

use crate::support::logger::WarningThrottle;
use crate::support::metrics::Metrics;

/// Which cap a set of slots enforces, as log lines and metrics name it.
#[derive(Debug)]
pub struct Limit {
    pub flag: &'static str,
    pub metric_label: &'static str,
    /// What a connection is called in log lines.
    pub what: &'static str,
}

pub const HTTP_CONNECTIONS: Limit =
    Limit { flag: "--max-http-connections", metric_label: "max_http_connections", what: "connection" };
pub const UNIX_CONNECTIONS: Limit =
    Limit { flag: "--max-unix-connections", metric_label: "max_unix_connections", what: "publisher" };

pub struct ConnectionSlots {
    entries: RefCell<Slab<Slot>>,
    max: usize,
    next_id: Cell<u64>,
    limit: Limit,
    evictions: WarningThrottle,
    refusals: WarningThrottle,
}

struct Slot {
    /// Unique, unlike slab keys, which are reused.
    id: u64,
    /// What the connection waits for and since when; `None` while it is busy.
    idle: Option<(Idleness, Instant)>,
    /// Closing it tells the connection it was evicted.
    evict: Sender<()>,
}

/// Why a connection may be evicted; the first kind goes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Idleness {
    /// Answered and closing: evicting it costs its client nothing.
    Lingering,
    /// Sending its request body below the minimum rate: evicting it costs its client a request
    /// it was too slow to finish.
    Trickling,
    /// Waiting for a request (or a line): evicting it costs its client a reconnect.
    Waiting,
}

impl Idleness {
    /// What an eviction of this kind closed, for the log line.
    fn evicted(self, what: &str) -> String {
        match self {
            Idleness::Lingering => format!("closed a {what} lingering after its answer"),
            Idleness::Trickling => {
                format!("closed the {what} sending its body below --min-body-rate longest")
            }
            Idleness::Waiting => format!("closed the {what} idle longest"),
        }
    }
}

/// Proof of a taken slot; dropping it gives the slot back.
pub struct SlotGuard {
    slots: Rc<ConnectionSlots>,
    key: usize,
    id: u64,
    evicted: Receiver<()>,
}

/// How a slot was obtained.
enum Admission {
    Granted(SlotGuard),
    /// Granted after evicting a connection of this kind.
    GrantedByEviction(SlotGuard, Idleness),
    /// Every slot is busy.
    Refused,
}

impl ConnectionSlots {
    pub fn new(max: usize, limit: Limit) -> Rc<Self> {
        Rc::new(ConnectionSlots {
            entries: RefCell::new(Slab::new()),
            max,
            next_id: Cell::new(0),
            limit,
            evictions: WarningThrottle::default(),
            refusals: WarningThrottle::default(),
        })
    }

    /// Takes a slot for a new connection, logging and counting an eviction it causes; `None`
    /// (logged and counted too) when every slot is busy and the caller must refuse.
    pub fn admit(self: &Rc<Self>, metrics: &Metrics) -> Option<SlotGuard> {
        let Limit { flag, metric_label, what } = self.limit;
        match self.try_take() {
            Admission::Granted(slot) => Some(slot),
            Admission::GrantedByEviction(slot, idleness) => {
                self.evictions.note(&format!("{flag} reached: {}", idleness.evicted(what)));
                metrics.count("resq_push_connections_evicted_total", metric_label);
                Some(slot)
            }
            Admission::Refused => {
                self.refusals.note(&format!("{what} refused: {flag} busy"));
                metrics.count("resq_push_connections_refused_total", metric_label);
                None
            }
        }
    }

    fn try_take(self: &Rc<Self>) -> Admission {
        let mut made_room = None;
        if self.entries.borrow().len() >= self.max {
            let Some(idleness) = self.evict_longest_idle() else { return Admission::Refused };
            made_room = Some(idleness);
        }
        let (evict, evicted) = async_channel::bounded(1);
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        // A new connection counts as idle until its first request or line arrives.
        let idle = Some((Idleness::Waiting, Instant::now()));
        let key = self.entries.borrow_mut().insert(Slot { id, idle, evict });
        let guard = SlotGuard { slots: Rc::clone(self), key, id, evicted };
        match made_room {
            Some(idleness) => Admission::GrantedByEviction(guard, idleness),
            None => Admission::Granted(guard),
        }
    }

    #[cfg(test)]
    fn open(&self) -> usize {
        self.entries.borrow().len()
    }

    /// Closes the first evictable connection (by kind, then by how long it has been so), and
    /// says which kind it was; `None` when every connection is busy.
    fn evict_longest_idle(&self) -> Option<Idleness> {
        let mut entries = self.entries.borrow_mut();
        let (idleness, _, key) = entries
            .iter()
            .filter_map(|(key, slot)| slot.idle.map(|(idleness, since)| (idleness, since, key)))
            .min()?;
        entries.remove(key).evict.close();
        Some(idleness)
    }
}

impl SlotGuard {
    /// Marks the connection as waiting for input (evictable) or busy.
    pub fn set_idle(&self, idle: bool) {
        self.update(|slot| {
            let since = slot.idle.map_or_else(Instant::now, |(_, since)| since);
            slot.idle = idle.then_some((Idleness::Waiting, since));
        });
    }

    /// Marks the connection as sending its body below the minimum rate (evictable, before any
    /// waiting one), or back on pace (busy).
    pub fn set_trickling(&self, trickling: bool) {
        self.update(|slot| {
            slot.idle = match slot.idle {
                Some((Idleness::Trickling, since)) if trickling => Some((Idleness::Trickling, since)),
                _ if trickling => Some((Idleness::Trickling, Instant::now())),
                _ => None,
            }
        });
    }

    /// Marks the connection as answered and closing: the first to be evicted.
    pub fn set_lingering(&self) {
        self.update(|slot| slot.idle = Some((Idleness::Lingering, Instant::now())));
    }

    /// Changes this guard's slot, unless it was evicted (and its key perhaps reused).
    fn update(&self, change: impl FnOnce(&mut Slot)) {
        if let Some(slot) = self.slots.entries.borrow_mut().get_mut(self.key).filter(|s| s.id == self.id) {
            change(slot);
        }
    }

    /// Completes when the connection has been evicted to make room for a newer one.
    pub async fn evicted(&self) {
        let _ = self.evicted.recv().await;
    }

    /// Whether the connection has been evicted: it no longer holds a slot.
    pub fn was_evicted(&self) -> bool {
        self.evicted.is_closed()
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut entries = self.slots.entries.borrow_mut();
        // The key may have been evicted already and even reused by a newer connection.
        if entries.get(self.key).is_some_and(|slot| slot.id == self.id) {
            entries.remove(self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(slots: &Rc<ConnectionSlots>) -> Option<SlotGuard> {
        match slots.try_take() {
            Admission::Granted(guard) | Admission::GrantedByEviction(guard, _) => Some(guard),
            Admission::Refused => None,
        }
    }

    #[test]
    fn busy_connections_are_never_evicted() {
        let slots = ConnectionSlots::new(2, HTTP_CONNECTIONS);
        let a = take(&slots).unwrap();
        let b = take(&slots).unwrap();
        a.set_idle(false);
        b.set_idle(false);
        assert!(matches!(slots.try_take(), Admission::Refused));
        assert_eq!(slots.open(), 2);
    }

    #[test]
    fn the_longest_idle_connection_makes_room() {
        let slots = ConnectionSlots::new(2, HTTP_CONNECTIONS);
        let older = take(&slots).unwrap();
        let newer = take(&slots).unwrap();
        older.set_idle(true);
        newer.set_idle(true);
        let newest = take(&slots).unwrap();
        assert!(older.evicted.is_closed());
        assert!(!newer.evicted.is_closed());
        assert_eq!(slots.open(), 2);
        // The evicted guard's drop must not free the slot its key now holds.
        drop(older);
        assert_eq!(slots.open(), 2);
        drop(newest);
        drop(newer);
        assert_eq!(slots.open(), 0);
    }

    #[test]
    fn a_lingering_connection_goes_before_any_waiting_one() {
        let slots = ConnectionSlots::new(2, HTTP_CONNECTIONS);
        let waiting = take(&slots).unwrap();
        let lingering = take(&slots).unwrap();
        waiting.set_idle(true);
        lingering.set_lingering();
        let _newest = take(&slots).unwrap();
        assert!(lingering.evicted.is_closed());
        assert!(!waiting.evicted.is_closed());
    }

    #[test]
    fn a_trickling_connection_goes_after_lingering_ones_and_before_waiting_ones() {
        let slots = ConnectionSlots::new(3, HTTP_CONNECTIONS);
        let waiting = take(&slots).unwrap();
        let trickling = take(&slots).unwrap();
        let lingering = take(&slots).unwrap();
        waiting.set_idle(true);
        trickling.set_trickling(true);
        lingering.set_lingering();
        let _first = take(&slots).unwrap();
        assert!(lingering.was_evicted() && !trickling.was_evicted());
        let _second = take(&slots).unwrap();
        assert!(trickling.was_evicted() && !waiting.was_evicted());
    }

    #[test]
    fn a_body_back_on_pace_is_busy_again() {
        let slots = ConnectionSlots::new(1, HTTP_CONNECTIONS);
        let body = take(&slots).unwrap();
        body.set_trickling(true);
        body.set_trickling(false);
        assert!(matches!(slots.try_take(), Admission::Refused));
        assert!(!body.was_evicted());
    }
}
