//! The clock that age-based retention goes by.
//!
//! Boards often have no real-time clock: they boot in 1970 (or at the time saved at the last
//! shutdown) until NTP steps the clock, and a clock may jump years ahead and be corrected later.
//! Expiring by such a clock would delete recent emergencies, so `RetentionClock` trusts a reading
//! only when it is plausible and keeps time:
//!
//! - A wall clock earlier than `CLOCK_FLOOR` is implausible: nothing expires by age.
//! - One that kept time with the monotonic clock since the last trusted reading is trusted, and
//!   so is one that fell behind: it makes emergencies look younger, so it deletes less, not more.
//! - One that jumped ahead of that (or became plausible after an implausible start) is trusted
//!   only once it has kept time for `max_age`: by then everything received before the jump is
//!   really older than `max_age`, whatever its stamp says, so nothing recent can go.
//! - The first reading (at start) is trusted if plausible: a restart has nothing to check it
//!   against but the floor.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Since the Unix epoch, the earliest time a real clock reads where this source runs:
/// 2026-11-01T00:00:00Z, a little before it was written. A clock that reads earlier was never
/// set. A constant rather than the build time, so that builds stay reproducible; move it
/// forward now and then.
pub const CLOCK_FLOOR: Duration = Duration::from_secs(1_793_491_200);

/// How far the wall clock may run ahead of the monotonic clock between two readings and still
/// be said to keep time.
pub const STEP_TOLERANCE: Duration = Duration::from_secs(10);

/// The wall clock and the monotonic clock, read together.
#[derive(Clone, Copy, Debug)]
pub struct Reading {
    pub wall: SystemTime,
    pub mono: Instant,
}

impl Reading {
    pub fn now() -> Reading {
        Reading { wall: SystemTime::now(), mono: Instant::now() }
    }

    fn is_plausible(&self) -> bool {
        self.wall.duration_since(UNIX_EPOCH).is_ok_and(|since_epoch| since_epoch >= CLOCK_FLOOR)
    }

    /// Where the wall clock would read now had it kept time with the monotonic clock since
    /// `earlier`.
    fn expected_since(&self, earlier: Reading) -> SystemTime {
        let elapsed = self.mono.saturating_duration_since(earlier.mono);
        earlier.wall.checked_add(elapsed).unwrap_or(earlier.wall)
    }

    fn jumped_ahead_of(&self, earlier: Reading) -> bool {
        self.wall.duration_since(self.expected_since(earlier)).is_ok_and(|ahead| ahead > STEP_TOLERANCE)
    }

    /// Whether the wall clock kept time with the monotonic clock since `earlier`, either way.
    fn kept_time_since(&self, earlier: Reading) -> bool {
        let off = match self.wall.duration_since(self.expected_since(earlier)) {
            Ok(ahead) => ahead,
            Err(behind) => behind.duration(),
        };
        off <= STEP_TOLERANCE
    }
}

/// Decides, reading by reading, whether the wall clock can be trusted to expire by.
#[derive(Debug)]
pub struct RetentionClock {
    max_age: Duration,
    /// Whether any reading was taken: the first plausible one is trusted.
    read: bool,
    /// The last trusted reading, which the next one is checked against.
    trusted: Option<Reading>,
    /// When a wall clock that is not trusted began to keep time: it is trusted `max_age` later.
    probation: Option<Reading>,
}

impl RetentionClock {
    pub fn new(max_age: Duration) -> RetentionClock {
        RetentionClock { max_age, read: false, trusted: None, probation: None }
    }

    /// The time to expire by at `reading`, or `None` while the clock cannot be trusted.
    pub fn expiry_now(&mut self, reading: Reading) -> Option<SystemTime> {
        let first = !std::mem::replace(&mut self.read, true);
        if !reading.is_plausible() {
            self.probation = None;
            return None;
        }
        let in_step = self.trusted.is_some_and(|trusted| !reading.jumped_ahead_of(trusted));
        if first || in_step || self.served_probation(reading) {
            self.trusted = Some(reading);
            self.probation = None;
            return Some(reading.wall);
        }
        None
    }

    /// Whether `reading`'s wall clock has kept time for `max_age`; if it has not kept time since
    /// its probation began, the probation begins again now.
    fn served_probation(&mut self, reading: Reading) -> bool {
        match self.probation {
            Some(since) if reading.kept_time_since(since) => {
                reading.mono.saturating_duration_since(since.mono) >= self.max_age
            }
            _ => {
                self.probation = Some(reading);
                self.max_age.is_zero()
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const SECOND: Duration = Duration::from_secs(1);
    pub(crate) const MINUTE: Duration = Duration::from_secs(60);
    pub(crate) const HOUR: Duration = Duration::from_secs(3600);
    pub(crate) const YEARS: Duration = Duration::from_secs(5 * 365 * 86_400);

    /// The reading `elapsed` after `start` by the monotonic clock, the wall clock then at `wall`.
    pub(crate) fn reading_after(start: Reading, elapsed: Duration, wall: SystemTime) -> Reading {
        Reading { wall, mono: start.mono + elapsed }
    }

    /// `start`'s wall clock kept time: `elapsed` later by both clocks.
    pub(crate) fn kept_time(start: Reading, elapsed: Duration) -> Reading {
        reading_after(start, elapsed, start.wall + elapsed)
    }

    fn clock() -> RetentionClock {
        RetentionClock::new(HOUR)
    }

    #[test]
    fn the_first_plausible_reading_is_trusted_and_so_is_a_clock_that_keeps_time() {
        let mut clock = clock();
        let start = Reading::now();
        assert_eq!(clock.expiry_now(start), Some(start.wall));
        let later = kept_time(start, 2 * HOUR);
        assert_eq!(clock.expiry_now(later), Some(later.wall));
    }

    #[test]
    fn a_clock_before_the_floor_is_never_trusted_and_once_set_waits_max_age() {
        let mut clock = clock();
        let boot = Reading { wall: SystemTime::UNIX_EPOCH + MINUTE, mono: Instant::now() };
        assert_eq!(clock.expiry_now(boot), None);
        assert_eq!(clock.expiry_now(kept_time(boot, 2 * HOUR)), None);
        let set = reading_after(boot, 3 * HOUR, SystemTime::now());
        assert_eq!(clock.expiry_now(set), None);
        assert_eq!(clock.expiry_now(kept_time(set, HOUR - SECOND)), None);
        let served = kept_time(set, HOUR);
        assert_eq!(clock.expiry_now(served), Some(served.wall));
    }

    #[test]
    fn a_jump_ahead_is_trusted_after_max_age_of_kept_time_and_another_jump_starts_over() {
        let mut clock = clock();
        let start = Reading::now();
        clock.expiry_now(start);
        let jumped = reading_after(start, MINUTE, start.wall + YEARS);
        assert_eq!(clock.expiry_now(jumped), None);
        assert_eq!(clock.expiry_now(kept_time(jumped, 30 * MINUTE)), None);
        let again = reading_after(jumped, 40 * MINUTE, jumped.wall + YEARS);
        assert_eq!(clock.expiry_now(again), None);
        assert_eq!(clock.expiry_now(kept_time(again, HOUR - SECOND)), None);
        let served = kept_time(again, HOUR);
        assert_eq!(clock.expiry_now(served), Some(served.wall));
        let on = kept_time(served, MINUTE);
        assert_eq!(clock.expiry_now(on), Some(on.wall));
    }

    #[test]
    fn a_jump_ahead_corrected_back_is_trusted_at_once() {
        let mut clock = clock();
        let start = Reading::now();
        clock.expiry_now(start);
        assert_eq!(clock.expiry_now(reading_after(start, MINUTE, start.wall + YEARS)), None);
        let corrected = kept_time(start, 2 * MINUTE);
        assert_eq!(clock.expiry_now(corrected), Some(corrected.wall));
    }

    #[test]
    fn a_clock_that_falls_behind_or_drifts_within_the_tolerance_is_trusted() {
        let mut clock = clock();
        let start = Reading::now();
        clock.expiry_now(start);
        let behind = reading_after(start, MINUTE, start.wall - HOUR);
        assert_eq!(clock.expiry_now(behind), Some(behind.wall));
        let drifted = reading_after(behind, MINUTE, behind.wall + MINUTE + STEP_TOLERANCE);
        assert_eq!(clock.expiry_now(drifted), Some(drifted.wall));
        // Back in step after falling behind is a jump ahead like any other.
        let stepped = reading_after(drifted, MINUTE, drifted.wall + MINUTE + HOUR);
        assert_eq!(clock.expiry_now(stepped), None);
    }
}
