//! Waiting for a thread, but not forever.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often `join_within` looks whether the thread has finished.
const POLL: Duration = Duration::from_millis(10);

/// Joins `thread` if it finishes within `bound`; else leaves it running, detached, and returns
/// `false`.
pub fn join_within(thread: JoinHandle<()>, bound: Duration) -> bool {
    let until = Instant::now() + bound;
    while !thread.is_finished() {
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(POLL);
    }
    // Finished: this returns at once. A panic there was reported when it happened.
    let _ = thread.join();
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_finishes_in_time_is_joined() {
        let thread = std::thread::spawn(|| std::thread::sleep(Duration::from_millis(20)));
        assert!(join_within(thread, Duration::from_secs(10)));
    }

    #[test]
    fn a_thread_still_busy_after_the_bound_is_left_running() {
        let thread = std::thread::spawn(|| std::thread::sleep(Duration::from_secs(3)));
        let started = Instant::now();
        assert!(!join_within(thread, Duration::from_millis(100)));
        assert!(started.elapsed() < Duration::from_secs(2), "waited {:?}", started.elapsed());
    }
}
