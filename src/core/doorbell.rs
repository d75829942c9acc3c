//! How the hub tells one session that there is something to send, or that it must end; and,
//! for a session parked with nothing to do, that its frames can go by the express lane instead
//! (`ws::express`): written at once by one task for every such client, the session not woken.

use std::cell::Cell;
use std::task::{Context, Poll, Waker};

/// Why the hub closed a client's doorbell; the session turns it into a close code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Farewell {
    /// It fell more than `queue` live events behind.
    TooSlow,
    /// The server is shutting down.
    ShuttingDown,
    /// Its token is no longer in the subscribe token file.
    Revoked,
    /// Cluster mode: the engine's stream was recreated; the history it was following is gone.
    StreamChanged,
}

/// Where a session is, as far as the express lane goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Stance {
    /// Running, or waiting for something else than the doorbell (a write, a read): only the
    /// session may write to its client.
    #[default]
    Busy,
    /// Waiting for the doorbell with everything written: what comes may be written for it.
    Parked,
    /// Parked, and the hub has listed it for the express lane: further rings add nothing.
    Listed,
}

/// The hub rings, the session awaits; one ring covers any number of events, and ringing never
/// blocks. On one thread, cells are all the synchronization this needs: an `async-channel`
/// here cost 770 bytes per client (its queue is padded to cache lines).
#[derive(Default)]
pub struct Doorbell {
    rung: Cell<bool>,
    stance: Cell<Stance>,
    farewell: Cell<Option<Farewell>>,
    waker: Cell<Option<Waker>>,
}

impl Doorbell {
    /// Wakes the session; unless it is parked: then it is listed instead, and `true` tells the
    /// hub to put it on the express lane's list. A listed one is already on it.
    pub(super) fn ring(&self) -> bool {
        match self.stance.get() {
            Stance::Parked => {
                self.stance.set(Stance::Listed);
                true
            }
            Stance::Listed => false,
            Stance::Busy => {
                self.wake();
                false
            }
        }
    }

    fn wake(&self) {
        self.rung.set(true);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    /// Always wakes the session, listed or not: the express lane skips it from then on.
    pub(super) fn close(&self, farewell: Farewell) {
        self.farewell.set(Some(farewell));
        self.stance.set(Stance::Busy);
        self.wake();
    }

    /// The session is about to wait for the doorbell with everything it was handed written: the
    /// express lane may write for it until it is woken.
    pub fn park(&self) {
        self.stance.set(Stance::Parked);
    }

    /// The session woke (for whatever reason) and may write again: the express lane keeps off.
    /// If it was listed and not yet served, its next wait finds the doorbell rung instead.
    pub fn unpark(&self) {
        if self.stance.replace(Stance::Busy) == Stance::Listed {
            self.rung.set(true);
        }
    }

    /// Whether the express lane may write for it now: listed, and not woken since.
    pub(super) fn is_listed(&self) -> bool {
        self.stance.get() == Stance::Listed
    }

    /// The express lane wrote everything it was listed for: parked again.
    pub(super) fn served(&self) {
        self.stance.set(Stance::Parked);
    }

    /// The express lane could not write all of it: the session must, so it is woken.
    pub(super) fn hand_back(&self) {
        self.stance.set(Stance::Busy);
        self.wake();
    }

    /// Ready once rung since the last time it was, or once closed (and from then on).
    pub fn poll_rung(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.rung.replace(false) || self.farewell.get().is_some() {
            return Poll::Ready(());
        }
        let waker = match self.waker.take() {
            Some(waker) if waker.will_wake(cx.waker()) => waker,
            _ => cx.waker().clone(),
        };
        self.waker.set(Some(waker));
        Poll::Pending
    }

    /// Why the hub closed it, once it has.
    pub fn farewell(&self) -> Option<Farewell> {
        self.farewell.get()
    }

    /// Whether it was rung and not yet awaited, for tests of the hub.
    #[cfg(test)]
    pub(super) fn is_rung(&self) -> bool {
        self.rung.get()
    }
}
