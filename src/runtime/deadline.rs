//! Bounding any future by a point in time, so that no peer can hold a task forever.

use std::future::Future;
use std::time::{Duration, Instant};

use smol::{Timer, future};

/// The deadline passed before the future finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut;

/// Runs `work` until it finishes or `deadline` passes, whichever comes first.
pub async fn before<T>(deadline: Instant, work: impl Future<Output = T>) -> Result<T, TimedOut> {
    future::or(async { Ok(work.await) }, async { Err(passed(deadline).await) }).await
}

/// Completes when `deadline` has passed.
pub async fn passed(deadline: Instant) -> TimedOut {
    Timer::at(deadline).await;
    TimedOut
}

/// Runs `work` for at most `limit`.
pub async fn within<T>(limit: Duration, work: impl Future<Output = T>) -> Result<T, TimedOut> {
    before(Instant::now() + limit, work).await
}
