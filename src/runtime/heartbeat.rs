//! Every client's heartbeat from one timer: `Heartbeat` divides `--ping-interval` into
//! `SLOTS_PER_INTERVAL` slots, and one task (`Heartbeat::sweep`) wakes at each slot's start, only
//! while some client is registered, and wakes the sessions whose ping (or pong deadline) falls in
//! the slot just begun.
//!
//! Why not a timer per session: each costs an entry in the reactor's timer tree, a wake-up of the
//! thread when it fires and a task poll, so an idle server with N tablets woke about N times per
//! interval. Swept, the pings due in a slot go out in one pass, and the thread wakes once per slot
//! for the sweep, whatever the number of clients, and then as the pongs come back (at 1000 idle
//! tablets about as often as uWebSockets' one loop, BENCHMARKS.md). The price is granularity: a
//! ping or a pong deadline falls on the next slot boundary, at most one slot (`--ping-interval` /
//! 8) late, never early. A session is a `Pulse` (its key in the slab of `Beat`s, removed on drop)
//! and keeps its own waker there; the sweep visits every beat, a few nanoseconds each.
//!
//! A session that waits parked (`ws::express`) is not woken to ping: the sweep hands every due
//! ping to the `ParkedPinger` the server installed, which writes it from the express lane if the
//! hub has the client parked, and wakes the session only if it did not. An idle tablet then costs a task wake per pong, not
//! one per ping and one per pong. Pong deadlines always wake the session: it must close.

use std::cell::{Cell, RefCell};
use std::num::{NonZeroU32, NonZeroU64};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use slab::Slab;
use smol::Timer;
use smol::future;

use crate::runtime::scheduler::FanOut;

/// Slots per `--ping-interval`: how often the sweep wakes, and the granularity of pings and pong
/// deadlines (one slot of 30 s is 3.75 s).
pub const SLOTS_PER_INTERVAL: u64 = 8;

/// Pings written for parked sessions per turn of the sweep; it then waits for the next scheduling
/// round (sessions, the express lane and the reactor go first), so that a slot where thousands are
/// due (they all connected together) does not hold the thread: 256 `send`s to loopback sockets are
/// 3-5 ms (13-19 µs each, BENCHMARKS.md "Round 7").
const PARKED_PINGS_PER_TURN: usize = 256;

/// Writes a ping for the client under a hub key whose client id's low 32 bits are the tag, if its
/// session is parked and the socket takes it at once: `true` once the ping is on its way (the
/// session is next due at its pong deadline), `false` to wake the session to ping itself.
pub type ParkedPinger = Box<dyn Fn(usize, u32) -> bool>;

/// A slot's number, counted from the heartbeat's start.
type Tick = u64;

/// The one timer of every session's heartbeat.
pub struct Heartbeat {
    start: Instant,
    /// `--ping-interval` / `SLOTS_PER_INTERVAL`, in nanoseconds (at least 1).
    slot_nanos: u128,
    ping_interval: Duration,
    pong_timeout: Duration,
    /// The last slot the sweep began: a beat due at or before it is ready to its session's poll,
    /// and the sweep serves it (pings for it, or wakes it) unless the session came first.
    swept: Cell<Tick>,
    beats: RefCell<Slab<Beat>>,
    /// The sweep, waiting for a first beat.
    sweeper: Cell<Option<Waker>>,
    parked_pinger: RefCell<Option<ParkedPinger>>,
}

/// One session's place in the heartbeat.
struct Beat {
    /// The slot at which the session is woken: its next ping, or its pong deadline.
    due: Tick,
    /// While a pong is awaited, the slot the ping was due at (never slot 0: the first ping is
    /// due one interval after registering).
    pinged_at: Option<NonZeroU64>,
    waker: Option<Waker>,
    /// Its session's client, whom `ParkedPinger` may write its ping to.
    client: Option<ClientRef>,
}

/// A session's client as the express lane knows it: its hub key (plus one, so that the `Option`
/// costs nothing) and the low 32 bits of its client id, since hub keys are reused.
#[derive(Clone, Copy)]
struct ClientRef {
    key_plus_one: NonZeroU32,
    tag: u32,
}

impl Beat {
    /// Its ping is due (not its pong deadline) at `tick`.
    fn ping_due(&self, tick: Tick) -> bool {
        self.due <= tick && self.pinged_at.is_none()
    }

    /// A ping went out: next due at its pong deadline, the slot it was due at kept for the next.
    fn pinged(&mut self, deadline: Tick) {
        self.pinged_at = NonZeroU64::new(self.due.max(1));
        self.due = deadline;
    }
}

impl Heartbeat {
    /// A heartbeat with room reserved (not touched) for `clients` sessions, so that its slab does
    /// not grow by doubling and leave its old buffers as holes in the heap.
    pub fn new(ping_interval: Duration, pong_timeout: Duration, clients: usize) -> Rc<Heartbeat> {
        Rc::new(Heartbeat {
            start: Instant::now(),
            slot_nanos: (ping_interval.as_nanos() / u128::from(SLOTS_PER_INTERVAL)).max(1),
            ping_interval,
            pong_timeout,
            swept: Cell::new(0),
            beats: RefCell::new(Slab::with_capacity(clients)),
            sweeper: Cell::new(None),
            parked_pinger: RefCell::new(None),
        })
    }

    /// How pings of parked sessions are written from now on; until then, they are woken.
    pub fn ping_parked_with(&self, pinger: ParkedPinger) {
        *self.parked_pinger.borrow_mut() = Some(pinger);
    }

    /// The heartbeat of the session of client `client_id` under `hub_key`, first due one
    /// `--ping-interval` from now (rounded up to a slot).
    pub fn register(self: &Rc<Self>, hub_key: usize, client_id: u64) -> Pulse {
        let due = self.first_tick_from(Instant::now() + self.ping_interval);
        let key_plus_one = u32::try_from(hub_key + 1).ok().and_then(NonZeroU32::new);
        // The tag tells apart the clients a reused key has had: the low bits are enough.
        let client = key_plus_one.map(|key_plus_one| ClientRef { key_plus_one, tag: client_id as u32 });
        let beat = Beat { due, pinged_at: None, waker: None, client };
        let key = self.beats.borrow_mut().insert(beat);
        if let Some(sweeper) = self.sweeper.take() {
            sweeper.wake();
        }
        Pulse { heartbeat: Rc::clone(self), key }
    }

    /// The one timer task: at each slot's start, serves the sessions due, a turn of parked pings
    /// per scheduling round (`FanOut::next_round`). Sleeps without a timer while no session is
    /// registered.
    pub async fn sweep(&self, rounds: &FanOut) {
        loop {
            future::poll_fn(|cx| {
                if self.beats.borrow().is_empty() {
                    self.sweeper.set(Some(cx.waker().clone()));
                    return Poll::Pending;
                }
                Poll::Ready(())
            })
            .await;
            Timer::at(self.instant_of(self.swept.get() + 1)).await;
            let tick = self.tick_at(Instant::now());
            let mut next = Some(0);
            while let Some(from) = next {
                next = self.sweep_from(tick, from);
                if next.is_some() {
                    rounds.next_round().await;
                }
            }
        }
    }

    /// Sweeps slot `tick` at once, every turn, for tests.
    #[cfg(test)]
    pub(crate) fn sweep_now(&self, tick: Tick) {
        let mut next = Some(0);
        while let Some(from) = next {
            next = self.sweep_from(tick, from);
        }
    }

    /// Marks slot `tick` swept and serves the beats due from key `from` on: a ping the pinger
    /// writes (its session is parked) is written for it, any other session due is woken. Returns the key to go on from
    /// after `PARKED_PINGS_PER_TURN` pings, `None` once every beat is served.
    fn sweep_from(&self, tick: Tick, from: usize) -> Option<usize> {
        self.swept.set(tick);
        let pinger = self.parked_pinger.borrow();
        let mut beats = self.beats.borrow_mut();
        let mut pings = 0;
        for key in from..beats.capacity() {
            let Some(beat) = beats.get_mut(key).filter(|beat| beat.due <= tick) else { continue };
            let parked_ping = beat.ping_due(tick)
                && beat
                    .client
                    .zip(pinger.as_ref())
                    .is_some_and(|(client, ping)| ping(client.key_plus_one.get() as usize - 1, client.tag));
            if parked_ping {
                // Sent now, which is never before the slot began.
                let sent = Instant::now().max(self.instant_of(tick));
                beat.pinged(self.first_tick_from(sent + self.pong_timeout));
                pings += 1;
                if pings == PARKED_PINGS_PER_TURN {
                    return Some(key + 1);
                }
            } else if let Some(waker) = beat.waker.take() {
                waker.wake();
            }
        }
        None
    }

    /// The slot under way at `now`.
    fn tick_at(&self, now: Instant) -> Tick {
        Tick::try_from(now.saturating_duration_since(self.start).as_nanos() / self.slot_nanos)
            .unwrap_or(Tick::MAX)
    }

    /// The first slot that starts at or after `when`.
    fn first_tick_from(&self, when: Instant) -> Tick {
        let nanos = when.saturating_duration_since(self.start).as_nanos();
        Tick::try_from(nanos.div_ceil(self.slot_nanos)).unwrap_or(Tick::MAX)
    }

    fn instant_of(&self, tick: Tick) -> Instant {
        let nanos = u64::try_from(u128::from(tick) * self.slot_nanos).unwrap_or(u64::MAX);
        self.start + Duration::from_nanos(nanos)
    }

    fn with_beat<T>(&self, key: usize, work: impl FnOnce(&mut Beat, Tick) -> T) -> Option<T> {
        let swept = self.swept.get();
        self.beats.borrow_mut().get_mut(key).map(|beat| work(beat, swept))
    }
}

/// A session's registration in the `Heartbeat`; dropping it unregisters the session.
pub struct Pulse {
    heartbeat: Rc<Heartbeat>,
    key: usize,
}

impl Pulse {
    /// Ready once the sweep has reached the slot this session is due at: time to ping (or to
    /// send an SSE heartbeat), or, while a pong is awaited, its deadline.
    pub fn poll_due(&self, cx: &mut Context<'_>) -> Poll<()> {
        let due = self.heartbeat.with_beat(self.key, |beat, swept| {
            if beat.due <= swept {
                return true;
            }
            if !beat.waker.as_ref().is_some_and(|waker| waker.will_wake(cx.waker())) {
                beat.waker = Some(cx.waker().clone());
            }
            false
        });
        if due.unwrap_or(false) { Poll::Ready(()) } else { Poll::Pending }
    }

    /// Whether a ping went out and nothing has come back since.
    pub fn awaiting_answer(&self) -> bool {
        self.heartbeat.with_beat(self.key, |beat, _| beat.pinged_at.is_some()).unwrap_or(false)
    }

    /// A ping is going out now: the session is next due at its pong deadline.
    pub fn pinged(&self) {
        self.pinged_at(Instant::now());
    }

    fn pinged_at(&self, now: Instant) {
        let deadline = self.heartbeat.first_tick_from(now + self.heartbeat.pong_timeout);
        self.heartbeat.with_beat(self.key, |beat, _| beat.pinged(deadline));
    }

    /// The client answered (anything it sends counts): the next ping is one interval after the
    /// last one, as if the ping had been answered at once.
    pub fn answered(&self) {
        self.heartbeat.with_beat(self.key, |beat, _| {
            if let Some(pinged_at) = beat.pinged_at.take() {
                beat.due = pinged_at.get() + SLOTS_PER_INTERVAL;
            }
        });
    }

    /// A heartbeat that expects no answer (SSE) went out: next due one interval later.
    pub fn beat(&self) {
        self.heartbeat.with_beat(self.key, |beat, swept| beat.due = beat.due.max(swept) + SLOTS_PER_INTERVAL);
    }
}

impl Drop for Pulse {
    fn drop(&mut self) {
        self.heartbeat.beats.borrow_mut().try_remove(self.key);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use crate::runtime::scheduler::Scheduler;

    /// A waker that counts its wakes, for tests of what wakes a session.
    #[derive(Default)]
    pub(crate) struct CountingWaker(pub(crate) AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn due(pulse: &Pulse, counter: &Arc<CountingWaker>) -> bool {
        let waker = Waker::from(Arc::clone(counter));
        pulse.poll_due(&mut Context::from_waker(&waker)).is_ready()
    }

    /// A heartbeat whose slots are so long that the clock never reaches the next one in a test:
    /// slots are swept by hand.
    fn slow_heartbeat() -> Rc<Heartbeat> {
        Heartbeat::new(Duration::from_secs(8 * 3600), Duration::from_secs(2 * 3600), 2)
    }

    #[test]
    fn a_ping_is_due_one_interval_after_registering_then_its_pong_deadline() {
        let heartbeat = slow_heartbeat();
        let pulse = heartbeat.register(0, 0);
        let counter = Arc::new(CountingWaker::default());
        // Registered just after slot 0 began: due one interval later, rounded up: slot 9.
        heartbeat.sweep_now(8);
        assert!(!due(&pulse, &counter));
        heartbeat.sweep_now(9);
        assert_eq!(counter.0.load(Ordering::Relaxed), 1, "the sweep wakes a due session");
        assert!(due(&pulse, &counter));
        // Sent a moment after slot 9 began: the pong deadline, two hours (slots) later, rounds
        // up to slot 12.
        pulse.pinged_at(heartbeat.instant_of(9) + Duration::from_millis(5));
        assert!(pulse.awaiting_answer());
        assert!(!due(&pulse, &counter), "not due again until its pong deadline");
        heartbeat.sweep_now(11);
        assert!(!due(&pulse, &counter));
        heartbeat.sweep_now(12);
        assert!(due(&pulse, &counter), "past the pong deadline");
        pulse.answered();
        assert!(!pulse.awaiting_answer());
        heartbeat.sweep_now(16);
        assert!(!due(&pulse, &counter), "answered: the next ping is one interval after the last");
        heartbeat.sweep_now(17);
        assert!(due(&pulse, &counter));
    }

    #[test]
    fn an_sse_heartbeat_is_due_every_interval() {
        let heartbeat = slow_heartbeat();
        let pulse = heartbeat.register(0, 0);
        let counter = Arc::new(CountingWaker::default());
        heartbeat.sweep_now(9);
        assert!(due(&pulse, &counter));
        pulse.beat();
        assert!(!due(&pulse, &counter));
        heartbeat.sweep_now(16);
        assert!(!due(&pulse, &counter));
        heartbeat.sweep_now(17);
        assert!(due(&pulse, &counter));
    }

    #[test]
    fn only_the_sessions_due_are_woken_and_a_dropped_pulse_is_gone() {
        let heartbeat = slow_heartbeat();
        let (early, late) = (heartbeat.register(0, 0), heartbeat.register(1, 1));
        let (early_waker, late_waker) =
            (Arc::new(CountingWaker::default()), Arc::new(CountingWaker::default()));
        assert!(!due(&early, &early_waker) && !due(&late, &late_waker));
        heartbeat.with_beat(late.key, |beat, _| beat.due = 20);
        heartbeat.sweep_now(9);
        assert_eq!(early_waker.0.load(Ordering::Relaxed), 1);
        assert_eq!(late_waker.0.load(Ordering::Relaxed), 0);
        drop(early);
        drop(late);
        assert!(heartbeat.beats.borrow().is_empty());
    }

    /// Installs a pinger that answers what `writes` holds (as the express lane does, whether the
    /// client is parked) and records the hub keys it was asked for.
    fn pinger(heartbeat: &Heartbeat, writes: bool) -> (Rc<RefCell<Vec<usize>>>, Rc<Cell<bool>>) {
        let (asked, writes) = (Rc::new(RefCell::new(Vec::new())), Rc::new(Cell::new(writes)));
        let (log, answer) = (Rc::clone(&asked), Rc::clone(&writes));
        heartbeat.ping_parked_with(Box::new(move |key, _tag| {
            log.borrow_mut().push(key);
            answer.get()
        }));
        (asked, writes)
    }

    /// A session registered under hub key `key`, waiting for its heartbeat (not yet due).
    fn waiting(heartbeat: &Rc<Heartbeat>, key: usize) -> (Pulse, Arc<CountingWaker>) {
        let pulse = heartbeat.register(key, 10 * key as u64);
        let counter = Arc::new(CountingWaker::default());
        assert!(!due(&pulse, &counter));
        (pulse, counter)
    }

    #[test]
    fn a_parked_session_is_pinged_for_without_a_wake_until_its_pong_deadline() {
        let heartbeat = slow_heartbeat();
        let (asked, writes) = pinger(&heartbeat, true);
        let (pulse, counter) = waiting(&heartbeat, 7);
        heartbeat.sweep_now(9);
        assert_eq!(*asked.borrow(), [7], "the pinger wrote its ping");
        assert_eq!(counter.0.load(Ordering::Relaxed), 0, "and the session slept on");
        assert!(pulse.awaiting_answer());
        // Written as slot 9 began (in this test): the pong deadline is two slots later.
        heartbeat.sweep_now(10);
        assert!(!due(&pulse, &counter), "due next at the pong deadline, slot 11");
        heartbeat.sweep_now(11);
        assert_eq!(counter.0.load(Ordering::Relaxed), 1, "a pong deadline wakes a parked session");
        assert_eq!(asked.borrow().len(), 1, "and is not a ping");
        pulse.answered();
        assert!(!due(&pulse, &counter), "answered: not due until the next ping");
        writes.set(false);
        heartbeat.sweep_now(17);
        assert_eq!(asked.borrow().len(), 2);
        assert_eq!(counter.0.load(Ordering::Relaxed), 2, "an awake session pings for itself");
        assert!(due(&pulse, &counter));
    }

    #[test]
    fn a_parked_session_whose_ping_cannot_be_written_is_woken_to_write_it() {
        let heartbeat = slow_heartbeat();
        let (asked, _) = pinger(&heartbeat, false);
        let (pulse, counter) = waiting(&heartbeat, 3);
        heartbeat.sweep_now(9);
        assert_eq!(*asked.borrow(), [3]);
        assert_eq!(counter.0.load(Ordering::Relaxed), 1);
        assert!(!pulse.awaiting_answer());
        assert!(due(&pulse, &counter));
    }

    #[test]
    fn a_sweep_yields_after_a_turn_of_parked_pings_and_then_goes_on() {
        let heartbeat = Heartbeat::new(Duration::from_secs(8 * 3600), Duration::from_secs(2 * 3600), 0);
        let (asked, _) = pinger(&heartbeat, true);
        let pulses: Vec<Pulse> =
            (0..PARKED_PINGS_PER_TURN + 10).map(|key| heartbeat.register(key, key as u64)).collect();
        let next = heartbeat.sweep_from(9, 0);
        assert_eq!(next, Some(PARKED_PINGS_PER_TURN));
        assert_eq!(asked.borrow().len(), PARKED_PINGS_PER_TURN);
        assert_eq!(heartbeat.sweep_from(9, PARKED_PINGS_PER_TURN), None);
        let all: Vec<usize> = (0..pulses.len()).collect();
        assert_eq!(*asked.borrow(), all, "each pinged once");
        assert!(pulses.iter().all(Pulse::awaiting_answer));
    }

    /// The sweep as the server runs it, with a session that is always busy: one turn's pings go
    /// out together, and the sessions run before the next turn's.
    #[test]
    fn a_sweep_lets_the_sessions_run_between_its_turns_of_parked_pings() {
        let scheduler = Scheduler::new(8);
        let heartbeat = Heartbeat::new(Duration::from_millis(80), Duration::from_secs(3600), 0);
        let count = PARKED_PINGS_PER_TURN + 1;
        let session_turns = Rc::new(Cell::new(0u64));
        // The session turns run so far, at each ping.
        let seen = Rc::new(RefCell::new(Vec::new()));
        let (all_pinged, pinged) = async_channel::bounded(1);
        let (log, turns) = (Rc::clone(&seen), Rc::clone(&session_turns));
        heartbeat.ping_parked_with(Box::new(move |_, _| {
            log.borrow_mut().push(turns.get());
            if log.borrow().len() == count {
                let _ = all_pinged.try_send(());
            }
            true
        }));
        let _pulses: Vec<Pulse> = (0..count).map(|key| heartbeat.register(key, key as u64)).collect();
        let turns = Rc::clone(&session_turns);
        let busy = async move {
            loop {
                turns.set(turns.get() + 1);
                future::yield_now().await;
            }
        };
        scheduler.sessions.spawn(busy).detach();
        let (sweeper, rounds) = (Rc::clone(&heartbeat), Rc::clone(&scheduler.fan_out));
        scheduler.control.spawn(async move { sweeper.sweep(&rounds).await }).detach();
        let gave_up = async {
            Timer::after(Duration::from_secs(10)).await;
            false
        };
        assert!(scheduler.block_on(future::or(async { pinged.recv().await.is_ok() }, gave_up)));
        let seen = seen.borrow();
        let (first_turn, next) = seen.split_at(PARKED_PINGS_PER_TURN);
        assert!(first_turn.iter().all(|&turns| turns == first_turn[0]), "sessions ran within a turn");
        assert!(next[0] > first_turn[0], "no session ran between the turns ({} turns)", next[0]);
    }

    #[test]
    fn a_beat_stays_small() {
        // Every idle client has one (BENCHMARKS.md, "Per idle WebSocket client").
        assert!(size_of::<Beat>() <= 40, "{}", size_of::<Beat>());
    }

    #[test]
    fn the_sweep_wakes_a_session_within_a_slot_of_its_ping() {
        let heartbeat = Heartbeat::new(Duration::from_millis(80), Duration::from_millis(40), 1);
        let pulse = heartbeat.register(0, 0);
        let started = Instant::now();
        let rounds = Rc::clone(&Scheduler::new(1).fan_out);
        let sweep = heartbeat.sweep(&rounds);
        let woken = future::poll_fn(|cx| pulse.poll_due(cx));
        smol::block_on(future::or(woken, sweep));
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(80), "woken after {elapsed:?}");
        assert!(elapsed < Duration::from_secs(5), "woken after {elapsed:?}");
    }
}
