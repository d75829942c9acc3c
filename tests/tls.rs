//! HTTPS and wss:// on `--tls-listen`, with certificates made by `deploy/site-ca` in a temporary
//! directory: Python's `websockets` trusting only the test CA receives what `curl --cacert`
//! publishes, a certificate rotated on SIGHUP reaches new connections while connected clients
//! stay, bad files stop the start, and the limits hold for TLS clients as for plain ones.
//!
//! Needs `openssl` (for the script), `curl`, and `python3` with `websockets` (`bash scripts/test`
//! puts it in a virtual environment; `.ci/run` installs the Debian packages). Built only with the
//! cargo feature `tls` (the default).
#![cfg(feature = "tls")]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;

use common::{PATIENCE, Server, TempDir, run_to_exit, signal};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use serde_json::Value;
use tungstenite::{Message, WebSocket};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The files `deploy/site-ca` made in a directory.
struct SiteCa {
    dir: PathBuf,
}

impl SiteCa {
    /// Runs `deploy/site-ca` for localhost and 127.0.0.1 into `dir/name`, as the current group.
    fn make(dir: &Path, name: &str) -> SiteCa {
        let ca = SiteCa { dir: dir.join(name) };
        ca.run(&[]);
        ca
    }

    /// Runs the script again (idempotent), with `extra` arguments (`--renew`); returns its output.
    fn run(&self, extra: &[&str]) -> String {
        let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout).unwrap();
        let output = Command::new(Path::new(ROOT).join("deploy/site-ca"))
            .args(["--dir", self.dir.to_str().unwrap(), "--owner", user.trim()])
            .args(["--name", "localhost", "--ip", "127.0.0.1", "--no-reload"])
            .args(extra)
            .output()
            .expect("cannot run deploy/site-ca (is openssl installed?)");
        let text =
            String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "deploy/site-ca failed:\n{text}");
        text
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).to_str().unwrap().to_owned()
    }

    /// The server's own certificate (the first of the chain), as DER.
    fn leaf(&self) -> Vec<u8> {
        let pem = std::fs::read(self.dir.join("server.crt")).unwrap();
        CertificateDer::pem_slice_iter(&pem).next().unwrap().unwrap().to_vec()
    }

    /// The flags that serve these files on an ephemeral TLS port.
    fn flags(&self) -> Vec<String> {
        ["--tls-listen", "127.0.0.1:0", "--tls-cert", &self.path("server.crt")]
            .into_iter()
            .chain(["--tls-key", &self.path("server.key"), "--ca-cert", &self.path("ca.crt")])
            .map(str::to_owned)
            .collect()
    }
}

/// A server with TLS from `ca`, and `extra` flags; returns it with its TLS address.
fn start(ca: &SiteCa, extra: &[&str]) -> (Server, SocketAddr) {
    let flags = ca.flags();
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend(extra);
    let server = Server::start(&args);
    let logs = server.logs();
    let addr = logs.split("TLS on ").nth(1).and_then(|rest| rest.split(' ').next()).unwrap().parse().unwrap();
    (server, addr)
}

/// A TCP stream that counts the TLS application-data records it reads, as they come off the wire.
struct RecordCounter {
    stream: TcpStream,
    /// The header of the record being read, while it is incomplete.
    header: Vec<u8>,
    /// Bytes of the current record's body not read yet.
    remaining: usize,
    records: usize,
}

impl Read for RecordCounter {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.stream.read(buf)?;
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            if self.remaining > 0 {
                let skipped = self.remaining.min(rest.len());
                self.remaining -= skipped;
                rest = &rest[skipped..];
                continue;
            }
            self.header.push(rest[0]);
            rest = &rest[1..];
            if self.header.len() == 5 {
                self.records += usize::from(self.header[0] == 0x17);
                self.remaining = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                self.header.clear();
            }
        }
        Ok(n)
    }
}

impl Write for RecordCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

/// A blocking wss:// client (rustls and tungstenite) trusting only `ca`'s CA.
struct WssClient {
    ws: WebSocket<StreamOwned<ClientConnection, RecordCounter>>,
}

impl WssClient {
    fn connect(ca: &SiteCa, addr: SocketAddr) -> WssClient {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let tls =
            ClientConnection::new(client_config(ca), ServerName::try_from("localhost").unwrap()).unwrap();
        let url = format!("wss://localhost:{}/ws/emergencias", addr.port());
        let counter = RecordCounter { stream, header: Vec::new(), remaining: 0, records: 0 };
        let (ws, _) = tungstenite::client(url, StreamOwned::new(tls, counter)).unwrap();
        WssClient { ws }
    }

    /// TLS application-data records read so far.
    fn records(&self) -> usize {
        self.ws.get_ref().sock.records
    }

    /// The certificate the server presented, as DER.
    fn server_certificate(&self) -> Vec<u8> {
        self.ws.get_ref().conn.peer_certificates().unwrap()[0].to_vec()
    }

    fn recv_json(&mut self) -> Value {
        loop {
            match self.ws.read().unwrap() {
                Message::Text(text) => return serde_json::from_str(&text).unwrap(),
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }
}

fn client_config(ca: &SiteCa) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca.path("ca.crt")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// `curl --cacert` against the TLS port; returns its stdout (the body) and fails on an error.
fn curl(ca: &SiteCa, addr: SocketAddr, args: &[&str]) -> String {
    let url_base = format!("https://localhost:{}", addr.port());
    let args: Vec<String> = args.iter().map(|arg| arg.replace("https://localhost", &url_base)).collect();
    let output = Command::new("curl")
        .args(["--silent", "--show-error", "--fail", "--max-time", "10", "--cacert", &ca.path("ca.crt")])
        .args(&args)
        .output()
        .expect("cannot run curl: apt-get install curl");
    assert!(output.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

fn publish_over_https(ca: &SiteCa, addr: SocketAddr, body: &str) -> Value {
    let reply = curl(
        ca,
        addr,
        &["-H", "Content-Type: application/json", "--data", body, "https://localhost/emergencias"],
    );
    serde_json::from_str(&reply).unwrap()
}

/// Python's `websockets` as a wss:// client: its lines, one per message.
struct PythonListener {
    child: Child,
    lines: BufReader<ChildStdout>,
}

impl PythonListener {
    fn start(ca_file: &str, addr: SocketAddr) -> PythonListener {
        let url = format!("wss://localhost:{}/ws/emergencias", addr.port());
        let mut child = Command::new("python3")
            .arg(Path::new(ROOT).join("tests/python/wss_listen.py"))
            .args([&url, ca_file])
            .stdout(Stdio::piped())
            .spawn()
            .expect("cannot run python3 (with websockets: see tests/python/requirements.txt)");
        let lines = BufReader::new(child.stdout.take().unwrap());
        PythonListener { child, lines }
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.lines.read_line(&mut line).unwrap();
        line
    }
}

impl Drop for PythonListener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn python_wss_trusting_only_the_site_ca_receives_what_curl_publishes_over_https() {
    let dir = TempDir::new();
    let ca = SiteCa::make(dir.path(), "tls");
    let (server, addr) = start(&ca, &["--in-memory"]);
    let mut listener = PythonListener::start(&ca.path("ca.crt"), addr);
    let welcome: Value = serde_json::from_str(&listener.line()).unwrap();
    assert_eq!(welcome["type"], "connection", "{welcome}");

    let reply = publish_over_https(&ca, addr, r#"{"id":"tls-1","address":"Calle 1"}"#);
    assert_eq!(reply["seq"], 1, "{reply}");
    let event: Value = serde_json::from_str(&listener.line()).unwrap();
    assert_eq!(event["seq"], 1, "{event}");
    server.wait_for_log("connected from 127.0.0.1:");
    assert!(server.logs().contains(" over wss"), "{}", server.logs());
    assert_eq!(event["data"]["address"], "Calle 1", "{event}");

    // The CA is served as it is on disk, to anyone.
    let served = curl(&ca, addr, &["https://localhost/ca.crt"]);
    assert_eq!(served, std::fs::read_to_string(ca.path("ca.crt")).unwrap());
    // A client that trusts another CA does not get in.
    let other = SiteCa::make(dir.path(), "other");
    let mut stranger = PythonListener::start(&other.path("ca.crt"), addr);
    let refused = stranger.line();
    assert!(refused.starts_with("failed:") && refused.contains("CERTIFICATE_VERIFY_FAILED"), "{refused}");
    server.wait_for_log("TLS handshake with 127.0.0.1:");
}

#[test]
fn a_certificate_rotated_on_sighup_reaches_new_connections_while_clients_stay() {
    let dir = TempDir::new();
    let ca = SiteCa::make(dir.path(), "tls");
    let (server, addr) = start(&ca, &["--in-memory"]);
    let first_leaf = ca.leaf();
    let mut before = WssClient::connect(&ca, addr);
    assert_eq!(before.recv_json()["type"], "connection");
    assert_eq!(before.server_certificate(), first_leaf);

    // The script's renewal: a new key and certificate from the same CA, then the reload.
    let renewal = ca.run(&["--renew"]);
    assert!(renewal.contains("issued"), "{renewal}");
    let second_leaf = ca.leaf();
    assert_ne!(second_leaf, first_leaf);
    signal(server.pid(), "HUP");
    server.wait_for_log("reloaded the TLS certificate");

    let mut after = WssClient::connect(&ca, addr);
    assert_eq!(after.recv_json()["type"], "connection");
    assert_eq!(after.server_certificate(), second_leaf);
    assert_eq!(publish_over_https(&ca, addr, r#"{"n":1}"#)["seq"], 1);
    assert_eq!(before.recv_json()["seq"], 1, "the client from before the rotation stays connected");
    assert_eq!(after.recv_json()["seq"], 1);

    // A reload that finds a key not matching the certificate keeps the one in force.
    let other = SiteCa::make(dir.path(), "other");
    std::fs::copy(other.path("server.key"), ca.path("server.key")).unwrap();
    signal(server.pid(), "HUP");
    server.wait_for_log("reload failed, keeping the current TLS certificate");
    assert!(server.logs().contains("does not match the certificate"), "{}", server.logs());
    let still = WssClient::connect(&ca, addr);
    assert_eq!(still.server_certificate(), second_leaf);
}

#[test]
fn a_bad_key_or_certificate_file_stops_the_start_with_a_clear_error() {
    let dir = TempDir::new();
    let ca = SiteCa::make(dir.path(), "tls");
    let other = SiteCa::make(dir.path(), "other");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let garbage = garbage.to_str().unwrap();
    let missing = dir.path().join("missing.pem");
    let missing = missing.to_str().unwrap();
    let cases = [
        (ca.path("server.crt"), missing.to_owned(), vec![missing, "cannot read the TLS key"]),
        (missing.to_owned(), ca.path("server.key"), vec![missing, "cannot read the TLS certificate"]),
        (garbage.to_owned(), ca.path("server.key"), vec![garbage, "no certificate in"]),
        (ca.path("server.crt"), ca.path("server.crt"), vec!["no private key in"]),
        (ca.path("server.crt"), other.path("server.key"), vec!["does not match the certificate"]),
    ];
    for (cert, key, expected) in cases {
        let finished = run_to_exit(&[
            "--in-memory",
            "--listen",
            "127.0.0.1:0",
            "--tls-listen",
            "127.0.0.1:0",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ]);
        assert_eq!(finished.code, Some(1), "{cert} {key}: {}", finished.stderr);
        for needle in expected {
            assert!(finished.stderr.contains(needle), "{cert} {key}: no {needle:?} in {}", finished.stderr);
        }
        assert!(!finished.stderr.contains("listening on"), "{}", finished.stderr);
    }
    let half =
        run_to_exit(&["--in-memory", "--tls-listen", "127.0.0.1:0", "--tls-cert", &ca.path("server.crt")]);
    assert_eq!(half.code, Some(2), "{}", half.stderr);
    assert!(half.stderr.contains("--tls-listen needs both --tls-cert and --tls-key"), "{}", half.stderr);
}

#[test]
fn a_burst_reaches_a_wss_client_in_one_tls_record_not_one_per_emergency() {
    let dir = TempDir::new();
    let ca = SiteCa::make(dir.path(), "tls");
    let (server, addr) = start(&ca, &["--in-memory", "--queue", "16"]);
    let mut client = WssClient::connect(&ca, addr);
    assert_eq!(client.recv_json()["type"], "connection");
    // Half a queue (--queue 16 here) in one write to the Unix socket: the hub takes all eight
    // before the session writes, as one batch.
    let burst: String = (1..=8).map(|n| format!("{{\"n\":{n}}}\n")).collect();
    let mut unix = server.unix();
    unix.send(burst.as_bytes());
    for _ in 1..=8 {
        assert_eq!(unix.reply()["ok"], true);
    }
    let before = client.records();
    for seq in 1..=8 {
        assert_eq!(client.recv_json()["seq"], seq);
    }
    let records = client.records() - before;
    // Not 8: a batch is one rustls write. (Session tickets came with the welcome.)
    assert!(records <= 2, "8 emergencies came in {records} TLS records");
}

#[test]
fn a_client_stalling_mid_handshake_is_closed_after_the_header_timeout() {
    let dir = TempDir::new();
    let ca = SiteCa::make(dir.path(), "tls");
    let (server, addr) = start(&ca, &["--in-memory", "--header-timeout", "0.5"]);
    let mut stalled = TcpStream::connect(addr).unwrap();
    stalled.set_read_timeout(Some(PATIENCE)).unwrap();
    // The first bytes of a ClientHello record, then nothing.
    stalled.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00]).unwrap();
    let mut rest = Vec::new();
    let read = stalled.read_to_end(&mut rest);
    assert!(read.is_ok(), "the server did not close the stalled handshake: {read:?}");
    server.wait_for_log("TLS handshake not complete within --header-timeout");
    // The server goes on serving.
    assert_eq!(WssClient::connect(&ca, addr).recv_json()["type"], "connection");
}

#[test]
fn a_plain_http_request_to_the_tls_port_is_answered_in_plain_text_and_closed() {
    let dir = TempDir::new();
    let ca = SiteCa::make(dir.path(), "tls");
    let (server, addr) = start(&ca, &["--in-memory"]);
    let mut plain = TcpStream::connect(addr).unwrap();
    plain.set_read_timeout(Some(PATIENCE)).unwrap();
    plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let response = common::HttpResponse::read(&mut BufReader::new(&plain));
    assert_eq!(response.status, 400, "{response:?}");
    assert!(response.error().contains("https://"), "{response:?}");
    assert_eq!(response.header("connection").as_deref(), Some("close"));
    let mut rest = Vec::new();
    assert!(matches!(plain.read_to_end(&mut rest), Ok(0)), "the connection stayed open");
    server.wait_for_log("not TLS on the TLS port");
}

#[test]
fn tls_connections_count_against_the_http_connection_cap() {
    let dir = TempDir::new();
    let ca = SiteCa::make(dir.path(), "tls");
    let (server, addr) = start(&ca, &["--in-memory", "--max-http-connections", "1"]);
    // A TLS connection, its handshake done, silent: it holds the one slot, waiting for a request.
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let tls = ClientConnection::new(client_config(&ca), ServerName::try_from("localhost").unwrap()).unwrap();
    let mut idle = StreamOwned::new(tls, stream);
    while idle.conn.is_handshaking() {
        idle.conn.complete_io(&mut idle.sock).unwrap();
    }
    // A plain request needs the slot: the idle TLS connection is closed for it.
    assert_eq!(server.get("/healthz").status, 200);
    let mut rest = Vec::new();
    let read = idle.read_to_end(&mut rest);
    assert!(
        !matches!(&read, Err(error) if matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "the idle TLS connection was not evicted: {read:?}"
    );
    server.wait_for_log("closed the connection idle longest");
}

#[test]
fn a_wss_client_that_stops_reading_is_dropped_as_too_slow_and_others_keep_receiving() {
    let dir = TempDir::new();
    let ca = SiteCa::make(dir.path(), "tls");
    let (server, addr) = start(&ca, &["--in-memory", "--queue", "8", "--write-timeout", "2"]);
    let mut reader = WssClient::connect(&ca, addr);
    assert_eq!(reader.recv_json()["type"], "connection");
    let mut stalled = WssClient::connect(&ca, addr);
    assert_eq!(stalled.recv_json()["type"], "connection");
    server.wait_for_clients(2);

    let payload = format!(r#"{{"blob":"{}"}}"#, "x".repeat(60_000));
    let mut unix = server.unix();
    let total = 300; // about 18 MB through each client
    for n in 1..=total {
        assert_eq!(unix.publish(&payload), n);
        assert_eq!(reader.recv_json()["seq"], n);
    }
    server.wait_for_log("too slow: --queue events behind");
    server.wait_for_clients(1);
    drop(stalled);
    assert_eq!(publish_over_https(&ca, addr, r#"{"after":true}"#)["seq"], total + 1);
    assert_eq!(reader.recv_json()["seq"], total + 1);
}

#[test]
fn an_sse_client_over_https_receives_what_is_published_and_ends_with_the_server() {
    let dir = TempDir::new();
    let ca = SiteCa::make(dir.path(), "tls");
    let (server, addr) = start(&ca, &["--in-memory"]);
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let tls = ClientConnection::new(client_config(&ca), ServerName::try_from("localhost").unwrap()).unwrap();
    let mut events = BufReader::new(StreamOwned::new(tls, stream));
    let request = "GET /sse/emergencias HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n";
    events.get_mut().write_all(request.as_bytes()).unwrap();
    let mut next_line = || {
        let mut line = String::new();
        events.read_line(&mut line).unwrap();
        line.trim_end().to_owned()
    };
    assert_eq!(next_line(), "HTTP/1.1 200 OK");
    while next_line() != "event: welcome" {}
    let welcome: Value = serde_json::from_str(next_line().strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(welcome["type"], "connection");
    let stream_id = welcome["stream"].as_str().unwrap().to_owned();

    assert_eq!(publish_over_https(&ca, addr, r#"{"tipo":"incendio"}"#)["seq"], 1);
    let id_line = format!("id: {stream_id}:1");
    while next_line() != id_line {}
    let envelope: Value = serde_json::from_str(next_line().strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!((envelope["seq"].as_u64(), envelope["data"]["tipo"].as_str()), (Some(1), Some("incendio")));

    // Over TLS the session's reads go through rustls: the server's stop reaches the client as
    // the end of the stream, not as a hang or a TLS error.
    let _data = server.stop();
    let mut rest = String::new();
    let ended = events.read_to_string(&mut rest);
    assert!(ended.is_ok(), "the stream did not end cleanly: {ended:?} after {rest:?}");
}
