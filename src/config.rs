//! Command-line configuration: every limit the server enforces, with its default and its flag.
//!
//! Defaults suit a Raspberry Pi class board serving a few hundred tablets. `CommandLine::parse`
//! turns the arguments into a checked `Config`, the text `--help` or `--version` prints, or an
//! error naming the flag; `Config::validate` rejects values that would make the server
//! misbehave, so a bad flag fails at start. `help` lays out the `--help` text.

mod help;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use argh::{EarlyExit, FromArgs};

/// Default address for HTTP and WebSocket clients: the port the old backend used.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8000";
/// Default connections the kernel queues before the server accepts them: a site's tablets all
/// reconnecting at once after a Wi-Fi outage must not overflow it (a dropped SYN is retried only
/// after a second). Linux caps it at `net.core.somaxconn`, 4096 by default since 5.4.
pub const DEFAULT_LISTEN_BACKLOG: u32 = 4096;
/// Default seconds between server WebSocket pings.
pub const DEFAULT_PING_INTERVAL_SECS: f64 = 30.0;
/// Default seconds a client has to answer a ping (with anything) before it is dropped.
pub const DEFAULT_PONG_TIMEOUT_SECS: f64 = 10.0;
/// Default number of emergencies kept for catch-up.
pub const DEFAULT_HISTORY: usize = 1000;
/// Default age after which an emergency leaves the history: a week.
pub const DEFAULT_HISTORY_MAX_AGE_SECS: f64 = 7.0 * 86_400.0;
/// Default directory of the durable history, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "data";
/// Default bytes of serialized emergencies kept for catch-up.
pub const DEFAULT_HISTORY_BYTES: usize = 16 * 1024 * 1024;
/// Default largest emergency accepted: an HTTP body or one Unix-socket line.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;
/// Default bytes of emergencies in flight at once (read, checked, waiting for the disk and the
/// hub): 256 of the largest, or thousands of ordinary ones. Each is held about twice while in
/// flight (its body, then its envelope), so with the full history and every connection open the
/// process stays well under the unit's `MemoryMax` (BENCHMARKS.md, "Memory under concurrent
/// large publishes").
pub const DEFAULT_MAX_INFLIGHT_BYTES: usize = 16 * 1024 * 1024;
/// Default largest `GET /emergencias` response; a poller asks again from the last seq it got.
pub const DEFAULT_MAX_POLL_BYTES: usize = 1024 * 1024;
/// Upper bound for `--max-body-bytes`, so size arithmetic stays far from overflow.
pub const MAX_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Default largest HTTP request head (request line and headers).
pub const DEFAULT_MAX_HEAD_BYTES: usize = 8 * 1024;
/// Default seconds to receive a whole HTTP request (head and body).
pub const DEFAULT_HEADER_TIMEOUT_SECS: f64 = 10.0;
/// Default slowest request body, in bytes a second on average (after a second's grace), that
/// keeps its connection from being evicted when `--max-http-connections` are open: a body
/// trickling below it is a slot held for nothing. 1 KiB/s is far below any working network.
pub const DEFAULT_MIN_BODY_RATE: usize = 1024;
/// Default seconds a write to a client may take before the client is dropped.
pub const DEFAULT_WRITE_TIMEOUT_SECS: f64 = 10.0;
/// Default live events a WebSocket client may fall behind before it counts as too slow and is dropped.
/// Half of it is how far publishing runs ahead of the fan-out (`Config::publish_burst`): 32, one
/// write batch (`ws::frame::WRITE_BATCH_FRAMES`), so that a burst of publishes reaches each client
/// in writes of up to 32 frames. A client's queue is a place in the shared ring, not a copy: the
/// ring holds at most this many emergencies more than `--history`.
pub const DEFAULT_QUEUE: usize = 64;
/// Default connected WebSocket clients.
pub const DEFAULT_MAX_CLIENTS: usize = 1000;
/// Default HTTP connections that are not (yet) WebSocket clients, including those mid-head.
pub const DEFAULT_MAX_HTTP_CONNECTIONS: usize = 1024;
/// Default simultaneous Unix-socket publisher connections.
pub const DEFAULT_MAX_UNIX_CONNECTIONS: usize = 32;
/// Default largest message a WebSocket client may send (clients send only pings, and later acks).
pub const DEFAULT_MAX_CLIENT_MESSAGE_BYTES: usize = 4096;
/// Default kernel send buffer of a WebSocket client: one write batch (`ws::session` writes at most
/// 64 KiB at a time). What a client that stopped reading leaves queued stays in kernel memory
/// until `--write-timeout`; left to autotuning it grew to 1 MiB a client on loopback.
pub const DEFAULT_CLIENT_SEND_BUFFER_BYTES: usize = 64 * 1024;
/// The smallest `--client-send-buffer` other than 0: Linux rounds less up to about half of it.
pub const MIN_CLIENT_SEND_BUFFER_BYTES: usize = 8192;
/// The largest `--client-send-buffer`.
pub const MAX_CLIENT_SEND_BUFFER_BYTES: usize = 64 * 1024 * 1024;

/// Default status notices (acks, closes, escalations) a client may fall behind before it is
/// dropped as too slow: every tablet's first ack of every emergency is one, so a site of 1000
/// tablets acking a burst needs room for thousands. About 120 bytes each, held once for all.
pub const DEFAULT_STATUS_QUEUE: usize = 8192;
/// Default open (not closed) emergencies kept beyond the history and resent to fresh tablets.
pub const DEFAULT_MAX_OPEN: usize = 1000;
/// Default bytes of envelopes the open emergencies may hold in memory (beyond the history's).
pub const DEFAULT_MAX_OPEN_BYTES: usize = 16 * 1024 * 1024;
/// Default pipelined `POST /emergencias` an HTTP connection takes in before it answers the first,
/// so that they share one commit (as a Unix-socket burst does); 1 answers each before the next.
pub const DEFAULT_HTTP_PIPELINE: usize = 16;
/// The largest `--http-pipeline`: the journal's queue (`store::journal::MAX_QUEUED`) is 4096.
pub const MAX_HTTP_PIPELINE: usize = 1024;
/// Default receipts per emergency of connections without a token name (open subscribing).
pub const DEFAULT_MAX_UNNAMED_RECEIPTS: usize = 64;
/// Default `--on-unacked` commands running at once; more wait their turn.
pub const DEFAULT_MAX_ESCALATION_CHILDREN: usize = 4;
/// Default seconds an `--on-unacked` command may run before it is killed.
pub const DEFAULT_ESCALATION_TIME_LIMIT_SECS: f64 = 30.0;

/// Default JetStream stream of a site (`--nats-stream`).
pub const DEFAULT_NATS_STREAM: &str = "RESQ";
/// Default replicas of the stream when a box creates it (`--nats-replicas`): a three-node cluster.
pub const DEFAULT_NATS_REPLICAS: usize = 3;
/// JetStream keeps at most 5 replicas of a stream.
pub const MAX_NATS_REPLICAS: usize = 5;
/// Default seconds a publish waits for the engine's ack, then for this box to have it (`--nats-timeout`).
pub const DEFAULT_NATS_TIMEOUT_SECS: f64 = 5.0;
/// Default publishes, acks and closes waiting for the `nats` thread (`--nats-queue`): past it an
/// HTTP publish is refused at once (503) rather than queued behind an engine that does not answer.
pub const DEFAULT_NATS_QUEUE: usize = 1024;

/// resq-push: WebSocket push server for emergency dispatch sites. Tablets connect to
/// /ws/emergencias; local apps publish over a Unix socket or POST /emergencias.
#[derive(FromArgs, Debug, Clone)]
pub struct Config {
    /// address for HTTP and WebSocket clients: IP:PORT, [IPv6]:PORT, localhost:PORT, or :PORT
    /// for every interface (0.0.0.0:PORT) (default 0.0.0.0:8000)
    #[argh(option, default = "default_listen()", from_str_fn(parse_listen))]
    pub listen: SocketAddr,

    /// connections the kernel queues before they are accepted (default 4096; the kernel caps it at
    /// net.core.somaxconn)
    #[argh(option, default = "DEFAULT_LISTEN_BACKLOG")]
    pub listen_backlog: u32,

    /// address for HTTPS and wss:// clients, beside the plain listener, in the same forms; needs
    /// the certificate and key below (default: none)
    #[argh(option, from_str_fn(parse_listen))]
    pub tls_listen: Option<SocketAddr>,

    /// PEM file of the server's certificate, then the chain up to its CA, for the TLS
    /// listener; reloaded on SIGHUP
    #[argh(option)]
    pub tls_cert: Option<PathBuf>,

    /// PEM file of that certificate's private key (PKCS#8, SEC1 or PKCS#1); reloaded on SIGHUP
    #[argh(option)]
    pub tls_key: Option<PathBuf>,

    /// PEM file of the site CA certificate, served to anyone as GET /ca.crt so that a tablet
    /// can install it (default: none, /ca.crt is 404)
    #[argh(option)]
    pub ca_cert: Option<PathBuf>,

    /// unix socket for newline-delimited JSON publishing (default: none)
    #[argh(option)]
    pub unix_socket: Option<PathBuf>,

    /// seconds between WebSocket pings to each client, fractions allowed (default 30)
    #[argh(option, default = "secs(DEFAULT_PING_INTERVAL_SECS)", from_str_fn(parse_seconds))]
    pub ping_interval: Duration,

    /// seconds a client has to answer a ping before it is dropped (default 10)
    #[argh(option, default = "secs(DEFAULT_PONG_TIMEOUT_SECS)", from_str_fn(parse_seconds))]
    pub pong_timeout: Duration,

    /// emergencies kept for catch-up with ?since= (default 1000)
    #[argh(option, default = "DEFAULT_HISTORY")]
    pub history: usize,

    /// seconds an emergency stays in the history, on disk and in memory (default 604800, a week)
    #[argh(option, default = "secs(DEFAULT_HISTORY_MAX_AGE_SECS)", from_str_fn(parse_age))]
    pub history_max_age: Duration,

    /// directory of the durable history; created if missing (default ./data)
    #[argh(option, default = "PathBuf::from(DEFAULT_DATA_DIR)")]
    pub data_dir: PathBuf,

    /// keep the history in memory only: lost at restart (tests, diskless boards)
    #[argh(switch)]
    pub in_memory: bool,

    /// bytes of emergencies kept in memory for catch-up; the oldest go first (default 16 MiB)
    #[argh(option, default = "DEFAULT_HISTORY_BYTES")]
    pub history_bytes: usize,

    /// largest emergency accepted, as an HTTP body or a Unix-socket line (default 65536)
    #[argh(option, default = "DEFAULT_MAX_BODY_BYTES")]
    pub max_body_bytes: usize,

    /// bytes of emergencies being published at once, over HTTP and the Unix socket; more wait
    /// their turn, then get 503 (default 16 MiB; at least --max-body-bytes)
    #[argh(option, default = "DEFAULT_MAX_INFLIGHT_BYTES")]
    pub max_inflight_bytes: usize,

    /// largest GET /emergencias response in bytes (default 1 MiB)
    #[argh(option, default = "DEFAULT_MAX_POLL_BYTES")]
    pub max_poll_bytes: usize,

    /// largest HTTP request head in bytes (default 8192)
    #[argh(option, default = "DEFAULT_MAX_HEAD_BYTES")]
    pub max_head_bytes: usize,

    /// seconds a client has to send a whole HTTP request, head and body (default 10)
    #[argh(option, default = "secs(DEFAULT_HEADER_TIMEOUT_SECS)", from_str_fn(parse_seconds))]
    pub header_timeout: Duration,

    /// bytes a second an HTTP request body must average, after its first second, for its
    /// connection not to be closed for a new one when --max-http-connections are open; 0: no
    /// minimum (default 1024)
    #[argh(option, default = "DEFAULT_MIN_BODY_RATE")]
    pub min_body_rate: usize,

    /// seconds one write to a client may take before it is dropped (default 10)
    #[argh(option, default = "secs(DEFAULT_WRITE_TIMEOUT_SECS)", from_str_fn(parse_seconds))]
    pub write_timeout: Duration,

    /// live events a WebSocket client may fall behind before it is dropped (default 64)
    #[argh(option, default = "DEFAULT_QUEUE")]
    pub queue: usize,

    /// connected WebSocket clients; more are refused with 503 (default 1000)
    #[argh(option, default = "DEFAULT_MAX_CLIENTS")]
    pub max_clients: usize,

    /// open HTTP connections that are not WebSocket clients (default 1024)
    #[argh(option, default = "DEFAULT_MAX_HTTP_CONNECTIONS")]
    pub max_http_connections: usize,

    /// open Unix-socket publisher connections (default 32)
    #[argh(option, default = "DEFAULT_MAX_UNIX_CONNECTIONS")]
    pub max_unix_connections: usize,

    /// file of tokens (`TOKEN` or `NAME TOKEN` per line) that POST /emergencias must present as
    /// `Authorization: Bearer`; reloaded on SIGHUP (default: publishing over HTTP is open)
    #[argh(option)]
    pub publish_token_file: Option<PathBuf>,

    /// file of tokens that WebSocket clients and pollers must present, as ?token= or
    /// `Authorization: Bearer`; reloaded on SIGHUP (default: listening is open)
    #[argh(option)]
    pub subscribe_token_file: Option<PathBuf>,

    /// browser origin allowed to open WebSockets and call the HTTP API cross-origin, e.g.
    /// https://console.example or http://10.0.0.5:3000; repeatable (default: any origin may
    /// connect, no CORS headers)
    #[argh(option, from_str_fn(parse_origin))]
    pub allowed_origin: Vec<String>,

    /// largest message a WebSocket client may send, in bytes (default 4096)
    #[argh(option, default = "DEFAULT_MAX_CLIENT_MESSAGE_BYTES")]
    pub max_client_message_bytes: usize,

    /// kernel send buffer of each WebSocket client in bytes, at most twice net.core.wmem_max:
    /// the kernel memory a client that stops reading holds until its write times out; 0 leaves
    /// it to the kernel's autotuning (default 65536)
    #[argh(option, default = "DEFAULT_CLIENT_SEND_BUFFER_BYTES")]
    pub client_send_buffer: usize,

    /// address of a reverse proxy (a TLS terminator) whose X-Forwarded-For or Forwarded header
    /// names the client, or a block of them like 10.0.0.0/8; repeatable (default: none, every
    /// client is the address it connects from)
    #[argh(option, from_str_fn(parse_trusted_proxy))]
    pub trusted_proxy: Vec<IpBlock>,

    /// status notices (acks, closes, escalations) a client may fall behind before it is
    /// dropped (default 8192)
    #[argh(option, default = "DEFAULT_STATUS_QUEUE")]
    pub status_queue: usize,

    /// open emergencies kept, however old, and sent first to every fresh tablet; past it the
    /// oldest open one is let go with a warning (default 1000)
    #[argh(option, default = "DEFAULT_MAX_OPEN")]
    pub max_open: usize,

    /// bytes of emergencies the open ones may hold in memory; past it the oldest open one is let
    /// go (default 16 MiB)
    #[argh(option, default = "DEFAULT_MAX_OPEN_BYTES")]
    pub max_open_bytes: usize,

    /// pipelined POST /emergencias requests of one HTTP connection stored together before the
    /// first is answered, so that they share a commit; 1: each answered before the next is read
    /// (default 16, at most 1024)
    #[argh(option, default = "DEFAULT_HTTP_PIPELINE")]
    pub http_pipeline: usize,

    /// receipts kept per emergency for connections without a token name (default 64)
    #[argh(option, default = "DEFAULT_MAX_UNNAMED_RECEIPTS")]
    pub max_unnamed_receipts: usize,

    /// seconds after which an emergency nobody acked escalates: a warning, an `unacked`
    /// broadcast and --on-unacked (default: never)
    #[argh(option, from_str_fn(parse_seconds))]
    pub ack_timeout: Option<Duration>,

    /// command run (by /bin/sh -c) once for each escalated emergency, with its envelope on stdin
    /// and RESQ_SEQ, RESQ_STREAM in the environment (default: none)
    #[argh(option)]
    pub on_unacked: Option<String>,

    /// how many --on-unacked commands may run at once; more wait (default 4)
    #[argh(option, default = "DEFAULT_MAX_ESCALATION_CHILDREN")]
    pub max_escalation_children: usize,

    /// seconds each --on-unacked command may run before it is killed (default 30)
    #[argh(option, default = "secs(DEFAULT_ESCALATION_TIME_LIMIT_SECS)", from_str_fn(parse_seconds))]
    pub escalation_time_limit: Duration,

    /// connected clients below which /healthz answers 503 "degraded" (default: no minimum)
    #[argh(option)]
    pub min_subscribers: Option<usize>,

    /// NATS servers of the cluster's engine, nats://HOST:PORT or tls://HOST:PORT, comma
    /// separated: cluster mode, several boxes on one history in JetStream (default: none, one
    /// box; needs a build with the cargo feature cluster)
    #[argh(option, from_str_fn(parse_nats_urls))]
    pub nats: Option<NatsUrls>,

    /// the site's JetStream stream: emergencies on NAME.emergencias, acks and closes on
    /// NAME.receipts in the stream NAME_RECEIPTS (default RESQ)
    #[argh(option, default = "DEFAULT_NATS_STREAM.to_owned()", from_str_fn(parse_stream_name))]
    pub nats_stream: String,

    /// replicas of the streams when this box creates them, 1 to 5 (default 3)
    #[argh(option, default = "DEFAULT_NATS_REPLICAS")]
    pub nats_replicas: usize,

    /// file holding the NATS token (default: none)
    #[argh(option)]
    pub nats_token: Option<PathBuf>,

    /// NATS user name; its password comes from --nats-password-file (default: none)
    #[argh(option)]
    pub nats_user: Option<String>,

    /// file holding the password of --nats-user
    #[argh(option)]
    pub nats_password_file: Option<PathBuf>,

    /// NATS credentials file (a user JWT and its NKey seed) (default: none)
    #[argh(option)]
    pub nats_creds: Option<PathBuf>,

    /// PEM file of the CA that signed the NATS servers' certificates, for tls:// URLs
    /// (default: the system's roots)
    #[argh(option)]
    pub nats_ca_cert: Option<PathBuf>,

    /// seconds a publish waits for the engine's ack, and then for this box to have the
    /// emergency, before it is answered 503 (default 5)
    #[argh(option, default = "secs(DEFAULT_NATS_TIMEOUT_SECS)", from_str_fn(parse_seconds))]
    pub nats_timeout: Duration,

    /// publishes, acks and closes waiting for the engine's thread; past it HTTP publishes get
    /// 503 and Unix publishers wait (default 1024)
    #[argh(option, default = "DEFAULT_NATS_QUEUE")]
    pub nats_queue: usize,

    /// this box's name in logs, /healthz and escalation claims (default: the host name)
    #[argh(option, from_str_fn(parse_box_name))]
    pub box_name: Option<String>,

    /// print the version and exit
    #[argh(switch)]
    pub version: bool,
}

/// The NATS servers of `--nats`, each `nats://HOST:PORT` or `tls://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsUrls(pub Vec<String>);

fn parse_nats_urls(text: &str) -> Result<NatsUrls, String> {
    let mut urls = Vec::new();
    for url in text.split(',').map(str::trim).filter(|url| !url.is_empty()) {
        let rest = url
            .strip_prefix("nats://")
            .or_else(|| url.strip_prefix("tls://"))
            .ok_or_else(|| format!("'{url}' must start with nats:// or tls://"))?;
        let address = rest.rsplit('@').next().unwrap_or(rest);
        let (host, port) = address.rsplit_once(':').ok_or_else(|| format!("'{url}' needs a :PORT"))?;
        if host.is_empty() || port.parse::<u16>().is_err() || address.contains('/') {
            return Err(format!("'{url}' is not nats://HOST:PORT or tls://HOST:PORT"));
        }
        if rest.contains('@') {
            return Err(format!(
                "'{url}': no credentials in the URL (they would show in ps): use --nats-token, \
                 --nats-user with --nats-password-file, or --nats-creds"
            ));
        }
        urls.push(url.to_owned());
    }
    if urls.is_empty() {
        return Err("needs at least one nats://HOST:PORT".into());
    }
    Ok(NatsUrls(urls))
}

/// A stream name JetStream takes, that also makes a subject token: letters, digits, `-`, `_`.
fn parse_stream_name(text: &str) -> Result<String, String> {
    let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if text.is_empty() || text.len() > 64 || !text.chars().all(valid) {
        return Err(format!("'{text}' must be 1 to 64 letters, digits, '-' or '_'"));
    }
    Ok(text.to_owned())
}

fn parse_box_name(text: &str) -> Result<String, String> {
    let valid = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
    if text.is_empty() || text.len() > 64 || !text.chars().all(valid) {
        return Err(format!("'{text}' must be 1 to 64 letters, digits, '-', '_' or '.'"));
    }
    Ok(text.to_owned())
}

/// What the command line asks for.
#[derive(Debug)]
pub enum CommandLine {
    /// Serve with this configuration, already validated.
    Serve(Box<Config>),
    /// Print this on stdout and exit 0: the answer to `--help` or `--version`.
    Print(String),
    /// Do not start: the message names the flag to fix.
    Invalid(String),
}

impl CommandLine {
    /// Parses the arguments after the program's name.
    pub fn parse(args: &[&str]) -> CommandLine {
        match Config::from_args(&["resq-push"], args) {
            Ok(config) if config.version => {
                CommandLine::Print(format!("resq-push {}\n", env!("CARGO_PKG_VERSION")))
            }
            Ok(config) => match config.validate() {
                Ok(()) => CommandLine::Serve(Box::new(config)),
                Err(message) => CommandLine::Invalid(message),
            },
            Err(EarlyExit { output, status: Ok(()) }) => CommandLine::Print(help::readable(&output)),
            Err(EarlyExit { output, status: Err(()) }) => CommandLine::Invalid(format!(
                "{} (resq-push --help lists the flags)",
                output.trim_end().trim_end_matches('.')
            )),
        }
    }
}

impl Config {
    /// How many emergencies may be published before publishing waits for every woken session to
    /// write (`scheduler::FanOut`). Half a queue: a client that writes whenever it is woken never
    /// falls `--queue` behind, and a burst reaches each client in one write of several frames
    /// instead of one write per frame.
    pub fn publish_burst(&self) -> usize {
        (self.queue / 2).max(1)
    }

    /// Checks the values together; the error names the flag to fix.
    pub fn validate(&self) -> Result<(), String> {
        let positive_counts = [
            ("--history", self.history),
            ("--history-bytes", self.history_bytes),
            ("--max-body-bytes", self.max_body_bytes),
            ("--max-poll-bytes", self.max_poll_bytes),
            ("--queue", self.queue),
            ("--max-clients", self.max_clients),
            ("--max-http-connections", self.max_http_connections),
            ("--max-unix-connections", self.max_unix_connections),
            ("--status-queue", self.status_queue),
            ("--max-escalation-children", self.max_escalation_children),
            ("--nats-queue", self.nats_queue),
        ];
        for (flag, value) in positive_counts {
            if value == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        if self.max_body_bytes > MAX_MAX_BODY_BYTES {
            return Err(format!("--max-body-bytes must be at most {MAX_MAX_BODY_BYTES}"));
        }
        if self.max_inflight_bytes < self.max_body_bytes {
            return Err("--max-inflight-bytes must be at least --max-body-bytes".into());
        }
        if !(1..=MAX_HTTP_PIPELINE).contains(&self.http_pipeline) {
            return Err(format!("--http-pipeline must be from 1 to {MAX_HTTP_PIPELINE}"));
        }
        if self.max_head_bytes < 256 {
            return Err("--max-head-bytes must be at least 256".into());
        }
        if self.max_client_message_bytes < 128 {
            return Err("--max-client-message-bytes must be at least 128".into());
        }
        let send_buffers = MIN_CLIENT_SEND_BUFFER_BYTES..=MAX_CLIENT_SEND_BUFFER_BYTES;
        if self.client_send_buffer != 0 && !send_buffers.contains(&self.client_send_buffer) {
            return Err(format!(
                "--client-send-buffer must be 0 (the kernel's own sizing) or {MIN_CLIENT_SEND_BUFFER_BYTES} to \
                 {MAX_CLIENT_SEND_BUFFER_BYTES}"
            ));
        }
        match (self.tls_listen.is_some(), self.tls_cert.is_some(), self.tls_key.is_some()) {
            (true, true, true) | (false, false, false) => {}
            (true, _, _) => return Err("--tls-listen needs both --tls-cert and --tls-key".into()),
            (false, _, _) => return Err("--tls-cert and --tls-key go with --tls-listen".into()),
        }
        if cfg!(not(feature = "tls")) && self.tls_listen.is_some() {
            return Err("--tls-listen: this resq-push was built without TLS (the cargo feature tls)".into());
        }
        if self.tls_listen.is_some() && self.tls_listen == Some(self.listen) && self.listen.port() != 0 {
            return Err("--tls-listen must differ from --listen: a port is plain or TLS".into());
        }
        self.validate_cluster()?;
        if self.on_unacked.is_some() && self.ack_timeout.is_none() {
            return Err("--on-unacked needs --ack-timeout".into());
        }
        let has_tokens = self.publish_token_file.is_some() || self.subscribe_token_file.is_some();
        if has_tokens && self.allowed_origin.iter().any(|origin| origin == "*") {
            return Err("--allowed-origin '*' cannot be combined with token files: list the origins".into());
        }
        let positive_durations = [
            ("--ping-interval", self.ping_interval),
            ("--pong-timeout", self.pong_timeout),
            ("--header-timeout", self.header_timeout),
            ("--write-timeout", self.write_timeout),
            ("--escalation-time-limit", self.escalation_time_limit),
            ("--nats-timeout", self.nats_timeout),
            ("--ack-timeout", self.ack_timeout.unwrap_or(Duration::MAX)),
        ];
        for (flag, value) in positive_durations {
            if value < Duration::from_millis(10) {
                return Err(format!("{flag} must be at least 0.01 seconds"));
            }
        }
        Ok(())
    }
}

impl Config {
    /// The cluster flags together: refused in a build without the feature, credentials given
    /// one way only, and a local cache to follow the stream into.
    fn validate_cluster(&self) -> Result<(), String> {
        let credentials = [
            ("--nats-token", self.nats_token.is_some()),
            ("--nats-user", self.nats_user.is_some()),
            ("--nats-creds", self.nats_creds.is_some()),
        ];
        let given: Vec<&str> =
            credentials.iter().filter(|(_, given)| *given).map(|(flag, _)| *flag).collect();
        if self.nats.is_none() {
            let any = !given.is_empty() || self.nats_password_file.is_some() || self.nats_ca_cert.is_some();
            return if any { Err("the --nats-* credentials go with --nats".into()) } else { Ok(()) };
        }
        if cfg!(not(feature = "cluster")) {
            return Err(
                "--nats: this resq-push was built without cluster mode (the cargo feature cluster)".into()
            );
        }
        if given.len() > 1 {
            return Err(format!("{} and {}: give the NATS credentials one way", given[0], given[1]));
        }
        if self.nats_user.is_some() != self.nats_password_file.is_some() {
            return Err("--nats-user and --nats-password-file go together".into());
        }
        if self.in_memory {
            return Err("--nats needs --data-dir (its cache of the stream), not --in-memory".into());
        }
        if !(1..=MAX_NATS_REPLICAS).contains(&self.nats_replicas) {
            return Err(format!("--nats-replicas must be 1 to {MAX_NATS_REPLICAS}"));
        }
        Ok(())
    }
}

/// An IP address, or a block of them in CIDR notation (`10.0.0.0/8`, `fd00::/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpBlock {
    first: IpAddr,
    prefix_len: u32,
}

impl IpBlock {
    /// Parses `192.0.2.1`, `2001:db8::1`, `10.0.0.0/8` or `fd00::/8`. A block with bits set
    /// beyond its prefix is refused: `10.1.2.3/8` is more likely a typo than a wish.
    pub fn parse(text: &str) -> Result<IpBlock, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let not_an_address = || "not an IP address or a block like 10.0.0.0/8".to_owned();
        let first = address.trim().parse::<IpAddr>().map_err(|_| not_an_address())?.to_canonical();
        let bits = address_bits(first);
        let prefix_len = match prefix {
            None => bits,
            Some(prefix) => prefix
                .parse()
                .ok()
                .filter(|len| *len <= bits)
                .ok_or_else(|| format!("the prefix length must be 0 to {bits}"))?,
        };
        let block = IpBlock { first, prefix_len };
        let network = IpBlock { first: block.network_of(first), prefix_len };
        if network != block {
            return Err(format!("bits set beyond the prefix; did you mean {network}?"));
        }
        Ok(block)
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        let address = address.to_canonical();
        address.is_ipv4() == self.first.is_ipv4() && self.network_of(address) == self.first
    }

    /// `address` with the bits beyond this block's prefix cleared.
    fn network_of(&self, address: IpAddr) -> IpAddr {
        let beyond = address_bits(address).saturating_sub(self.prefix_len);
        match address {
            IpAddr::V4(v4) => {
                Ipv4Addr::from(u32::from(v4) & u32::MAX.checked_shl(beyond).unwrap_or(0)).into()
            }
            IpAddr::V6(v6) => {
                Ipv6Addr::from(u128::from(v6) & u128::MAX.checked_shl(beyond).unwrap_or(0)).into()
            }
        }
    }
}

fn address_bits(address: IpAddr) -> u32 {
    if address.is_ipv4() { 32 } else { 128 }
}

impl fmt::Display for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.first, self.prefix_len)
    }
}

/// Parses one `--trusted-proxy`: an address or a CIDR block (`IpBlock::parse`).
pub fn parse_trusted_proxy(text: &str) -> Result<IpBlock, String> {
    IpBlock::parse(text)
}

fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN.parse().unwrap_or_else(|_| unreachable!("DEFAULT_LISTEN is a valid address"))
}

/// Parses `--listen`: an IP address with a port, `localhost:PORT` (127.0.0.1) or `:PORT` (every
/// IPv4 interface). Other host names are refused rather than looked up: which address a name
/// resolves to on a dispatch site's network is a guess the operator should not have to debug.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let Some((host, port)) = text.rsplit_once(':').filter(|_| !text.ends_with(']')) else {
        return Err(format!("'{text}' has no port: give IP:PORT, localhost:PORT or :PORT"));
    };
    let port: u16 = port.parse().map_err(|_| format!("'{port}' is not a port number (0 to 65535)"))?;
    let ip = match host {
        "" => Ipv4Addr::UNSPECIFIED,
        host if host.eq_ignore_ascii_case("localhost") => Ipv4Addr::LOCALHOST,
        host if host.parse::<IpAddr>().is_ok() => {
            return Err(format!("'{text}': write an IPv6 address in brackets, like [{host}]:{port}"));
        }
        host => {
            return Err(format!(
                "'{host}' is a host name; give an IP address (like 192.168.1.10:{port}), \
                 localhost:{port}, or :{port} for every interface"
            ));
        }
    };
    Ok(SocketAddr::from((ip, port)))
}

/// Parses `--allowed-origin` into the form a browser sends as `Origin` (RFC 6454):
/// `scheme://host[:port]`, scheme and host in lower case, without the scheme's default port.
/// One trailing `/` is forgiven, as in a URL copied from the address bar; a path, query,
/// fragment or user name never appears in an `Origin`, so it would lock every browser out.
pub fn parse_origin(text: &str) -> Result<String, String> {
    if text == "*" {
        return Ok(text.to_owned());
    }
    let only = "an origin is only scheme://host[:port]";
    let Some((scheme, rest)) = text.split_once("://") else {
        return Err(format!(
            "'{text}' is not an origin: give a scheme and host, like https://console.example"
        ));
    };
    if !is_scheme(scheme) {
        return Err(format!("'{text}': '{scheme}' is not a URL scheme"));
    }
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if let Some(start) = authority.find(['/', '?', '#']) {
        let extra = &authority[start..];
        return Err(format!("'{text}' has a path, query or fragment ('{extra}'): {only}"));
    }
    if authority.contains('@') {
        return Err(format!("'{text}' has a user name or password: {only}"));
    }
    let (host, port) =
        split_port(authority).map_err(|port| format!("'{text}': '{port}' is not a port number"))?;
    if host.is_empty() {
        return Err(format!("'{text}' has no host: {only}"));
    }
    if !is_host(host) {
        return Err(format!(
            "'{text}': '{host}' is not a host name or IP address (write an international name in its xn-- form)"
        ));
    }
    let (scheme, host) = (scheme.to_ascii_lowercase(), host.to_ascii_lowercase());
    Ok(match port.filter(|port| Some(*port) != default_port(&scheme)) {
        Some(port) => format!("{scheme}://{host}:{port}"),
        None => format!("{scheme}://{host}"),
    })
}

fn is_scheme(text: &str) -> bool {
    text.starts_with(|c: char| c.is_ascii_alphabetic())
        && text.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
}

/// A DNS name, an IPv4 address or a bracketed IPv6 address.
fn is_host(text: &str) -> bool {
    match text.strip_prefix('[').and_then(|rest| rest.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => text.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)),
    }
}

/// Splits `host[:port]` (an IPv6 host keeps its brackets); the error is the port that is not a
/// number.
fn split_port(authority: &str) -> Result<(&str, Option<u16>), &str> {
    match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => {
            port.parse().map(|port| (host, Some(port))).map_err(|_| port)
        }
        _ => Ok((authority, None)),
    }
}

/// The port a browser leaves out of `Origin` for `scheme`.
fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

fn secs(value: f64) -> Duration {
    Duration::from_secs_f64(value)
}

/// Parses an age in seconds, up to ten years.
fn parse_age(text: &str) -> Result<Duration, String> {
    let value: f64 = text.trim().parse().map_err(|_| format!("'{text}' is not a number of seconds"))?;
    if !(1.0..=10.0 * 365.0 * 86_400.0).contains(&value) {
        return Err(format!("'{text}' must be between 1 second and ten years"));
    }
    Ok(Duration::from_secs_f64(value))
}

/// Parses seconds such as `30` or `0.25`.
fn parse_seconds(text: &str) -> Result<Duration, String> {
    let value: f64 = text.trim().parse().map_err(|_| format!("'{text}' is not a number of seconds"))?;
    if !(0.0..=86_400.0).contains(&value) {
        return Err(format!("'{text}' must be between 0 and 86400 seconds"));
    }
    Ok(Duration::from_secs_f64(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        Config::from_args(&["resq-push"], args).map_err(|early| early.output)
    }

    /// Why `CommandLine::parse` refuses `args`, or `None` if it serves.
    fn refusal(args: &[&str]) -> Option<String> {
        match CommandLine::parse(args) {
            CommandLine::Invalid(message) => Some(message),
            _ => None,
        }
    }

    #[test]
    fn nats_urls_are_nats_or_tls_with_a_port_and_no_credentials() {
        let urls = parse_nats_urls("nats://10.0.0.1:4222, tls://nats.site:4443").unwrap();
        assert_eq!(urls.0, ["nats://10.0.0.1:4222", "tls://nats.site:4443"]);
        for bad in ["10.0.0.1:4222", "nats://host", "nats://:4222", "nats://host:x", "http://h:1", ","] {
            assert!(parse_nats_urls(bad).is_err(), "{bad}");
        }
        let secret = parse_nats_urls("nats://user:pass@host:4222").unwrap_err();
        assert!(secret.contains("no credentials in the URL"), "{secret}");
        assert!(parse_stream_name("RESQ-site_1").is_ok());
        assert!(parse_stream_name("a.b").is_err() && parse_stream_name("").is_err());
    }

    #[test]
    fn the_cluster_flags_go_together() {
        let nats = ["--nats", "nats://127.0.0.1:4222"];
        assert_eq!(
            refusal(&["--nats-token", "/t"]).as_deref(),
            Some("the --nats-* credentials go with --nats")
        );
        if cfg!(feature = "cluster") {
            assert_eq!(refusal(&nats), None);
            let both = refusal(&[&nats[..], &["--nats-token", "/t", "--nats-creds", "/c"]].concat());
            assert!(both.is_some_and(|m| m.contains("one way")));
            let user = refusal(&[&nats[..], &["--nats-user", "u"]].concat());
            assert_eq!(user.as_deref(), Some("--nats-user and --nats-password-file go together"));
            let memory = refusal(&[&nats[..], &["--in-memory"]].concat());
            assert!(memory.is_some_and(|m| m.contains("--data-dir")));
            let replicas = refusal(&[&nats[..], &["--nats-replicas", "6"]].concat());
            assert_eq!(replicas.as_deref(), Some("--nats-replicas must be 1 to 5"));
        } else {
            let refused = refusal(&nats).unwrap_or_default();
            assert!(refused.contains("built without cluster mode (the cargo feature cluster)"), "{refused}");
        }
    }

    #[test]
    fn defaults_are_valid() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.ping_interval, Duration::from_secs(30));
        assert_eq!(config.pong_timeout, Duration::from_secs(10));
        config.validate().unwrap();
    }

    #[test]
    fn fractional_seconds_are_accepted() {
        let config = parse(&["--ping-interval", "0.25"]).unwrap();
        assert_eq!(config.ping_interval, Duration::from_millis(250));
    }

    #[test]
    fn the_command_line_says_what_to_do() {
        assert!(matches!(CommandLine::parse(&["--in-memory"]), CommandLine::Serve(_)));
        let version = CommandLine::parse(&["--version"]);
        assert!(
            matches!(&version, CommandLine::Print(text) if text.starts_with("resq-push 0.")),
            "{version:?}"
        );
        let help = CommandLine::parse(&["--help"]);
        assert!(matches!(&help, CommandLine::Print(text) if text.starts_with("Usage: ")), "{help:?}");
        for (args, flag) in [
            (&["--bogus"][..], "--bogus"),
            (&["--queue"][..], "--queue"),
            (&["--queue", "x"][..], "--queue"),
            (&["--queue", "0"][..], "--queue"),
        ] {
            let invalid = CommandLine::parse(args);
            assert!(
                matches!(&invalid, CommandLine::Invalid(message) if message.contains(flag)),
                "{invalid:?}"
            );
        }
    }

    #[test]
    fn listen_takes_addresses_localhost_and_a_bare_port() {
        let parsed = |text| parse_listen(text).map(|addr| addr.to_string());
        assert_eq!(parsed("192.168.1.10:8000").as_deref(), Ok("192.168.1.10:8000"));
        assert_eq!(parsed("[::1]:8000").as_deref(), Ok("[::1]:8000"));
        assert_eq!(parsed("localhost:8000").as_deref(), Ok("127.0.0.1:8000"));
        assert_eq!(parsed("LocalHost:0").as_deref(), Ok("127.0.0.1:0"));
        assert_eq!(parsed(":8000").as_deref(), Ok("0.0.0.0:8000"));
    }

    #[test]
    fn listen_refuses_names_and_missing_ports_precisely() {
        let error = |text| parse_listen(text).unwrap_err();
        assert!(error("dispatch.lan:8000").contains("'dispatch.lan' is a host name"));
        assert!(error("localhost").contains("has no port"));
        assert!(error("8000").contains("has no port"));
        assert!(error("[::1]").contains("has no port"));
        assert!(error(":").contains("'' is not a port number"));
        assert!(error(":65536").contains("'65536' is not a port number"));
        assert!(error("localhost:http").contains("'http' is not a port number"));
        assert!(error("::1:8000").contains("[::1]:8000"));
        let flagged = parse(&["--listen", "box:80"]).unwrap_err();
        assert!(flagged.contains("--listen"), "{flagged}");
    }

    #[test]
    fn origins_are_kept_as_browsers_send_them() {
        for (given, kept) in [
            ("https://console.example", "https://console.example"),
            ("https://console.example/", "https://console.example"),
            ("HTTPS://Console.Example/", "https://console.example"),
            ("https://console.example:8443/", "https://console.example:8443"),
            ("https://console.example:443", "https://console.example"),
            ("http://console.example:80/", "http://console.example"),
            ("http://10.0.0.5:3000", "http://10.0.0.5:3000"),
            ("http://[::1]:8080/", "http://[::1]:8080"),
            ("http://[::1]", "http://[::1]"),
            ("*", "*"),
        ] {
            assert_eq!(parse_origin(given).as_deref(), Ok(kept), "{given}");
        }
        let config = parse(&["--allowed-origin", "https://a.example/", "--allowed-origin", "http://b:81"]);
        assert_eq!(config.unwrap().allowed_origin, ["https://a.example", "http://b:81"]);
    }

    #[test]
    fn origins_that_no_browser_sends_are_refused() {
        for (given, reason) in [
            ("https://console.example/tablets", "has a path, query or fragment ('/tablets')"),
            ("https://console.example//", "has a path, query or fragment ('/')"),
            ("https://console.example?x=1", "('?x=1')"),
            ("https://console.example/#top", "('/#top')"),
            ("https://admin:pw@console.example", "user name or password"),
            ("https://", "has no host"),
            ("https://:8443", "has no host"),
            ("console.example", "give a scheme and host"),
            ("null", "give a scheme and host"),
            ("https://console.example:https", "'https' is not a port number"),
            ("https://consola.ejemplo.cl\u{f1}", "xn--"),
            ("1https://console.example", "not a URL scheme"),
            ("http://[::1", "is not a host name"),
        ] {
            let error = parse_origin(given).unwrap_err();
            assert!(error.contains(reason), "{given}: {error}");
        }
        let flagged = parse(&["--allowed-origin", "https://x.example/app"]).unwrap_err();
        assert!(flagged.contains("--allowed-origin"), "{flagged}");
    }

    #[test]
    fn ip_blocks_hold_what_their_prefix_covers() {
        let block = |text| IpBlock::parse(text).unwrap();
        let address = |text: &str| text.parse::<IpAddr>().unwrap();
        assert!(block("10.0.0.0/8").contains(address("10.200.3.4")));
        assert!(!block("10.0.0.0/8").contains(address("11.0.0.1")));
        assert!(block("127.0.0.1").contains(address("::ffff:127.0.0.1")));
        assert!(!block("127.0.0.1").contains(address("127.0.0.2")));
        assert!(block("0.0.0.0/0").contains(address("192.0.2.1")));
        assert!(!block("0.0.0.0/0").contains(address("::1")));
        assert!(block("fd00::/8").contains(address("fd12:3456::1")));
        assert!(block("::1").contains(address("::1")));
        assert_eq!(block("fd00::/8").to_string(), "fd00::/8");
    }

    #[test]
    fn bad_ip_blocks_are_refused_with_a_hint() {
        assert!(IpBlock::parse("proxy.local").unwrap_err().contains("not an IP address"));
        assert!(IpBlock::parse("10.0.0.0/33").unwrap_err().contains("0 to 32"));
        assert!(IpBlock::parse("10.0.0.0/").unwrap_err().contains("0 to 32"));
        assert_eq!(
            IpBlock::parse("10.1.2.3/8").unwrap_err(),
            "bits set beyond the prefix; did you mean 10.0.0.0/8?"
        );
        let flagged = parse(&["--trusted-proxy", "::1/129"]).unwrap_err();
        assert_eq!(
            flagged,
            "Error parsing option '--trusted-proxy' with value '::1/129': the prefix length must be 0 to 128\n"
        );
        let refused = CommandLine::parse(&["--trusted-proxy", "10.1.2.3/8"]);
        assert!(
            matches!(&refused, CommandLine::Invalid(message)
                if message.contains("'--trusted-proxy' with value '10.1.2.3/8'")
                    && message.contains("did you mean 10.0.0.0/8")),
            "{refused:?}"
        );
    }

    #[test]
    fn bad_values_are_named() {
        assert!(parse(&["--ping-interval", "soon"]).unwrap_err().contains("soon"));
        assert!(parse(&["--ping-interval", "-1"]).is_err());
        let zero_queue = parse(&["--queue", "0"]).unwrap().validate().unwrap_err();
        assert!(zero_queue.contains("--queue"), "{zero_queue}");
        let zero_ping = parse(&["--ping-interval", "0"]).unwrap().validate().unwrap_err();
        assert!(zero_ping.contains("--ping-interval"), "{zero_ping}");
        let small_budget = parse(&["--max-inflight-bytes", "1000"]).unwrap().validate().unwrap_err();
        assert!(small_budget.contains("--max-inflight-bytes"), "{small_budget}");
        let tiny_buffer = parse(&["--client-send-buffer", "100"]).unwrap().validate().unwrap_err();
        assert!(tiny_buffer.contains("--client-send-buffer"), "{tiny_buffer}");
        assert!(parse(&["--client-send-buffer", "0"]).unwrap().validate().is_ok());
    }

    #[test]
    fn tls_flags_go_together() {
        let validate = |args: &[&str]| parse(args).unwrap().validate();
        let alone = validate(&["--tls-listen", ":8443"]).unwrap_err();
        assert!(alone.contains("--tls-listen needs both --tls-cert and --tls-key"), "{alone}");
        let no_key = validate(&["--tls-listen", ":8443", "--tls-cert", "c.pem"]).unwrap_err();
        assert!(no_key.contains("--tls-key"), "{no_key}");
        let no_listener = validate(&["--tls-cert", "c.pem", "--tls-key", "k.pem"]).unwrap_err();
        assert!(no_listener.contains("go with --tls-listen"), "{no_listener}");
        let same =
            validate(&["--listen", ":8000", "--tls-listen", ":8000", "--tls-cert", "c", "--tls-key", "k"]);
        assert!(same.is_err());
        let full = validate(&["--tls-listen", ":8443", "--tls-cert", "c.pem", "--tls-key", "k.pem"]);
        assert_eq!(full.is_ok(), cfg!(feature = "tls"), "{full:?}");
        assert!(validate(&["--ca-cert", "ca.crt"]).is_ok());
    }
}
