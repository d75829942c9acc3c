//! One HTTP connection: reads requests (keep-alive), routes them, and answers each.
//!
//! | route | method | answer |
//! |---|---|---|
//! | `/ws/emergencias` | GET | WebSocket upgrade (see `session`) |
//! | `/emergencias` | POST | publish one emergency: `202` |
//! | `/emergencias?since=N` | GET | retained emergencies after `N` (polling fallback) |
//! | `/healthz` | GET | clients and last seq |
//!
//! Anything else gets `404` or `405`. A request that leaves the connection in an unknown state
//! (a body not read, a malformed head) is answered and the connection closed.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use log::{debug, warn};
use smol::future;
use smol::io::AsyncWriteExt;
use smol::net::TcpStream;

use crate::auth::{Access, Identity, TokenSet, Verdict};
use crate::deadline;
use crate::http;
use crate::http::{BodyError, HeadError, HttpConnection, Request, Response};
use crate::hub::Resume;
use crate::ingest;
use crate::protocol::{self, Health, PublishReply, Source, error_json};
use crate::server::Shared;
use crate::session::{self, Session};
use crate::slots::SlotGuard;

/// What a handled request leaves for the connection.
enum Outcome {
    /// Send this response; keep the connection if both sides want it.
    Reply(Response),
    /// Hand the connection to a WebSocket session.
    Upgrade(Request),
}

/// A connection whose request asked for `/ws/emergencias`, handed over to `session::upgrade`.
pub struct Upgrade {
    pub connection: HttpConnection,
    pub request: Request,
    /// Still counts against `--max-http-connections` until the upgrade is answered.
    pub slot: SlotGuard,
}

/// Serves one connection's HTTP requests; returns its WebSocket session if it asks for one and
/// is admitted, for the caller to run as a task of its own.
pub async fn serve_connection(
    shared: Rc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    slot: SlotGuard,
) -> Option<Session> {
    let upgrade = serve_requests(&shared, stream, peer, slot).await?;
    session::upgrade(&shared, upgrade, peer).await
}

/// Serves requests until the connection closes, or returns it when it asks for an upgrade.
/// `slot` counts it against `--max-http-connections` until then.
async fn serve_requests(
    shared: &Shared,
    stream: TcpStream,
    peer: SocketAddr,
    slot: SlotGuard,
) -> Option<Upgrade> {
    let config = &shared.config;
    let mut connection = HttpConnection::new(stream, Rc::clone(&shared.metrics));
    loop {
        let idle_until = Instant::now() + config.header_timeout;
        // Waiting for a request, the connection may be evicted to make room for a newer one.
        slot.set_idle(true);
        let head = future::or(
            connection.read_head(config.max_head_bytes, idle_until, config.header_timeout),
            async {
                future::or(shared.stopping(), slot.evicted()).await;
                Err(HeadError::Closed)
            },
        )
        .await;
        slot.set_idle(false);
        let (request, deadline) = match head {
            Ok(head) => head,
            Err(error) => {
                answer_bad_head(connection, error, peer, shared).await;
                return None;
            }
        };
        debug!("{peer} {} {}", request.method, request.path);
        let keep_alive = request.keep_alive();
        let body_left_unread = declares_body(&request) && !is_publish(&request);
        match handle(shared, &mut connection, request, peer, deadline).await {
            Outcome::Upgrade(request) => return Some(Upgrade { connection, request, slot }),
            Outcome::Reply(mut response) => {
                response.keep_alive &= keep_alive && !body_left_unread;
                if !response.keep_alive {
                    connection.respond_and_close(response, config.write_timeout).await;
                    return None;
                }
                if connection.respond(&response, Instant::now() + config.write_timeout).await.is_err() {
                    return None;
                }
            }
        }
        // Pipelined requests must not monopolize the thread.
        future::yield_now().await;
    }
}

async fn handle(
    shared: &Shared,
    connection: &mut HttpConnection,
    request: Request,
    peer: SocketAddr,
    deadline: Instant,
) -> Outcome {
    let head_only = request.method == "HEAD";
    let method = if head_only { "GET" } else { request.method.as_str() };
    let mut response = match (request.path.as_str(), method) {
        ("/ws/emergencias", "GET") if !head_only => return Outcome::Upgrade(request),
        ("/ws/emergencias", _) => method_not_allowed("GET"),
        ("/emergencias", "POST") => publish(shared, connection, &request, peer, deadline).await,
        ("/emergencias", "GET") => poll(shared, &request, peer),
        ("/emergencias", "OPTIONS") => preflight(shared, &request, "GET, POST"),
        ("/emergencias", _) => method_not_allowed("GET, POST"),
        ("/healthz", "GET") => health(shared),
        ("/healthz", "OPTIONS") => preflight(shared, &request, "GET"),
        ("/metrics", "GET") => metrics(shared),
        ("/metrics", _) => method_not_allowed("GET"),
        ("/healthz", _) => method_not_allowed("GET"),
        (path, _) => Response::json(404, error_json(&format!("no such path: {path}"))),
    };
    if let Some(origin) = shared.access.borrow().cors_origin(request.header("origin")) {
        response = response.with_header("Access-Control-Allow-Origin", origin).with_header("Vary", "Origin");
    }
    response.head_only = head_only;
    Outcome::Reply(response)
}

/// Answers a CORS preflight: allowed for the origins in `--allowed-origin`, refused otherwise.
/// The `Access-Control-Allow-Origin` header itself is added by `handle`, as for every response.
fn preflight(shared: &Shared, request: &Request, methods: &'static str) -> Response {
    let access = shared.access.borrow();
    if access.cors_origin(request.header("origin")).is_none() {
        return Response::json(403, error_json("origin not allowed (--allowed-origin)"));
    }
    Response::json(204, String::new())
        .with_header("Access-Control-Allow-Methods", methods)
        .with_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
        .with_header("Access-Control-Max-Age", "600")
}

/// The token a request presents: `Authorization: Bearer <token>`, or `?token=` where allowed
/// (browsers cannot set headers on a WebSocket).
fn presented_token(request: &Request, query_allowed: bool) -> Option<String> {
    let bearer = request.header("authorization").and_then(|value| {
        let (scheme, token) = value.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
    });
    bearer.or_else(|| {
        query_allowed.then(|| request.query_param("token").and_then(http::percent_decode)).flatten()
    })
}

/// Checks a request's token against `tokens` (if configured): the holder's identity, or the
/// `401` to send. Refusals are logged with the peer address, never with a token.
pub fn authorize(
    tokens: Option<&TokenSet>,
    request: &Request,
    query_allowed: bool,
    action: &str,
    peer: SocketAddr,
) -> Result<Option<Identity>, Response> {
    let presented = presented_token(request, query_allowed);
    let problem = match Access::check(tokens, presented.as_deref()) {
        Verdict::Open => return Ok(None),
        Verdict::Holder(name) => {
            let token = presented.unwrap_or_default().into_boxed_str();
            return Ok(Some(Identity { name, token }));
        }
        Verdict::Missing => "missing token",
        Verdict::Invalid => "invalid token",
    };
    warn!("refused {action} from {peer}: {problem}");
    Err(Response::json(401, error_json(problem)).with_header("WWW-Authenticate", "Bearer"))
}

fn is_publish(request: &Request) -> bool {
    request.path == "/emergencias" && request.method == "POST"
}

fn declares_body(request: &Request) -> bool {
    request.header("transfer-encoding").is_some()
        || request.headers("content-length").any(|length| length.trim() != "0")
}

fn method_not_allowed(allow: &'static str) -> Response {
    Response::json(405, error_json(&format!("method not allowed; use {allow}"))).with_header("Allow", allow)
}

/// A response after which the connection must close: its body was not read.
fn closing(status: u16, message: &str) -> Response {
    Response { keep_alive: false, ..Response::json(status, error_json(message)) }
}

/// `POST /emergencias`: one JSON object with `Content-Length`.
async fn publish(
    shared: &Shared,
    connection: &mut HttpConnection,
    request: &Request,
    peer: SocketAddr,
    deadline: Instant,
) -> Response {
    let max_bytes = shared.config.max_body_bytes;
    let authorized = authorize(shared.access.borrow().publish.as_ref(), request, false, "publish", peer);
    if let Err(refusal) = authorized {
        return Response { keep_alive: false, ..refusal };
    }
    if request.header("transfer-encoding").is_some() {
        warn!("rejected publish from {peer}: chunked body");
        return closing(411, "chunked bodies are not supported: send Content-Length");
    }
    let length = match content_length(request) {
        Ok(Some(length)) => length,
        Ok(None) => return closing(411, "Content-Length required"),
        Err(message) => return closing(400, message),
    };
    if length > max_bytes {
        warn!("rejected publish from {peer}: body of {length} bytes over --max-body-bytes");
        return closing(413, &format!("body larger than {max_bytes} bytes"));
    }
    if let Some(expectation) = request.header("expect") {
        if !expectation.trim().eq_ignore_ascii_case("100-continue") {
            return closing(417, "only Expect: 100-continue is supported");
        }
        let interim =
            deadline::before(deadline, connection.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n"));
        if request.minor_version >= 1 && !matches!(interim.await, Ok(Ok(()))) {
            return closing(408, "could not send 100 Continue");
        }
    }
    let body = match connection.read_body(length, deadline).await {
        Ok(body) => body,
        Err(BodyError::TimedOut) => {
            warn!("closed {peer}: body not complete within --header-timeout");
            return closing(408, "body not complete within the request timeout");
        }
        Err(BodyError::Incomplete) => return closing(400, "body incomplete"),
    };
    match ingest::submit(shared, &body, Source::Http).await {
        Ok(receipt) => {
            let stream = shared.hub.borrow().stream_id().to_owned();
            Response::json(202, PublishReply::accepted(&stream, receipt.seq, receipt.queued_to))
        }
        Err(rejection) if rejection.is_temporary() => {
            warn!("could not take a publish from {peer}: {rejection}");
            Response::json(503, error_json(&rejection.to_string())).with_header("Retry-After", "5")
        }
        Err(rejection) => {
            warn!("rejected publish from {peer}: {rejection}");
            Response::json(400, error_json(&rejection.to_string()))
        }
    }
}

/// The declared body length: `None` if absent, an error if invalid or contradictory.
fn content_length(request: &Request) -> Result<Option<usize>, &'static str> {
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
fn poll(shared: &Shared, request: &Request, peer: SocketAddr) -> Response {
    if let Err(refusal) = authorize(shared.access.borrow().subscribe.as_ref(), request, true, "poll", peer) {
        return refusal;
    }
    let resume = match parse_resume(request, peer) {
        Ok(resume) => resume.unwrap_or(Resume { since: 0, stream: None }),
        Err(response) => return response,
    };
    let hub = shared.hub.borrow();
    let (entries, _) = hub.retained_after(&resume);
    let mut body = String::from("[");
    for json in entries {
        if body.len() > 1 {
            if body.len() + json.len() + 2 > shared.config.max_poll_bytes {
                break;
            }
            body.push(',');
        }
        body.push_str(json);
    }
    body.push(']');
    Response::json(200, body)
}

/// `GET /metrics`: Prometheus text format.
fn metrics(shared: &Shared) -> Response {
    let page = shared.metrics.render(&shared.hub.borrow());
    Response { content_type: "text/plain; version=0.0.4; charset=utf-8", ..Response::json(200, page) }
}

fn health(shared: &Shared) -> Response {
    let hub = shared.hub.borrow();
    let health = Health {
        status: "ok",
        stream: hub.stream_id(),
        clients: hub.client_count(),
        seq: hub.last_seq(),
        history: hub.history_range(),
        client_list: hub.clients(),
    };
    Response::json(200, protocol::to_json(&health))
}

/// Reads `?since=N` (the last seq the client has) and `&stream=ID` (the history it came from).
pub fn parse_resume(request: &Request, peer: SocketAddr) -> Result<Option<Resume>, Response> {
    let Some(text) = request.query_param("since") else { return Ok(None) };
    let since = text.parse().map_err(|_| {
        warn!("refused {peer}: since={text:?} is not a whole number");
        Response::json(400, error_json("since must be a whole number: the last seq you received"))
    })?;
    let stream = request.query_param("stream").map(str::to_owned);
    Ok(Some(Resume { since, stream }))
}

/// Answers a request whose head could not be read, if it deserves an answer, and closes.
async fn answer_bad_head(connection: HttpConnection, error: HeadError, peer: SocketAddr, shared: &Shared) {
    let (status, message) = match error {
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
        HeadError::TimedOut => (408, "request head not complete within --header-timeout".to_owned()),
        HeadError::TooLarge => {
            (431, format!("request head larger than {} bytes", shared.config.max_head_bytes))
        }
        HeadError::TooManyHeaders => (431, format!("more than {} headers", crate::http::MAX_HEADERS)),
        HeadError::Malformed(error) => (400, format!("malformed HTTP request: {error}")),
    };
    warn!("closed {peer}: {message}");
    connection.respond_and_close(closing(status, &message), shared.config.write_timeout).await;
}
