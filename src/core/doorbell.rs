//! How the hub tells one session that there is something to send, or that it must end. (A
//! parked session is not rung: the hub lists it for the express lane, `Stance`.)

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

/// The hub rings, the session awaits; one ring covers any number of events, and ringing never
/// blocks. On one thread, cells are all the synchronization this needs: an `async-channel`
/// here cost 770 bytes per client (its queue is padded to cache lines). It lives in the client's
/// slab entry, and the session polls it through the hub (`Subscription::poll_rung`): an `Rc`
/// of it, shared, cost 56 bytes more per client.
#[derive(Default)]
pub struct Doorbell {
    rung: Cell<bool>,
    farewell: Cell<Option<Farewell>>,
    waker: Cell<Option<Waker>>,
}

impl Doorbell {
    pub(super) fn ring(&self) {
        self.rung.set(true);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    /// Rung without a wake-up: for the session itself, which is running.
    pub(super) fn mark_rung(&self) {
        self.rung.set(true);
    }

    pub(super) fn close(&self, farewell: Farewell) {
        self.farewell.set(Some(farewell));
        self.ring();
    }

    /// Ready once rung since the last time it was, or once closed (and from then on).
    pub(super) fn poll_rung(&self, cx: &mut Context<'_>) -> Poll<()> {
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
    pub(super) fn farewell(&self) -> Option<Farewell> {
        self.farewell.get()
    }

    /// Whether it was rung and not yet awaited, for tests of the hub.
    #[cfg(test)]
    pub(super) fn is_rung(&self) -> bool {
        self.rung.get()
    }
}
