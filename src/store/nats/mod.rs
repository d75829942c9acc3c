//! Cluster mode's engine: NATS JetStream as the store beside SQLite. The engine assigns the
//! seqs (its stream sequence) and keeps the replicated history; the journal becomes the box's
//! cache of it, for replay while the engine is away and at restart.
//!
//! `async-nats` runs on tokio only, so it gets one thread of its own, `nats`, with a
//! current-thread runtime, as SQLite has the journal's: the executor stays single-threaded and
//! talks to it over bounded `async-channel`s. Publishes go to the thread as `Command`s and come
//! back as `PubAcked` (the engine's quorum commit) or the reason they were not stored; the
//! follower (`follower`) reads the stream in order into the journal (`Cacher`), whose commits
//! reach the hub by the path local commits take. Acks and closes go to the receipts stream,
//! which every box follows too; escalation commands are claimed in a KV bucket (`claims`).

mod claims;
mod follower;
mod quorum;
mod stream;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use async_channel::{Receiver, Sender};
use async_nats::jetstream::{self, kv};
use async_nats::{Client, ConnectOptions, Event, HeaderMap, ServerAddr};
use log::{info, warn};

use crate::core::receipts::ReceiptEvent;
use crate::store::ClusterOnly;
use crate::store::engine::{
    Claim, Credentials, EngineError, EngineReply, EngineSettings, EngineStatus, Follow, MESSAGE_ID, PubAcked,
    Publication, encode_deliveries, encode_receipt,
};
use crate::store::journal::Cacher;
use crate::support::logger::WarningThrottle;

/// Threads of tokio's blocking pool beside the `nats` thread: the client resolves the servers'
/// names there (one connect at a time). Bounded, so that `TasksMax` in
/// deploy/resq-push.service holds (tokio's default is 512).
const BLOCKING_THREADS: usize = 2;
/// How long the thread is given to send what it holds when the server stops.
const STOP_WAIT: Duration = Duration::from_secs(2);

enum Command {
    Publish(Publication, Sender<EngineReply>),
    /// Acks and closes for the receipts stream; once the engine has them, stored and applied
    /// here too (`done` hears it), else `failed` hears why.
    Receipts {
        events: Vec<ReceiptEvent>,
        done: Option<Sender<()>>,
        failed: Sender<(Vec<ReceiptEvent>, String)>,
    },
    /// This box's deliveries, already stored and applied here, for the other boxes.
    Deliveries(Vec<ReceiptEvent>),
    /// Claim the command of escalation `seq` for `lease`.
    Claim {
        seq: u64,
        lease: Duration,
        reply: Sender<Result<Claim, String>>,
    },
    /// The command of escalation `seq` has run.
    ClaimDone {
        seq: u64,
    },
}

/// The status, written by the `nats` thread and read by the executor.
#[derive(Debug)]
struct SharedStatus {
    state: Mutex<EngineStatus>,
    /// Rung at each reconnect: the follower reads the stream again at once, rather than wait
    /// for its consumer to notice that it is gone.
    reconnected: (Sender<()>, Receiver<()>),
}

impl Default for SharedStatus {
    fn default() -> SharedStatus {
        SharedStatus { state: Mutex::default(), reconnected: async_channel::bounded(1) }
    }
}

impl SharedStatus {
    fn lock(&self) -> MutexGuard<'_, EngineStatus> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Completes at the next reconnect (or at once if one happened since the last call).
    async fn reconnect(&self) {
        if self.reconnected.1.recv().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    fn update(&self, change: impl FnOnce(&mut EngineStatus)) {
        change(&mut self.lock());
    }

    /// A publish's ack proves the quorum; a publish without one clears it (`quorum`).
    fn note_publish(&self, answer: &EngineReply) {
        let acked = answer.is_ok();
        self.update(|status| status.stream_ok = acked);
    }

    /// One log line per connect and disconnect, not per message.
    fn note(&self, event: Event, box_name: &str) {
        match event {
            Event::Connected => {
                info!("engine: {box_name} connected to NATS");
                self.update(|status| status.connected = true);
                let _ = self.reconnected.0.try_send(());
            }
            Event::Disconnected => {
                warn!("engine: {box_name} disconnected from NATS: publishes are refused until it is back");
                self.update(|status| {
                    status.connected = false;
                    status.stream_ok = false;
                });
            }
            Event::Closed => self.update(|status| status.connected = false),
            // Every failed reconnect is one: one line per period says so, with the count.
            Event::ServerError(error) => note_throttled(&format!("engine: NATS server error: {error}")),
            Event::ClientError(error) => note_throttled(&format!("engine: NATS client error: {error}")),
            Event::SlowConsumer(_) | Event::LameDuckMode | Event::Draining => {
                info!("engine: {event}")
            }
        }
    }
}

thread_local! {
    /// The engine's errors, on the `nats` thread, where the event callback runs.
    static ENGINE_ERRORS: WarningThrottle = WarningThrottle::default();
}

fn note_throttled(message: &str) {
    ENGINE_ERRORS.with(|throttle| throttle.note(message));
}

/// The executor's handle on the `nats` thread.
#[derive(Debug)]
pub struct Engine {
    commands: Sender<Command>,
    follow: Sender<Follow>,
    status: Arc<SharedStatus>,
    settings: EngineSettings,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Publish(..) => "Publish",
            Command::Receipts { .. } => "Receipts",
            Command::Deliveries(..) => "Deliveries",
            Command::Claim { .. } => "Claim",
            Command::ClaimDone { .. } => "ClaimDone",
        })
    }
}

/// Starts the `nats` thread, connects, and binds (or creates) the stream, waiting for that at
/// most `--nats-timeout`. Returns the stream identity if the engine answered in time, `None`
/// if it did not (the box starts on its cache and binds when the engine is back). An error is
/// a setting that can never work (a URL, a credentials file).
pub fn start(settings: EngineSettings) -> Result<(Engine, Option<String>), String> {
    let (commands, incoming) = async_channel::bounded(settings.queue);
    let (follow, go) = async_channel::bounded(1);
    let (bound_sender, bound) = async_channel::bounded(1);
    let status = Arc::new(SharedStatus::default());
    let thread = {
        let (settings, status) = (settings.clone(), Arc::clone(&status));
        std::thread::Builder::new()
            .name("nats".into())
            .spawn(move || run(settings, status, incoming, bound_sender, go))
            .map_err(|e| format!("cannot start the nats thread: {e}"))?
    };
    let identity = bound.recv_blocking().map_err(|_| "the nats thread stopped at start".to_owned())??;
    let engine = Engine { commands, follow, status, settings, thread: Some(thread) };
    Ok((engine, identity))
}

impl Engine {
    /// Starts following the stream into `follow.cacher`, after the seq the cache holds.
    pub fn follow(&self, follow: Follow) {
        let _ = self.follow.try_send(follow);
    }

    /// Hands a publication to the `nats` thread; the receiver hears the engine's commit or why
    /// there is none. Refused at once when `--nats-queue` commands already wait.
    pub fn publish(&self, publication: Publication) -> Result<Receiver<EngineReply>, String> {
        let (reply, acked) = async_channel::bounded(1);
        match self.commands.try_send(Command::Publish(publication, reply)) {
            Ok(()) => Ok(acked),
            Err(async_channel::TrySendError::Full(_)) => Err(format!(
                "{} publishes, acks and closes already wait for the engine (--nats-queue)",
                self.settings.queue
            )),
            Err(async_channel::TrySendError::Closed(_)) => Err("the nats thread has stopped".into()),
        }
    }

    /// As `publish`, waiting for room in `--nats-queue` instead (a Unix publisher, which reads
    /// no more of its socket meanwhile).
    pub async fn publish_when_room(&self, publication: Publication) -> Result<Receiver<EngineReply>, String> {
        let (reply, acked) = async_channel::bounded(1);
        match self.commands.send(Command::Publish(publication, reply)).await {
            Ok(()) => Ok(acked),
            Err(_) => Err("the nats thread has stopped".into()),
        }
    }

    /// Hands acks and closes to the `nats` thread for the receipts stream: once committed
    /// there they are stored and applied on this box (`done` hears it) and every other box
    /// follows them; `failed` gets them back, with why, if the engine did not take them.
    pub fn publish_receipts(
        &self,
        events: Vec<ReceiptEvent>,
        done: Option<Sender<()>>,
        failed: Sender<(Vec<ReceiptEvent>, String)>,
    ) -> Result<(), (Vec<ReceiptEvent>, String)> {
        match self.commands.try_send(Command::Receipts { events, done, failed }) {
            Ok(()) => Ok(()),
            Err(refused) => {
                let reason = if refused.is_full() {
                    "too many waiting for the engine"
                } else {
                    "the nats thread has stopped"
                };
                match refused.into_inner() {
                    Command::Receipts { events, .. } => Err((events, reason.to_owned())),
                    _ => unreachable!("sent a Receipts command"),
                }
            }
        }
    }

    /// Shares this box's deliveries (stored and applied here already) with the other boxes,
    /// through the receipts stream; best effort: if the engine does not take them, the other
    /// boxes do not count them (logged).
    pub fn publish_deliveries(&self, events: Vec<ReceiptEvent>) {
        if self.commands.try_send(Command::Deliveries(events)).is_err() {
            note_throttled(
                "engine: deliveries not shared with the other boxes: too many waiting for the engine",
            );
        }
    }

    /// Claims the `--on-unacked` command of escalation `seq` for `time_limit` plus
    /// `claims::LEASE_MARGIN`; the receiver hears whether this box runs it.
    pub fn claim(&self, seq: u64, time_limit: Duration) -> Receiver<Result<Claim, String>> {
        let (reply, claimed) = async_channel::bounded(1);
        let lease = time_limit + claims::LEASE_MARGIN;
        if let Err(refused) = self.commands.try_send(Command::Claim { seq, lease, reply })
            && let Command::Claim { reply, .. } = refused.into_inner()
        {
            let _ = reply.try_send(Err("too many waiting for the engine".into()));
        }
        claimed
    }

    /// Marks the command of escalation `seq` as run (best effort: if the mark is lost, another
    /// box may run it again once the lease is over).
    pub fn claim_done(&self, seq: u64) {
        let _ = self.commands.try_send(Command::ClaimDone { seq });
    }

    /// What only cluster mode can make (`engine::ClusterOnly`).
    pub fn cluster_only(&self) -> ClusterOnly {
        ClusterOnly
    }

    pub fn status(&self) -> EngineStatus {
        self.status.lock().clone()
    }

    pub fn servers(&self) -> &[String] {
        &self.settings.urls
    }

    pub fn stream_name(&self) -> &str {
        &self.settings.stream.name
    }

    pub fn box_name(&self) -> &str {
        &self.settings.box_name
    }

    /// `--nats-timeout`.
    pub fn timeout(&self) -> Duration {
        self.settings.timeout
    }
}

impl Drop for Engine {
    /// Lets the thread send what it holds, for at most `STOP_WAIT`.
    fn drop(&mut self) {
        self.commands.close();
        self.follow.close();
        if let Some(thread) = self.thread.take()
            && !crate::support::join::join_within(thread, STOP_WAIT)
        {
            warn!("the nats thread is still busy after {STOP_WAIT:?}; exiting anyway");
        }
    }
}

/// The `nats` thread: connect, bind, report, then serve publishes and follow the stream until
/// the executor's side closes.
fn run(
    settings: EngineSettings,
    status: Arc<SharedStatus>,
    commands: Receiver<Command>,
    bound: Sender<Result<Option<String>, String>>,
    go: Receiver<Follow>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .thread_name("nats-blocking")
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = bound.try_send(Err(format!("cannot start the nats runtime: {e}")));
            return;
        }
    };
    runtime.block_on(async move {
        let client = match connect(&settings, Arc::clone(&status)).await {
            Ok(client) => client,
            Err(e) => {
                let _ = bound.try_send(Err(e));
                return;
            }
        };
        let mut context = jetstream::new(client.clone());
        context.set_timeout(settings.timeout);
        let identity = follower::bind_at_start(&context, &settings, &status).await;
        let _ = bound.try_send(Ok(identity));
        let Ok(follow) = go.recv().await else { return };
        let cacher = follow.cacher.clone();
        let receipts = std::pin::pin!(follower::run_receipts(
            context.clone(),
            settings.stream.clone(),
            settings.box_name.clone(),
            cacher.clone(),
            Arc::clone(&status)
        ));
        let following = std::pin::pin!(follower::run(
            context.clone(),
            settings.stream.clone(),
            follow,
            Arc::clone(&status)
        ));
        tokio::spawn(quorum::prove_whenever_lost(context.clone(), settings.clone(), Arc::clone(&status)));
        let serving = std::pin::pin!(serve(&client, &context, &settings, commands, &cacher, &status));
        futures_util::future::select(futures_util::future::select(following, receipts), serving).await;
    });
}

async fn connect(settings: &EngineSettings, status: Arc<SharedStatus>) -> Result<Client, String> {
    let addresses = settings
        .urls
        .iter()
        .map(|url| url.parse::<ServerAddr>().map_err(|e| format!("--nats {url}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let box_name = settings.box_name.clone();
    let mut options = ConnectOptions::new()
        .name(format!("resq-push {box_name}"))
        .retry_on_initial_connect()
        .connection_timeout(settings.timeout)
        .event_callback(move |event| {
            let (status, box_name) = (Arc::clone(&status), box_name.clone());
            async move { status.note(event, &box_name) }
        });
    options = match &settings.credentials {
        Credentials::None => options,
        Credentials::Token(token) => options.token(token.clone()),
        Credentials::UserPassword { user, password } => {
            options.user_and_password(user.clone(), password.clone())
        }
        Credentials::CredsFile(path) => options
            .credentials_file(path)
            .await
            .map_err(|e| format!("--nats-creds {}: {e}", path.display()))?,
    };
    if let Some(ca) = &settings.ca_cert {
        options = options.add_root_certificates(ca.clone());
    }
    options.connect(addresses).await.map_err(|e| format!("cannot connect to NATS: {e}"))
}

/// The engine's error as an operator reads it: without a quorum of its replicas (or with the
/// stream gone) JetStream has no responder, which the client reports as no stream.
fn engine_error(error: String) -> String {
    if error.contains("no stream found") {
        return "no JetStream quorum for the stream, or the stream is gone".into();
    }
    error
}

/// Pause before sending again a publish that no stream received.
const NO_RESPONDERS_RETRY: Duration = Duration::from_millis(100);

/// Waits for a publish's ack within `timeout`. A publish that no stream received (no
/// responders: a leader just elected whose interest has not reached this server yet, or no
/// quorum) stored nothing, so it is sent again, under the same `Nats-Msg-Id`, until `timeout`.
async fn acked_within(
    mut ack: jetstream::context::PublishAckFuture,
    (context, subject, headers, payload): (jetstream::Context, String, HeaderMap, bytes::Bytes),
    timeout: Duration,
) -> EngineReply {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let error = match tokio::time::timeout_at(deadline, ack).await {
            Ok(Ok(ack)) => return Ok(PubAcked { seq: ack.sequence, duplicate: ack.duplicate }),
            Ok(Err(e)) => e,
            Err(_) => return Err(EngineError::maybe_stored(format!("no ack within {timeout:?}"))),
        };
        let unreceived = error.kind() == jetstream::context::PublishErrorKind::StreamNotFound;
        if !unreceived || tokio::time::Instant::now() + NO_RESPONDERS_RETRY >= deadline {
            return Err(ack_error(error));
        }
        tokio::time::sleep(NO_RESPONDERS_RETRY).await;
        ack = match context.publish_with_headers(subject.clone(), headers.clone(), payload.clone()).await {
            Ok(ack) => ack,
            Err(e) => return Err(EngineError::not_stored(engine_error(e.to_string()))),
        };
    }
}

/// A publish's ack that failed: certain that nothing was stored only when no stream received
/// it (no responders); a timeout leaves it open.
fn ack_error(error: jetstream::context::PublishError) -> EngineError {
    let reason = engine_error(error.to_string());
    match error.kind() {
        jetstream::context::PublishErrorKind::StreamNotFound => EngineError::not_stored(reason),
        _ => EngineError::maybe_stored(reason),
    }
}

/// The claim key of escalation `seq` in the stream bound.
fn claim_key(status: &SharedStatus, seq: u64) -> Option<String> {
    status.lock().stream_id.as_ref().map(|stream_id| format!("{stream_id}.{seq}"))
}

/// The claims' bucket, made at the first claim and kept: not made again per claim.
async fn claims_bucket<'a>(
    bucket: &'a mut Option<kv::Store>,
    context: &jetstream::Context,
    settings: &EngineSettings,
) -> Result<&'a kv::Store, String> {
    let store = match bucket.take() {
        Some(store) => store,
        None => claims::bucket(context, &settings.stream).await?,
    };
    Ok(bucket.insert(store))
}

/// Publishes `events` to the receipts stream, each with its message id; the future completes
/// once the engine has committed them all, or with why not, within `--nats-timeout`.
async fn send_receipts(
    context: &jetstream::Context,
    settings: &EngineSettings,
    stream_id: &str,
    events: &[ReceiptEvent],
) -> impl std::future::Future<Output = Result<(), String>> + use<> {
    let timeout = settings.timeout;
    let subject = settings.stream.receipts_subject();
    let mut acks = Vec::new();
    let mut refused = None;
    for (id, body) in events.iter().filter_map(|event| encode_receipt(stream_id, event)) {
        let mut headers = HeaderMap::new();
        headers.insert(MESSAGE_ID, id.as_str());
        let payload = bytes::Bytes::from(body);
        match context.publish_with_headers(subject.clone(), headers.clone(), payload.clone()).await {
            // As publishes: sent again under its id while no stream receives it.
            Ok(ack) => {
                acks.push(acked_within(ack, (context.clone(), subject.clone(), headers, payload), timeout))
            }
            Err(e) => {
                refused = Some(engine_error(e.to_string()));
                break;
            }
        }
    }
    async move {
        if let Some(reason) = refused {
            return Err(reason);
        }
        match futures_util::future::try_join_all(acks).await {
            Ok(_) => Ok(()),
            Err(error) => Err(error.reason),
        }
    }
}

/// Messages of deliveries being shared at once, at most (each `DELIVERIES_PER_MESSAGE`
/// deliveries at most); past it a flush's deliveries are not shared (logged).
const MAX_SHARING: usize = 256;
/// How many times a message of deliveries is sent before it is given up (logged), and the wait
/// between two sends: together about as long as the cache serves a site without the engine.
const SHARE_ATTEMPTS: u32 = 60;
const SHARE_RETRY: Duration = Duration::from_secs(1);

/// Publishes this box's deliveries to the receipts stream, one message per
/// `DELIVERIES_PER_MESSAGE`, each sent again until the engine acks it (`SHARE_ATTEMPTS`): a
/// delivery made while the engine is away (a replay from the cache) counts on the other boxes
/// once it is back. Applying a delivery twice changes nothing, so a send whose ack was lost
/// may be repeated. `sharing` counts the messages in flight, at most `MAX_SHARING`.
fn share_deliveries(
    context: &jetstream::Context,
    settings: &EngineSettings,
    stream_id: &str,
    events: &[ReceiptEvent],
    sharing: &Arc<AtomicUsize>,
) {
    let (subject, timeout) = (settings.stream.receipts_subject(), settings.timeout);
    for body in encode_deliveries(stream_id, &settings.box_name, events) {
        if sharing.fetch_add(1, Ordering::Relaxed) >= MAX_SHARING {
            sharing.fetch_sub(1, Ordering::Relaxed);
            note_throttled(
                "engine: deliveries not shared with the other boxes: too many waiting for the engine",
            );
            return;
        }
        let (context, subject, sharing) = (context.clone(), subject.clone(), Arc::clone(sharing));
        tokio::spawn(async move {
            if let Err(e) = send_until_acked(&context, subject, bytes::Bytes::from(body), timeout).await {
                note_throttled(&format!("engine: deliveries not shared with the other boxes: {e}"));
            }
            sharing.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Sends `payload` to `subject` until the engine acks it, `SHARE_ATTEMPTS` times at most,
/// `SHARE_RETRY` apart: the last error if it never did.
async fn send_until_acked(
    context: &jetstream::Context,
    subject: String,
    payload: bytes::Bytes,
    timeout: Duration,
) -> Result<(), String> {
    let mut last_error = String::new();
    for attempt in 0..SHARE_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(SHARE_RETRY).await;
        }
        last_error = match context.publish(subject.clone(), payload.clone()).await {
            Ok(ack) => match tokio::time::timeout(timeout, ack).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no ack within {timeout:?}"),
            },
            Err(e) => e.to_string(),
        };
    }
    Err(last_error)
}

/// Sends each publish in the order it came (so a Unix publisher's lines keep theirs), then
/// waits for its ack beside the others: a burst is in flight together.
async fn serve(
    client: &Client,
    context: &jetstream::Context,
    settings: &EngineSettings,
    commands: Receiver<Command>,
    cacher: &Cacher,
    status: &Arc<SharedStatus>,
) {
    let subject = settings.stream.emergencies_subject();
    let timeout = settings.timeout;
    let mut bucket = None;
    let sharing = Arc::new(AtomicUsize::new(0));
    while let Ok(command) = commands.recv().await {
        let (publication, reply) = match command {
            Command::Publish(publication, reply) => (publication, reply),
            Command::Claim { seq, lease, reply } => {
                let answer = match claim_key(status, seq) {
                    Some(key) => match claims_bucket(&mut bucket, context, settings).await {
                        Ok(store) => claims::claim(store, &key, &settings.box_name, lease).await,
                        Err(e) => Err(e),
                    },
                    None => Err("the stream is not bound".into()),
                };
                let _ = reply.try_send(answer);
                continue;
            }
            Command::ClaimDone { seq } => {
                if let Some(key) = claim_key(status, seq) {
                    let marked = match claims_bucket(&mut bucket, context, settings).await {
                        Ok(store) => claims::done(store, &key, &settings.box_name).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = marked {
                        warn!(
                            "engine: escalation of seq {seq} not marked done ({e}): another box may run it again"
                        );
                    }
                }
                continue;
            }
            Command::Deliveries(events) => {
                let stream_id = status.lock().stream_id.clone();
                if let Some(stream_id) = stream_id {
                    share_deliveries(context, settings, &stream_id, &events, &sharing);
                }
                continue;
            }
            Command::Receipts { events, done, failed } => {
                let stream_id = status.lock().stream_id.clone();
                let connected = client.connection_state() == async_nats::connection::State::Connected;
                match stream_id.filter(|_| connected) {
                    Some(stream_id) => {
                        let sent = send_receipts(context, settings, &stream_id, &events).await;
                        let cacher = cacher.clone();
                        tokio::spawn(async move {
                            match sent.await {
                                Ok(()) if cacher.record(events.clone(), done) => {}
                                Ok(()) => {
                                    let _ =
                                        failed.try_send((events, "the storage thread has stopped".into()));
                                }
                                Err(reason) => {
                                    let _ = failed.try_send((events, reason));
                                }
                            }
                        });
                    }
                    None => {
                        let _ = failed.try_send((events, "not connected to NATS".into()));
                    }
                }
                continue;
            }
        };
        if client.connection_state() != async_nats::connection::State::Connected {
            let _ = reply.try_send(Err(EngineError::not_stored("not connected to NATS")));
            continue;
        }
        let mut headers = HeaderMap::new();
        for (name, value) in publication.headers(&settings.box_name) {
            headers.insert(name, value.as_str());
        }
        let payload = bytes::Bytes::from(publication.data);
        let sent = context.publish_with_headers(subject.clone(), headers.clone(), payload.clone());
        let ack = match tokio::time::timeout(timeout, sent).await {
            Ok(Ok(ack)) => ack,
            Ok(Err(e)) => {
                let _ = reply.try_send(Err(EngineError::not_stored(engine_error(e.to_string()))));
                continue;
            }
            Err(_) => {
                let _ =
                    reply.try_send(Err(EngineError::maybe_stored(format!("not sent within {timeout:?}"))));
                continue;
            }
        };
        let again = (context.clone(), subject.clone(), headers, payload);
        let status = Arc::clone(status);
        tokio::spawn(async move {
            let answer = acked_within(ack, again, timeout).await;
            status.note_publish(&answer);
            let _ = reply.try_send(answer);
        });
    }
}
