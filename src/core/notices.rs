//! `Notices`: the ring of status messages (acks, closes, escalations) broadcast to every client,
//! each serialized once and shared, like the history's envelopes.
//!
//! It is every client's second queue, read the same way as the history: a client is a position
//! in it (the next notice its session takes), the hub rings the client's doorbell when one is
//! pushed, and a client more than `--status-queue` notices behind is dropped as too slow. A notice
//! stays only until every connected client has taken it, so the ring never holds more than
//! `--status-queue` (plus one) of them.

use std::collections::VecDeque;
use std::rc::Rc;

use crate::core::SharedEnvelope;

#[derive(Debug, Default)]
pub struct Notices {
    ring: VecDeque<SharedEnvelope>,
    /// The position of `ring[0]`; positions count every notice ever pushed.
    first: u64,
}

impl Notices {
    /// The position the next notice gets: a new client starts here.
    pub fn end(&self) -> u64 {
        self.first + self.ring.len() as u64
    }

    pub fn push(&mut self, json: SharedEnvelope) {
        self.ring.push_back(json);
    }

    /// The notice at `position`, if still held.
    pub fn get(&self, position: u64) -> Option<SharedEnvelope> {
        let index = usize::try_from(position.checked_sub(self.first)?).ok()?;
        self.ring.get(index).map(Rc::clone)
    }

    /// Drops the notices before `oldest_unsent`, which every client has taken.
    pub fn trim(&mut self, oldest_unsent: u64) {
        while self.first < oldest_unsent && self.ring.pop_front().is_some() {
            self.first += 1;
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.ring.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_survive_trimming() {
        let mut notices = Notices::default();
        for text in ["a", "b", "c"] {
            notices.push(text.into());
        }
        notices.trim(2);
        assert_eq!((notices.end(), notices.len()), (3, 1));
        assert_eq!(notices.get(1), None);
        assert_eq!(notices.get(2).as_deref(), Some("c"));
        notices.trim(u64::MAX);
        assert_eq!((notices.end(), notices.len()), (3, 0));
    }
}
