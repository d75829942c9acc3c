//! Server-Sent Events on `/sse/emergencias`: the live stream of `/ws/emergencias` for proxies and
//! networks that break WebSockets. The same admission (`admission`: token, `since`,
//! `--max-clients`), the same `Session` (hub subscription, queue, slow-client rule, write timeout,
//! heartbeat timer, counting) and the same shared envelopes; only the framing differs
//! (`events::EventStream`), and what a client can send (nothing: it acks over HTTP).
//!
//! The answer is a `200` with `Content-Type: text/event-stream`, whose body ends with the
//! connection. EventSource sends the last event `id` back as `Last-Event-ID` when it reconnects:
//! it resumes exactly as `?since=<seq>&stream=<stream>` does, and a `reset` event (before the
//! welcome) says when the id belongs to another history or is ahead of the server.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use log::{debug, info, warn};
use smol::io::AsyncWriteExt;
use std::os::fd::BorrowedFd;

use crate::app::App;
use crate::core::hub::Resume;
use crate::http::conn::{Request, Response};
use crate::http::credentials::parse_resume;
use crate::http::routes::Upgrade;
use crate::http::status::Status;
use crate::protocol::error_json;
use crate::runtime::deadline;
use crate::ws::admission::{self, Subscribed};
use crate::ws::events::EventStream;
use crate::ws::session::{Session, Wire};

/// Answers `GET /sse/emergencias`: the client's session, or `None` when it was refused with a
/// plain HTTP status (the same checks, statuses and log lines as a WebSocket client's). Until
/// the `200` the connection counts against `--max-http-connections`; from then on the hub
/// counts it, under `--max-clients`.
pub async fn open(app: &Rc<App>, upgrade: Upgrade) -> Option<Session> {
    let Upgrade { mut connection, request, slot, client: peer } = upgrade;
    let config = &app.config;
    let resume = || match resume_from_last_event_id(&request, peer)? {
        Some(resume) => Ok(Some(resume)),
        None => parse_resume(&request, peer),
    };
    let subscribed = match admission::subscribe(app, &request, peer, "SSE client", resume) {
        Ok(subscribed) => subscribed,
        Err(refusal) => {
            connection.respond_and_close(refusal, config.write_timeout, &slot).await;
            return None;
        }
    };
    let head = response_head(app.access.borrow().cors_origin(request.header("origin")).as_deref());
    app.metrics.count("resq_push_http_responses_total", Status::OK.label);
    let written = deadline::within(config.write_timeout, connection.stream.write_all(head.as_bytes())).await;
    if !matches!(written, Ok(Ok(()))) {
        return None;
    }
    drop(slot);
    admission::cap_send_buffer(connection.stream.tcp(), config.client_send_buffer);
    give_up_unacknowledged_after(connection.stream.tcp(), config.pong_timeout);
    let Subscribed { name, resume, subscription, greeting } = subscribed;
    let client_id = subscription.client_id;
    let over = if connection.stream.is_tls() { "SSE over TLS" } else { "SSE" };
    match &resume {
        Some(resume) => {
            info!(
                "client {client_id}{name} connected from {peer} over {over}, resuming after seq {}",
                resume.since
            )
        }
        None => info!("client {client_id}{name} connected from {peer} over {over}"),
    }
    let events = EventStream::new(&greeting, resume.as_ref());
    let socket = connection.stream.socket();
    Some(Session::new(
        Wire::EventStream(events, connection.stream),
        socket,
        Rc::clone(app),
        subscription,
        greeting,
    ))
}

/// An SSE client cannot answer a heartbeat, so `--pong-timeout` is applied by TCP instead
/// (`TCP_USER_TIMEOUT`): data the peer has not acknowledged for that long (a heartbeat, at the
/// latest) ends the connection, and the session with it, as a missing pong ends a WebSocket's.
fn give_up_unacknowledged_after(socket: BorrowedFd<'_>, timeout: Duration) {
    if let Err(error) = socket2::SockRef::from(&socket).set_tcp_user_timeout(Some(timeout)) {
        debug!("could not set an SSE client's TCP user timeout: {error}");
    }
}

/// The response head: no length (the body is the stream, ended by closing the connection), no
/// caching, and no buffering by nginx-style proxies.
pub fn response_head(cors_origin: Option<&str>) -> String {
    let mut head = String::from(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-store\r\n\
         X-Accel-Buffering: no\r\nConnection: close\r\n",
    );
    if let Some(origin) = cors_origin {
        head.push_str(&format!("Access-Control-Allow-Origin: {origin}\r\nVary: Origin\r\n"));
    }
    head.push_str("\r\n");
    head
}

/// Where a client resumes: `Last-Event-ID` (`<stream>:<seq>`, or a bare seq) when it sent one,
/// since that is the newest it has (EventSource keeps the URL it first used, with its old
/// `since`), else `?since=` and `&stream=`.
pub fn resume_from_last_event_id(request: &Request, peer: SocketAddr) -> Result<Option<Resume>, Response> {
    let Some(value) = request.header("last-event-id").map(str::trim).filter(|value| !value.is_empty()) else {
        return Ok(None);
    };
    let (stream, seq) = match value.rsplit_once(':') {
        Some((stream, seq)) => (Some(stream), seq),
        None => (None, value),
    };
    let valid_stream = stream.is_none_or(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic()));
    match seq.parse() {
        Ok(since) if valid_stream => Ok(Some(Resume { since, stream: stream.map(str::to_owned) })),
        _ => {
            warn!("refused SSE client {peer}: Last-Event-ID {value:?} is not <stream>:<seq>");
            Err(Response::json(
                Status::BAD_REQUEST,
                error_json("Last-Event-ID must be <stream>:<seq>, as this server's event ids are"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_event_id_is_a_position() {
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let resume = |value: &str| {
            let request = Request::with_headers(&[("last-event-id", value)]);
            resume_from_last_event_id(&request, peer).map_err(|response| response.status)
        };
        assert_eq!(resume("9f2c:43"), Ok(Some(Resume { since: 43, stream: Some("9f2c".into()) })));
        assert_eq!(resume("43"), Ok(Some(Resume { since: 43, stream: None })));
        assert_eq!(resume(" "), Ok(None));
        assert_eq!(resume("9f2c:x"), Err(Status::BAD_REQUEST));
        assert_eq!(resume(":43"), Err(Status::BAD_REQUEST));
        assert_eq!(
            resume_from_last_event_id(&Request::with_headers(&[]), peer).map_err(|r| r.status),
            Ok(None)
        );
    }
}
