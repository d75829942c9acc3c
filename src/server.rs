//! The running server: accept loops for the TCP listener and the Unix socket, one spawned task
//! per connection (and one per WebSocket session once it upgrades), connection caps, and the
//! shutdown sequence.
//!
//! Everything runs on the calling thread, under the `Scheduler`. `main` binds the sockets and
//! hands them to `serve` with a stream of `Control`s (from signals): reload the token files, or
//! shut down.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::net::TcpListener as StdTcpListener;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use async_channel::{Receiver, Sender};
use futures_util::FutureExt;
use log::{error, info, warn};
use smol::io::AsyncWriteExt;
use smol::net::TcpListener;
use smol::stream::{Stream, StreamExt};
use smol::{LocalExecutor, Timer, future};

use crate::auth::{Access, TokenSet};
use crate::config::Config;
use crate::hub::{Hub, HubLimits, SharedHub};
use crate::journal::{self, Committed, Journal, Storage};
use crate::metrics::Metrics;
use crate::routes;
use crate::scheduler::{FanOut, Scheduler};
use crate::slots::{ConnectionSlots, HTTP_CONNECTIONS};
use crate::unix_ingest::{self, BoundUnixSocket};

/// How long shutdown waits for sessions to drain their queues and close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How often aged-out history is swept.
const EXPIRY_SWEEP: Duration = Duration::from_secs(60);
/// Connections accepted in one go before their tasks get a turn.
const ACCEPT_BATCH: usize = 64;
/// Pause after an accept error, so that running out of file descriptors does not spin the CPU.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What every connection task shares.
pub struct Shared {
    pub config: Config,
    pub hub: SharedHub,
    /// Tokens and origins; replaced as a whole on reload. Borrowed only between awaits.
    pub access: RefCell<Access>,
    /// Where accepted emergencies are committed before they are acknowledged; `None` when the
    /// history is in memory only.
    pub journal: Option<Journal>,
    pub metrics: Rc<Metrics>,
    /// Paces publishing to the sessions' fan-out: every path that hands emergencies to the hub
    /// waits for `FanOut::room` right before each (no await in between) and counts it after.
    pub fan_out: Rc<FanOut>,
    /// Its `recv` fails once shutdown begins: idle connections race it to close promptly.
    pub stop: Receiver<()>,
}

impl Shared {
    /// Completes once shutdown has begun.
    pub async fn stopping(&self) {
        let _ = self.stop.recv().await;
    }
}

/// What the process asks of a running server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Re-read the token files (SIGHUP).
    Reload,
    /// Stop (SIGTERM, SIGINT).
    Shutdown,
}

/// Serves until `controls` asks to shut down (or ends), then closes every client with 1001.
pub fn serve(
    config: Config,
    access: Access,
    storage: Storage,
    tcp: StdTcpListener,
    unix: Option<BoundUnixSocket>,
    mut controls: impl Stream<Item = Control> + Unpin,
) -> io::Result<()> {
    let tcp = TcpListener::try_from(tcp)?;
    let unix_listener = unix.as_ref().map(BoundUnixSocket::listener).transpose()?;
    let limits = HubLimits {
        history: config.history,
        history_bytes: config.history_bytes,
        queue: config.queue,
        max_clients: config.max_clients,
        history_max_age: config.history_max_age,
    };
    let (hub, journal, committed) = match storage {
        Storage::Memory => (Hub::new(limits, &journal::new_stream_id()), None, None),
        Storage::Durable { journal, loaded, committed } => {
            let hub = Hub::new(limits, &loaded.stream_id);
            hub.borrow_mut().restore(loaded.last_seq, loaded.retained);
            (hub, Some(journal), Some(committed))
        }
    };
    let (stop_sender, stop) = async_channel::bounded(1);
    let metrics = Rc::new(Metrics::default());
    let scheduler = Scheduler::new(config.publish_burst());
    let fan_out = Rc::clone(&scheduler.fan_out);
    let shared =
        Rc::new(Shared { config, hub, access: RefCell::new(access), journal, metrics, fan_out, stop });
    // Every connection task holds a clone of `task_token`; when all are dropped, `tasks_done`
    // reports it, which is how shutdown knows the sessions have finished.
    let (task_token, tasks_done) = async_channel::bounded::<()>(1);
    if let Some(committed) = committed {
        scheduler.control.spawn(deliver_committed(Rc::clone(&shared), committed)).detach();
    }
    scheduler.control.spawn(expire_history(Rc::clone(&shared))).detach();

    scheduler.block_on(async {
        let accepting = future::zip(
            accept_tcp(&scheduler, &shared, tcp, task_token.clone()),
            unix_ingest::accept(&scheduler.control, &shared, unix_listener, task_token.clone()),
        );
        let controlled = async {
            while let Some(Control::Reload) = controls.next().await {
                reload_access(&shared);
            }
        };
        future::or(async { accepting.await.0 }, controlled).await;

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
    });
    drop(unix);
    Ok(())
}

/// Hands what the journal committed to the hub, in seq order, and answers each publisher.
async fn deliver_committed(shared: Rc<Shared>, committed: Receiver<Committed>) {
    while let Ok(Committed(batch)) = committed.recv().await {
        for (stored, reply) in batch {
            shared.fan_out.room().await;
            let receipt = shared.hub.borrow_mut().deliver(stored);
            shared.fan_out.published();
            let _ = reply.try_send(Ok(receipt));
        }
        future::yield_now().await;
    }
}

/// Drops aged-out emergencies from memory and disk, even when nothing is published.
async fn expire_history(shared: Rc<Shared>) {
    loop {
        Timer::after(EXPIRY_SWEEP).await;
        shared.hub.borrow_mut().expire(SystemTime::now());
        if let Some(journal) = &shared.journal {
            journal.sweep();
        }
    }
}

/// Re-reads the token files; clients whose subscribe token is gone are disconnected, everyone
/// else stays. On any error the current tokens stay in force.
fn reload_access(shared: &Shared) {
    let reloaded = shared.access.borrow().reload();
    match reloaded {
        Ok(access) => {
            let revoked = match &access.subscribe {
                Some(tokens) => shared.hub.borrow_mut().revoke(|token| tokens.holder(token).is_some()),
                None => 0,
            };
            let count = |tokens: &Option<TokenSet>| tokens.as_ref().map_or(0, TokenSet::token_count);
            info!(
                "reloaded token files: {} publish and {} subscribe tokens; {revoked} clients revoked",
                count(&access.publish),
                count(&access.subscribe)
            );
            *shared.access.borrow_mut() = access;
        }
        Err(error) => error!("reload failed, keeping the current tokens: {error}"),
    }
}

/// Spawns `work` as a detached connection task that holds a shutdown token while it runs.
pub fn spawn_connection<T: 'static>(
    executor: &LocalExecutor<'static>,
    task_token: &Sender<()>,
    work: impl Future<Output = T> + 'static,
) {
    let token = task_token.clone();
    // `map`, not an async block: a block would hold `work` twice (as its capture and as the
    // future it awaits), doubling what every connection's task allocates.
    executor.spawn(work.map(move |_| drop(token))).detach();
}

async fn accept_tcp(
    scheduler: &Scheduler,
    shared: &Rc<Shared>,
    listener: TcpListener,
    task_token: Sender<()>,
) {
    let slots = ConnectionSlots::new(shared.config.max_http_connections, HTTP_CONNECTIONS);
    let errors = WarningThrottle::default();
    let mut accepted = 0usize;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Some(slot) = slots.admit(&shared.metrics) else {
                    refuse_busy(stream).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                // Its requests are control work; once it upgrades, its session moves over.
                let (sessions, token) = (Rc::clone(&scheduler.sessions), task_token.clone());
                let fan_out = Rc::clone(&scheduler.fan_out);
                let connection =
                    routes::serve_connection(Rc::clone(shared), stream, peer, slot).map(move |upgraded| {
                        if let Some(session) = upgraded {
                            let ticket = fan_out.session_ticket();
                            spawn_connection(&sessions, &token, session.serve().map(move |()| drop(ticket)));
                        }
                    });
                spawn_connection(&scheduler.control, &task_token, connection);
                // In a reconnect storm, let a batch of new connections read their requests
                // before more are accepted, so that connections do not pile up unread.
                accepted += 1;
                if accepted.is_multiple_of(ACCEPT_BATCH) {
                    future::yield_now().await;
                }
            }
            Err(error) => back_off_after_accept_error("TCP", error, &errors).await,
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
pub async fn back_off_after_accept_error(kind: &str, error: io::Error, throttle: &WarningThrottle) {
    throttle.note(&format!("{kind} accept failed: {error}; pausing {ACCEPT_BACKOFF:?} after each failure"));
    Timer::after(ACCEPT_BACKOFF).await;
}
