//! One simulated tablet: connect, read the welcome, then read everything until told to stop,
//! answering pings (tungstenite queues the Pong and sends it on the next read) and keeping per-seq
//! books: latency from the publish timestamp in `data.t`, duplicates, out-of-order, pings seen.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use async_channel::Receiver;
use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::Message;
use async_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::lock::Semaphore;
use smol::net::TcpStream;
use smol::stream::StreamExt;
use smol::{Timer, future};
use socket2::{Domain, Protocol, Socket, Type};

use crate::tls::{BenchStream, TlsClient};

/// Where the server is, parsed from `--url ws://HOST:PORT[/path]` or `wss://...`.
#[derive(Clone, Debug)]
pub struct Target {
    /// Where the WebSocket clients connect.
    pub addr: SocketAddr,
    /// Plain HTTP (`/healthz`, HTTP publishing, probes): `addr` for ws://, the next port for
    /// wss:// (a spawned server listens there in plain).
    pub http_addr: SocketAddr,
    /// For wss://: the CA the clients trust, from `--tls-dir`.
    pub tls: Option<TlsClient>,
    /// `HOST:PORT` as given, for the HTTP `Host` header.
    pub authority: String,
    /// The WebSocket URL, path included.
    pub ws_url: String,
    /// Sent as `Authorization: Bearer` on the WebSocket upgrade, when set.
    pub token: Option<String>,
    /// Sent as `Authorization: Bearer` on `POST /emergencias`, when set.
    pub publish_token: Option<String>,
}

impl Target {
    pub fn parse(
        url: &str,
        token: Option<String>,
        publish_token: Option<String>,
        tls_dir: Option<&std::path::Path>,
    ) -> Result<Target, String> {
        let (scheme, rest) = match (url.strip_prefix("ws://"), url.strip_prefix("wss://")) {
            (Some(rest), _) => ("ws", rest),
            (_, Some(rest)) => ("wss", rest),
            _ => return Err(format!("--url must start with ws:// or wss://, got {url}")),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) if i + 1 < rest.len() => (&rest[..i], &rest[i..]),
            Some(i) => (&rest[..i], "/ws/emergencias"),
            None => (rest, "/ws/emergencias"),
        };
        use std::net::ToSocketAddrs;
        let addr = authority
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {authority}: {e}"))?
            .next()
            .ok_or_else(|| format!("{authority} resolves to nothing"))?;
        let (tls, http_addr) = match (scheme, tls_dir) {
            ("ws", _) => (None, addr),
            (_, Some(dir)) => {
                let host = authority.rsplit_once(':').map_or(authority, |(host, _)| host);
                let plain = SocketAddr::new(addr.ip(), addr.port().wrapping_add(1));
                (Some(TlsClient::new(dir, host.trim_matches(['[', ']']))?), plain)
            }
            (_, None) => return Err("wss:// needs --tls-dir (a directory made by deploy/site-ca)".into()),
        };
        Ok(Target {
            addr,
            http_addr,
            tls,
            authority: authority.to_owned(),
            ws_url: format!("{scheme}://{authority}{path}"),
            token,
            publish_token,
        })
    }
}

/// What every client of one run shares.
pub struct Fleet {
    pub target: Target,
    /// The bench's clock: payload timestamps are nanoseconds since this instant.
    pub t0: Instant,
    /// Closed when the clients must stop.
    pub stop: Receiver<()>,
    /// Bounds connects in flight (none for a storm).
    pub gate: Option<Semaphore>,
    /// Per-client highest seq seen; `u64::MAX` once the client has ended.
    pub progress: Vec<AtomicU64>,
    pub welcomed: AtomicUsize,
    pub failed: AtomicUsize,
    /// Clients whose connection ended before `stop`.
    pub ended_early: AtomicUsize,
    pub connect_timeout: Duration,
    /// Whether each client acks every emergency it gets (`{"type":"ack","seq":N}`).
    pub ack: bool,
    /// `ack` broadcasts received, by every client together.
    pub acks_seen: AtomicU64,
    /// Resuming clients (`?since=` in the URL): the seq they resume after, where their books
    /// start (else each starts at its welcome's seq).
    pub since: Option<u64>,
    /// Each client notes when it first holds this seq (`ClientReport::caught_up_at`).
    pub catch_up_to: u64,
}

impl Fleet {
    pub fn new(
        target: Target,
        t0: Instant,
        clients: usize,
        gate: Option<usize>,
        stop: Receiver<()>,
    ) -> Fleet {
        Fleet {
            target,
            t0,
            stop,
            gate: gate.map(Semaphore::new),
            progress: (0..clients).map(|_| AtomicU64::new(0)).collect(),
            welcomed: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            ended_early: AtomicUsize::new(0),
            connect_timeout: Duration::from_secs(30),
            ack: false,
            acks_seen: AtomicU64::new(0),
            since: None,
            catch_up_to: u64::MAX,
        }
    }

    pub fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    /// Clients that have not ended and have not yet seen `seq`.
    pub fn behind(&self, seq: u64) -> usize {
        self.progress.iter().filter(|p| p.load(Relaxed) < seq).count()
    }
}

/// How a client's connection ended.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum End {
    #[default]
    NeverConnected,
    /// We stopped it (the normal end).
    Stopped,
    /// The server sent a Close frame.
    ServerClose(u16, String),
    /// The connection ended without a Close frame.
    Eof,
    Error(String),
}

/// One client's books.
#[derive(Default)]
pub struct ClientReport {
    /// Connect, handshake or welcome failure.
    pub failure: Option<String>,
    pub welcomed_at: Option<Instant>,
    pub welcome_seq: u64,
    pub events: u64,
    /// Delivery latency of each event, microseconds.
    pub latencies_us: Vec<u32>,
    /// Bit per seq above `welcome_seq`.
    seen: Vec<u64>,
    pub max_seq: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// Text frames that are not a parsable `emergencia` (other types are fine, counted here).
    pub other_texts: u64,
    pub pings: u64,
    last_ping: Option<Instant>,
    pub max_ping_gap: Option<Duration>,
    pub end: End,
    pub ended_at: Option<Instant>,
    /// When this client first held `Fleet::catch_up_to`.
    pub caught_up_at: Option<Instant>,
}

impl ClientReport {
    fn record_seq(&mut self, seq: u64) {
        if seq <= self.welcome_seq {
            self.duplicates += 1;
            return;
        }
        let index = (seq - self.welcome_seq - 1) as usize;
        if index >= (1 << 26) {
            self.other_texts += 1;
            return;
        }
        let (word, bit) = (index / 64, 1u64 << (index % 64));
        if word >= self.seen.len() {
            self.seen.resize(word + 1, 0);
        }
        if self.seen[word] & bit != 0 {
            self.duplicates += 1;
            return;
        }
        self.seen[word] |= bit;
        if seq < self.max_seq {
            self.out_of_order += 1;
        }
        self.max_seq = self.max_seq.max(seq);
    }

    /// Whether `seq` was received.
    pub fn has(&self, seq: u64) -> bool {
        if seq <= self.welcome_seq {
            return false;
        }
        let index = (seq - self.welcome_seq - 1) as usize;
        self.seen.get(index / 64).is_some_and(|word| word & (1 << (index % 64)) != 0)
    }

    /// Of `published` (the seqs the publisher got accepted), those this client should have had
    /// (published after its welcome) but did not get.
    pub fn lost(&self, published: &[u64]) -> u64 {
        if self.welcomed_at.is_none() {
            return 0;
        }
        published.iter().filter(|&&seq| seq > self.welcome_seq && !self.has(seq)).count() as u64
    }
}

const EMERGENCY_PREFIX: &[u8] = b"{\"type\":\"emergencia\",\"seq\":";
const DATA_T: &[u8] = b"\"data\":{\"t\":";

/// Leading decimal digits of `bytes`.
fn parse_u64(bytes: &[u8]) -> Option<u64> {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 19 {
        return None;
    }
    bytes[..digits].iter().try_fold(0u64, |n, &b| n.checked_mul(10)?.checked_add(u64::from(b - b'0')))
}

/// `(seq, t)` of an emergency frame whose data starts with the bench's `{"t":`. No JSON parse:
/// at 250,000 frames a second the bench must stay cheaper than the server.
pub fn parse_emergency(text: &[u8]) -> Option<(u64, Option<u64>)> {
    let seq = parse_u64(text.strip_prefix(EMERGENCY_PREFIX)?)?;
    // `data` follows seq, received_at and source, about 70 bytes on: look there first.
    let find = |from: usize, to: usize| {
        let window = text.get(from..to.min(text.len()))?;
        window.windows(DATA_T.len()).position(|w| w == DATA_T).map(|i| from + i)
    };
    let near = EMERGENCY_PREFIX.len();
    let t = find(near, near + 160)
        .or_else(|| find(near, text.len()))
        .and_then(|i| parse_u64(&text[i + DATA_T.len()..]));
    Some((seq, t))
}

fn websocket_config() -> WebSocketConfig {
    // Small buffers: 10,000 of these live in one process.
    WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0).max_write_buffer_size(64 * 1024)
}

static KEY_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A `Sec-WebSocket-Key`: 16 bytes in base64. They only need to differ between connections.
fn websocket_key() -> String {
    let n = KEY_COUNTER.fetch_add(1, Relaxed);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
            as u64;
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&n.to_le_bytes());
    bytes[8..].copy_from_slice(&(nanos ^ u64::from(std::process::id()).rotate_left(32)).to_le_bytes());
    data_encoding::BASE64.encode(&bytes)
}

fn expected_accept(key: &str) -> String {
    use sha1::Digest;
    let digest = sha1::Sha1::new().chain_update(key.as_bytes()).chain_update(WEBSOCKET_GUID).finalize();
    data_encoding::BASE64.encode(&digest)
}

const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The upgrade request, and the `Sec-WebSocket-Key` it carries.
fn upgrade_request(target: &Target) -> (String, String) {
    let key = websocket_key();
    let path = target.ws_url.split_once("://").and_then(|(_, r)| r.find('/').map(|i| &r[i..])).unwrap_or("/");
    let auth = target.token.as_ref().map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n",
        target.authority
    );
    (key, request)
}

/// Opens a TCP connection and writes `request` as soon as it is up, as a tablet does. The write is
/// tried right after `connect()`, in the same poll: on loopback the handshake is already done by
/// then. `TcpStream::connect` would first wait for a reactor tick, and since one executor thread
/// runs its tasks in FIFO order, a storm's requests would then all wait behind its connects.
async fn connect_and_send(addr: SocketAddr, request: &[u8]) -> Result<TcpStream, String> {
    let connect_error = |e: std::io::Error| format!("connect: {}", e.kind());
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .and_then(|s| s.set_nonblocking(true).map(|()| s))
        .map_err(connect_error)?;
    let _ = socket.set_tcp_nodelay(true);
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(connect_error(e)),
    }
    let mut stream = TcpStream::try_from(std::net::TcpStream::from(socket)).map_err(connect_error)?;
    // Not yet connected, the write waits for writability; a failed connect fails it.
    if let Err(e) = stream.write_all(request).await {
        return Err(match stream.peer_addr() {
            Ok(_) => format!("sending the upgrade: {e}"),
            Err(_) => connect_error(e),
        });
    }
    Ok(stream)
}

/// The client's side of the RFC 6455 upgrade once the request carrying `key` is sent: reads and
/// checks the answer. Written here rather than taken from tungstenite so that a refusal is
/// reported precisely (`HTTP 503: ...`, reset before any answer, ...).
async fn handshake(key: &str, mut stream: BenchStream) -> Result<WebSocketStream<BenchStream>, String> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buffer.len() > 16 * 1024 {
            return Err("upgrade answer head over 16 KiB".into());
        }
        match stream.read(&mut chunk).await {
            Ok(0) if buffer.is_empty() => return Err("closed before answering the upgrade".into()),
            Ok(0) => return Err("closed in the middle of the upgrade answer".into()),
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(e) if buffer.is_empty() => return Err(format!("{} before answering the upgrade", e.kind())),
            Err(e) => return Err(format!("reading the upgrade answer: {e}")),
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let status = head.split(' ').nth(1).unwrap_or("?");
    if status != "101" {
        // Include the body when it came with the head (the server's errors are small JSON).
        let body = String::from_utf8_lossy(&buffer[head_end..]);
        return Err(format!("HTTP {status} {}", body.trim()));
    }
    let accept = head
        .lines()
        .find_map(|line| line.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case("sec-websocket-accept")))
        .map(|(_, v)| v.trim().to_owned());
    if accept.as_deref() != Some(expected_accept(key).as_str()) {
        return Err(format!("bad Sec-WebSocket-Accept {accept:?}"));
    }
    let rest = buffer[head_end..].to_vec();
    Ok(WebSocketStream::from_partially_read(stream, rest, Role::Client, Some(websocket_config())).await)
}

/// What a client keeps of the welcome.
pub struct Welcome {
    pub seq: u64,
    /// The identity of the server's history, for `&stream=` on a resume.
    pub stream: Option<String>,
}

/// Connects and reads the welcome.
pub async fn connect(target: &Target) -> Result<(WebSocketStream<BenchStream>, Welcome), String> {
    let (key, request) = upgrade_request(target);
    let stream = match &target.tls {
        None => BenchStream::Plain(connect_and_send(target.addr, request.as_bytes()).await?),
        Some(tls) => {
            let tcp = connect_and_send(target.addr, b"").await?;
            let mut stream = tls.connect(tcp).await.map_err(|e| format!("TLS handshake: {e}"))?;
            stream.write_all(request.as_bytes()).await.map_err(|e| format!("sending the upgrade: {e}"))?;
            stream.flush().await.map_err(|e| format!("sending the upgrade: {e}"))?;
            stream
        }
    };
    let mut ws = handshake(&key, stream).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let welcome: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| format!("welcome is not JSON: {e}"))?;
                if welcome["type"] != "connection" {
                    return Err(format!("first frame is not the welcome: {text}"));
                }
                let stream = welcome["stream"].as_str().map(str::to_owned);
                return Ok((ws, Welcome { seq: welcome["seq"].as_u64().unwrap_or(0), stream }));
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(frame))) => {
                return Err(format!("closed before the welcome: {:?}", frame.map(|f| u16::from(f.code))));
            }
            Some(Ok(other)) => return Err(format!("unexpected first frame {other:?}")),
            Some(Err(e)) => return Err(format!("reading the welcome: {e}")),
            None => return Err("connection ended before the welcome".into()),
        }
    }
}

/// Runs client `index` of `fleet` until `fleet.stop` is closed or the connection ends.
pub async fn run(fleet: Arc<Fleet>, index: usize, record_latency: bool) -> ClientReport {
    let mut report = ClientReport::default();
    let permit = match &fleet.gate {
        Some(gate) => Some(gate.acquire().await),
        None => None,
    };
    let connected = future::or(async { Some(connect(&fleet.target).await) }, async {
        Timer::after(fleet.connect_timeout).await;
        None
    })
    .await;
    drop(permit);
    let mut ws = match connected {
        Some(Ok((ws, welcome))) => {
            let seq = fleet.since.unwrap_or(welcome.seq);
            report.welcome_seq = seq;
            report.max_seq = seq;
            report.welcomed_at = Some(Instant::now());
            fleet.progress[index].store(seq, Relaxed);
            fleet.welcomed.fetch_add(1, Relaxed);
            ws
        }
        Some(Err(failure)) => return fail(&fleet, index, report, failure),
        None => return fail(&fleet, index, report, "no welcome within 30 s".into()),
    };

    let end = future::or(read_loop(&mut ws, &mut report, &fleet, index, record_latency), async {
        let _ = fleet.stop.recv().await;
        End::Stopped
    })
    .await;
    if end == End::Stopped {
        // Close politely, and wait a little for the server's Close so it sees a clean end.
        let _ = future::or(
            async {
                let _ = ws.close(None).await;
                while let Some(Ok(_)) = ws.next().await {}
            },
            async {
                Timer::after(Duration::from_secs(2)).await;
            },
        )
        .await;
    } else {
        fleet.ended_early.fetch_add(1, Relaxed);
    }
    fleet.progress[index].store(u64::MAX, Relaxed);
    report.end = end;
    report.ended_at = Some(Instant::now());
    report
}

fn fail(fleet: &Fleet, index: usize, mut report: ClientReport, failure: String) -> ClientReport {
    fleet.failed.fetch_add(1, Relaxed);
    fleet.progress[index].store(u64::MAX, Relaxed);
    report.failure = Some(failure);
    report
}

async fn read_loop(
    ws: &mut WebSocketStream<BenchStream>,
    report: &mut ClientReport,
    fleet: &Fleet,
    index: usize,
    record_latency: bool,
) -> End {
    while let Some(message) = ws.next().await {
        match message {
            Ok(Message::Text(text)) => match parse_emergency(text.as_bytes()) {
                Some((seq, t)) => {
                    report.events += 1;
                    report.record_seq(seq);
                    // A resume's replayed emergencies are old by design: only live ones count.
                    let live = fleet.since.is_none() || seq > fleet.catch_up_to;
                    if let (true, true, Some(t)) = (record_latency, live, t) {
                        let us = fleet.now_ns().saturating_sub(t) / 1000;
                        report.latencies_us.push(us.min(u64::from(u32::MAX)) as u32);
                    }
                    fleet.progress[index].store(report.max_seq, Relaxed);
                    if report.caught_up_at.is_none() && report.max_seq >= fleet.catch_up_to {
                        report.caught_up_at = Some(Instant::now());
                    }
                    if fleet.ack
                        && ws.send(Message::text(format!(r#"{{"type":"ack","seq":{seq}}}"#))).await.is_err()
                    {
                        return End::Eof;
                    }
                }
                None if text.starts_with(r#"{"type":"ack""#) => {
                    fleet.acks_seen.fetch_add(1, Relaxed);
                }
                None => report.other_texts += 1,
            },
            Ok(Message::Ping(_)) => {
                let now = Instant::now();
                if let Some(last) = report.last_ping.replace(now) {
                    let gap = now - last;
                    report.max_ping_gap = Some(report.max_ping_gap.map_or(gap, |g| g.max(gap)));
                }
                report.pings += 1;
            }
            Ok(Message::Close(frame)) => {
                let (code, reason) =
                    frame.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or_default();
                return End::ServerClose(code, reason);
            }
            Ok(_) => {}
            Err(error) => return End::Error(error.to_string()),
        }
    }
    End::Eof
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_seq_and_timestamp_without_json() {
        let frame = br#"{"type":"emergencia","seq":42,"received_at":"2026-01-01T00:00:00.000Z","source":"http","data":{"t":123456789,"i":3,"pad":"x"}}"#;
        assert_eq!(parse_emergency(frame), Some((42, Some(123456789))));
        assert_eq!(parse_emergency(br#"{"type":"emergencia","seq":7,"data":{"a":1}}"#), Some((7, None)));
        assert_eq!(parse_emergency(br#"{"type":"pong"}"#), None);
    }

    #[test]
    fn books_duplicates_out_of_order_and_loss() {
        let mut report =
            ClientReport { welcome_seq: 10, welcomed_at: Some(Instant::now()), ..Default::default() };
        for seq in [11, 13, 12, 13, 200] {
            report.record_seq(seq);
        }
        assert_eq!((report.duplicates, report.out_of_order, report.max_seq), (1, 1, 200));
        assert_eq!(report.lost(&[9, 10, 11, 12, 13, 14, 15]), 2);
    }

    #[test]
    fn books_from_since_count_an_old_replay_as_duplicate_and_a_gap_as_loss() {
        // A resuming client's books start at its `since` (150), not at its welcome's seq.
        let mut report =
            ClientReport { welcome_seq: 150, welcomed_at: Some(Instant::now()), ..Default::default() };
        for seq in [150, 151, 153] {
            report.record_seq(seq);
        }
        assert_eq!(report.duplicates, 1);
        assert_eq!(report.lost(&(1..=153).collect::<Vec<_>>()), 1);
    }

    #[test]
    fn parses_targets() {
        let t = Target::parse("ws://127.0.0.1:8000", None, None, None).unwrap();
        assert_eq!(t.ws_url, "ws://127.0.0.1:8000/ws/emergencias");
        let t = Target::parse("ws://127.0.0.1:9/x?y=1", None, None, None).unwrap();
        assert_eq!((t.authority.as_str(), t.ws_url.as_str()), ("127.0.0.1:9", "ws://127.0.0.1:9/x?y=1"));
    }
}
