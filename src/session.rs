//! One WebSocket client on `/ws/emergencias`: the upgrade, then a loop that sends the client's
//! queue, pings on a timer and reads whatever the client sends.
//!
//! Tablets never have to send anything: a client stays as long as it answers pings (browsers do
//! so automatically). Every write is bounded by `--write-timeout`, and every way out of the loop
//! ends in `SessionEnd`, logged once; dropping the `Subscription` frees the client's slot.

use std::fmt;
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use async_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use async_tungstenite::tungstenite::{Bytes, Error as WsError, Message, Utf8Bytes};
use futures_util::SinkExt;
use log::{info, warn};
use sha1::{Digest, Sha1};
use smol::io::AsyncReadExt;
use smol::net::TcpStream;
use smol::stream::StreamExt;
use smol::{Timer, future};

use crate::config::Config;
use crate::deadline::{self, TimedOut};
use crate::http::{HttpConnection, Request, Response};
use crate::hub::{Farewell, Hub, Refusal, Subscription};
use crate::protocol::{self, PONG, WELCOME_MESSAGE, Welcome, error_json};
use crate::routes;
use crate::server::Shared;
use crate::slots::SlotGuard;

/// Initial read buffer per client. Clients send pongs and pings of a few bytes; tungstenite
/// grows the buffer for a larger message, up to `--max-client-message-bytes`.
const READ_BUFFER_BYTES: usize = 256;
/// Bytes of events written to a client before one flush, when its queue holds several.
const WRITE_BATCH_BYTES: usize = 64 * 1024;
/// How long a client gets to answer our Close before the connection is dropped anyway.
const CLOSE_REPLY_TIMEOUT: Duration = Duration::from_secs(1);
/// The GUID that RFC 6455 appends to the client's key.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Answers an upgrade request on `/ws/emergencias` and runs the session until it ends.
/// `slot` counts the connection against `--max-http-connections` until it has upgraded.
pub async fn serve(
    shared: Rc<Shared>,
    mut connection: HttpConnection,
    request: Request,
    peer: SocketAddr,
    slot: SlotGuard,
) {
    let config = &shared.config;
    let admitted = match admit(&shared, &request, peer) {
        Ok(admitted) => admitted,
        Err(refusal) => return connection.respond_and_close(refusal, config.write_timeout).await,
    };
    let switching = Response::json(101, String::new())
        .with_header("Upgrade", "websocket")
        .with_header("Connection", "Upgrade")
        .with_header("Sec-WebSocket-Accept", admitted.accept_key);
    if connection.respond(&switching, Instant::now() + config.write_timeout).await.is_err() {
        return;
    }
    // From here on the hub counts this connection, under --max-clients.
    drop(slot);
    // What the client sent after its request head; shrunk, because tungstenite keeps this
    // vector's allocation as its read buffer.
    let mut early_frames = connection.buffered;
    early_frames.shrink_to_fit();
    let ws = WebSocketStream::from_partially_read(
        connection.stream,
        early_frames,
        Role::Server,
        Some(websocket_config(config)),
    )
    .await;

    let (client_id, name) = (admitted.subscription.client_id, admitted.name);
    match admitted.since {
        Some(since) => info!("client {client_id}{name} connected from {peer}, resuming after seq {since}"),
        None => info!("client {client_id}{name} connected from {peer}"),
    }
    drop(request);
    let started = Instant::now();
    let mut session = Session { ws, config, subscription: admitted.subscription, events_sent: 0 };
    let end = session.run().await;
    let summary = format!(
        "client {client_id}{name} ({peer}) disconnected after {:.0?}, {} events sent: {end}",
        started.elapsed(),
        session.events_sent
    );
    shared.metrics.count_delivered(session.events_sent);
    match end.drop_reason() {
        Some(reason) => {
            shared.metrics.count("resq_push_clients_dropped_total", reason);
            warn!("{summary}");
        }
        None => info!("{summary}"),
    }
}

/// A client that passed every check and is registered with the hub.
struct Admitted {
    accept_key: String,
    /// ` (token name)` for log lines, or nothing.
    name: String,
    since: Option<u64>,
    subscription: Subscription,
}

/// Everything that can refuse a client with a plain HTTP status, before the 101: the upgrade
/// headers, the origin, the token, `since`, and room in the hub (which then registers it).
fn admit(shared: &Shared, request: &Request, peer: SocketAddr) -> Result<Admitted, Response> {
    let accept_key = check_upgrade(request).inspect_err(|refusal| {
        warn!("refused WebSocket upgrade from {peer}: {}", refusal.body);
    })?;
    if let Some(origin) = request.header("origin")
        && !shared.access.borrow().origin_allowed(origin)
    {
        warn!("refused WebSocket client {peer}: origin {origin:?} not in --allowed-origin");
        return Err(Response::json(403, error_json("origin not allowed")));
    }
    let identity = routes::authorize(
        shared.access.borrow().subscribe.as_ref(),
        request,
        true,
        "WebSocket client",
        peer,
    )?;
    let name = identity.as_ref().map(|identity| format!(" ({})", identity.name)).unwrap_or_default();
    let resume = routes::parse_resume(request, peer)?;
    let subscription = Hub::subscribe(&shared.hub, peer, identity, resume.as_ref()).map_err(|refusal| {
        let reason = match refusal {
            Refusal::Full => "too many clients (--max-clients)",
            Refusal::ShuttingDown => "server shutting down",
        };
        warn!("refused WebSocket client {peer}: {reason}");
        if refusal == Refusal::Full {
            shared.metrics.count("resq_push_connections_refused_total", "max_clients");
        }
        Response::json(503, error_json(reason)).with_header("Retry-After", "5")
    })?;
    Ok(Admitted { accept_key, name, since: resume.map(|resume| resume.since), subscription })
}

/// Settings for clients that send almost nothing: a small read buffer and small message limits.
fn websocket_config(config: &Config) -> WebSocketConfig {
    let largest_event = config.max_body_bytes + 1024;
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BATCH_BYTES)
        .max_write_buffer_size(WRITE_BATCH_BYTES + 2 * largest_event)
        .max_message_size(Some(config.max_client_message_bytes))
        .max_frame_size(Some(config.max_client_message_bytes))
}

/// Checks the RFC 6455 upgrade headers and returns the `Sec-WebSocket-Accept` value.
fn check_upgrade(request: &Request) -> Result<String, Response> {
    if !request.header_has_token("upgrade", "websocket") || !request.header_has_token("connection", "upgrade")
    {
        return Err(Response::json(426, error_json("this endpoint only speaks WebSocket"))
            .with_header("Upgrade", "websocket")
            .with_header("Sec-WebSocket-Version", "13"));
    }
    if request.header("sec-websocket-version").map(str::trim) != Some("13") {
        return Err(Response::json(426, error_json("unsupported Sec-WebSocket-Version, use 13"))
            .with_header("Sec-WebSocket-Version", "13"));
    }
    let key = request.header("sec-websocket-key").map(str::trim).unwrap_or("");
    match data_encoding::BASE64.decode(key.as_bytes()) {
        Ok(decoded) if decoded.len() == 16 => Ok(accept_key(key)),
        _ => Err(Response::json(400, error_json("Sec-WebSocket-Key must be 16 bytes in base64"))),
    }
}

fn accept_key(key: &str) -> String {
    let digest = Sha1::new().chain_update(key.as_bytes()).chain_update(WEBSOCKET_GUID).finalize();
    data_encoding::BASE64.encode(&digest)
}

/// How a session ended.
#[derive(Debug)]
enum SessionEnd {
    /// The client sent a Close frame.
    ClientClosed(Option<CloseCode>),
    /// The TCP connection ended without a Close frame.
    ConnectionLost,
    /// Nothing came back within `--pong-timeout` of a ping.
    PongTimeout,
    /// The hub dropped the client because its queue was full.
    TooSlow,
    /// A write did not finish within `--write-timeout`.
    WriteTimeout,
    /// The server is shutting down.
    Shutdown,
    /// Its token was removed from the subscribe token file.
    Revoked,
    /// The client broke the protocol or sent too large a message.
    ProtocolError(WsError),
    /// Reading or writing failed.
    Io(WsError),
}

impl SessionEnd {
    /// Why the server dropped the client, when it did: worth a warning and a metric.
    fn drop_reason(&self) -> Option<&'static str> {
        match self {
            SessionEnd::PongTimeout => Some("pong_timeout"),
            SessionEnd::TooSlow => Some("slow"),
            SessionEnd::WriteTimeout => Some("write_timeout"),
            SessionEnd::ProtocolError(_) => Some("protocol"),
            SessionEnd::Revoked => Some("revoked"),
            _ => None,
        }
    }
}

impl fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionEnd::ClientClosed(Some(code)) => write!(f, "client closed ({})", u16::from(*code)),
            SessionEnd::ClientClosed(None) => f.write_str("client closed"),
            SessionEnd::ConnectionLost => f.write_str("connection lost"),
            SessionEnd::PongTimeout => f.write_str("no answer to ping within --pong-timeout"),
            SessionEnd::TooSlow => f.write_str("too slow: --queue events behind, it can resume with ?since="),
            SessionEnd::WriteTimeout => f.write_str("a write took longer than --write-timeout"),
            SessionEnd::Shutdown => f.write_str("server shutting down"),
            SessionEnd::Revoked => f.write_str("token revoked"),
            SessionEnd::ProtocolError(error) => write!(f, "protocol error: {error}"),
            SessionEnd::Io(error) => write!(f, "i/o error: {error}"),
        }
    }
}

/// What woke the session loop.
enum Wake {
    Frame(Option<Result<Message, WsError>>),
    Event(Option<Utf8Bytes>),
    Timer,
}

struct Session<'a> {
    ws: WebSocketStream<TcpStream>,
    config: &'a Config,
    subscription: Subscription,
    events_sent: u64,
}

impl Session<'_> {
    async fn run(&mut self) -> SessionEnd {
        // Paths taken once or rarely are boxed: this future lives as long as the client, and
        // inline it would be as large as its largest path.
        if let Err(end) = Box::pin(self.send_welcome_and_replay()).await {
            return end;
        }
        let mut timer = Timer::at(Instant::now() + self.config.ping_interval);
        // When the last ping went out, while its answer is awaited.
        let mut ping_sent_at: Option<Instant> = None;
        loop {
            let wake = {
                let ws = &mut self.ws;
                let events = &self.subscription.events;
                let mut frame = pin!(async { Wake::Frame(ws.next().await) });
                let mut event = pin!(async { Wake::Event(events.recv().await.ok()) });
                let mut tick = pin!(async {
                    (&mut timer).await;
                    Wake::Timer
                });
                // Every poll of the socket costs a read system call, so queued events go first;
                // while a pong is awaited the client's frames go first, so that no burst of
                // events can make a live client look dead.
                let frames_first = ping_sent_at.is_some();
                future::poll_fn(|cx| {
                    if frames_first && let Poll::Ready(wake) = frame.as_mut().poll(cx) {
                        return Poll::Ready(wake);
                    }
                    if let Poll::Ready(wake) = event.as_mut().poll(cx) {
                        return Poll::Ready(wake);
                    }
                    if !frames_first && let Poll::Ready(wake) = frame.as_mut().poll(cx) {
                        return Poll::Ready(wake);
                    }
                    tick.as_mut().poll(cx)
                })
                .await
            };
            let result = match wake {
                Wake::Frame(frame) => {
                    if let Some(sent_at) = ping_sent_at.take() {
                        timer.set_at(sent_at + self.config.ping_interval);
                    }
                    let handled = Box::pin(self.handle_frame(frame)).await;
                    // A client flooding frames must not monopolize the thread: frames already
                    // buffered are read without ever returning Pending.
                    future::yield_now().await;
                    handled
                }
                Wake::Event(Some(event)) => self.send_events(event).await,
                Wake::Event(None) => Err(Box::pin(self.say_farewell()).await),
                Wake::Timer if ping_sent_at.is_some() => {
                    Box::pin(self.close(CloseCode::Policy, "no pong within pong_timeout")).await;
                    Err(SessionEnd::PongTimeout)
                }
                Wake::Timer => {
                    let now = Instant::now();
                    ping_sent_at = Some(now);
                    timer.set_at(now + self.config.pong_timeout);
                    Box::pin(self.write(Message::Ping(Bytes::new()))).await
                }
            };
            if let Err(end) = result {
                return self.explain(end);
            }
        }
    }

    /// A write that failed or timed out after the hub dropped the client as too slow ended
    /// because the client was too slow: say so.
    fn explain(&self, end: SessionEnd) -> SessionEnd {
        match end {
            SessionEnd::WriteTimeout | SessionEnd::Io(_)
                if self.subscription.farewell.get() == Some(Farewell::TooSlow) =>
            {
                SessionEnd::TooSlow
            }
            end => end,
        }
    }

    async fn send_welcome_and_replay(&mut self) -> Result<(), SessionEnd> {
        let subscription = &self.subscription;
        let welcome = Welcome {
            kind: "connection",
            message: WELCOME_MESSAGE,
            client_id: subscription.client_id,
            stream: subscription.stream.to_string(),
            seq: subscription.seq,
            history: subscription.history,
            replay: subscription.replay_info,
            ping_interval_ms: self.config.ping_interval.as_millis(),
            pong_timeout_ms: self.config.pong_timeout.as_millis(),
        };
        self.feed(Message::Text(protocol::to_json(&welcome).into())).await?;
        for event in std::mem::take(&mut self.subscription.replay) {
            self.feed(Message::Text(event)).await?;
            self.events_sent += 1;
        }
        self.flush().await
    }

    async fn handle_frame(&mut self, frame: Option<Result<Message, WsError>>) -> Result<(), SessionEnd> {
        match frame {
            Some(Ok(Message::Text(text))) if is_ping_text(&text) => self.write(Message::text(PONG)).await,
            Some(Ok(Message::Close(frame))) => {
                // tungstenite has queued the Close reply; flushing sends it.
                let _ = deadline::within(CLOSE_REPLY_TIMEOUT, self.ws.flush()).await;
                Err(SessionEnd::ClientClosed(frame.map(|f| f.code)))
            }
            // Other text, binary, and Ping/Pong frames only show the client is alive. tungstenite
            // queues the answer to a Ping and sends it on the next read, write or flush.
            Some(Ok(_)) => Ok(()),
            Some(Err(error @ WsError::Capacity(_))) => {
                self.close(CloseCode::Size, "message too large").await;
                Err(SessionEnd::ProtocolError(error))
            }
            Some(Err(error @ WsError::Utf8(_))) => {
                self.close(CloseCode::Invalid, "text is not UTF-8").await;
                Err(SessionEnd::ProtocolError(error))
            }
            Some(Err(error @ WsError::Protocol(_))) => {
                self.close(CloseCode::Protocol, "protocol error").await;
                Err(SessionEnd::ProtocolError(error))
            }
            Some(Err(error)) => Err(SessionEnd::Io(error)),
            None => Err(SessionEnd::ConnectionLost),
        }
    }

    /// Sends `first` and whatever else is already queued, with one flush.
    async fn send_events(&mut self, first: Utf8Bytes) -> Result<(), SessionEnd> {
        let mut batch_bytes = first.len();
        self.feed(Message::Text(first)).await?;
        self.events_sent += 1;
        while batch_bytes < WRITE_BATCH_BYTES {
            let Ok(event) = self.subscription.events.try_recv() else { break };
            batch_bytes += event.len();
            self.feed(Message::Text(event)).await?;
            self.events_sent += 1;
        }
        self.flush().await
    }

    /// The hub closed the queue (after it was drained): say why, with the matching close code.
    async fn say_farewell(&mut self) -> SessionEnd {
        match self.subscription.farewell.get() {
            Some(Farewell::TooSlow) => {
                self.close(CloseCode::Policy, "too slow: reconnect with ?since=").await;
                SessionEnd::TooSlow
            }
            Some(Farewell::Revoked) => {
                self.close(CloseCode::Policy, "token revoked").await;
                SessionEnd::Revoked
            }
            Some(Farewell::ShuttingDown) | None => {
                self.close(CloseCode::Away, "server shutting down").await;
                SessionEnd::Shutdown
            }
        }
    }

    /// Sends a Close frame, then reads (and discards) what the client still sends until its
    /// own Close or `CLOSE_REPLY_TIMEOUT`: closing a socket with unread input would reset the
    /// connection and could destroy our Close before the client reads it.
    async fn close(&mut self, code: CloseCode, reason: &'static str) {
        let frame = CloseFrame { code, reason: Utf8Bytes::from_static(reason) };
        let limit = self.config.write_timeout.min(CLOSE_REPLY_TIMEOUT);
        if deadline::within(limit, self.ws.close(Some(frame))).await.is_err() {
            return;
        }
        let _ = deadline::within(CLOSE_REPLY_TIMEOUT, async {
            // After a read error tungstenite reads no more frames, so drain the socket directly.
            while let Some(Ok(_)) = self.ws.next().await {}
            let _ = self.ws.get_ref().shutdown(std::net::Shutdown::Write);
            let mut discard = vec![0u8; 1024];
            for _ in 0..64 {
                if !matches!(self.ws.get_mut().read(&mut discard).await, Ok(n) if n > 0) {
                    break;
                }
            }
        })
        .await;
    }

    async fn write(&mut self, message: Message) -> Result<(), SessionEnd> {
        self.feed(message).await?;
        self.flush().await
    }

    async fn feed(&mut self, message: Message) -> Result<(), SessionEnd> {
        Self::bounded(self.config.write_timeout, self.ws.feed(message)).await
    }

    async fn flush(&mut self) -> Result<(), SessionEnd> {
        Self::bounded(self.config.write_timeout, self.ws.flush()).await
    }

    async fn bounded(
        limit: Duration,
        write: impl Future<Output = Result<(), WsError>>,
    ) -> Result<(), SessionEnd> {
        match deadline::within(limit, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(SessionEnd::Io(error)),
            Err(TimedOut) => Err(SessionEnd::WriteTimeout),
        }
    }
}

/// Whether a client's text is a heartbeat: `ping` or `{"type":"ping"}`.
fn is_ping_text(text: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Typed<'a> {
        #[serde(rename = "type", borrow)]
        kind: &'a str,
    }
    let text = text.trim();
    text == "ping" || serde_json::from_str::<Typed>(text).is_ok_and(|typed| typed.kind == "ping")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_6455_example() {
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn heartbeat_texts() {
        assert!(is_ping_text("ping"));
        assert!(is_ping_text(" {\"type\": \"ping\"} "));
        assert!(!is_ping_text("{\"type\":\"ack\",\"seq\":3}"));
        assert!(!is_ping_text("pingpong"));
        assert!(!is_ping_text("{\"type\":\"ping\""));
    }
}
