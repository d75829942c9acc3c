//! The running server: accept loops for the TCP listener and the Unix socket, one spawned task
//! per connection, connection caps, and the shutdown sequence.
//!
//! Everything runs on one `LocalExecutor` on the calling thread. `main` binds the sockets and
//! hands them to `serve` with a future that completes when it is time to stop.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::TcpListener as StdTcpListener;
use std::rc::Rc;
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender};
use log::{info, warn};
use smol::io::AsyncWriteExt;
use smol::net::TcpListener;
use smol::{LocalExecutor, Timer, future};

use crate::config::Config;
use crate::hub::{Hub, HubLimits, SharedHub};
use crate::routes;
use crate::unix_ingest::{self, BoundUnixSocket};

/// How long shutdown waits for sessions to drain their queues and close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Pause after an accept error, so that running out of file descriptors does not spin the CPU.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What every connection task shares.
pub struct Shared {
    pub config: Config,
    pub hub: SharedHub,
    /// Its `recv` fails once shutdown begins: idle connections race it to close promptly.
    pub stop: Receiver<()>,
}

/// A cap on open connections of one kind; a taken slot is given back when its guard drops.
pub struct ConnectionSlots {
    open: Cell<usize>,
    max: usize,
}

pub struct SlotGuard(Rc<ConnectionSlots>);

impl ConnectionSlots {
    pub fn new(max: usize) -> Rc<Self> {
        Rc::new(ConnectionSlots { open: Cell::new(0), max })
    }

    pub fn try_take(self: &Rc<Self>) -> Option<SlotGuard> {
        let open = self.open.get();
        (open < self.max).then(|| {
            self.open.set(open + 1);
            SlotGuard(Rc::clone(self))
        })
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.open.set(self.0.open.get() - 1);
    }
}

/// Serves until `shutdown` completes, then closes every client with 1001 and returns.
pub fn serve(
    config: Config,
    tcp: StdTcpListener,
    unix: Option<BoundUnixSocket>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let tcp = TcpListener::try_from(tcp)?;
    let unix_listener = unix.as_ref().map(BoundUnixSocket::listener).transpose()?;
    let hub = Hub::new(HubLimits {
        history: config.history,
        history_bytes: config.history_bytes,
        queue: config.queue,
        max_clients: config.max_clients,
    });
    let (stop_sender, stop) = async_channel::bounded(1);
    let shared = Rc::new(Shared { config, hub, stop });
    // Every connection task holds a clone of `task_token`; when all are dropped, `tasks_done`
    // reports it, which is how shutdown knows the sessions have finished.
    let (task_token, tasks_done) = async_channel::bounded::<()>(1);
    let executor = LocalExecutor::new();

    smol::block_on(executor.run(async {
        let accepting = future::zip(
            accept_tcp(&executor, &shared, tcp, task_token.clone()),
            unix_ingest::accept(&executor, &shared, unix_listener, task_token.clone()),
        );
        future::or(async { accepting.await.0 }, shutdown).await;

        info!("shutting down: closing {} clients", shared.hub.borrow().client_count());
        stop_sender.close();
        shared.hub.borrow_mut().shut_down();
        drop(task_token);
        if future::or(async { tasks_done.recv().await.is_err() }, async {
            Timer::after(SHUTDOWN_GRACE).await;
            false
        })
        .await
        {
            info!("all connections closed");
        } else {
            warn!("shutdown: connections still open after {SHUTDOWN_GRACE:?}, closing them");
        }
    }));
    drop(unix);
    Ok(())
}

/// Spawns `work` as a detached connection task that holds a shutdown token while it runs.
pub fn spawn_connection(
    executor: &LocalExecutor<'static>,
    task_token: &Sender<()>,
    work: impl Future<Output = ()> + 'static,
) {
    let token = task_token.clone();
    executor
        .spawn(async move {
            work.await;
            drop(token);
        })
        .detach();
}

async fn accept_tcp(
    executor: &LocalExecutor<'static>,
    shared: &Rc<Shared>,
    listener: TcpListener,
    task_token: Sender<()>,
) {
    let slots = ConnectionSlots::new(shared.config.max_http_connections);
    let refusals = WarningThrottle::default();
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Some(slot) = slots.try_take() else {
                    refusals.note("connection refused: --max-http-connections reached");
                    refuse_busy(stream).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let connection = routes::serve_connection(Rc::clone(shared), stream, peer, slot);
                spawn_connection(executor, &task_token, connection);
            }
            Err(error) => back_off_after_accept_error("TCP", error).await,
        }
    }
}

/// Answers a connection over `--max-http-connections` with a 503 if the socket takes it at
/// once, and closes it. No task is spawned for it: a flood must not cost memory.
async fn refuse_busy(mut stream: smol::net::TcpStream) {
    let body = r#"{"ok":false,"error":"server busy: too many connections"}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nRetry-After: 5\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // One non-blocking attempt: a fresh socket's send buffer is empty, so it normally succeeds.
    let _ = future::poll_once(stream.write(response.as_bytes())).await;
}

/// Logs a repeated warning at most once per `WarningThrottle::PERIOD`, with how many were held
/// back, so that a flood of refused connections cannot flood the log.
#[derive(Default)]
pub struct WarningThrottle {
    last_logged: Cell<Option<Instant>>,
    held_back: Cell<u64>,
}

impl WarningThrottle {
    const PERIOD: Duration = Duration::from_secs(10);

    pub fn note(&self, message: &str) {
        let now = Instant::now();
        if self.last_logged.get().is_some_and(|last| now < last + Self::PERIOD) {
            self.held_back.set(self.held_back.get() + 1);
            return;
        }
        match self.held_back.replace(0) {
            0 => warn!("{message}"),
            held_back => warn!("{message} (and {held_back} more in the last {:?})", Self::PERIOD),
        }
        self.last_logged.set(Some(now));
    }
}

/// Logs an accept error and pauses; out of file descriptors, this keeps the loop from spinning.
pub async fn back_off_after_accept_error(kind: &str, error: io::Error) {
    warn!("{kind} accept failed: {error}; pausing {ACCEPT_BACKOFF:?}");
    Timer::after(ACCEPT_BACKOFF).await;
}
