//! One client of the live stream from its 101 (WebSocket) or its 200 (Server-Sent Events) to its
//! end: a loop that sends what the hub has for the client, heartbeats when the heartbeat's sweep
//! (`runtime::heartbeat`) says it is due, and reads whatever the client sends.
//!
//! Tablets never have to send anything: a WebSocket client stays as long as it answers pings
//! (browsers do so automatically). Emergencies are written as `Frame`s straight to the socket,
//! several per system call when several are waiting; over WebSocket, the client's frames are read
//! into a buffer on the stack and parsed by `ws::reader` (nothing kept between reads unless a read
//! cut a frame short), and Pongs and Closes are answered as `Frame`s too. The `Wire` is the one
//! part that differs between the two: the framing (`Frame::text` or `ws::events::EventStream`),
//! what the client can send, how the heartbeat is answered and how the connection ends. The hub
//! subscription, the queue and its slow-client rule, `--write-timeout`, the heartbeat and the
//! counting are the same code for both.
//! Every way out of the loop ends in `SessionEnd`, logged once; dropping the `Subscription` frees
//! the client.

use std::fmt;
use std::io::{self, IoSlice};
use std::mem;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use async_tungstenite::tungstenite::Error as WsError;
use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use log::{debug, info, warn};
use smol::io::{AsyncRead, AsyncWrite};
use smol::{Async, Timer, future};

use crate::app::App;
use crate::config::Config;
use crate::core::doorbell::Farewell;
use crate::core::hub::Greeting;
use crate::core::receipts::AckRequest;
use crate::core::subscription::Subscription;
use crate::protocol::{self, PONG, WELCOME_MESSAGE, Welcome};
use crate::runtime::deadline;
use crate::runtime::heartbeat::Pulse;
use crate::runtime::linger::HalfClose;
use crate::tls::transport::Transport;
use crate::ws::events::EventStream;
use crate::ws::express::{Express, Leftover};
use crate::ws::frame::{Frame, WRITE_BATCH_BYTES, WRITE_BATCH_FRAMES, slices_for, unwritten_slices};
use crate::ws::reader::{ClientClose, ClientFrame, FrameReader, READ_CHUNK_BYTES};

/// How long a client gets to answer our Close before the connection is dropped anyway.
const CLOSE_REPLY_TIMEOUT: Duration = Duration::from_secs(1);

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
    /// The client sent something (or closed the connection).
    Readable,
    /// The hub rang, or closed the doorbell to end the session.
    Doorbell,
    /// The heartbeat's sweep: time to ping, or the pong deadline passed.
    Heartbeat,
}

/// How a session's client is spoken to.
pub enum Wire {
    /// The client's frames are read by a `FrameReader` (what a read left unfinished, if any), and
    /// answered (Pong, Close) like everything else, with `Frame`s written to the transport.
    WebSocket(FrameReader, Transport),
    /// Server-Sent Events: the client sends nothing, its events are framed by `EventStream` and
    /// written to the transport.
    EventStream(EventStream, Transport),
}

impl Wire {
    /// The client's byte stream (plain or TLS), which frames as the hub framed them are written to.
    fn transport(&self) -> &Transport {
        match self {
            Wire::WebSocket(_, transport) => transport,
            Wire::EventStream(_, transport) => transport,
        }
    }

    fn transport_mut(&mut self) -> &mut Transport {
        match self {
            Wire::WebSocket(_, transport) => transport,
            Wire::EventStream(_, transport) => transport,
        }
    }
}

/// A connected client, from its 101 (or 200) to its end.
pub struct Session {
    wire: Wire,
    /// The socket under the wire's transport, to wait for input.
    socket: Arc<Async<std::net::TcpStream>>,
    app: Rc<App>,
    subscription: Subscription,
    /// Its place in the one heartbeat timer: when to ping, and whether a pong is awaited.
    pulse: Pulse,
    /// For the welcome; taken when it is sent.
    greeting: Option<Box<Greeting>>,
    started: Instant,
    /// The express lane, for a plain WebSocket session: it writes while the session is parked.
    express: Option<Rc<Express>>,
}

impl Session {
    /// A session for a client the handshake admitted.
    pub fn new(
        wire: Wire,
        socket: Arc<Async<std::net::TcpStream>>,
        app: Rc<App>,
        subscription: Subscription,
        greeting: Greeting,
    ) -> Session {
        Session {
            wire,
            socket,
            pulse: app.heartbeat.register(subscription.key(), subscription.client_id),
            app,
            subscription,
            greeting: Some(Box::new(greeting)),
            started: Instant::now(),
            express: None,
        }
    }

    /// Runs the session to its end and logs how it ended. A plain WebSocket session joins the
    /// express lane.
    pub fn serve(self, express: &Rc<Express>) -> impl Future<Output = ()> + 'static {
        // Moved into the block and borrowed by the future it awaits, never moved again: an
        // `async fn` taking `self` would keep two copies of it for the client's whole life.
        let mut session = self;
        if let Wire::WebSocket(_, Transport::Plain(socket)) = &session.wire {
            express.join(session.subscription.key(), session.subscription.client_id, Arc::clone(socket));
            session.express = Some(Rc::clone(express));
        }
        async move {
            let end = session.run().await;
            session.log_end(end);
        }
    }

    fn log_end(&self, end: SessionEnd) {
        let app = &self.app;
        let summary = format!(
            "{} disconnected after {:.0?}, {} events sent: {end}",
            self.label(),
            self.started.elapsed(),
            self.subscription.sent()
        );
        match end.drop_reason() {
            Some(reason) => {
                app.metrics.count("resq_push_clients_dropped_total", reason);
                warn!("{summary}");
            }
            None => info!("{summary}"),
        }
    }

    /// `client ID (name) (peer)`, for its log lines.
    fn label(&self) -> String {
        let transport = if matches!(self.wire, Wire::EventStream(..)) { ", SSE" } else { "" };
        self.subscription.label(transport)
    }

    fn config(&self) -> &Config {
        &self.app.config
    }

    async fn run(&mut self) -> SessionEnd {
        // Every path that awaits is boxed: this future lives as long as the client, idle most of
        // its life, and inline it would be as large as its largest path. Even sending what the
        // doorbell rang for (248 bytes inline): a box per wake was not measurably dearer per
        // delivery (callgrind), and every idle client is 248 bytes smaller (BENCHMARKS.md, "Idle
        // clients: where each byte and wake-up goes").
        if let Err(end) = Box::pin(self.send_welcome_and_replay()).await {
            return end;
        }
        // Frames that came with the upgrade request are already buffered: the socket will not
        // signal them.
        if let Err(end) = Box::pin(self.read_frames()).await {
            return self.explain(end);
        }
        loop {
            let parks = self.express.is_some();
            let wake = {
                let socket = &self.socket;
                let transport = self.wire.transport();
                let subscription = &self.subscription;
                let pulse = &self.pulse;
                // The socket is polled for readiness, not read: a read that finds nothing
                // would cost a system call on every wake. While a pong is awaited the client
                // goes first, so that no burst of events can make a live client look dead.
                let client_first = pulse.awaiting_answer();
                // Under TLS, input rustls already holds is not signaled by the socket.
                let readable = |cx: &mut std::task::Context<'_>| {
                    transport.has_buffered_input() || socket.poll_readable(cx).is_ready()
                };
                if parks {
                    self.subscription.park();
                }
                let wake = future::poll_fn(|cx| {
                    if client_first && readable(cx) {
                        return Poll::Ready(Wake::Readable);
                    }
                    if subscription.poll_rung(cx).is_ready() {
                        return Poll::Ready(Wake::Doorbell);
                    }
                    if !client_first && readable(cx) {
                        return Poll::Ready(Wake::Readable);
                    }
                    pulse.poll_due(cx).map(|()| Wake::Heartbeat)
                })
                .await;
                if parks {
                    self.subscription.unpark();
                }
                wake
            };
            if let Some(leftover) = self.express_leftover()
                && let Err(end) = Box::pin(self.finish(leftover)).await
            {
                return self.explain(end);
            }
            let result = match wake {
                Wake::Readable => {
                    self.pulse.answered();
                    Box::pin(self.read_frames()).await
                }
                Wake::Doorbell if self.subscription.farewell().is_some() => {
                    Err(Box::pin(self.say_farewell()).await)
                }
                Wake::Doorbell => Box::pin(self.send_pending(Vec::new())).await,
                Wake::Heartbeat if self.pulse.awaiting_answer() => {
                    Box::pin(self.close(CloseCode::Policy, "no pong within pong_timeout")).await;
                    Err(SessionEnd::PongTimeout)
                }
                Wake::Heartbeat if matches!(self.wire, Wire::EventStream(..)) => {
                    // No answer can come: a dead peer shows as a write that fails (TCP's
                    // user timeout, set at the handshake) or one that times out.
                    self.pulse.beat();
                    Box::pin(self.write(&[EventStream::heartbeat()])).await
                }
                Wake::Heartbeat => {
                    self.pulse.pinged();
                    Box::pin(self.write(&[Frame::ping()])).await
                }
            };
            if let Err(end) = result {
                return self.explain(end);
            }
        }
    }

    /// What the express lane could not write for it while it was parked.
    fn express_leftover(&self) -> Option<Box<Leftover>> {
        let express = self.express.as_ref()?;
        express.take_leftover(self.subscription.key(), self.subscription.client_id)
    }

    /// Writes the rest of a batch the express lane began, before anything else.
    async fn finish(&mut self, leftover: Box<Leftover>) -> Result<(), SessionEnd> {
        let limit = self.config().write_timeout;
        write_rest(self.wire.transport_mut(), &leftover.frames, leftover.written, limit).await?;
        self.record_delivered(&leftover.seqs);
        Ok(())
    }

    /// A write that failed or timed out after the hub dropped the client as too slow ended
    /// because the client was too slow: say so.
    fn explain(&self, end: SessionEnd) -> SessionEnd {
        match end {
            SessionEnd::WriteTimeout | SessionEnd::Io(_)
                if self.subscription.farewell() == Some(Farewell::TooSlow) =>
            {
                SessionEnd::TooSlow
            }
            end => end,
        }
    }

    /// The welcome, then the replay (when the client resumed) and whatever came since, with
    /// the welcome in the first write.
    async fn send_welcome_and_replay(&mut self) -> Result<(), SessionEnd> {
        let Some(greeting) = self.greeting.take() else { return Ok(()) };
        let config = self.config();
        let welcome = Welcome {
            kind: "connection",
            message: WELCOME_MESSAGE,
            client_id: self.subscription.client_id,
            stream: greeting.stream.to_string(),
            seq: greeting.seq,
            history: greeting.history,
            replay: greeting.replay,
            open: greeting.open.clone(),
            ping_interval_ms: config.ping_interval.as_millis(),
            pong_timeout_ms: config.pong_timeout.as_millis(),
        };
        let welcome = protocol::to_json(&welcome).into();
        let first = match &mut self.wire {
            Wire::WebSocket(..) => vec![Frame::text(welcome)],
            Wire::EventStream(events, _) => events.welcome(welcome),
        };
        self.send_pending(first).await
    }

    /// Writes `first` and everything the hub has for this client, in batches of up to
    /// `WRITE_BATCH_FRAMES`, one system call each when the socket has room. The emergencies of
    /// a batch count as delivered to this tablet once the write has put all of it on the socket.
    async fn send_pending(&mut self, first: Vec<Frame>) -> Result<(), SessionEnd> {
        let mut batch = first;
        let mut seqs = Vec::new();
        loop {
            let wire = &mut self.wire;
            let taken = self.subscription.take_pending(WRITE_BATCH_FRAMES, WRITE_BATCH_BYTES, |outgoing| {
                seqs.extend(outgoing.seq);
                batch.push(match wire {
                    Wire::WebSocket(..) => Frame::text(outgoing.json),
                    Wire::EventStream(events, _) => events.message(outgoing.json, outgoing.seq),
                });
            });
            if batch.is_empty() {
                return Ok(());
            }
            self.write(&batch).await?;
            self.record_delivered(&seqs);
            seqs.clear();
            batch.clear();
            if taken == WRITE_BATCH_FRAMES {
                // A long replay must not hold the thread: other clients write between batches.
                future::yield_now().await;
            }
        }
    }

    /// Counts the emergencies just written (so that /metrics moves while clients stay connected)
    /// and records their delivery to this tablet.
    fn record_delivered(&mut self, seqs: &[u64]) {
        if seqs.is_empty() {
            return;
        }
        self.app.metrics.count_delivered(seqs.len() as u64);
        let events = self.subscription.delivered(seqs, SystemTime::now());
        self.app.publisher.record(events);
    }

    /// Handles every frame the client has sent; returns when the socket has nothing more, with
    /// the answers to its Pings and text pings written. An SSE client has nothing to say: what it
    /// sends is dropped, and its end of the connection ends the session.
    async fn read_frames(&mut self) -> Result<(), SessionEnd> {
        if let Wire::EventStream(_, transport) = &mut self.wire {
            let drained = EventStream::drain(transport).await;
            // A client flooding bytes must not monopolize the thread either.
            future::yield_now().await;
            return match drained {
                Ok(true) => Ok(()),
                Ok(false) => Err(SessionEnd::ConnectionLost),
                Err(error) => Err(SessionEnd::Io(error.into())),
            };
        }
        self.subscription.heard(SystemTime::now());
        // Frames that came with the upgrade request are parsed before anything is read.
        let mut early = matches!(&self.wire, Wire::WebSocket(reader, _) if reader.holds_input());
        loop {
            let mut replies = Vec::new();
            let read = self.read_once(mem::take(&mut early), &mut replies).await;
            if !replies.is_empty() {
                Box::pin(self.write(&replies)).await?;
            }
            match read {
                // A read short of a chunk took all there was: no second read to find nothing.
                Read::Nothing | Read::Bytes { parsed: Ok(None), more: false } => return Ok(()),
                // A client flooding frames must not monopolize the thread.
                Read::Bytes { parsed: Ok(None), more: true } => future::yield_now().await,
                Read::Bytes { parsed: Ok(Some(close)), .. } => {
                    return Err(Box::pin(self.answer_close(close)).await);
                }
                Read::Bytes { parsed: Err(error), .. } => return Err(Box::pin(self.refuse(error)).await),
                Read::Closed => return Err(SessionEnd::ConnectionLost),
                Read::Failed(error) => return Err(SessionEnd::Io(error.into())),
            }
        }
    }

    /// One read of the client's bytes (none when `early`: only what came with the upgrade is
    /// parsed), each frame handled as it is parsed: acks recorded, the answers to Pings and text
    /// pings added to `replies`.
    async fn read_once(
        &mut self,
        early: bool,
        replies: &mut Vec<Frame>,
    ) -> Read<Result<Option<ClientClose>, WsError>> {
        let Session { wire: Wire::WebSocket(reader, transport), subscription, app, .. } = self else {
            return Read::Nothing;
        };
        let max_message = app.config.max_client_message_bytes;
        let mut parse = |chunk: &mut [u8]| {
            reader.feed(chunk, max_message, |frame| match frame {
                ClientFrame::Text(text) => match client_text(text) {
                    ClientText::Ping => replies.push(Frame::text(PONG.into())),
                    ClientText::Ack(seq) => handle_ack(subscription, app, seq),
                    ClientText::Other => {}
                },
                ClientFrame::Ping(payload) => replies.push(Frame::pong(payload)),
            })
        };
        if early {
            return Read::Bytes { parsed: parse(&mut []), more: true };
        }
        read_chunk(transport, false, parse).await
    }

    /// The client sent a Close: it gets one back, with its code (and reason), and the session ends.
    async fn answer_close(&mut self, close: ClientClose) -> SessionEnd {
        let limit = self.config().write_timeout.min(CLOSE_REPLY_TIMEOUT);
        let _ = write_all(self.wire.transport_mut(), &[Frame::close(&close.payload)], limit).await;
        SessionEnd::ClientClosed(close.code)
    }

    /// The client broke the protocol, sent text that is not UTF-8 or a message too large: closed
    /// with the code that says which.
    async fn refuse(&mut self, error: WsError) -> SessionEnd {
        let (code, reason) = match &error {
            WsError::Capacity(_) => (CloseCode::Size, "message too large"),
            WsError::Utf8(_) => (CloseCode::Invalid, "text is not UTF-8"),
            _ => (CloseCode::Protocol, "protocol error"),
        };
        self.close(code, reason).await;
        SessionEnd::ProtocolError(error)
    }

    /// The hub closed the doorbell: say why, with the matching close code. At shutdown the
    /// client first gets everything it has not been sent.
    async fn say_farewell(&mut self) -> SessionEnd {
        match self.subscription.farewell() {
            Some(Farewell::TooSlow) => {
                self.close(CloseCode::Policy, "too slow: reconnect with ?since=").await;
                SessionEnd::TooSlow
            }
            Some(Farewell::Revoked) => {
                self.close(CloseCode::Policy, "token revoked").await;
                SessionEnd::Revoked
            }
            Some(Farewell::StreamChanged) => {
                self.close(CloseCode::Restart, "new history: reconnect with ?since=&stream=").await;
                SessionEnd::Shutdown
            }
            Some(Farewell::ShuttingDown) | None => {
                if let Err(end) = self.send_pending(Vec::new()).await {
                    return end;
                }
                self.close(CloseCode::Away, "server shutting down").await;
                SessionEnd::Shutdown
            }
        }
    }

    /// Sends a Close frame (over SSE, a comment saying why), then reads (and discards) what the
    /// client still sends until its own Close or `CLOSE_REPLY_TIMEOUT`: closing a socket with
    /// unread input would reset the connection and could destroy our Close before the client
    /// reads it.
    async fn close(&mut self, code: CloseCode, reason: &'static str) {
        let limit = self.config().write_timeout.min(CLOSE_REPLY_TIMEOUT);
        let max_message = self.config().max_client_message_bytes;
        let (reader, transport) = match &mut self.wire {
            Wire::WebSocket(reader, transport) => (reader, transport),
            Wire::EventStream(_, transport) => {
                let _ = write_all(transport, &[EventStream::farewell(reason)], limit).await;
                transport.end_writing();
                let _ = deadline::within(CLOSE_REPLY_TIMEOUT, drain_to_end(&self.socket, transport)).await;
                return;
            }
        };
        let mut payload = u16::from(code).to_be_bytes().to_vec();
        payload.extend_from_slice(reason.as_bytes());
        if write_all(transport, &[Frame::close(&payload)], limit).await.is_err() {
            return;
        }
        let _ = deadline::within(CLOSE_REPLY_TIMEOUT, async {
            // Frames up to the client's Close are parsed and dropped; after a protocol error the
            // reader stops at the same error, and the rest is drained unparsed.
            let mut until_close = |chunk: &mut [u8]| reader.feed(chunk, max_message, |_| {});
            while let Read::Bytes { parsed: Ok(None), .. } =
                read_chunk(transport, true, &mut until_close).await
            {}
            transport.end_writing();
            for _ in 0..64 {
                if !matches!(read_chunk(transport, true, |_| ()).await, Read::Bytes { .. }) {
                    break;
                }
            }
        })
        .await;
    }

    /// Writes `frames` to the socket.
    async fn write(&mut self, frames: &[Frame]) -> Result<(), SessionEnd> {
        let limit = self.config().write_timeout;
        write_all(self.wire.transport_mut(), frames, limit).await
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(express) = &self.express {
            express.leave(self.subscription.key(), self.subscription.client_id);
        }
    }
}

/// An ack from the client: recorded (and broadcast once stored) if it is this tablet's first for
/// a known seq; anything else is ignored.
fn handle_ack(subscription: &Subscription, app: &App, seq: u64) {
    let label = || subscription.label("");
    match subscription.ack(seq, SystemTime::now()) {
        AckRequest::First(event) => app.publisher.record(vec![event]),
        AckRequest::Repeated => debug!("{}: repeated ack of seq {seq}", label()),
        AckRequest::Unknown => debug!("{}: ack of unknown seq {seq} ignored", label()),
        AckRequest::Uncounted => debug!("{}: ack of seq {seq} past --max-unnamed-receipts", label()),
    }
}

/// What one read of a client's bytes gave.
enum Read<T> {
    /// Nothing yet (only when not waiting for input).
    Nothing,
    /// What was made of the bytes read; `more`: they filled the chunk, so more may be waiting
    /// (a TCP read short of it took everything the socket had).
    Bytes {
        parsed: T,
        more: bool,
    },
    /// The client closed the connection.
    Closed,
    Failed(io::Error),
}

/// Reads once into a buffer on the stack (so no future holds it) and hands the bytes to `parse`;
/// waits for input if `wait`, else returns `Nothing` when there is none yet.
fn read_chunk<T>(
    transport: &mut Transport,
    wait: bool,
    mut parse: impl FnMut(&mut [u8]) -> T,
) -> impl Future<Output = Read<T>> {
    future::poll_fn(move |cx| {
        let mut chunk = [0u8; READ_CHUNK_BYTES];
        match Pin::new(&mut *transport).poll_read(cx, &mut chunk) {
            Poll::Ready(Ok(0)) => Poll::Ready(Read::Closed),
            Poll::Ready(Ok(n)) => {
                Poll::Ready(Read::Bytes { parsed: parse(&mut chunk[..n]), more: n == chunk.len() })
            }
            Poll::Ready(Err(error)) => Poll::Ready(Read::Failed(error)),
            Poll::Pending if wait => Poll::Pending,
            Poll::Pending => Poll::Ready(Read::Nothing),
        }
    })
}

/// Writes every byte of `frames` with as few `writev` calls as the socket allows (under TLS,
/// one rustls write a batch: one record, not one per frame), then what rustls still holds. The
/// clock starts only if the socket is full: a write that goes through at once costs no timer.
async fn write_all(transport: &mut Transport, frames: &[Frame], limit: Duration) -> Result<(), SessionEnd> {
    write_rest(transport, frames, 0, limit).await
}

/// As `write_all`, for `frames` of which `written` bytes are on the socket already.
async fn write_rest(
    transport: &mut Transport,
    frames: &[Frame],
    mut written: usize,
    limit: Duration,
) -> Result<(), SessionEnd> {
    let total: usize = frames.iter().map(Frame::len).sum();
    let mut deadline: Option<Timer> = None;
    future::poll_fn(|cx| {
        let mut wait = |cx: &mut std::task::Context<'_>| {
            let timer = deadline.get_or_insert_with(|| Timer::after(limit));
            match Pin::new(timer).poll(cx) {
                Poll::Ready(_) => Poll::Ready(Err(SessionEnd::WriteTimeout)),
                Poll::Pending => Poll::Pending,
            }
        };
        while written < total {
            let mut slices = [IoSlice::new(&[]); slices_for(WRITE_BATCH_FRAMES)];
            let count = unwritten_slices(frames, written, &mut slices);
            match Pin::new(&mut *transport).poll_write_vectored(cx, &slices[..count]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(SessionEnd::Io(
                        io::Error::from(io::ErrorKind::WriteZero).into(),
                    )));
                }
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(SessionEnd::Io(error.into()))),
                Poll::Pending => return wait(cx),
            }
        }
        match Pin::new(&mut *transport).poll_flush(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(error)) => Poll::Ready(Err(SessionEnd::Io(error.into()))),
            Poll::Pending => wait(cx),
        }
    })
    .await
}

/// Reads and drops what the client sends until it closes (an SSE client's end), in at most 64
/// rounds of `EventStream::drain`.
async fn drain_to_end(socket: &Async<std::net::TcpStream>, transport: &mut Transport) {
    for _ in 0..64 {
        if socket.readable().await.is_err() || !matches!(EventStream::drain(transport).await, Ok(true)) {
            return;
        }
    }
}

/// What a client's text frame asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientText {
    /// `ping` or `{"type":"ping"}`: answered with a pong.
    Ping,
    /// `{"type":"ack","seq":N}`.
    Ack(u64),
    /// Anything else, malformed included: ignored.
    Other,
}

pub fn client_text(text: &str) -> ClientText {
    #[derive(serde::Deserialize)]
    struct Typed<'a> {
        #[serde(rename = "type", borrow)]
        kind: &'a str,
        seq: Option<u64>,
    }
    let text = text.trim();
    if text == "ping" {
        return ClientText::Ping;
    }
    match serde_json::from_str::<Typed>(text) {
        Ok(Typed { kind: "ping", .. }) => ClientText::Ping,
        Ok(Typed { kind: "ack", seq: Some(seq) }) => ClientText::Ack(seq),
        _ => ClientText::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a connected client's task may hold: the session's future is allocated once per
    /// client and lives as long as it does, so a refactor that grows it grows every client.
    const MAX_SESSION_FUTURE_BYTES: usize = 320;
    /// What reading a client's frames boxes: alive in every session woken by the same batch of
    /// pongs, since it yields between frames (the close paths inside it are boxed again).
    const MAX_READ_FRAMES_FUTURE_BYTES: usize = 224;

    #[test]
    fn a_session_future_stays_small() {
        smol::block_on(async {
            let listener = smol::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let _client = smol::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
            let (stream, peer) = listener.accept().await.unwrap();
            let (app, _stop_sender) = App::for_tests();
            let socket = Arc::from(stream.clone());
            let (subscription, greeting) = Subscription::open(&app.hub, peer, None, None).unwrap();
            let session = Session::new(
                Wire::WebSocket(FrameReader::default(), Transport::plain(stream)),
                socket,
                Rc::clone(&app),
                subscription,
                greeting,
            );
            let session_bytes = std::mem::size_of_val(&session);
            let mut session = session;
            // Boxed, but alive at once in every session a batch of pongs wakes (it yields).
            let reading = size_of_val(&session.read_frames());
            let size = std::mem::size_of_val(&session.serve(&Express::new(1)));
            // `cargo test --release --lib a_session_future -- --nocapture` prints the figures.
            eprintln!(
                "session {session_bytes} bytes (its wire {}), its future {size}, reading {reading}",
                size_of::<Wire>()
            );
            assert!(reading <= MAX_READ_FRAMES_FUTURE_BYTES, "reading frames takes a {reading}-byte future");
            assert!(size <= MAX_SESSION_FUTURE_BYTES, "a session's future is {size} bytes");
        });
    }

    #[test]
    fn client_texts() {
        assert_eq!(client_text("ping"), ClientText::Ping);
        assert_eq!(client_text(" {\"type\": \"ping\"} "), ClientText::Ping);
        assert_eq!(client_text("{\"type\":\"ack\",\"seq\":3}"), ClientText::Ack(3));
        assert_eq!(client_text("{\"type\":\"ack\",\"seq\":-3}"), ClientText::Other);
        assert_eq!(client_text("{\"type\":\"ack\"}"), ClientText::Other);
        assert_eq!(client_text("pingpong"), ClientText::Other);
        assert_eq!(client_text("{\"type\":\"ping\""), ClientText::Other);
    }
}
