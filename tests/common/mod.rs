//! Test harness: starts the real `resq-push` binary on an ephemeral port (and a Unix socket in a
//! temporary directory) and talks to it over real sockets.
//!
//! Waits are on events (a log line, a frame, a condition polled with a deadline), never fixed sleeps.

#![allow(dead_code)]

pub mod browser;
pub mod nats;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

/// Longest any single wait in a test may take before it fails.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "resq-push-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Moves the directory out of `self`, which then removes nothing.
    fn take(&mut self) -> TempDir {
        TempDir(std::mem::take(&mut self.0))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A running server process.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub unix_socket: PathBuf,
    logs: Arc<Mutex<String>>,
    pub dir: TempDir,
}

impl Server {
    /// Starts the server with a Unix socket and `extra` flags, on an ephemeral port unless `extra`
    /// has `--listen` (a restart on the same port, so connected pages reconnect by themselves).
    pub fn start(extra: &[&str]) -> Server {
        let dir = TempDir::new();
        Server::start_in(dir, extra)
    }

    /// Starts the server with its Unix socket at `dir/resq.sock`.
    pub fn start_in(dir: TempDir, extra: &[&str]) -> Server {
        let unix_socket = dir.path().join("resq.sock");
        let (child, logs, addr) = spawn(&unix_socket, extra).unwrap_or_else(|output| {
            panic!("server did not start:\n{output}");
        });
        Server { child, addr, unix_socket, logs, dir }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the server has logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Waits until the logs contain `needle`.
    pub fn wait_for_log(&self, needle: &str) {
        wait_until(&format!("log line containing {needle:?}"), || self.logs().contains(needle));
    }

    pub fn ws(&self, path_and_query: &str) -> Client {
        Client::connect(self.addr, path_and_query)
    }

    /// Connects to `/ws/emergencias` and reads the welcome.
    pub fn subscribe(&self) -> (Client, Value) {
        let mut client = self.ws("/ws/emergencias");
        let welcome = client.recv_json();
        assert_eq!(welcome["type"], "connection", "{welcome}");
        (client, welcome)
    }

    /// Sends raw bytes as one HTTP request on a new connection and reads one response.
    pub fn http(&self, request: &[u8]) -> HttpResponse {
        let mut stream = TcpStream::connect(self.addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream.write_all(request).unwrap();
        HttpResponse::read(&mut BufReader::new(stream))
    }

    pub fn get(&self, path: &str) -> HttpResponse {
        self.http(format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes())
    }

    pub fn post(&self, body: &str) -> HttpResponse {
        self.http(
            format!(
                "POST /emergencias HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
    }

    pub fn health(&self) -> Value {
        let response = self.get("/healthz");
        assert_eq!(response.status, 200);
        response.json()
    }

    pub fn clients(&self) -> u64 {
        self.health()["clients"].as_u64().unwrap()
    }

    /// A counter of `/metrics`, named with its labels as the page writes them; 0 if absent.
    pub fn counter(&self, name_and_labels: &str) -> u64 {
        let page = self.get("/metrics").body;
        let line =
            page.lines().find(|line| line.rsplit_once(' ').is_some_and(|(name, _)| name == name_and_labels));
        line.and_then(|line| line.rsplit(' ').next()).map_or(0, |value| value.parse().unwrap())
    }

    pub fn last_seq(&self) -> u64 {
        self.health()["seq"].as_u64().unwrap()
    }

    /// Waits until `/healthz` shows `expected` clients.
    pub fn wait_for_clients(&self, expected: u64) {
        wait_until(&format!("{expected} clients in /healthz"), || self.clients() == expected);
    }

    pub fn unix(&self) -> UnixPublisher {
        UnixPublisher::connect(&self.unix_socket)
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        signal(self.pid(), "TERM");
    }

    /// Kills the process with SIGKILL, as a power cut would, and hands back its directory.
    pub fn kill9(mut self) -> TempDir {
        signal(self.pid(), "KILL");
        let _ = self.child.wait();
        self.dir.take()
    }

    /// Stops the process with SIGTERM and hands back its directory.
    pub fn stop(mut self) -> TempDir {
        self.terminate();
        assert!(self.wait_exit().success());
        self.dir.take()
    }

    /// Every retained emergency, oldest first, fetched page by page.
    pub fn poll_all(&self) -> Vec<Value> {
        let mut all: Vec<Value> = Vec::new();
        loop {
            let since = all.last().map_or(0, |event| event["seq"].as_u64().unwrap());
            let page = self.get(&format!("/emergencias?since={since}")).json();
            let page = page.as_array().unwrap();
            if page.is_empty() {
                return all;
            }
            all.extend(page.iter().cloned());
        }
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "server did not exit; logs:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status().unwrap();
    assert!(status.success());
}

/// Starts the binary; returns it with its log buffer and address, or all it printed on failure.
pub fn spawn(unix_socket: &Path, extra: &[&str]) -> Result<(Child, Arc<Mutex<String>>, SocketAddr), String> {
    let data_dir = unix_socket.with_file_name("data");
    let mut args = vec!["--unix-socket", unix_socket.to_str().unwrap()];
    if !extra.contains(&"--listen") {
        args.extend(["--listen", "127.0.0.1:0"]);
    }
    if !extra.iter().any(|arg| *arg == "--in-memory" || *arg == "--data-dir") {
        args.extend(["--data-dir", data_dir.to_str().unwrap()]);
    }
    args.extend(extra);
    let (child, logs) = spawn_raw(&args);
    wait_listening(child, logs)
}

/// Waits until a started server says where it listens; all it printed if it does not.
fn wait_listening(
    mut child: Child,
    logs: Arc<Mutex<String>>,
) -> Result<(Child, Arc<Mutex<String>>, SocketAddr), String> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = logs.lock().unwrap().clone();
        if let Some(addr) = text.split("listening on ").nth(1).and_then(|rest| rest.split(' ').next()) {
            return Ok((child, logs, addr.parse().unwrap()));
        }
        if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(logs.lock().unwrap().clone());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Starts the binary with exactly `args`, collecting its stderr in the background.
pub fn spawn_raw(args: &[&str]) -> (Child, Arc<Mutex<String>>) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_resq-push"));
    command.args(args);
    spawn_command(command)
}

/// Starts `command` (which runs the binary), collecting its stderr in the background.
/// `RUST_LOG` is `info` unless `command` sets it.
pub fn spawn_command(mut command: Command) -> (Child, Arc<Mutex<String>>) {
    if !command.get_envs().any(|(name, _)| name == "RUST_LOG") {
        command.env("RUST_LOG", "info");
    }
    let mut child =
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let logs = Arc::new(Mutex::new(String::new()));
    collect_lines(child.stderr.take().unwrap(), Arc::clone(&logs));
    (child, logs)
}

/// Appends every line `pipe` gives to `sink`, in the background, until it closes.
pub fn collect_lines(pipe: impl Read + Send + 'static, sink: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let mut logs = sink.lock().unwrap();
            logs.push_str(&line);
            logs.push('\n');
        }
    });
}

/// How a run of the binary that ended by itself ended, and what it printed.
#[derive(Debug)]
pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the binary with `args` until it exits by itself; fails the test if it is still running
/// after `PATIENCE` (it started serving instead of refusing its flags).
pub fn run_to_exit(args: &[&str]) -> Finished {
    run_to_exit_with_log(args, "info")
}

/// As `run_to_exit`, with `RUST_LOG` set to `rust_log`.
pub fn run_to_exit_with_log(args: &[&str], rust_log: &str) -> Finished {
    let mut child = Command::new(env!("CARGO_BIN_EXE_resq-push"))
        .args(args)
        .env("RUST_LOG", rust_log)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = read_in_background(child.stdout.take().unwrap());
    let stderr = read_in_background(child.stderr.take().unwrap());
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?}: still running after {PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Finished { code: status.code(), stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() }
}

fn read_in_background(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// Polls `condition` until it holds, failing the test after `PATIENCE`.
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A WebSocket client (tungstenite, blocking) with a read timeout.
pub struct Client {
    pub ws: WebSocket<TcpStream>,
    /// Ping frames seen so far.
    pub pings: usize,
}

impl Client {
    pub fn connect(addr: SocketAddr, path_and_query: &str) -> Client {
        Client::try_connect(addr, path_and_query, &[])
            .unwrap_or_else(|error| panic!("handshake failed: {error}"))
    }

    /// Connects with extra request headers; the error carries the HTTP status of a refusal.
    pub fn try_connect(
        addr: SocketAddr,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Result<Client, tungstenite::Error> {
        use tungstenite::client::IntoClientRequest;
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut request = format!("ws://{addr}{path_and_query}").into_client_request().unwrap();
        for (name, value) in headers {
            request.headers_mut().insert(
                tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        match tungstenite::client(request, stream) {
            Ok((ws, _)) => Ok(Client { ws, pings: 0 }),
            Err(tungstenite::HandshakeError::Failure(error)) => Err(error),
            Err(tungstenite::HandshakeError::Interrupted(_)) => panic!("handshake interrupted"),
        }
    }

    /// The HTTP status with which a handshake was refused.
    pub fn refusal_status(addr: SocketAddr, path_and_query: &str, headers: &[(&str, &str)]) -> u16 {
        match Client::try_connect(addr, path_and_query, headers) {
            Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
            Err(other) => panic!("expected an HTTP refusal, got {other}"),
            Ok(_) => panic!("expected a refusal, the handshake succeeded"),
        }
    }

    /// The next text frame; Ping and Pong frames are counted and skipped.
    pub fn recv_text(&mut self) -> String {
        loop {
            match self.ws.read().unwrap() {
                Message::Text(text) => return text.to_string(),
                Message::Ping(_) => self.pings += 1,
                Message::Pong(_) => {}
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    pub fn recv_json(&mut self) -> Value {
        serde_json::from_str(&self.recv_text()).unwrap()
    }

    /// Reads an emergency and checks its seq.
    pub fn recv_emergency(&mut self, seq: u64) -> Value {
        let event = self.recv_json();
        assert_eq!(event["type"], "emergencia", "{event}");
        assert_eq!(event["seq"], seq, "{event}");
        event
    }

    pub fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).unwrap();
    }

    /// Reads until the server's Close frame and returns it; fails on any text frame.
    pub fn recv_close(&mut self) -> Option<CloseFrame> {
        loop {
            match self.ws.read() {
                Ok(Message::Close(frame)) => return frame,
                Ok(Message::Ping(_) | Message::Pong(_)) => {}
                Ok(other) => panic!("expected Close, got {other:?}"),
                Err(error) => panic!("expected Close, got error {error}"),
            }
        }
    }
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl HttpResponse {
    /// Reads one response (with `Content-Length`) from `reader`.
    pub fn read(reader: &mut impl BufRead) -> HttpResponse {
        let head = HttpResponse::read_head(reader);
        HttpResponse::read_body(head, reader)
    }

    /// Reads a response head, up to and including its blank line.
    pub fn read_head(reader: &mut impl BufRead) -> String {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            let read = reader.read_line(&mut line).unwrap();
            assert!(read > 0, "connection closed before a complete response head: {head:?}");
            head.push_str(&line);
            if line == "\r\n" {
                return head;
            }
        }
    }

    /// Reads the body (of `Content-Length` bytes) of the response `head` began.
    pub fn read_body(head: String, reader: &mut impl BufRead) -> HttpResponse {
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let length: usize = head
            .lines()
            .find_map(|line| {
                line.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        HttpResponse { status, head, body: String::from_utf8(body).unwrap() }
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|line| {
            let (line_name, value) = line.split_once(':')?;
            line_name.eq_ignore_ascii_case(name).then(|| value.trim().to_owned())
        })
    }

    /// The `error` message of a JSON error body.
    pub fn error(&self) -> String {
        let json = self.json();
        assert_eq!(json["ok"], false, "{json}");
        json["error"].as_str().unwrap().to_owned()
    }
}

/// A publisher on the Unix socket.
pub struct UnixPublisher {
    pub stream: UnixStream,
    replies: BufReader<UnixStream>,
}

impl UnixPublisher {
    pub fn connect(path: &Path) -> UnixPublisher {
        let stream = UnixStream::connect(path).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let replies = BufReader::new(stream.try_clone().unwrap());
        UnixPublisher { stream, replies }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn reply(&mut self) -> Value {
        let mut line = String::new();
        self.replies.read_line(&mut line).unwrap();
        assert!(line.ends_with('\n'), "reply line not terminated: {line:?}");
        serde_json::from_str(&line).unwrap()
    }

    /// Publishes one line and returns its seq.
    pub fn publish(&mut self, json: &str) -> u64 {
        self.send(format!("{json}\n").as_bytes());
        let reply = self.reply();
        assert_eq!(reply["ok"], true, "{reply}");
        reply["seq"].as_u64().unwrap()
    }
}

impl Server {
    /// Starts the server with its data dir on a tmpfs of `size` (as `mount -o size=` takes it)
    /// that only it sees: `unshare` gives it a mount namespace of its own, so the mount goes away
    /// with the process and nothing is left on the host. As root that is a plain `unshare
    /// --mount`; otherwise a user namespace makes the mount possible. The test fills that disk
    /// for real through `on_disk`.
    pub fn start_on_small_disk(size: &str, extra: &[&str]) -> Server {
        let dir = TempDir::new();
        let disk = dir.path().join("disk");
        std::fs::create_dir(&disk).unwrap();
        let unix_socket = dir.path().join("resq.sock");
        let data_dir = disk.join("data");
        let mut command = Command::new("unshare");
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            command.args(["--user", "--map-root-user"]);
        }
        command.args([
            "--mount",
            "sh",
            "-c",
            r#"mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && exec "$@""#,
        ]);
        command.args(["sh", size, disk.to_str().unwrap(), env!("CARGO_BIN_EXE_resq-push")]);
        command.args(["--listen", "127.0.0.1:0", "--unix-socket", unix_socket.to_str().unwrap()]);
        command.args(["--data-dir", data_dir.to_str().unwrap()]).args(extra);
        let (child, logs) = spawn_command(command);
        let (child, logs, addr) = wait_listening(child, logs).unwrap_or_else(|output| {
            panic!("server did not start on a small disk:\n{output}");
        });
        Server { child, addr, unix_socket, logs, dir }
    }

    /// The small disk of `start_on_small_disk` as the server sees it: its mount namespace, seen
    /// through `/proc/PID/root`.
    pub fn on_disk(&self, name: &str) -> PathBuf {
        let disk = self.dir.path().join("disk").join(name);
        Path::new(&format!("/proc/{}/root", self.pid())).join(disk.strip_prefix("/").unwrap())
    }
}

/// Writes zeros to `path` until the disk is full.
pub fn fill_disk(path: &Path) {
    let mut file = std::fs::File::create(path).unwrap();
    let zeros = [0u8; 4096];
    loop {
        match file.write(&zeros) {
            Ok(0) => return,
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::StorageFull => return,
            Err(error) => panic!("filling {}: {error}", path.display()),
        }
    }
}

/// A new connection with a POST head the server has read, as its `100 Continue` proves, and a
/// body of `content_length` bytes still to come: the server is waiting for it.
pub fn post_head_read(server: &Server, content_length: usize) -> TcpStream {
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let head = format!(
        "POST /emergencias HTTP/1.1\r\nHost: t\r\nContent-Length: {content_length}\r\nExpect: 100-continue\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut interim = [0u8; 25];
    std::io::Read::read_exact(&mut stream, &mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream
}

/// A data dir in `dir` as an older version left it: the `emergencies` table with `columns` only
/// (beyond seq, received_at_ms and envelope), stream `00112233aabbccdd`, and `count` emergencies
/// received a minute ago.
pub fn old_data_dir(dir: &TempDir, columns: &str, count: u64) {
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let db = rusqlite::Connection::open(data.join("history.sqlite3")).unwrap();
    db.execute_batch(&format!(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
         CREATE TABLE emergencies (
             seq INTEGER PRIMARY KEY, received_at_ms INTEGER NOT NULL, envelope TEXT NOT NULL{columns});
         INSERT INTO meta VALUES ('stream_id', '00112233aabbccdd'), ('last_seq', '{count}');"
    ))
    .unwrap();
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    for seq in 1..=count {
        let envelope = format!(
            r#"{{"type":"emergencia","seq":{seq},"received_at":"2026-01-01T00:00:00.000Z","source":"unix","data":{{}}}}"#
        );
        db.execute(
            "INSERT INTO emergencies (seq, received_at_ms, envelope) VALUES (?1, ?2, ?3)",
            rusqlite::params![seq as i64, now_ms as i64 - 60_000, envelope],
        )
        .unwrap();
    }
}
