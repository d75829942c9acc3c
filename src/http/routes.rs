//! One HTTP connection: reads requests (keep-alive), routes them, and answers each.
//!
//! | route | method | answer |
//! |---|---|---|
//! | `/ws/emergencias` | GET | handed over as an `Upgrade` (see `ws::handshake`) |
//! | `/sse/emergencias` | GET | the same stream as Server-Sent Events: handed over as an `Upgrade` too (see `ws::sse`) |
//! | `/emergencias` | POST | publish one emergency (`Idempotency-Key` for a safe retry): `202`, `409` |
//! | `/emergencias?since=N` | GET | retained emergencies after `N` (polling fallback), `X-Resq-*` headers |
//! | `/emergencias/{seq}` | GET | the envelope and its status: deliveries, acks, close, escalation |
//! | `/emergencias/{seq}/ack` | POST | an ack from a tablet without a WebSocket (SSE pages) |
//! | `/emergencias/{seq}/cerrar` | POST | close it (publish token), with an optional JSON object |
//! | `/tablets` | GET | the roster: every named tablet, connected or not |
//! | `/healthz` | GET | storage state (`503` while it fails, or below `--min-subscribers`), version, uptime, clients, last seq |
//! | `/`, `/console.css`, `/console.js`, `/resq-client.js` | GET | the console and the client module (`assets`) |
//! | `/ca.crt` | GET | the site CA's certificate (`--ca-cert`), public |
//!
//! Anything else gets `404` or `405`. A request that leaves the connection in an unknown state
//! (a body not read, a malformed head) is answered and the connection closed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use log::{debug, info, warn};
use smol::future;

use crate::app::App;
use crate::auth::TokenSet;
use crate::core::hub::{ConnectedClient, Resume};
use crate::core::idempotency::IdempotencyKey;
use crate::http::assets;
use crate::http::ca_cert;
use crate::http::conn::{BodyError, BodyPace, HeadError, HttpConnection, MAX_HEADERS, Request, Response};
use crate::http::credentials::{authorize, parse_resume};
use crate::http::forwarded;
use crate::http::status::Status;
use crate::ingest::{self, AckOutcome, CloseOutcome, Rejection, Staged, WhenBusy};
use crate::protocol::{
    self, AckReply, ClientInfo, CloseReply, EngineHealth, Health, Source, StorageHealth, TabletInfo,
    TabletSummary, Tablets, error_json,
};
use crate::runtime::budget::Reservation;
use crate::runtime::slots::SlotGuard;
use crate::store::journal::StorageState;
use crate::support::metrics::Gauges;
use crate::support::timestamp::rfc3339_millis;
use crate::tls::transport::Transport;

/// What a handled request leaves for the connection.
enum Outcome {
    /// Send this response; keep the connection if both sides want it.
    Reply(Response),
    /// Hand the connection to a session of the live stream (WebSocket or SSE).
    Upgrade(Request),
    /// A publish handed to the history, answered once it is settled (`Pipeline`).
    Publishing(PendingPublish),
}

/// A `POST /emergencias` not yet answered: its request (keep-alive, CORS) and its publish.
struct PendingPublish {
    request: Request,
    publish: StagedPublish,
}

/// An emergency staged in the history, waiting for its outcome.
struct StagedPublish {
    staged: Staged,
    /// Its share of `--max-inflight-bytes`, held until it is answered.
    _held: Reservation,
    peer: SocketAddr,
    /// The publish token's name, for the log line.
    publisher: Option<Rc<str>>,
    length: usize,
}

/// The publishes of one connection staged before the first of them is answered: pipelined
/// requests read ahead (at most `--http-pipeline`) share the journal's next commit, as a Unix
/// burst does, instead of each waiting for its own. Only a `POST /emergencias` whose head and
/// body are both at hand is read ahead; any other request, or one still arriving, waits until
/// everything before it is answered, so every answer is the one it would get alone, in order.
struct Pipeline {
    pending: VecDeque<PendingPublish>,
    window: usize,
}

impl Pipeline {
    /// Whether the next request should be read before the pending ones are answered.
    async fn reads_ahead(&self, app: &App, connection: &mut HttpConnection) -> bool {
        let Some(last) = self.pending.back() else { return true };
        if self.pending.len() >= self.window || !last.request.keep_alive() || app.is_stopping() {
            return false;
        }
        let next = connection.peek_whole_request(app.config.max_head_bytes).await;
        next.is_some_and(|request| {
            request.method == "POST" && request.path == "/emergencias" && request.header("expect").is_none()
        })
    }

    /// Answers every pending publish in order; the connection, unless the last closed it. Only
    /// the last can close it, and not even that one if an answer `follows` (a request after
    /// them was read: it decides whether the connection goes on).
    async fn answer_all(
        &mut self,
        app: &App,
        mut connection: HttpConnection,
        slot: &SlotGuard,
        follows: bool,
    ) -> Option<HttpConnection> {
        while let Some(pending) = self.pending.pop_front() {
            let wants_keep_alive = pending.request.keep_alive();
            let response = settle_publish(app, pending).await;
            let keep_open = follows
                || !self.pending.is_empty()
                || connection.can_continue(wants_keep_alive, app.is_stopping());
            connection = answer(app, connection, response, keep_open, slot).await?;
        }
        Some(connection)
    }
}

/// A connection whose request asked for the live stream (`/ws/emergencias`, `/sse/emergencias`),
/// handed over to `ws`.
pub struct Upgrade {
    pub connection: HttpConnection,
    pub request: Request,
    /// Still counts against `--max-http-connections` until the upgrade is answered.
    pub slot: SlotGuard,
    /// Who asked: the peer, or the client a trusted proxy forwards for.
    pub client: SocketAddr,
}

/// Serves requests until the connection closes, or returns it when it asks for an upgrade.
/// `slot` counts it against `--max-http-connections` until then. Each request is handled as
/// coming from its client: `peer`, unless `peer` is a trusted proxy that names another.
pub async fn serve_requests(
    app: &App,
    stream: Transport,
    peer: SocketAddr,
    slot: SlotGuard,
) -> Option<Upgrade> {
    let config = &app.config;
    let mut connection = HttpConnection::new(stream, Rc::clone(&app.metrics));
    let mut pipeline = Pipeline { pending: VecDeque::new(), window: config.http_pipeline };
    loop {
        if !pipeline.reads_ahead(app, &mut connection).await {
            connection = pipeline.answer_all(app, connection, &slot, false).await?;
        }
        let idle_until = Instant::now() + config.header_timeout;
        // Waiting for a request, the connection may be evicted to make room for a newer one.
        slot.set_idle(pipeline.pending.is_empty());
        let head = future::or(
            connection.read_head(config.max_head_bytes, idle_until, config.header_timeout),
            async {
                future::or(app.stopping(), slot.evicted()).await;
                Err(HeadError::Closed)
            },
        )
        .await;
        slot.set_idle(false);
        let (request, deadline) = match head {
            Ok(head) => head,
            Err(error) => {
                // Read ahead only when whole: a head that failed was not, and none is pending.
                answer_bad_head(connection, error, peer, app, &slot).await;
                return None;
            }
        };
        let client = forwarded::client_address(&app.config.trusted_proxy, peer, &request);
        debug!("{client} {} {}", request.method, request.path);
        let wants_keep_alive = request.keep_alive();
        match handle(app, &mut connection, request, client, deadline, &slot).await {
            Outcome::Upgrade(request) => return Some(Upgrade { connection, request, slot, client }),
            Outcome::Publishing(pending) => pipeline.pending.push_back(pending),
            Outcome::Reply(response) => {
                connection = pipeline.answer_all(app, connection, &slot, true).await?;
                let keep_open = connection.can_continue(wants_keep_alive, app.is_stopping());
                connection = answer(app, connection, response, keep_open, &slot).await?;
            }
        }
        // Pipelined requests must not monopolize the thread.
        future::yield_now().await;
    }
}

/// Writes a response, and closes the connection after it unless `keep_open`; the connection,
/// unless it is closed.
async fn answer(
    app: &App,
    mut connection: HttpConnection,
    response: Response,
    keep_open: bool,
    slot: &SlotGuard,
) -> Option<HttpConnection> {
    let write_timeout = app.config.write_timeout;
    if !keep_open {
        connection.respond_and_close(response, write_timeout, slot).await;
        return None;
    }
    let written = connection.respond(&response, true, Instant::now() + write_timeout);
    written.await.ok().map(|()| connection)
}

async fn handle(
    app: &App,
    connection: &mut HttpConnection,
    request: Request,
    peer: SocketAddr,
    deadline: Instant,
    slot: &SlotGuard,
) -> Outcome {
    let head_only = request.method == "HEAD";
    let method = if head_only { "GET" } else { request.method.as_str() };
    let mut response = match (request.path.as_str(), method) {
        ("/ws/emergencias", "GET") if !head_only => return Outcome::Upgrade(request),
        ("/ws/emergencias", _) => method_not_allowed("GET"),
        ("/sse/emergencias", "GET") if !head_only => return Outcome::Upgrade(request),
        ("/sse/emergencias", _) => method_not_allowed("GET"),
        ("/emergencias", "POST") => match publish(app, connection, &request, peer, deadline, slot).await {
            Ok(publish) => return Outcome::Publishing(PendingPublish { request, publish }),
            Err(refusal) => refusal,
        },
        ("/emergencias", "GET") => poll(app, &request, peer),
        ("/emergencias", "OPTIONS") => preflight(app, &request, peer, "GET, POST"),
        ("/emergencias", _) => method_not_allowed("GET, POST"),
        (path, _) if path.starts_with("/emergencias/") => {
            emergency_route(app, connection, &request, peer, deadline, slot).await
        }
        ("/tablets", "GET") => tablets(app, &request, peer),
        // A console of another origin sends its token in a header: that needs a preflight.
        ("/tablets", "OPTIONS") => preflight(app, &request, peer, "GET"),
        ("/tablets", _) => method_not_allowed("GET"),
        ("/healthz", "GET") => health(app),
        ("/healthz", "OPTIONS") => preflight(app, &request, peer, "GET"),
        ("/metrics", "GET") => metrics(app),
        ("/metrics", _) => method_not_allowed("GET"),
        ("/ca.crt", "GET") => ca_cert::ca_certificate(app.config.ca_cert.as_deref()),
        ("/ca.crt", _) => method_not_allowed("GET"),
        ("/healthz", _) => method_not_allowed("GET"),
        (path, _) => assets::respond(path, method, &request).unwrap_or_else(|| {
            Response::json(Status::NOT_FOUND, error_json(&format!("no such path: {path}")))
        }),
    };
    response = with_cors(app, &request, response);
    response.head_only = head_only;
    Outcome::Reply(response)
}

/// Adds the CORS headers for an allowed origin.
fn with_cors(app: &App, request: &Request, mut response: Response) -> Response {
    if let Some(origin) = app.access.borrow().cors_origin(request.header("origin")) {
        let exposed = own_header_names(&response);
        response = response.with_header("Access-Control-Allow-Origin", origin).with_header("Vary", "Origin");
        if !exposed.is_empty() {
            response = response.with_header("Access-Control-Expose-Headers", exposed);
        }
    }
    response
}

/// `/emergencias/{seq}`, `/emergencias/{seq}/ack` and `/emergencias/{seq}/cerrar`.
async fn emergency_route(
    app: &App,
    connection: &mut HttpConnection,
    request: &Request,
    peer: SocketAddr,
    deadline: Instant,
    slot: &SlotGuard,
) -> Response {
    let rest = request.path.strip_prefix("/emergencias/").unwrap_or_default();
    let (seq_text, action) = rest.split_once('/').unwrap_or((rest, ""));
    let Ok(seq) = seq_text.parse::<u64>() else {
        return error(Status::NOT_FOUND, &format!("no such path: {}", request.path));
    };
    match (action, request.method.as_str()) {
        ("", "GET" | "HEAD") => emergency_status(app, request, peer, seq),
        ("", "OPTIONS") => preflight(app, request, peer, "GET"),
        ("", _) => method_not_allowed("GET"),
        ("ack", "POST") => http_ack(app, request, peer, seq).await,
        ("cerrar", "POST") => close(app, connection, request, peer, deadline, slot, seq).await,
        ("ack" | "cerrar", "OPTIONS") => preflight(app, request, peer, "POST"),
        ("ack" | "cerrar", _) => method_not_allowed("POST"),
        _ => error(Status::NOT_FOUND, &format!("no such path: {}", request.path)),
    }
}

fn unknown_seq() -> Response {
    error(Status::NOT_FOUND, "unknown seq")
}

/// `GET /emergencias/{seq}`: the stored envelope and its status, with the per-tablet timeline.
fn emergency_status(app: &App, request: &Request, peer: SocketAddr, seq: u64) -> Response {
    if let Err(refusal) = authorize(app.access.borrow().subscribe.as_ref(), request, true, "status", peer) {
        return refusal;
    }
    match app.hub.with(|hub| hub.status_json(seq)) {
        Some(body) => Response::json(Status::OK, body),
        None => unknown_seq(),
    }
}

/// `POST /emergencias/{seq}/ack`: the tablet is the token's name, else the client's address.
async fn http_ack(app: &App, request: &Request, peer: SocketAddr, seq: u64) -> Response {
    let identity = match authorize(app.access.borrow().subscribe.as_ref(), request, true, "ack", peer) {
        Ok(identity) => identity,
        Err(refusal) => return refusal,
    };
    // The body is never read: one declared is left unread and closes the connection after.
    if let Err(refusal) = declared_length(app, request, peer, "ack", false) {
        return refusal;
    }
    let (tablet, named) = match &identity {
        Some(identity) => (identity.name.to_string(), true),
        // Labelled as a connection is: never in the roster, under the unnamed cap after a restart.
        None => (app.hub.with(|hub| format!("{}client-{}", hub.unnamed_prefix(), peer.ip())), false),
    };
    match app.publisher.ack(&tablet, named, seq).await {
        Ok(AckOutcome::Unknown) => unknown_seq(),
        Ok(AckOutcome::Acked { duplicate, counts }) => {
            if !duplicate {
                info!("seq {seq} acked over http by {tablet}");
            }
            let reply =
                AckReply { ok: true, seq, acked: counts.acked, delivered: counts.delivered, duplicate };
            Response::json(Status::OK, protocol::to_json(&reply))
        }
        Err(rejection) => refused(rejection, peer),
    }
}

/// `POST /emergencias/{seq}/cerrar`, with an optional JSON object as its body.
async fn close(
    app: &App,
    connection: &mut HttpConnection,
    request: &Request,
    peer: SocketAddr,
    deadline: Instant,
    slot: &SlotGuard,
    seq: u64,
) -> Response {
    let publisher = match authorize(app.access.borrow().publish.as_ref(), request, false, "close", peer) {
        Ok(publisher) => publisher,
        Err(refusal) => return refusal,
    };
    let length = match declared_length(app, request, peer, "close", false) {
        Ok(length) => length,
        Err(refusal) => return refusal,
    };
    let (body, _held) = match read_whole_body(app, connection, request, peer, length, deadline, slot).await {
        Ok(read) => read,
        Err(refusal) => return refusal,
    };
    let detail = match ingest::parse_close_detail(&body) {
        Ok(detail) => detail,
        Err(rejection) => {
            return error(Status::BAD_REQUEST, &format!("the body must be a JSON object: {rejection}"));
        }
    };
    match app.publisher.close(seq, detail).await {
        Ok(CloseOutcome::Unknown) => unknown_seq(),
        Ok(CloseOutcome::Closed { already }) => {
            let name = publisher.map(|identity| format!(" ({})", identity.name)).unwrap_or_default();
            if !already {
                info!("closed seq {seq} over http from {peer}{name}");
            }
            let reply = CloseReply { ok: true, seq, closed: true, already_closed: already };
            Response::json(Status::OK, protocol::to_json(&reply))
        }
        Err(rejection) => refused(rejection, peer),
    }
}

/// `GET /tablets`: every named tablet (the subscribe tokens' names), connected or not.
fn tablets(app: &App, request: &Request, peer: SocketAddr) -> Response {
    if let Err(refusal) = authorize(app.access.borrow().subscribe.as_ref(), request, true, "roster", peer) {
        return refusal;
    }
    let (tablets, unnamed_connections) = roster(app);
    let body = Tablets { tablets, unnamed_connections, min_subscribers: app.config.min_subscribers };
    Response::json(Status::OK, protocol::to_json(&body))
}

/// The roster: one entry per subscribe token name, and how many clients have no name.
fn roster(app: &App) -> (Vec<TabletInfo>, usize) {
    let names = app.access.borrow().subscribe.as_ref().map(TokenSet::names).unwrap_or_default();
    app.hub.with(|hub| {
        let clients: Vec<ConnectedClient> = hub.clients().collect();
        let unnamed = clients.iter().filter(|client| client.name.is_none()).count();
        // Each tablet's connections, found by name once: not one scan of the clients per name.
        let mut by_name: HashMap<&str, Vec<&ConnectedClient>> = HashMap::new();
        for client in &clients {
            if let Some(name) = &client.name {
                by_name.entry(&**name).or_default().push(client);
            }
        }
        let tablets = names
            .iter()
            .map(|name| {
                let own = by_name.get(&**name).map(Vec::as_slice).unwrap_or_default();
                let record = hub.tablet_record(name);
                // A connection's last frame, or the tablet's last HTTP ack (all an SSE page sends).
                let heard = own.iter().map(|client| client.last_heard).chain(record.last_heard).max();
                TabletInfo {
                    name: name.to_string(),
                    connected: !own.is_empty(),
                    connections: own.len(),
                    connected_since: own.iter().map(|client| client.connected_at).min().map(rfc3339_millis),
                    last_heard: heard.map(rfc3339_millis),
                    last_delivered_seq: record.last_delivered_seq,
                    last_acked_seq: record.last_acked_seq,
                }
            })
            .collect();
        (tablets, unnamed)
    })
}

/// The server's own `X-Resq-*` headers on a response, comma-separated: a browser lets a page
/// read them only if they are listed in `Access-Control-Expose-Headers`.
fn own_header_names(response: &Response) -> String {
    let own = response.headers.iter().map(|(name, _)| *name).filter(|name| name.starts_with("X-Resq-"));
    own.collect::<Vec<_>>().join(", ")
}

/// Answers a CORS preflight: allowed for the origins in `--allowed-origin`, refused otherwise.
/// The `Access-Control-Allow-Origin` header itself is added by `handle`, as for every response.
fn preflight(app: &App, request: &Request, peer: SocketAddr, methods: &'static str) -> Response {
    let access = app.access.borrow();
    let origin = request.header("origin");
    if access.cors_origin(origin).is_none() {
        let allowed = &access.allowed_origins;
        match origin {
            Some(origin) => warn!(
                "refused CORS preflight from {peer}: origin {origin:?} not in --allowed-origin {allowed:?}"
            ),
            None => warn!("refused CORS preflight from {peer}: no Origin header"),
        }
        return Response::json(Status::FORBIDDEN, error_json("origin not allowed (--allowed-origin)"));
    }
    Response::json(Status::NO_CONTENT, String::new())
        .with_header("Access-Control-Allow-Methods", methods)
        .with_header("Access-Control-Allow-Headers", "Authorization, Content-Type, Idempotency-Key")
        .with_header("Access-Control-Max-Age", "600")
}

fn method_not_allowed(allow: &'static str) -> Response {
    Response::json(Status::METHOD_NOT_ALLOWED, error_json(&format!("method not allowed; use {allow}")))
        .with_header("Allow", allow)
}

/// An error response; the connection closes after it when the request's body was not read.
fn error(status: Status, message: &str) -> Response {
    Response::json(status, error_json(message))
}

/// `POST /emergencias`: one JSON object with `Content-Length`, staged in the history; answered
/// by `settle_publish`.
async fn publish(
    app: &App,
    connection: &mut HttpConnection,
    request: &Request,
    peer: SocketAddr,
    deadline: Instant,
    slot: &SlotGuard,
) -> Result<StagedPublish, Response> {
    let publisher = authorize(app.access.borrow().publish.as_ref(), request, false, "publish", peer)?;
    let length = declared_length(app, request, peer, "publish", true)?;
    let key = idempotency_key(request).map_err(|message| {
        warn!("rejected publish from {peer}: {message}");
        error(Status::BAD_REQUEST, &message)
    })?;
    let (body, held) = read_whole_body(app, connection, request, peer, length, deadline, slot).await?;
    let staged = app.publisher.stage(body, Source::Http, key, WhenBusy::Refuse).await;
    let staged = staged.map_err(|rejection| refused(rejection, peer))?;
    let publisher = publisher.map(|identity| identity.name);
    Ok(StagedPublish { staged, _held: held, peer, publisher, length })
}

/// Waits for a staged publish's outcome: its answer (`202`, `409`, `503`), with CORS headers.
async fn settle_publish(app: &App, pending: PendingPublish) -> Response {
    let PendingPublish { request, publish: StagedPublish { staged, _held, peer, publisher, length } } =
        pending;
    let response = match app.publisher.settle(staged, Source::Http).await {
        // A duplicate gets the status its original got: a publisher that retries until it sees
        // a 202 stops at the first retry that gets through.
        Ok(accepted) => {
            let name = publisher.map(|name| format!(" ({name})")).unwrap_or_default();
            info!("{accepted} ({length} bytes) over http from {peer}{name}");
            Response::json(Status::ACCEPTED, app.publisher.reply(accepted))
        }
        Err(rejection) => refused(rejection, peer),
    };
    with_cors(app, &request, response)
}

/// The length of a request's body: `411` if chunked (or, when `required`, without
/// `Content-Length`), `413` past `--max-body-bytes`. A refused body is never read, so the
/// connection is closed after the answer and no byte of it is taken for a request.
fn declared_length(
    app: &App,
    request: &Request,
    peer: SocketAddr,
    what: &str,
    required: bool,
) -> Result<usize, Response> {
    if request.header("transfer-encoding").is_some() {
        warn!("rejected {what} from {peer}: chunked body");
        return Err(error(Status::LENGTH_REQUIRED, "chunked bodies are not supported: send Content-Length"));
    }
    let length = match content_length(request) {
        Ok(Some(length)) => length,
        Ok(None) if !required => 0,
        Ok(None) => return Err(error(Status::LENGTH_REQUIRED, "Content-Length required")),
        Err(message) => return Err(error(Status::BAD_REQUEST, message)),
    };
    let max_bytes = app.config.max_body_bytes;
    if length > max_bytes {
        warn!("rejected {what} from {peer}: body of {length} bytes over --max-body-bytes");
        return Err(error(Status::CONTENT_TOO_LARGE, &format!("body larger than {max_bytes} bytes")));
    }
    Ok(length)
}

/// Reads a body of `length` bytes (after `100 Continue` if asked), holding its share of
/// `--max-inflight-bytes` while it comes in and after.
async fn read_whole_body(
    app: &App,
    connection: &mut HttpConnection,
    request: &Request,
    peer: SocketAddr,
    length: usize,
    deadline: Instant,
    slot: &SlotGuard,
) -> Result<(Vec<u8>, Reservation), Response> {
    if let Some(expectation) = request.header("expect") {
        if !expectation.trim().eq_ignore_ascii_case("100-continue") {
            return Err(error(Status::EXPECTATION_FAILED, "only Expect: 100-continue is supported"));
        }
        let interim = Response::interim(Status::CONTINUE).to_bytes(false);
        if request.minor_version >= 1 && connection.send(&interim, deadline).await.is_err() {
            return Err(error(Status::REQUEST_TIMEOUT, "could not send 100 Continue"));
        }
    }
    let mut held = match app.publisher.reserve(length, deadline).await {
        Ok(reservation) => Some(reservation),
        Err(rejection) => return Err(refused(rejection, peer)),
    };
    let pace = BodyPace { started: Instant::now(), min_rate: app.config.min_body_rate };
    let body = match connection.read_body(length, deadline, pace, slot, &mut held).await {
        Ok(body) => body,
        Err(BodyError::TimedOut) => {
            warn!("closed {peer}: body not complete within --header-timeout");
            return Err(error(Status::REQUEST_TIMEOUT, "body not complete within the request timeout"));
        }
        // The eviction is logged, throttled, where it is decided: a flood of these is one line.
        Err(BodyError::TooSlow) => {
            debug!("closed {peer}: body below --min-body-rate, evicted for a new connection");
            return Err(error(
                Status::REQUEST_TIMEOUT,
                "body slower than --min-body-rate: closed for a new connection",
            ));
        }
        Err(BodyError::Incomplete) => return Err(error(Status::BAD_REQUEST, "body incomplete")),
    };
    // A body that trickled gave its share back; it is whole now, and holds it again.
    let held = match held {
        Some(reservation) => reservation,
        None => match app.publisher.reserve(length, deadline).await {
            Ok(reservation) => reservation,
            Err(rejection) => return Err(refused(rejection, peer)),
        },
    };
    Ok((body, held))
}

/// The answer to a publish the ingest path refused, logged.
fn refused(rejection: Rejection, peer: SocketAddr) -> Response {
    match rejection {
        Rejection::KeyConflict { .. } => {
            warn!("rejected publish from {peer}: {rejection}");
            error(Status::CONFLICT, &rejection.to_string())
        }
        _ if rejection.is_temporary() => {
            warn!("could not take a publish from {peer}: {rejection}");
            error(Status::SERVICE_UNAVAILABLE, &rejection.to_string()).with_header("Retry-After", "5")
        }
        _ => {
            warn!("rejected publish from {peer}: {rejection}");
            error(Status::BAD_REQUEST, &rejection.to_string())
        }
    }
}

/// The `Idempotency-Key` header: `None` if absent, an error naming it if invalid or repeated.
pub fn idempotency_key(request: &Request) -> Result<Option<IdempotencyKey>, String> {
    let mut values = request.headers("idempotency-key");
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err("more than one Idempotency-Key header".into());
    }
    IdempotencyKey::parse(value).map(Some).map_err(|e| format!("invalid Idempotency-Key header: {e}"))
}

/// The declared body length: `None` if absent, an error if invalid or contradictory.
pub fn content_length(request: &Request) -> Result<Option<usize>, &'static str> {
    let mut length = None;
    for value in request.headers("content-length") {
        let digits = value.trim();
        // Only plain digits: `+7` could be read differently by a proxy in front.
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err("invalid Content-Length");
        }
        let parsed: usize = digits.parse().map_err(|_| "invalid Content-Length")?;
        if length.is_some_and(|previous| previous != parsed) {
            return Err("conflicting Content-Length headers");
        }
        length = Some(parsed);
    }
    Ok(length)
}

/// `GET /emergencias?since=N`: a JSON array of the retained envelopes after `N`, oldest first,
/// at most `--max-poll-bytes` of them (always at least one): poll again from the last seq.
/// The body stays a bare array for old pollers; the welcome's `stream` and `replay` come as
/// `X-Resq-*` headers, so that a poller can tell its seq belongs to another history.
fn poll(app: &App, request: &Request, peer: SocketAddr) -> Response {
    if let Err(refusal) = authorize(app.access.borrow().subscribe.as_ref(), request, true, "poll", peer) {
        return refusal;
    }
    let resume = match parse_resume(request, peer) {
        Ok(Some(resume)) => resume,
        Ok(None) => Resume { since: 0, stream: request.query_param("stream").map(str::to_owned) },
        Err(response) => return response,
    };
    let max_bytes = app.config.max_poll_bytes;
    app.hub.with(|hub| {
        let (entries, replay) = hub.retained_after(&resume);
        let body = json_array(entries, max_bytes);
        Response::json(Status::OK, body)
            .with_header("X-Resq-Stream", hub.stream_id())
            .with_header("X-Resq-Last-Seq", hub.last_seq().to_string())
            .with_header("X-Resq-Missed", replay.missed.to_string())
            .with_header("X-Resq-Reset", replay.reset.to_string())
            .with_header("X-Resq-Stream-Changed", replay.stream_changed.to_string())
    })
}

/// Joins envelopes into a JSON array of at most `max_bytes`, but never leaves out the first.
fn json_array<'a>(entries: impl Iterator<Item = &'a str>, max_bytes: usize) -> String {
    let mut body = String::from("[");
    for json in entries {
        if body.len() > 1 {
            if body.len() + json.len() + 2 > max_bytes {
                break;
            }
            body.push(',');
        }
        body.push_str(json);
    }
    body.push(']');
    body
}

/// `GET /metrics`: Prometheus text format.
fn metrics(app: &App) -> Response {
    let summary = tablet_summary(app);
    let gauges = app.hub.with(|hub| Gauges {
        clients: hub.client_count(),
        last_seq: hub.last_seq(),
        history_entries: hub.history_range().count,
        history_bytes: hub.history_bytes(),
        tablets_expected: summary.expected,
        tablets_connected: summary.connected,
        min_subscribers: app.config.min_subscribers.unwrap_or(0),
        open_emergencies: hub.open_count(),
        open_unacked: hub.open_unacked(),
    });
    let mut page = app.metrics.render(&gauges);
    if let Some(engine) = app.publisher.engine() {
        let connected = u8::from(engine.status().connected);
        let failures = app.publisher.engine_failures();
        page.push_str(&format!(
            "# HELP resq_engine_connected Whether this box is connected to NATS (cluster mode).\n\
             # TYPE resq_engine_connected gauge\nresq_engine_connected {connected}\n\
             # HELP resq_engine_publish_failures_total Publishes the engine did not commit.\n\
             # TYPE resq_engine_publish_failures_total counter\nresq_engine_publish_failures_total {failures}\n"
        ));
    }
    Response { content_type: "text/plain; version=0.0.4; charset=utf-8", ..Response::json(Status::OK, page) }
}

/// Named tablets expected, and how many of them have a connection.
fn tablet_summary(app: &App) -> TabletSummary {
    let names = app.access.borrow().subscribe.as_ref().map(TokenSet::names).unwrap_or_default();
    let connected = app.hub.with(|hub| {
        let connected: HashSet<Rc<str>> = hub.clients().filter_map(|client| client.name).collect();
        names.iter().filter(|name| connected.contains(*name)).count()
    });
    TabletSummary { expected: names.len(), connected }
}

/// `GET /healthz`: `503` while storage fails, or while fewer clients than `--min-subscribers`
/// are connected, so that a monitor alerts on the status alone.
fn health(app: &App) -> Response {
    let storage = storage_health(app);
    let engine = engine_health(app);
    let clients = app.hub.with(|hub| hub.client_count());
    let below_minimum = app.config.min_subscribers.filter(|&minimum| clients < minimum);
    let engine_down = engine.as_ref().is_some_and(|engine| engine.state != "connected");
    let (status, code, reason) = match (storage.state, below_minimum) {
        ("failing", _) => ("failing", Status::SERVICE_UNAVAILABLE, None),
        _ if engine_down => (
            "failing",
            Status::SERVICE_UNAVAILABLE,
            Some("engine disconnected: publishes are refused, tablets are served from the cache".into()),
        ),
        (_, Some(minimum)) => (
            "degraded",
            Status::SERVICE_UNAVAILABLE,
            Some(format!("only {clients} of {minimum} required subscribers connected")),
        ),
        _ => ("ok", Status::OK, None),
    };
    let tablets = tablet_summary(app);
    let body = app.hub.with(|hub| {
        protocol::to_json(&Health {
            status,
            version: env!("CARGO_PKG_VERSION"),
            uptime_s: app.metrics.uptime().as_secs(),
            started_at: rfc3339_millis(app.metrics.started_at()),
            storage,
            stream: hub.stream_id(),
            clients: hub.client_count(),
            seq: hub.last_seq(),
            history: hub.history_range(),
            tablets,
            reason,
            engine,
            client_list: hub.clients().map(client_info).collect(),
        })
    });
    Response::json(code, body)
}

/// One client of `/healthz`'s `client_list`.
fn client_info(client: ConnectedClient) -> ClientInfo {
    ClientInfo {
        client_id: client.client_id,
        name: client.name.map(|name| name.to_string()),
        peer: client.peer.to_string(),
        connected_at: rfc3339_millis(client.connected_at),
        queued: client.queued,
    }
}

/// Cluster mode's engine, for `/healthz`: disconnected also while the stream is not bound.
fn engine_health(app: &App) -> Option<EngineHealth> {
    let engine = app.publisher.engine()?;
    let status = engine.status();
    let reachable = status.connected && status.stream_id.is_some() && status.stream_ok;
    let state = if reachable { "connected" } else { "disconnected" };
    Some(EngineHealth {
        state,
        box_name: engine.box_name().to_owned(),
        servers: engine.servers().to_vec(),
        stream: engine.stream_name().to_owned(),
        stream_id: status.stream_id,
        last_seq: status.last_seq,
        publish_failures: app.publisher.engine_failures(),
        last_error: status.last_error,
    })
}

fn storage_health(app: &App) -> StorageHealth {
    let Some(journal) = app.publisher.journal() else {
        return StorageHealth { state: "in_memory", since: None, cause: None, last_error: None };
    };
    match journal.state() {
        StorageState::Ok => StorageHealth { state: "ok", since: None, cause: None, last_error: None },
        StorageState::Failing { since, cause, last_error } => StorageHealth {
            state: "failing",
            since: Some(rfc3339_millis(since)),
            cause: Some(cause.label()),
            last_error: Some(last_error),
        },
    }
}

/// Answers a request whose head could not be read, if it deserves an answer, and closes.
async fn answer_bad_head(
    connection: HttpConnection,
    failure: HeadError,
    peer: SocketAddr,
    app: &App,
    slot: &SlotGuard,
) {
    let (status, message) = match failure {
        HeadError::Closed => return,
        HeadError::Truncated => {
            debug!("{peer} left in the middle of a request");
            return;
        }
        HeadError::Io(error) => {
            debug!("{peer} connection failed: {error}");
            return;
        }
        HeadError::TimedOut if connection.buffered.is_empty() => return,
        HeadError::TimedOut => {
            (Status::REQUEST_TIMEOUT, "request head not complete within --header-timeout".to_owned())
        }
        HeadError::TooLarge => (
            Status::HEADER_FIELDS_TOO_LARGE,
            format!("request head larger than {} bytes", app.config.max_head_bytes),
        ),
        HeadError::TooManyHeaders => {
            (Status::HEADER_FIELDS_TOO_LARGE, format!("more than {MAX_HEADERS} headers"))
        }
        HeadError::Malformed(error) => (Status::BAD_REQUEST, format!("malformed HTTP request: {error}")),
    };
    warn!("closed {peer}: {message}");
    connection.respond_and_close(error(status, &message), app.config.write_timeout, slot).await;
}
