//! The one thread's scheduler: two `LocalExecutor`s and the loop that drives them, giving the
//! control tasks (accepting, HTTP requests, ingest, delivery from the journal, expiry) their
//! turns before the WebSocket sessions'.
//!
//! Why two: a publish wakes every session, and each session's write is a system call. With one
//! run queue in FIFO order, a publish that arrives during a fan-out waits behind every session
//! woken before it, so the server takes in one publish per fan-out and falls behind a steady
//! rate. Taken in first, the publish reaches the hub while the fan-out is under way, and every
//! session not yet served sends both emergencies in one write: under load the fan-out
//! coalesces. Each side has a bounded number of turns per round and the reactor is polled
//! between rounds, so neither side can starve the other, and pings, accepts and signals keep
//! their turns.
//!
//! Going first, ingest could outrun the sessions and push clients that keep up past
//! `--queue`; `FanOut` bounds that: after half a queue of emergencies, publishing waits until
//! every session they woke has had its turn.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::mem;
use std::rc::Rc;
use std::task::{Poll, Waker};

use smol::{LocalExecutor, future};

/// Control tasks run per round, at most. Each does a bounded piece of work per turn.
const CONTROL_TURNS: usize = 64;
/// Session turns per round, at most: about one write each, a fraction of a millisecond in all.
const SESSION_TURNS: usize = 64;

pub struct Scheduler {
    pub control: LocalExecutor<'static>,
    /// Shared with the control tasks, which hand each upgraded connection over to it.
    pub sessions: Rc<LocalExecutor<'static>>,
    pub fan_out: Rc<FanOut>,
}

impl Scheduler {
    pub fn new(publish_burst: usize) -> Scheduler {
        Scheduler {
            control: LocalExecutor::new(),
            sessions: Rc::new(LocalExecutor::new()),
            fan_out: Rc::new(FanOut::new(publish_burst)),
        }
    }

    /// Runs `main` and every spawned task on this thread until `main` completes.
    pub fn block_on<T>(&self, main: impl Future<Output = T>) -> T {
        smol::block_on(future::or(main, self.run_tasks()))
    }

    async fn run_tasks<T>(&self) -> T {
        loop {
            let control_ran = (0..CONTROL_TURNS).take_while(|_| self.control.try_tick()).count();
            let sessions_ran = (0..SESSION_TURNS).take_while(|_| self.sessions.try_tick()).count();
            self.fan_out.sessions_ran(sessions_ran, sessions_ran < SESSION_TURNS);
            if control_ran + sessions_ran > 0 {
                // Returning to `block_on` for a moment polls the reactor without blocking, so
                // input that arrived during this round wakes its tasks before the next.
                future::yield_now().await;
            } else {
                future::or(self.control.tick(), self.sessions.tick()).await;
            }
        }
    }
}

/// How far publishing may run ahead of the sessions.
pub struct FanOut {
    /// Emergencies handed to the hub since the sessions last caught up.
    published: Cell<usize>,
    /// At most this many (half a queue, `Config::publish_burst`) before publishing waits.
    burst: usize,
    /// Session turns run so far.
    session_turns: Cell<u64>,
    /// Session tasks alive (`SessionTicket`s): at most this many are in the session run queue.
    sessions: Cell<usize>,
    /// While publishing waits: the turn count by which every session the burst woke has run,
    /// even if the sessions never all go idle (clients that keep sending keep theirs busy).
    release_at: Cell<Option<u64>>,
    waiting: RefCell<Vec<Waker>>,
    /// Session-side tasks with more to do in the next round (`next_round`): the express lane.
    next_round: RefCell<Vec<Waker>>,
}

impl FanOut {
    fn new(burst: usize) -> FanOut {
        FanOut {
            published: Cell::new(0),
            burst: burst.max(1),
            session_turns: Cell::new(0),
            sessions: Cell::new(0),
            release_at: Cell::new(None),
            waiting: RefCell::new(Vec::new()),
            next_round: RefCell::new(Vec::new()),
        }
    }

    /// Counts one emergency handed to the hub.
    pub fn published(&self) {
        self.published.set(self.published.get() + 1);
    }

    /// Counts a session task for as long as the ticket lives; the task holds it.
    pub fn session_ticket(self: &Rc<Self>) -> SessionTicket {
        self.sessions.set(self.sessions.get() + 1);
        SessionTicket(Rc::clone(self))
    }

    /// Called before handing the hub an emergency: once a burst has been published, waits
    /// until every session it woke has had its turn, each then sending the whole burst in one
    /// write. Returns at once otherwise, so that nothing else can publish between this check
    /// and the caller's publish.
    pub async fn room(&self) {
        if self.published.get() < self.burst {
            return;
        }
        if self.release_at.get().is_none() {
            // The session run queue is FIFO and holds each task at most once: after as many
            // turns as there are session tasks, every one queued when the wait began has run.
            self.release_at.set(Some(self.session_turns.get() + self.sessions.get() as u64));
        }
        future::poll_fn(|cx| {
            if self.published.get() < self.burst {
                return Poll::Ready(());
            }
            let mut waiting = self.waiting.borrow_mut();
            if !waiting.iter().any(|waker| waker.will_wake(cx.waker())) {
                waiting.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    /// For a task with more to write than one turn should (the express lane, the heartbeat's
    /// sweep): waits for the next scheduling round, so that the other side's tasks and the
    /// reactor go first, as between session turns. Meanwhile the sessions do not count as idle:
    /// publishing stays paced to it.
    pub async fn next_round(&self) {
        let mut queued = false;
        future::poll_fn(|cx| {
            if mem::replace(&mut queued, true) {
                return Poll::Ready(());
            }
            self.next_round.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// After a round: `turns` sessions ran, and `idle` says none is left to run.
    fn sessions_ran(&self, turns: usize, idle: bool) {
        let next_round = self.next_round.take();
        let idle = idle && next_round.is_empty();
        for waker in next_round {
            waker.wake();
        }
        self.session_turns.set(self.session_turns.get() + turns as u64);
        if idle || self.release_at.get().is_some_and(|at| self.session_turns.get() >= at) {
            self.published.set(0);
            self.release_at.set(None);
            for waker in self.waiting.take() {
                waker.wake();
            }
        }
    }
}

/// A live session task, counted by `FanOut`.
pub struct SessionTicket(Rc<FanOut>);

impl Drop for SessionTicket {
    fn drop(&mut self) {
        self.0.sessions.set(self.0.sessions.get() - 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use std::cell::RefCell;

    #[test]
    fn control_tasks_go_before_waiting_sessions() {
        let scheduler = Scheduler::new(8);
        let order = Rc::new(RefCell::new(Vec::new()));
        for i in 0..3 {
            let order = Rc::clone(&order);
            scheduler.sessions.spawn(async move { order.borrow_mut().push(format!("session {i}")) }).detach();
        }
        let log = Rc::clone(&order);
        scheduler.control.spawn(async move { log.borrow_mut().push("control".into()) }).detach();
        let done = scheduler.sessions.spawn(future::yield_now());
        scheduler.block_on(done);
        assert_eq!(order.borrow().as_slice(), ["control", "session 0", "session 1", "session 2"]);
    }

    #[test]
    fn publishing_waits_for_the_sessions_after_a_burst() {
        let scheduler = Scheduler::new(2);
        let order = Rc::new(RefCell::new(Vec::new()));
        let log = Rc::clone(&order);
        let session = scheduler.sessions.spawn(async move { log.borrow_mut().push("session") });
        let (log, fan_out) = (Rc::clone(&order), Rc::clone(&scheduler.fan_out));
        let publisher = scheduler.control.spawn(async move {
            for _ in 0..4 {
                fan_out.room().await;
                fan_out.published();
                log.borrow_mut().push("publish");
            }
        });
        scheduler.block_on(future::zip(session, publisher));
        assert_eq!(order.borrow().as_slice(), ["publish", "publish", "session", "publish", "publish"]);
    }

    /// The heartbeat's sweep, a control task, waits for the next round between its turns of
    /// pings: the sessions (and the express lane) run in between. `yield_now` would not let them:
    /// a control task that yields runs again within the same round.
    #[test]
    fn a_control_task_waiting_for_the_next_round_lets_the_sessions_run_first() {
        let scheduler = Scheduler::new(8);
        let order = Rc::new(RefCell::new(Vec::new()));
        let (log, fan_out) = (Rc::clone(&order), Rc::clone(&scheduler.fan_out));
        let control = scheduler.control.spawn(async move {
            log.borrow_mut().push("turn 1");
            fan_out.next_round().await;
            log.borrow_mut().push("turn 2");
        });
        let log = Rc::clone(&order);
        scheduler.sessions.spawn(async move { log.borrow_mut().push("session") }).detach();
        scheduler.block_on(control);
        assert_eq!(order.borrow().as_slice(), ["turn 1", "session", "turn 2"]);
    }

    /// Pins the invariant that `FanOut` relies on (ARCHITECTURE.md): the session executor's run
    /// queue is FIFO and holds a task once, so after as many session turns as there are session
    /// tasks, every session queued when the wait began has run. If the executor stopped being
    /// FIFO, or the count were wrong, publishing would stall here and the test fail after 5 s.
    #[test]
    fn sessions_that_never_go_idle_still_let_publishing_go_on() {
        let scheduler = Scheduler::new(1);
        // More always-busy sessions than one round runs: the session queue is never empty.
        for _ in 0..2 * SESSION_TURNS {
            let ticket = scheduler.fan_out.session_ticket();
            let busy = async {
                loop {
                    future::yield_now().await
                }
            };
            scheduler.sessions.spawn(busy.map(move |()| drop(ticket))).detach();
        }
        let fan_out = Rc::clone(&scheduler.fan_out);
        let publisher = scheduler.control.spawn(async move {
            for _ in 0..5 {
                fan_out.room().await;
                fan_out.published();
            }
            true
        });
        let gave_up = async {
            smol::Timer::after(std::time::Duration::from_secs(5)).await;
            false
        };
        assert!(scheduler.block_on(future::or(publisher, gave_up)), "publishing stalled");
    }
}
