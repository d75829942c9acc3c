//! Minimal HTTP/1.1 for the routes this server has: reading a bounded request head (httparse) and
//! body, and writing small responses. Keep-alive and pipelining work; chunked bodies are refused.
//! The connection knows whether the current request's body has been read, which makes it the one
//! owner of the keep-alive decision (`HttpConnection::can_continue`). A body arriving below
//! `--min-body-rate` (`BodyPace`) lets its connection be evicted for a new one.

use std::future::Future;
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

use smol::future;
use smol::io::{AsyncReadExt, AsyncWriteExt};

use crate::http::status::Status;
use crate::runtime::budget::Reservation;
use crate::runtime::deadline::{self, TimedOut};
use crate::runtime::linger::Linger;
use crate::runtime::slots::SlotGuard;
use crate::support::metrics::Metrics;
use crate::tls::transport::Transport;

/// Bytes read at a time while waiting for a request head, and for a body.
const HEAD_CHUNK: usize = 1024;
const BODY_CHUNK: usize = 4096;
/// Most headers a request may have; more get `431`.
pub const MAX_HEADERS: usize = 32;
/// How much of an unread request body is discarded, at most, before closing after an error,
/// so the client reads the error instead of a connection reset.
const LINGER_AFTER_ERROR: Linger = Linger { time: Duration::from_secs(2), bytes: 256 * 1024 };
/// How long a body may take to reach `--min-body-rate`: its first bytes may wait for a slow
/// start or a retransmission, and at any time a body is a second's worth ahead of the minimum.
pub const BODY_RATE_GRACE: Duration = Duration::from_secs(1);

/// The slowest a request body may arrive and keep its connection's slot: on average
/// `min_rate` bytes a second (0: no minimum) from `started`, after `BODY_RATE_GRACE`.
#[derive(Clone, Copy, Debug)]
pub struct BodyPace {
    pub started: Instant,
    pub min_rate: usize,
}

impl BodyPace {
    /// When `received` bytes stop being enough; `None` if they always are.
    pub fn behind_at(&self, received: usize) -> Option<Instant> {
        if self.min_rate == 0 {
            return None;
        }
        let earned = Duration::try_from_secs_f64(received as f64 / self.min_rate as f64).ok()?;
        self.started.checked_add(BODY_RATE_GRACE.checked_add(earned)?)
    }
}

/// Why a body read stopped waiting for the next bytes.
enum BodyWait {
    /// The whole request's deadline passed.
    TimedOut,
    /// The body fell below the minimum rate: its connection becomes evictable.
    FellBehind,
    /// It was evicted for a new connection while behind.
    Evicted,
}

/// A parsed request head.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Names in lower case.
    headers: Vec<(String, String)>,
}

impl Request {
    /// The first value of a header, by lower-case name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, value)| value.as_str())
    }

    /// All values of a header (a header may repeat).
    pub fn headers<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers.iter().filter(move |(n, _)| n == name).map(|(_, value)| value.as_str())
    }

    /// Whether a comma-separated header (`Connection`, `Upgrade`) lists `token`, ignoring case.
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers(name)
            .flat_map(|value| value.split(','))
            .any(|item| item.trim().eq_ignore_ascii_case(token))
    }

    /// The value of a query parameter, undecoded (this server's parameters are plain numbers).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .as_deref()?
            .split('&')
            .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value)
    }

    /// Whether the request announces a body (`Transfer-Encoding`, or a non-zero `Content-Length`).
    pub fn declares_body(&self) -> bool {
        self.header("transfer-encoding").is_some()
            || self.headers("content-length").any(|length| length.trim() != "0")
    }

    /// Whether the client wants the connection kept open after the response.
    pub fn keep_alive(&self) -> bool {
        if self.header_has_token("connection", "close") {
            false
        } else {
            self.minor_version >= 1 || self.header_has_token("connection", "keep-alive")
        }
    }
}

#[cfg(test)]
impl Request {
    /// `GET /` with these headers (names in lower case), for tests of what reads them.
    pub fn with_headers(headers: &[(&str, &str)]) -> Request {
        let headers = headers.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect();
        Request { method: "GET".into(), path: "/".into(), query: None, minor_version: 1, headers }
    }
}

/// Decodes `%XX` escapes and `+` (as a space) in a query value; `None` if an escape is broken or
/// the result is not UTF-8.
pub fn percent_decode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        rest = tail;
        match byte {
            b'%' => {
                let hex = std::str::from_utf8(rest.get(..2)?).ok()?;
                bytes.push(u8::from_str_radix(hex, 16).ok()?);
                rest = &rest[2..];
            }
            b'+' => bytes.push(b' '),
            _ => bytes.push(byte),
        }
    }
    String::from_utf8(bytes).ok()
}

/// Why no request head could be read.
#[derive(Debug)]
pub enum HeadError {
    /// The client closed the connection between requests: nothing to answer.
    Closed,
    /// The connection ended in the middle of a head.
    Truncated,
    /// The head was not complete by the deadline.
    TimedOut,
    /// The head is larger than `--max-head-bytes` (`431`).
    TooLarge,
    /// More than `MAX_HEADERS` headers (`431`).
    TooManyHeaders,
    /// Not HTTP/1.x (`400`).
    Malformed(httparse::Error),
    Io(io::Error),
}

/// An HTTP connection: the stream plus bytes read past the current request (pipelined requests,
/// a body, or the first WebSocket frames).
pub struct HttpConnection {
    /// Plain TCP or TLS: the same requests either way.
    pub stream: Transport,
    pub buffered: Vec<u8>,
    /// The current request declared a body that has not been read (in full): after it, the
    /// connection cannot tell where the next request starts.
    body_unread: bool,
    /// Every response is counted by status.
    metrics: Rc<Metrics>,
}

impl HttpConnection {
    pub fn new(stream: Transport, metrics: Rc<Metrics>) -> Self {
        HttpConnection { stream, buffered: Vec::new(), body_unread: false, metrics }
    }

    /// Reads one request head of at most `max_bytes`. The first byte must come by `idle_until`;
    /// from then on the whole request has `timeout`. Returns the request and that deadline,
    /// which the body must also meet.
    pub async fn read_head(
        &mut self,
        max_bytes: usize,
        idle_until: Instant,
        timeout: Duration,
    ) -> Result<(Request, Instant), HeadError> {
        let mut deadline = if self.buffered.is_empty() { idle_until } else { Instant::now() + timeout };
        loop {
            if let Some(request) = self.parse_buffered_head(max_bytes)? {
                return Ok((request, deadline));
            }
            let was_idle = self.buffered.is_empty();
            let read = self
                .read_more(HEAD_CHUNK, deadline::passed(deadline))
                .await
                .map_err(|TimedOut| HeadError::TimedOut)?
                .map_err(HeadError::Io)?;
            if read == 0 {
                return Err(if was_idle { HeadError::Closed } else { HeadError::Truncated });
            }
            if was_idle {
                deadline = Instant::now() + timeout;
            }
        }
    }

    /// Reads at most `at_most` bytes onto the end of `buffered`, unless `interrupt` completes
    /// first. Reading straight into the heap buffer keeps the connection's future small: a stack
    /// array would live in every connection's task for as long as the connection does.
    async fn read_more<E>(
        &mut self,
        at_most: usize,
        interrupt: impl Future<Output = E>,
    ) -> Result<io::Result<usize>, E> {
        let start = self.buffered.len();
        self.buffered.resize(start + at_most, 0);
        let (stream, spare) = (&mut self.stream, &mut self.buffered[start..]);
        let read = future::or(async { Ok(stream.read(spare).await) }, async { Err(interrupt.await) }).await;
        let filled = match &read {
            Ok(Ok(n)) => *n,
            _ => 0,
        };
        self.buffered.truncate(start + filled);
        read
    }

    /// The next request's head, if it and its whole body (by a plain `Content-Length`) are
    /// already read, without taking it: what a pipeline may take in before answering. Reads
    /// once more if the socket has bytes ready now, never waiting for them.
    pub async fn peek_whole_request(&mut self, max_head_bytes: usize) -> Option<Request> {
        if let Some(request) = self.buffered_whole_request(max_head_bytes) {
            return Some(request);
        }
        if !self.read_ready(BODY_CHUNK).await {
            return None;
        }
        self.buffered_whole_request(max_head_bytes)
    }

    fn buffered_whole_request(&self, max_head_bytes: usize) -> Option<Request> {
        let (request, head_len) = parse_head(&self.buffered, max_head_bytes).ok()??;
        let mut lengths = request.headers("content-length");
        let body_len = match (lengths.next(), lengths.next()) {
            (Some(length), None) => length.trim().parse::<usize>().ok()?,
            _ => return None,
        };
        drop(lengths);
        (self.buffered.len() - head_len >= body_len).then_some(request)
    }

    /// Reads at most `at_most` bytes onto the end of `buffered` if the stream has them now;
    /// whether it did. An end or an error is left for the next real read to find.
    async fn read_ready(&mut self, at_most: usize) -> bool {
        let start = self.buffered.len();
        self.buffered.resize(start + at_most, 0);
        let read = future::poll_once(self.stream.read(&mut self.buffered[start..])).await;
        let filled = match read {
            Some(Ok(n)) => n,
            _ => 0,
        };
        self.buffered.truncate(start + filled);
        filled > 0
    }

    fn parse_buffered_head(&mut self, max_bytes: usize) -> Result<Option<Request>, HeadError> {
        let Some((request, head_len)) = parse_head(&self.buffered, max_bytes)? else {
            return Ok(None);
        };
        self.buffered.drain(..head_len);
        self.body_unread = request.declares_body();
        Ok(Some(request))
    }

    /// Reads a body of exactly `len` bytes (already checked against the limit) by `deadline`.
    /// While it is below `pace`, its `slot` may be evicted and its share of
    /// `--max-inflight-bytes` (`held`) is given back, so that a trickle holds nobody up; on
    /// pace it is busy, as it is after.
    pub async fn read_body(
        &mut self,
        len: usize,
        deadline: Instant,
        pace: BodyPace,
        slot: &SlotGuard,
        held: &mut Option<Reservation>,
    ) -> Result<Vec<u8>, BodyError> {
        loop {
            if slot.was_evicted() {
                return Err(BodyError::TooSlow);
            }
            if self.buffered.len() >= len {
                break;
            }
            let behind_at = pace.behind_at(self.buffered.len()).filter(|&at| at < deadline);
            let behind = behind_at.is_some_and(|at| at <= Instant::now());
            slot.set_trickling(behind);
            if behind {
                held.take();
            }
            let wanted = (len - self.buffered.len()).min(BODY_CHUNK);
            self.make_room(wanted, len);
            let pause = async {
                match behind_at {
                    Some(_) if behind => {
                        slot.evicted().await;
                        BodyWait::Evicted
                    }
                    Some(at) => {
                        deadline::passed(at).await;
                        BodyWait::FellBehind
                    }
                    None => future::pending().await,
                }
            };
            let interrupt = future::or(async { deadline::passed(deadline).await.into() }, pause);
            match self.read_more(wanted, interrupt).await {
                Ok(Ok(0) | Err(_)) => return Err(BodyError::Incomplete),
                Ok(Ok(_)) | Err(BodyWait::FellBehind) => {}
                Err(BodyWait::TimedOut) => return Err(BodyError::TimedOut),
                Err(BodyWait::Evicted) => return Err(BodyError::TooSlow),
            }
        }
        slot.set_trickling(false);
        let rest = self.buffered.split_off(len);
        self.body_unread = false;
        Ok(std::mem::replace(&mut self.buffered, rest))
    }

    /// Makes room for `wanted` more bytes of a body of `len`, doubling as a `Vec` does but never
    /// past `len`: the body becomes the stored object as it is, and a doubled buffer would hold
    /// up to twice the body for as long as the publish is in flight.
    fn make_room(&mut self, wanted: usize, len: usize) {
        let needed = self.buffered.len() + wanted;
        if needed > self.buffered.capacity() {
            let target = (self.buffered.capacity() * 2).clamp(needed, len.max(needed));
            self.buffered.reserve_exact(target - self.buffered.len());
        }
    }

    /// Whether the connection can take another request once the current one is answered: the
    /// client wants it (`Request::keep_alive`), the request's body, if any, has been read, and
    /// the server is not `shutting_down` (it would close before the next request, unanswered).
    pub fn can_continue(&self, client_wants_it: bool, shutting_down: bool) -> bool {
        client_wants_it && !self.body_unread && !shutting_down
    }

    /// Writes a response by `deadline`, saying whether the connection stays open after it.
    pub async fn respond(
        &mut self,
        response: &Response,
        keep_alive: bool,
        deadline: Instant,
    ) -> io::Result<()> {
        self.metrics.count("resq_push_http_responses_total", response.status.label);
        self.send(&response.to_bytes(keep_alive), deadline).await
    }

    /// Writes `bytes` by `deadline`, all the way to the socket (under TLS a write can leave
    /// records in rustls until a flush).
    pub async fn send(&mut self, bytes: &[u8], deadline: Instant) -> io::Result<()> {
        let stream = &mut self.stream;
        let written = async {
            stream.write_all(bytes).await?;
            stream.flush().await
        };
        deadline::before(deadline, written)
            .await
            .map_err(|TimedOut| io::Error::from(io::ErrorKind::TimedOut))?
    }

    /// Writes a response that ends the connection, then discards what the client is still
    /// sending for a moment, so that it reads the response rather than a reset. Meanwhile its
    /// `slot` may be evicted, which ends the linger: the client has its answer.
    pub async fn respond_and_close(mut self, response: Response, write_timeout: Duration, slot: &SlotGuard) {
        if self.respond(&response, false, Instant::now() + write_timeout).await.is_err() {
            return;
        }
        slot.set_lingering();
        self.buffered.resize(BODY_CHUNK, 0);
        future::or(LINGER_AFTER_ERROR.close(&mut self.stream, &mut self.buffered), slot.evicted()).await;
    }
}

/// Parses a request head at the start of `buffer`: `None` while it is incomplete, else the
/// request and the head's length in bytes.
pub fn parse_head(buffer: &[u8], max_bytes: usize) -> Result<Option<(Request, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let head_len = match parsed.parse(buffer) {
        Ok(httparse::Status::Complete(len)) if len <= max_bytes => len,
        Ok(httparse::Status::Complete(_)) => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) if buffer.len() >= max_bytes => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(error) => return Err(HeadError::Malformed(error)),
    };
    let target = parsed.path.unwrap_or("/");
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query.to_owned())),
        None => (target, None),
    };
    let request = Request {
        method: parsed.method.unwrap_or("").to_owned(),
        path: path.to_owned(),
        query,
        minor_version: parsed.version.unwrap_or(1),
        headers: parsed
            .headers
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
            .collect(),
    };
    Ok(Some((request, head_len)))
}

impl From<TimedOut> for BodyWait {
    fn from(_: TimedOut) -> BodyWait {
        BodyWait::TimedOut
    }
}

/// Why a request body could not be read.
#[derive(Debug)]
pub enum BodyError {
    TimedOut,
    /// It came below `--min-body-rate`, and its connection was evicted for a new one.
    TooSlow,
    /// The connection ended or failed before the whole body arrived.
    Incomplete,
}

/// Whether a client may keep a response (its `Cache-Control`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caching {
    /// `no-store`: every answer about the live state (all but the embedded files).
    NoStore,
    /// `no-cache`: kept, but revalidated (by its `ETag`) before each use.
    Revalidate,
}

/// A small response with a complete body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: Status,
    pub headers: Vec<(&'static str, String)>,
    pub content_type: &'static str,
    pub caching: Caching,
    pub body: String,
    /// The answer to a HEAD request: headers as for GET, no body.
    pub head_only: bool,
}

impl Response {
    pub fn json(status: Status, body: String) -> Self {
        Response {
            status,
            headers: Vec::new(),
            content_type: "application/json",
            caching: Caching::NoStore,
            body,
            head_only: false,
        }
    }

    /// An interim (1xx) answer, sent before the final one: its status line alone.
    pub fn interim(status: Status) -> Self {
        Response { content_type: "", ..Response::json(status, String::new()) }
    }

    /// Replaces the default, `Caching::NoStore`.
    pub fn with_caching(mut self, caching: Caching) -> Self {
        self.caching = caching;
        self
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// The response on the wire, with `Connection: keep-alive` or `close`. A status without
    /// content (1xx, 204) gets no body and no `Content-*` headers; an informational one, no
    /// `Cache-Control` or `Connection` either (an interim answer has none; the 101 sets its own).
    pub fn to_bytes(&self, keep_alive: bool) -> Vec<u8> {
        let status = self.status;
        let mut head = format!("HTTP/1.1 {} {}\r\n", status.code, status.reason);
        if status.has_content() {
            let length = self.body.len();
            head.push_str(&format!("Content-Type: {}\r\nContent-Length: {length}\r\n", self.content_type));
        }
        if !status.is_informational() {
            head.push_str(match self.caching {
                Caching::NoStore => "Cache-Control: no-store\r\n",
                Caching::Revalidate => "Cache-Control: no-cache\r\n",
            });
            head.push_str(if keep_alive { "Connection: keep-alive\r\n" } else { "Connection: close\r\n" });
        }
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        if status.has_content() && !self.head_only {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Request {
        let (request, len) = parse_head(text.as_bytes(), 1024).unwrap().unwrap();
        assert_eq!(len, text.len());
        request
    }

    #[test]
    fn incomplete_and_oversized_heads() {
        assert!(parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n", 1024).unwrap().is_none());
        assert!(matches!(parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n", 10), Err(HeadError::TooLarge)));
        assert!(matches!(parse_head(b"\x16\x03\x01garbage\r\n\r\n", 1024), Err(HeadError::Malformed(_))));
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(MAX_HEADERS + 1));
        assert!(matches!(parse_head(many.as_bytes(), 4096), Err(HeadError::TooManyHeaders)));
    }

    #[test]
    fn tokens_queries_and_keep_alive() {
        let request = head(
            "GET /ws/emergencias?token=x&since=42 HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: WebSocket\r\n\r\n",
        );
        assert!(request.header_has_token("connection", "upgrade"));
        assert!(request.header_has_token("upgrade", "websocket"));
        assert_eq!(request.query_param("since"), Some("42"));
        assert_eq!(request.query_param("missing"), None);
        assert!(request.keep_alive());
        assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive());
        assert!(!head("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive());
    }

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(percent_decode("a%2Bb%3D%3d+c").as_deref(), Some("a+b== c"));
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
        assert_eq!(percent_decode("broken%2"), None);
        assert_eq!(percent_decode("bad%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
    }

    #[test]
    fn responses_carry_length_and_connection() {
        let bytes = Response::json(Status::ACCEPTED, "{}".into()).to_bytes(true);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 202 Accepted\r\n"), "{text}");
        assert!(text.contains("Content-Length: 2\r\n") && text.contains("Connection: keep-alive\r\n"));
        assert!(text.ends_with("\r\n\r\n{}"));
    }

    #[test]
    fn an_interim_response_is_its_status_line_alone() {
        for keep_alive in [true, false] {
            let bytes = Response::interim(Status::CONTINUE).to_bytes(keep_alive);
            assert_eq!(String::from_utf8(bytes).unwrap(), "HTTP/1.1 100 Continue\r\n\r\n");
        }
    }

    #[test]
    fn a_body_falls_behind_a_second_after_it_stops_earning_its_minimum() {
        let started = Instant::now();
        let pace = BodyPace { started, min_rate: 1000 };
        assert_eq!(pace.behind_at(0), Some(started + BODY_RATE_GRACE));
        assert_eq!(pace.behind_at(500), Some(started + BODY_RATE_GRACE + Duration::from_millis(500)));
        assert_eq!(pace.behind_at(3000), Some(started + BODY_RATE_GRACE + Duration::from_secs(3)));
        assert_eq!(BodyPace { started, min_rate: 0 }.behind_at(0), None);
        // Never behind in any future an `Instant` can name.
        assert_eq!(BodyPace { started, min_rate: 1 }.behind_at(usize::MAX), None);
    }
}
