//! Connection tasks: spawning them detached with a shutdown token, and pausing an accept loop
//! after an error.

use std::future::Future;
use std::io;
use std::time::Duration;

use async_channel::{Receiver, Sender};
use futures_util::FutureExt;
use smol::{LocalExecutor, Timer};

use crate::support::logger::WarningThrottle;

/// Pause after an accept error, so that running out of file descriptors does not spin the CPU.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Counts the connection tasks still running: each holds a clone of the token, and `all_done`
/// completes once every clone (and the original) is dropped. Shutdown waits on it.
#[derive(Clone)]
pub struct TaskTokens {
    token: Sender<()>,
}

/// Completes once every `TaskTokens` clone is gone.
pub struct AllTasksDone(Receiver<()>);

impl TaskTokens {
    pub fn new() -> (TaskTokens, AllTasksDone) {
        let (token, done) = async_channel::bounded(1);
        (TaskTokens { token }, AllTasksDone(done))
    }

    /// Spawns `work` as a detached task that holds a token while it runs.
    pub fn spawn<T: 'static>(
        &self,
        executor: &LocalExecutor<'static>,
        work: impl Future<Output = T> + 'static,
    ) {
        let token = self.token.clone();
        // `map`, not an async block: a block would hold `work` twice (as its capture and as the
        // future it awaits), doubling what every connection's task allocates.
        executor.spawn(work.map(move |_| drop(token))).detach();
    }
}

impl AllTasksDone {
    pub async fn wait(&self) {
        let _ = self.0.recv().await;
    }
}

/// Logs an accept error and pauses; out of file descriptors, this keeps the loop from spinning.
pub async fn back_off_after_accept_error(kind: &str, error: io::Error, throttle: &WarningThrottle) {
    throttle.note(&format!("{kind} accept failed: {error}; pausing {ACCEPT_BACKOFF:?} after each failure"));
    Timer::after(ACCEPT_BACKOFF).await;
}
