//! The composition root: builds the hub, the publish path and the `App`, runs the accept loops
//! (one task per connection, and one per WebSocket session once it upgrades), reloads, and the
//! shutdown sequence. Only `main` imports it.
//!
//! Everything runs on the calling thread, under the `Scheduler`. `main` binds the sockets and
//! hands them to `serve` with a stream of `Control`s (from signals): reload the token files, or
//! shut down.

use std::cell::RefCell;
use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::rc::Rc;
use std::time::{Duration, Instant};

use async_channel::Sender;
use futures_util::FutureExt;
use log::{error, info, warn};
use smol::net::{TcpListener, TcpStream};
use smol::stream::{Stream, StreamExt};
use smol::{LocalExecutor, Task, Timer, future};

use crate::app::{App, hub_limits};
use crate::auth::{Access, TokenSet};
use crate::config::Config;
use crate::core::clock::Reading;
use crate::core::handle::HubHandle;
use crate::core::hub::Hub;
use crate::http;
use crate::http::conn::{HttpConnection, Response};
use crate::http::status::Status;
use crate::ingest::Publisher;
use crate::ingest::escalation::{self, EscalationSettings};
use crate::protocol::error_json;
use crate::runtime::deadline;
use crate::runtime::heartbeat::Heartbeat;
use crate::runtime::linger::Refusals;
use crate::runtime::scheduler::Scheduler;
use crate::runtime::slots::{ConnectionSlots, HTTP_CONNECTIONS, SlotGuard};
use crate::runtime::tasks::{AllTasksDone, TaskTokens, back_off_after_accept_error};
use crate::store::Storage;
use crate::store::journal;
use crate::support::logger::WarningThrottle;
use crate::support::metrics::Metrics;
use crate::tls::transport::Transport;
use crate::tls::{self, Acceptor, HandshakeError, ServerCertificate};
use crate::unix::{self, BoundUnixSocket};
use crate::ws;
use crate::ws::express::Express;
use crate::ws::session::Session;

/// How long shutdown waits for each of its steps: the journal to hand over what it committed,
/// then the sessions to drain their queues and close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How often aged-out history is swept.
const EXPIRY_SWEEP: Duration = Duration::from_secs(60);
/// Connections accepted in one go before their tasks get a turn.
const ACCEPT_BATCH: usize = 64;

/// What the process asks of a running server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Re-read the token files and the TLS certificate (SIGHUP).
    Reload,
    /// Stop (SIGTERM, SIGINT).
    Shutdown,
}

/// The TLS listener (`--tls-listen`) and the certificate it serves.
pub struct TlsListener {
    pub listener: StdTcpListener,
    pub certificate: ServerCertificate,
}

/// Serves until `controls` asks to shut down (or ends), then closes every client with 1001.
pub fn serve(
    config: Config,
    access: Access,
    storage: Storage,
    tcp: StdTcpListener,
    tls: Option<TlsListener>,
    unix: Option<BoundUnixSocket>,
    mut controls: impl Stream<Item = Control> + Unpin,
) -> io::Result<()> {
    let tcp = TcpListener::try_from(tcp)?;
    let (tls_listener, certificate) = match tls {
        Some(TlsListener { listener, certificate }) => {
            (Some(TcpListener::try_from(listener)?), Some(certificate))
        }
        None => (None, None),
    };
    let unix_listener = unix.as_ref().map(BoundUnixSocket::listener).transpose()?;
    let limits = hub_limits(&config);
    let (mut hub, journal, committed) = match storage {
        Storage::Memory => (Hub::new(limits, &journal::new_stream_id()), None, None),
        Storage::Durable { journal, loaded, committed, engine } => {
            let mut hub =
                Hub::new(limits, &loaded.stream_id).restored(loaded.last_seq, loaded.retained, loaded.events);
            if let Some(engine) = &engine {
                hub = hub.with_box_name(engine.box_name());
            }
            (hub, Some((journal, engine)), Some(committed))
        }
    };
    let (journal, engine) = journal.map_or((None, None), |(journal, engine)| (Some(journal), engine));
    // The clock at start is what the sweeps' readings are checked against.
    hub.expire(Reading::now());
    let (hub, ingress) = HubHandle::new(hub);
    let (stop_sender, stop) = async_channel::bounded(1);
    let metrics = Rc::new(Metrics::default());
    let scheduler = Scheduler::new(config.publish_burst());
    let publisher = Publisher::new(
        ingress,
        journal,
        Rc::clone(&scheduler.fan_out),
        Rc::clone(&metrics),
        config.max_body_bytes,
        config.max_inflight_bytes,
    );
    let publisher = match engine {
        Some(engine) => publisher.with_engine(*engine),
        None => publisher,
    };
    let heartbeat = Heartbeat::new(config.ping_interval, config.pong_timeout, config.max_clients);
    let access = RefCell::new(access);
    let app = Rc::new(App { config, hub, access, publisher, metrics, heartbeat, stop });
    let (tasks, all_tasks_done) = TaskTokens::new();
    let delivery = committed.map(|committed| {
        let app = Rc::clone(&app);
        scheduler.control.spawn(async move { app.publisher.deliver_committed(committed).await })
    });
    scheduler.control.spawn(expire_history(Rc::clone(&app))).detach();
    let heartbeat = Rc::clone(&app.heartbeat);
    let rounds = Rc::clone(&scheduler.fan_out);
    scheduler.control.spawn(async move { heartbeat.sweep(&rounds).await }).detach();
    // A session's turn: it writes what parked sessions would have.
    let express = Express::new(app.config.max_clients);
    scheduler
        .sessions
        .spawn(Rc::clone(&express).run(Rc::clone(&app), Rc::clone(&scheduler.fan_out)))
        .detach();
    let (lane, hub) = (Rc::clone(&express), app.hub.clone());
    let ping_parked = move |key, tag| hub.try_with(|hub| lane.ping(hub, key, tag)).unwrap_or(false);
    app.heartbeat.ping_parked_with(Box::new(ping_parked));
    if app.publisher.journal().is_some() {
        let app = Rc::clone(&app);
        scheduler.control.spawn(async move { app.publisher.flush_deliveries_periodically().await }).detach();
    }
    if app.publisher.engine().is_some() {
        let app = Rc::clone(&app);
        scheduler.control.spawn(async move { app.publisher.abandon_refused_receipts().await }).detach();
    }
    if app.config.ack_timeout.is_some() {
        let settings = EscalationSettings {
            command: app.config.on_unacked.clone(),
            max_children: app.config.max_escalation_children,
            time_limit: app.config.escalation_time_limit,
            stream: app.hub.with(|hub| hub.stream_id().to_owned()),
        };
        let app = Rc::clone(&app);
        scheduler.control.spawn(async move { escalation::run(&app.publisher, settings).await }).detach();
    }

    // One cap for every TCP connection, plain or TLS, until it upgrades.
    let slots = ConnectionSlots::new(app.config.max_http_connections, HTTP_CONNECTIONS);
    scheduler.block_on(async {
        let plain = accept_tcp(&scheduler, &app, &express, tcp, None, &slots, tasks.clone());
        let encrypted = async {
            match tls_listener {
                Some(listener) => {
                    let certificate = certificate.as_ref();
                    accept_tcp(&scheduler, &app, &express, listener, certificate, &slots, tasks.clone()).await
                }
                None => future::pending().await,
            }
        };
        let accepting = future::zip(
            future::zip(plain, encrypted),
            unix::accept(&scheduler.control, &app, unix_listener, tasks.clone()),
        );
        let controlled = async {
            while let Some(Control::Reload) = controls.next().await {
                reload_access(&app);
                if let Some(certificate) = &certificate {
                    reload_certificate(certificate);
                }
            }
        };
        // Returning drops the accept loops: no new connections from here on.
        future::or(async { accepting.await.0.0 }, controlled).await;
        stop_ingest(&app, &stop_sender);
        drain_journal(delivery).await;
        close_clients(&app, tasks, all_tasks_done).await;
    });
    drop(unix);
    Ok(())
}

/// Shutdown, step 1: every new submission is refused (`Rejection::ShuttingDown`) and idle
/// connections are told to close; the journal commits what it has queued and stops.
fn stop_ingest(app: &App, stop_sender: &Sender<()>) {
    info!("shutting down: refusing new emergencies");
    stop_sender.close();
    app.publisher.stop_accepting();
}

/// Shutdown, step 2: waits until every emergency the journal committed is in the hub, while the
/// clients are still there to be sent it. Past `SHUTDOWN_GRACE` (a stuck disk) delivery is
/// cancelled: those publishers get an error or no answer, never an "ok" no tablet would see.
async fn drain_journal(delivery: Option<Task<()>>) {
    let Some(delivery) = delivery else { return };
    if deadline::within(SHUTDOWN_GRACE, delivery).await.is_err() {
        warn!(
            "shutdown: the journal did not finish within {SHUTDOWN_GRACE:?}; emergencies not yet \
             delivered get no \"ok\" (they may still be on disk)"
        );
    }
}

/// Shutdown, step 3: every session sends what it has not been sent, then Close 1001; waits for
/// every connection task, up to `SHUTDOWN_GRACE`.
async fn close_clients(app: &App, tasks: TaskTokens, all_tasks_done: AllTasksDone) {
    info!("shutting down: closing {} clients", app.hub.with(|hub| hub.client_count()));
    app.hub.with(Hub::shut_down);
    drop(tasks);
    if deadline::within(SHUTDOWN_GRACE, all_tasks_done.wait()).await.is_ok() {
        info!("all connections closed");
    } else {
        warn!("shutdown: connections still open after {SHUTDOWN_GRACE:?}, closing them");
    }
}

/// Drops aged-out emergencies from memory and disk, even when nothing is published.
async fn expire_history(app: Rc<App>) {
    loop {
        Timer::after(EXPIRY_SWEEP).await;
        app.hub.with(|hub| hub.expire(Reading::now()));
        if let Some(journal) = app.publisher.journal() {
            journal.sweep();
        }
    }
}

/// Re-reads the token files; clients whose subscribe token is gone are disconnected, everyone
/// else stays. On any error the current tokens stay in force.
fn reload_access(app: &App) {
    let reloaded = app.access.borrow().reload();
    match reloaded {
        Ok(access) => {
            let revoked = match &access.subscribe {
                Some(tokens) => app.hub.with(|hub| hub.revoke(|token| tokens.holder(token).is_some())),
                None => 0,
            };
            let count = |tokens: &Option<TokenSet>| tokens.as_ref().map_or(0, TokenSet::token_count);
            info!(
                "reloaded token files: {} publish and {} subscribe tokens; {revoked} clients revoked",
                count(&access.publish),
                count(&access.subscribe)
            );
            *app.access.borrow_mut() = access;
        }
        Err(error) => error!("reload failed, keeping the current tokens: {error}"),
    }
}

/// Reads the TLS certificate and key again: new handshakes get them, connected clients keep
/// theirs. On any error the certificate in force stays.
fn reload_certificate(certificate: &ServerCertificate) {
    match certificate.reload() {
        Ok(()) => info!("reloaded the TLS certificate {}: new connections get it", certificate.describe()),
        Err(error) => error!("reload failed, keeping the current TLS certificate: {error}"),
    }
}

/// Accepts connections on a plain listener, or a TLS one (`tls`), under the one cap `slots`.
async fn accept_tcp(
    scheduler: &Scheduler,
    app: &Rc<App>,
    express: &Rc<Express>,
    listener: TcpListener,
    tls: Option<&ServerCertificate>,
    slots: &Rc<ConnectionSlots>,
    tasks: TaskTokens,
) {
    let errors = WarningThrottle::default();
    let refusals = Refusals::default();
    let mut accepted = 0usize;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Some(slot) = slots.admit(&app.metrics) else {
                    // A plain 503 would be garbage to a TLS client, and a handshake is work the
                    // server has no room for: it is closed, and retries.
                    if tls.is_none() {
                        refuse_busy(&scheduler.control, app, stream, &refusals).await;
                    }
                    continue;
                };
                let _ = stream.set_nodelay(true);
                // Its requests are control work; once it upgrades, its session moves over.
                let (sessions, session_tasks) = (Rc::clone(&scheduler.sessions), tasks.clone());
                let (fan_out, express) = (Rc::clone(&scheduler.fan_out), Rc::clone(express));
                let acceptor = tls.map(ServerCertificate::acceptor);
                let connection =
                    serve_tcp(Rc::clone(app), stream, acceptor, peer, slot).map(move |upgraded| {
                        if let Some(session) = upgraded {
                            let ticket = fan_out.session_ticket();
                            session_tasks
                                .spawn(&sessions, session.serve(&express).map(move |()| drop(ticket)));
                        }
                    });
                tasks.spawn(&scheduler.control, connection);
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

/// Serves one TCP connection's HTTP requests, over TLS first with `tls`; returns its session
/// (WebSocket or SSE) if it asks for one and is admitted, for the caller to run as a task of its own.
async fn serve_tcp(
    app: Rc<App>,
    stream: TcpStream,
    tls: Option<Acceptor>,
    peer: SocketAddr,
    slot: SlotGuard,
) -> Option<Session> {
    let transport = match tls {
        Some(acceptor) => Box::pin(open_tls(&app, acceptor, stream, peer, &slot)).await?,
        None => Transport::plain(stream),
    };
    let upgrade = http::routes::serve_requests(&app, transport, peer, slot).await?;
    ws::accept(&app, upgrade).await
}

/// The TLS handshake, by `--header-timeout` from the connection's start; meanwhile it may be
/// evicted for a newer connection, like one waiting for its request. Plain HTTP to the TLS port
/// is answered (in plain text, 400) and closed, with a log line.
async fn open_tls(
    app: &App,
    acceptor: Acceptor,
    stream: TcpStream,
    peer: SocketAddr,
    slot: &SlotGuard,
) -> Option<Transport> {
    let deadline = Instant::now() + app.config.header_timeout;
    slot.set_idle(true);
    let interrupted = async {
        future::or(app.stopping(), slot.evicted()).await;
        Err(HandshakeError::Closed)
    };
    let handshake = future::or(tls::accept(acceptor, stream, deadline), interrupted).await;
    slot.set_idle(false);
    match handshake {
        Ok(transport) => Some(transport),
        Err(HandshakeError::NotTls(stream)) => {
            note_tls_failure(
                NOT_TLS,
                &format!("closed {peer}: not TLS on the TLS port (plain http:// or ws:// to --tls-listen?)"),
            );
            let connection = HttpConnection::new(Transport::plain(stream), Rc::clone(&app.metrics));
            let refusal = Response::json(
                Status::BAD_REQUEST,
                error_json("this port speaks TLS only: use https:// or wss://"),
            );
            connection.respond_and_close(refusal, app.config.write_timeout, slot).await;
            None
        }
        Err(HandshakeError::TimedOut) => {
            note_tls_failure(
                HANDSHAKE_TIMED_OUT,
                &format!("closed {peer}: TLS handshake not complete within --header-timeout"),
            );
            None
        }
        Err(HandshakeError::Failed(error)) => {
            note_tls_failure(HANDSHAKE_FAILED, &format!("TLS handshake with {peer} failed: {error}"));
            None
        }
        Err(HandshakeError::Closed) => None,
    }
}

thread_local! {
    /// Failed TLS handshakes, one line per period: a tablet that does not trust the site CA yet
    /// retries for as long as it is on, and a port scan fails hundreds at once.
    /// One throttle per kind, so that a flood of one does not hide the first of another.
    static TLS_FAILURES: [WarningThrottle; 3] = Default::default();
}

/// The kinds of failed TLS handshakes, as indexes into `TLS_FAILURES`.
const NOT_TLS: usize = 0;
const HANDSHAKE_TIMED_OUT: usize = 1;
const HANDSHAKE_FAILED: usize = 2;

fn note_tls_failure(kind: usize, message: &str) {
    TLS_FAILURES.with(|failures| failures[kind].note(message));
}

/// Answers a connection over `--max-http-connections` with a 503 (counted like every response)
/// and closes it, lingering so that its client reads the 503 rather than a reset
/// (`Refusals::refuse`: bounded, so a flood costs no memory).
async fn refuse_busy(control: &LocalExecutor<'static>, app: &App, stream: TcpStream, refusals: &Refusals) {
    let status = Status::SERVICE_UNAVAILABLE;
    let response = Response::json(status, error_json("server busy: too many connections"))
        .with_header("Retry-After", "5")
        .to_bytes(false);
    app.metrics.count("resq_push_http_responses_total", status.label);
    refusals.refuse(control, stream, &response).await;
}
