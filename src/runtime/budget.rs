//! A budget of bytes shared by the tasks that hold them: what in-flight publishes may hold at once
//! (`--max-inflight-bytes`), so that many large publishes at once wait their turn instead of
//! taking the process past its memory limit.
//!
//! A task reserves what it will hold before it holds it and gives it back by dropping its
//! `Reservation`. When the budget is spent, reservations wait in arrival order, each for at most
//! its deadline, so a large one is not passed over forever by small ones. When a burst drains
//! (nothing reserved, after a peak of at least `GIVE_BACK_AFTER`), the allocator is asked to
//! return the freed memory to the system: without that, glibc keeps the heap of the peak.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Instant;

use async_channel::Sender;

use crate::runtime::deadline;
use crate::support::memory;

/// A peak below this is left to the allocator: trimming after every small publish would cost
/// more than it gives back.
const GIVE_BACK_AFTER: usize = 1024 * 1024;

pub struct ByteBudget {
    capacity: usize,
    reserved: Cell<usize>,
    /// The most reserved at once since the budget last drained.
    peak: Cell<usize>,
    /// Reservations waiting for room, oldest first; at most one per waiting task.
    waiting: RefCell<VecDeque<Waiter>>,
}

struct Waiter {
    bytes: usize,
    /// Closed by the waiter when it gives up; a message grants it its bytes.
    grant: Sender<()>,
}

/// Bytes taken from a `ByteBudget`; dropping it gives them back.
pub struct Reservation {
    budget: Rc<ByteBudget>,
    bytes: usize,
}

impl ByteBudget {
    pub fn new(capacity: usize) -> Rc<ByteBudget> {
        Rc::new(ByteBudget {
            capacity,
            reserved: Cell::new(0),
            peak: Cell::new(0),
            waiting: RefCell::default(),
        })
    }

    /// Takes `bytes` (at most the whole budget), waiting behind earlier reservations until
    /// there is room; `None` if there is none by `until`.
    pub async fn reserve(self: &Rc<Self>, bytes: usize, until: Instant) -> Option<Reservation> {
        let bytes = bytes.min(self.capacity);
        if self.waiting.borrow().is_empty() && self.fits(bytes) {
            self.take(bytes);
            return Some(Reservation { budget: Rc::clone(self), bytes });
        }
        let (grant, granted) = async_channel::bounded(1);
        {
            let mut waiting = self.waiting.borrow_mut();
            waiting.retain(|waiter| !waiter.grant.is_closed());
            waiting.push_back(Waiter { bytes, grant });
        }
        let answer = deadline::before(until, granted.recv()).await;
        // A grant may have come in the same turn as the deadline: it is ours then.
        let granted = matches!(answer, Ok(Ok(()))) || granted.try_recv().is_ok();
        granted.then(|| Reservation { budget: Rc::clone(self), bytes })
    }

    #[cfg(test)]
    fn reserved(&self) -> usize {
        self.reserved.get()
    }

    fn fits(&self, bytes: usize) -> bool {
        self.reserved.get() + bytes <= self.capacity
    }

    fn take(&self, bytes: usize) {
        self.reserved.set(self.reserved.get() + bytes);
        self.peak.set(self.peak.get().max(self.reserved.get()));
    }

    fn give_back(&self, bytes: usize) {
        self.reserved.set(self.reserved.get() - bytes);
        self.grant_waiting();
        if self.reserved.get() == 0 && self.peak.replace(0) >= GIVE_BACK_AFTER {
            memory::give_back_freed();
        }
    }

    /// Grants the oldest waiting reservations that fit, in order.
    fn grant_waiting(&self) {
        let mut waiting = self.waiting.borrow_mut();
        while let Some(first) = waiting.front() {
            if first.grant.is_closed() {
                waiting.pop_front();
                continue;
            }
            if !self.fits(first.bytes) {
                break;
            }
            if first.grant.try_send(()).is_ok() {
                self.take(first.bytes);
            }
            waiting.pop_front();
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use smol::future;

    use super::*;

    fn soon() -> Instant {
        Instant::now() + Duration::from_millis(50)
    }

    #[test]
    fn reservations_wait_for_room_in_order_and_give_up_at_their_deadline() {
        future::block_on(async {
            let budget = ByteBudget::new(100);
            let first = budget.reserve(60, soon()).await.unwrap();
            assert!(budget.reserve(50, soon()).await.is_none(), "over the budget");
            assert_eq!(budget.reserved(), 60);
            let later = Instant::now() + Duration::from_secs(5);
            let waiting = future::zip(budget.reserve(80, later), budget.reserve(10, later));
            let freeing = async {
                future::yield_now().await;
                assert_eq!(budget.reserved(), 60, "the small one fits, but waits behind the large one");
                drop(first);
            };
            let ((large, small), ()) = future::zip(waiting, freeing).await;
            assert_eq!((large.is_some(), small.is_some()), (true, true));
            assert_eq!(budget.reserved(), 90);
        });
    }

    #[test]
    fn one_reservation_larger_than_the_budget_takes_all_of_it() {
        future::block_on(async {
            let budget = ByteBudget::new(100);
            let whole = budget.reserve(1000, soon()).await.unwrap();
            assert_eq!(budget.reserved(), 100);
            drop(whole);
            assert_eq!(budget.reserved(), 0);
        });
    }

    #[test]
    fn a_waiter_that_gave_up_blocks_nobody() {
        future::block_on(async {
            let budget = ByteBudget::new(100);
            let held = budget.reserve(100, soon()).await.unwrap();
            assert!(budget.reserve(100, soon()).await.is_none());
            drop(held);
            assert!(budget.reserve(100, soon()).await.is_some());
            assert!(budget.waiting.borrow().is_empty());
        });
    }
}
