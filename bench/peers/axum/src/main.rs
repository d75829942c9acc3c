//! resq-bench's tokio + axum peer: the subset of resq-push's protocol that resq-bench uses, on the
//! multi-threaded tokio runtime (its default), a `tokio::sync::broadcast` fan-out and one ping
//! interval per socket. No history, no storage, no auth: see bench/peers/README.md.
//!
//! `resq-peer-axum [--listen 127.0.0.1:8000] [--ping-interval 30] [--pong-timeout 10]`

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::broadcast;

/// Envelopes a subscriber may fall behind before it is dropped (it then reconnects).
const QUEUE: usize = 1024;
/// Each socket's read buffer.
const READ_BUFFER_BYTES: usize = 4096;
/// Bytes a socket's unsent frames may hold.
const MAX_WRITE_BUFFER_BYTES: usize = 1024 * 1024;
/// Largest accepted body, as resq-push's default `--max-body-bytes`.
const MAX_BODY_BYTES: usize = 64 * 1024;

struct Config {
    listen: SocketAddr,
    ping_interval: Duration,
    pong_timeout: Duration,
}

/// Shared by every connection.
struct Hub {
    /// The last seq and the sender, locked together so that seqs go out in order and a new
    /// subscriber's welcome seq is exactly what precedes its first envelope.
    feed: Mutex<(u64, broadcast::Sender<Utf8Bytes>)>,
    next_client: AtomicU64,
    clients: AtomicU64,
    config: Config,
}

fn parse_args() -> Result<Config, String> {
    let mut config = Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
        ping_interval: Duration::from_secs(30),
        pong_timeout: Duration::from_secs(10),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let seconds = || value.parse::<f64>().ok().filter(|s| *s > 0.0).map(Duration::from_secs_f64);
        match flag.as_str() {
            "--listen" => config.listen = value.parse().map_err(|e| format!("--listen {value}: {e}"))?,
            "--ping-interval" => config.ping_interval = seconds().ok_or("bad --ping-interval")?,
            "--pong-timeout" => config.pong_timeout = seconds().ok_or("bad --pong-timeout")?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(config)
}

#[tokio::main]
async fn main() {
    let config = match parse_args() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("resq-peer-axum: {error}");
            std::process::exit(2);
        }
    };
    let listen = config.listen;
    let hub: &'static Hub = Box::leak(Box::new(Hub {
        feed: Mutex::new((0, broadcast::channel(QUEUE).0)),
        next_client: AtomicU64::new(1),
        clients: AtomicU64::new(0),
        config,
    }));
    let app = Router::new()
        .route("/ws/emergencias", get(upgrade))
        .route("/emergencias", post(publish))
        .route("/healthz", get(healthz))
        .with_state(hub);
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("resq-peer-axum: cannot listen on {listen}: {error}");
            std::process::exit(1);
        }
    };
    eprintln!("resq-peer-axum: listening on {listen}");
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { if let Some(t) = term.as_mut() { t.recv().await; } } => {}
        }
    };
    // Open WebSockets do not end a graceful shutdown: the runtime is dropped after the signal.
    tokio::select! {
        _ = axum::serve(listener, app) => {}
        _ = shutdown => {}
    }
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn healthz(State(hub): State<&'static Hub>) -> Response {
    let seq = hub.feed.lock().map(|feed| feed.0).unwrap_or(0);
    let body = format!(r#"{{"status":"ok","clients":{},"seq":{seq}}}"#, hub.clients.load(Relaxed));
    json_response(StatusCode::OK, body)
}

/// `POST /emergencias`: a JSON object, stamped with the next seq, serialized once, broadcast.
async fn publish(State(hub): State<&'static Hub>, body: Bytes) -> Response {
    let refuse =
        |error: &str| json_response(StatusCode::BAD_REQUEST, format!(r#"{{"ok":false,"error":"{error}"}}"#));
    if body.len() > MAX_BODY_BYTES {
        return json_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            r#"{"ok":false,"error":"body too large"}"#.into(),
        );
    }
    let Ok(raw) = serde_json::from_slice::<&serde_json::value::RawValue>(&body) else {
        return refuse("invalid JSON");
    };
    if !raw.get().starts_with('{') {
        return refuse("not a JSON object");
    }
    let received_at = humantime::format_rfc3339_millis(SystemTime::now());
    let Ok(mut feed) = hub.feed.lock() else { return refuse("internal error") };
    feed.0 += 1;
    let seq = feed.0;
    let envelope = format!(
        r#"{{"type":"emergencia","seq":{seq},"received_at":"{received_at}","source":"http","data":{}}}"#,
        raw.get()
    );
    // No subscriber is no error: the emergency is still accepted.
    let _ = feed.1.send(Utf8Bytes::from(envelope));
    drop(feed);
    json_response(StatusCode::ACCEPTED, format!(r#"{{"ok":true,"seq":{seq}}}"#))
}

async fn upgrade(State(hub): State<&'static Hub>, ws: WebSocketUpgrade) -> Response {
    // tungstenite's defaults (a 128 KiB read buffer, writes batched up to 128 KiB) would cost an
    // idle socket over 100 KiB: small buffers as resq-push has, each frame written out at once.
    ws.read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_WRITE_BUFFER_BYTES)
        .max_message_size(16 * 1024)
        .on_upgrade(move |socket| serve(hub, socket))
}

/// One subscriber: the welcome, then broadcast envelopes and pings until either side ends.
async fn serve(hub: &'static Hub, socket: WebSocket) {
    let id = hub.next_client.fetch_add(1, Relaxed);
    let (seq, mut feed) = match hub.feed.lock() {
        Ok(guard) => (guard.0, guard.1.subscribe()),
        Err(_) => return,
    };
    hub.clients.fetch_add(1, Relaxed);
    let (mut sink, mut stream) = socket.split();
    let config = &hub.config;
    let welcome = format!(
        r#"{{"type":"connection","message":"Conectado! listo para recibir emergencias","client_id":{id},"seq":{seq},"ping_interval_ms":{},"pong_timeout_ms":{}}}"#,
        config.ping_interval.as_millis(),
        config.pong_timeout.as_millis()
    );
    if sink.send(Message::Text(welcome.into())).await.is_ok() {
        let mut ping = tokio::time::interval_at(
            tokio::time::Instant::now() + config.ping_interval,
            config.ping_interval,
        );
        let mut last_pong = Instant::now();
        loop {
            tokio::select! {
                envelope = feed.recv() => match envelope {
                    Ok(text) => if sink.send(Message::Text(text)).await.is_err() { break },
                    // Too far behind: close so the tablet reconnects, as resq-push does.
                    Err(_) => break,
                },
                frame = stream.next() => match frame {
                    Some(Ok(Message::Pong(_))) => last_pong = Instant::now(),
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                },
                _ = ping.tick() => {
                    if last_pong.elapsed() > config.ping_interval + config.pong_timeout {
                        break;
                    }
                    if sink.send(Message::Ping(Bytes::new())).await.is_err() { break }
                }
            }
        }
    }
    let _ = sink.close().await;
    hub.clients.fetch_sub(1, Relaxed);
}
