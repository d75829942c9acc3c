#![cfg(feature = "cluster")]
//! Cluster mode (issue 17): two or three resq-push boxes on one history in a real three-node NATS
//! JetStream cluster (tests/common/nats.rs), with real WebSocket tablets. Every test asserts that
//! every tablet got seq 1..N exactly once, with the same bytes from every box, through the
//! failures of deploy/README.md's "Cluster mode" table: a NATS server killed (the stream's
//! leader), quorum lost, a box killed, a box restarted while the engine is down, a box frozen,
//! everything killed, the stream deleted and recreated; and acks and escalations across boxes.
//!
//! Loops are bounded by deadlines; waits are on frames, replies and `/healthz`, never on sleeps.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::nats::{ENGINE_PATIENCE, NatsCluster};
use common::{Client, Server, TempDir};
use serde_json::Value;
use tungstenite::Message;

/// The stream the boxes use (`--nats-stream`'s default).
const STREAM: &str = "RESQ";

/// `--nats-timeout` in these tests: short, so that publishes refused while the engine is away
/// answer quickly.
const NATS_TIMEOUT: &str = "2";

/// Pause between a publisher's retries (a backoff, not a synchronization).
const RETRY_PAUSE: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------------------
// Boxes

/// Starts a box on `nats` and waits until its engine is connected: from then on the stream
/// takes publishes (a box says "connected" only once the stream has a leader, also when the box
/// has just created it), which every test's first publish checks.
fn start_box(nats: &NatsCluster, name: &str, extra: &[&str]) -> Server {
    let args = box_args(nats, name, None);
    let server = Server::start(&[args.iter().map(String::as_str).collect(), extra.to_vec()].concat());
    wait_engine(&server, "connected");
    server
}

/// Boxes `a` and `b` with the default flags, connected.
fn two_boxes(nats: &NatsCluster) -> (Server, Server) {
    (start_box(nats, "a", &[]), start_box(nats, "b", &[]))
}

/// Restarts a killed box on its directory (its cache) and address, without waiting for the engine.
fn restart_box(nats: &NatsCluster, dir: TempDir, addr: SocketAddr, name: &str, extra: &[&str]) -> Server {
    let args = box_args(nats, name, Some(addr));
    Server::start_in(dir, &[args.iter().map(String::as_str).collect(), extra.to_vec()].concat())
}

fn box_args(nats: &NatsCluster, name: &str, addr: Option<SocketAddr>) -> Vec<String> {
    let mut args = vec!["--nats".into(), nats.urls(), "--box-name".into(), name.into()];
    args.extend(["--nats-timeout".into(), NATS_TIMEOUT.into()]);
    if let Some(addr) = addr {
        args.extend(["--listen".into(), addr.to_string()]);
    }
    args
}

/// `/healthz` as it is, 200 or 503.
fn health(server: &Server) -> Value {
    let response = server.get("/healthz");
    assert!(matches!(response.status, 200 | 503), "{response:?}");
    response.json()
}

fn engine_state(server: &Server) -> String {
    health(server)["engine"]["state"].as_str().unwrap_or("none").to_owned()
}

fn wait_engine(server: &Server, state: &str) {
    wait_long(&format!("engine {state} in /healthz"), || engine_state(server) == state);
    let response = server.get("/healthz");
    let expected = if state == "connected" { 200 } else { 503 };
    assert_eq!(response.status, expected, "/healthz with the engine {state}: {}", response.body);
}

/// Waits until the box's hub has taken in `seq`.
fn wait_box_seq(server: &Server, seq: u64) {
    wait_long(&format!("seq {seq} in /healthz"), || health(server)["seq"].as_u64() >= Some(seq));
}

fn stream_of(server: &Server) -> String {
    health(server)["stream"].as_str().unwrap().to_owned()
}

/// Polls `condition` until it holds, failing the test after `ENGINE_PATIENCE` (elections and
/// reconnections take seconds).
fn wait_long(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + ENGINE_PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Publishing, fallibly: a box may be killed or its engine away while a publisher talks to it.

#[derive(Clone, Copy, Debug)]
enum Ingest {
    Http,
    Unix,
}

use Ingest::{Http, Unix};

/// Where a publisher reaches a box, copied out of `Server` so that a publisher thread does not
/// borrow a box the test kills.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    unix_socket: PathBuf,
}

fn target(server: &Server) -> Target {
    Target { addr: server.addr, unix_socket: server.unix_socket.clone() }
}

/// The emergency `name` as published: its name in `n`, and the same name as its idempotency key.
fn emergency(name: &str) -> String {
    format!(r#"{{"n":"{name}","idempotency_key":"{name}"}}"#)
}

/// Publishes `body` once: the reply of an accepted publish, or what went wrong (a status and
/// body, an error line, or the connection's error).
fn publish(target: &Target, path: Ingest, body: &str) -> Result<Value, String> {
    match path {
        Http => publish_http(target.addr, body),
        Unix => publish_unix(&target.unix_socket, body),
    }
}

fn publish_http(addr: SocketAddr, body: &str) -> Result<Value, String> {
    let mut stream = TcpStream::connect(addr).map_err(|error| error.to_string())?;
    stream.set_read_timeout(Some(common::PATIENCE)).unwrap();
    let request = format!(
        "POST /emergencias HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).map_err(|error| error.to_string())?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|error| error.to_string())?;
    let (head, reply) = response.split_once("\r\n\r\n").ok_or(format!("no response: {response:?}"))?;
    let status = head.split(' ').nth(1).unwrap_or("");
    let json: Value = serde_json::from_str(reply).map_err(|_| format!("{status} {reply}"))?;
    if status == "202" && json["ok"] == true { Ok(json) } else { Err(format!("{status} {reply}")) }
}

fn publish_unix(socket: &Path, body: &str) -> Result<Value, String> {
    let mut stream = UnixStream::connect(socket).map_err(|error| error.to_string())?;
    stream.set_read_timeout(Some(common::PATIENCE)).unwrap();
    stream.write_all(format!("{body}\n").as_bytes()).map_err(|error| error.to_string())?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(|error| error.to_string())?;
    let json: Value = serde_json::from_str(&line).map_err(|_| format!("reply {line:?}"))?;
    if json["ok"] == true { Ok(json) } else { Err(json.to_string()) }
}

/// Publishes `name` until a box accepts it (retries with the same idempotency key), failing
/// the test after `ENGINE_PATIENCE`. Returns every reply that said ok (one) and how many tries
/// were refused.
fn publish_until_ok(target: &Target, path: Ingest, name: &str) -> (Value, usize) {
    let deadline = Instant::now() + ENGINE_PATIENCE;
    let mut refused = 0;
    loop {
        match publish(target, path, &emergency(name)) {
            Ok(reply) => return (reply, refused),
            Err(error) => {
                refused += 1;
                assert!(Instant::now() < deadline, "{name} never accepted; last: {error}");
                std::thread::sleep(RETRY_PAUSE);
            }
        }
    }
}

fn seq_of(reply: &Value) -> u64 {
    reply["seq"].as_u64().unwrap_or_else(|| panic!("no seq in {reply}"))
}

/// The value of the Prometheus sample `name` (without labels) on a `/metrics` page.
fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{page}"))
}

/// A refused publish says the engine is unavailable, and that nothing was stored or (sent, its
/// ack timed out) that it may have been.
fn assert_engine_unavailable(result: Result<Value, String>) {
    let error = result.expect_err("a publish was accepted without the engine");
    let said = error.contains("nothing was stored") || error.contains("it may have been stored: retry");
    assert!(error.contains("engine unavailable") && said, "{error}");
}

// ---------------------------------------------------------------------------------------------
// Tablets

/// A WebSocket tablet that keeps every emergency frame it got, and checks as it reads that the
/// seqs are dense: no gap, no duplicate.
struct Tablet {
    name: String,
    client: Option<Client>,
    stream: String,
    /// Every emergency frame, by seq, as text.
    got: Vec<(u64, String)>,
    /// Any other frames (ack, closed, unacked, status), as JSON.
    notices: Vec<Value>,
    /// The query this tablet adds (a token).
    extra_query: String,
    /// The code of the last Close frame the server sent.
    close_code: Option<u16>,
}

impl Tablet {
    /// Connects to `server` with `?since=0`.
    fn connect(name: &str, server: &Server) -> Tablet {
        Tablet::connect_with(name, server, "")
    }

    fn connect_with(name: &str, server: &Server, extra_query: &str) -> Tablet {
        let mut tablet = Tablet {
            name: name.to_owned(),
            client: None,
            stream: String::new(),
            got: Vec::new(),
            notices: Vec::new(),
            extra_query: extra_query.to_owned(),
            close_code: None,
        };
        let welcome = tablet.resume(server);
        tablet.stream = welcome["stream"].as_str().unwrap().to_owned();
        tablet
    }

    fn last(&self) -> u64 {
        self.got.last().map_or(0, |(seq, _)| *seq)
    }

    /// (Re)connects to `server` with `?since=<last>&stream=<stream>` and returns the welcome,
    /// checking that it continues the same history.
    fn resume(&mut self, server: &Server) -> Value {
        let welcome = self.reconnect(server);
        if !self.stream.is_empty() {
            assert_eq!(welcome["stream"], self.stream.as_str(), "{}: another stream: {welcome}", self.name);
            assert_eq!(welcome["replay"]["stream_changed"], false, "{}: {welcome}", self.name);
        }
        assert_eq!(welcome["replay"]["missed"], 0, "{}: {welcome}", self.name);
        welcome
    }

    /// Connects with the tablet's last seq and stream and returns the welcome as it is.
    fn reconnect(&mut self, server: &Server) -> Value {
        let mut query = format!("/ws/emergencias?since={}{}", self.last(), self.extra_query);
        if !self.stream.is_empty() {
            query.push_str(&format!("&stream={}", self.stream));
        }
        let mut client = server.ws(&query);
        let welcome = client.recv_json();
        assert_eq!(welcome["type"], "connection", "{welcome}");
        self.client = Some(client);
        welcome
    }

    /// Reads one frame: false when the connection is gone (closed, reset, the box killed).
    fn read_one(&mut self) -> bool {
        let Some(client) = self.client.as_mut() else { return false };
        let text = match client.ws.read() {
            Ok(Message::Text(text)) => text.to_string(),
            Ok(Message::Close(frame)) => {
                self.close_code = frame.map(|frame| frame.code.into());
                self.client = None;
                return false;
            }
            Err(_) => {
                self.client = None;
                return false;
            }
            Ok(_) => return true,
        };
        let frame: Value = serde_json::from_str(&text).unwrap();
        if frame["type"] == "emergencia" {
            let seq = frame["seq"].as_u64().unwrap();
            assert_eq!(seq, self.last() + 1, "{}: a gap or a duplicate: {text}", self.name);
            self.got.push((seq, text));
        } else {
            self.notices.push(frame);
        }
        true
    }

    /// Reads until it has every seq up to `seq`; fails if the connection goes.
    fn recv_until(&mut self, seq: u64) {
        while self.last() < seq {
            assert!(self.read_one(), "{}: disconnected at seq {}, waiting for {seq}", self.name, self.last());
        }
    }

    /// Reads until it has `seq`, resuming on `server` whenever it is dropped (as a client told
    /// `too slow: reconnect with ?since=` does).
    /// Returns how many times it resumed.
    fn recv_until_resuming(&mut self, server: &Server, seq: u64) -> usize {
        let deadline = Instant::now() + ENGINE_PATIENCE;
        let mut resumed = 0;
        while self.last() < seq {
            assert!(Instant::now() < deadline, "{}: stuck at seq {}", self.name, self.last());
            if !self.read_one() {
                self.resume(server);
                resumed += 1;
            }
        }
        resumed
    }

    /// Reads until the connection is gone (its box was killed); what came before is kept.
    fn recv_until_gone(&mut self) {
        while self.read_one() {}
    }

    /// Reads until a notice of `kind` for `seq` matching `matches` has come; returns it.
    fn recv_notice(&mut self, kind: &str, seq: u64, matches: impl Fn(&Value) -> bool) -> Value {
        let found = |notices: &[Value]| {
            notices.iter().find(|n| n["type"] == kind && n["seq"] == seq && matches(n)).cloned()
        };
        loop {
            if let Some(notice) = found(&self.notices) {
                return notice;
            }
            assert!(self.read_one(), "{}: disconnected waiting for {kind} of {seq}", self.name);
        }
    }

    fn send(&mut self, text: &str) {
        self.client.as_mut().expect("connected").send_text(text);
    }
}

/// Every tablet has exactly seqs 1..=n, and the same bytes for each seq as every other.
fn assert_all_got(tablets: &[&Tablet], n: u64) {
    let reference = tablets[0];
    for tablet in tablets {
        let seqs: Vec<u64> = tablet.got.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "{}", tablet.name);
        for ((seq, text), (_, expected)) in tablet.got.iter().zip(&reference.got) {
            assert_eq!(
                text, expected,
                "seq {seq}: {} and {} got different bytes",
                tablet.name, reference.name
            );
        }
    }
}

/// The `data.n` of a tablet's emergency `seq`.
fn name_at(tablet: &Tablet, seq: u64) -> String {
    let (_, text) = &tablet.got[seq as usize - 1];
    let envelope: Value = serde_json::from_str(text).unwrap();
    envelope["data"]["n"].as_str().unwrap_or_else(|| panic!("no data.n in {text}")).to_owned()
}

/// Every box's history (GET /emergencias, page by page) holds the same emergencies, and so do
/// the tablets: the stored set, as seq -> name.
fn assert_boxes_store(boxes: &[&Server], tablets: &[&Tablet], n: u64) -> BTreeMap<u64, String> {
    let stored: BTreeMap<u64, String> = boxes[0]
        .poll_all()
        .iter()
        .map(|envelope| {
            (envelope["seq"].as_u64().unwrap(), envelope["data"]["n"].as_str().unwrap_or("").to_owned())
        })
        .collect();
    assert_eq!(stored.keys().copied().collect::<Vec<_>>(), (1..=n).collect::<Vec<_>>());
    for other in &boxes[1..] {
        assert_eq!(other.poll_all(), boxes[0].poll_all(), "two boxes hold different histories");
    }
    for tablet in tablets {
        for (seq, name) in &stored {
            assert_eq!(&name_at(tablet, *seq), name, "{} seq {seq}", tablet.name);
        }
    }
    stored
}

// ---------------------------------------------------------------------------------------------
// The tests

/// Publishers alternate between three boxes and between HTTP and the Unix socket: one stream,
/// one welcome, seqs 1..N in publish order on every tablet with identical bytes; a retry under
/// the same idempotency key on another box is answered as a duplicate and stored once.
#[test]
fn publishers_alternating_boxes_and_paths_give_one_history() {
    let nats = NatsCluster::start();
    let boxes: Vec<Server> = ["a", "b", "c"].iter().map(|name| start_box(&nats, name, &[])).collect();
    let stream = stream_of(&boxes[0]);
    for server in &boxes {
        assert_eq!(stream_of(server), stream, "every box gives the same stream");
    }
    let mut tablets: Vec<Tablet> =
        boxes.iter().enumerate().map(|(i, server)| Tablet::connect(&format!("t{i}"), server)).collect();
    const N: u64 = 30;
    for seq in 1..=N {
        let server = &boxes[seq as usize % 3];
        let path = if seq % 2 == 0 { Http } else { Unix };
        let reply = publish(&target(server), path, &emergency(&format!("e{seq}"))).unwrap();
        assert_eq!(seq_of(&reply), seq, "{reply}");
        assert_eq!(reply["stream"], stream.as_str(), "{reply}");
    }
    // A retry of e7 on another box and path: the same seq, nothing new.
    let retry = publish(&target(&boxes[0]), Http, &emergency("e7")).unwrap();
    assert_eq!((seq_of(&retry), &retry["duplicate"]), (7, &Value::Bool(true)), "{retry}");
    let last = publish(&target(&boxes[1]), Unix, &emergency("last")).unwrap();
    assert_eq!(seq_of(&last), N + 1, "the retry took a seq: {last}");
    for tablet in &mut tablets {
        tablet.recv_until(N + 1);
    }
    let views: Vec<&Tablet> = tablets.iter().collect();
    assert_all_got(&views, N + 1);
    let refs: Vec<&Server> = boxes.iter().collect();
    assert_boxes_store(&refs, &views, N + 1);
    // Each box's GET /emergencias/{seq} is the stored envelope, the bytes the tablets got.
    for server in &boxes {
        let one = server.get("/emergencias/5").json();
        assert_eq!(one["emergency"], serde_json::from_str::<Value>(&tablets[0].got[4].1).unwrap());
    }
}

/// `kill -9` of the stream's leader in the middle of a burst over two boxes: every publish is
/// retried under its idempotency key until accepted; every accepted one is stored once, the
/// seqs are dense, and a retry is answered with the original's seq.
#[test]
fn stream_leader_killed_mid_burst_loses_and_doubles_nothing() {
    let mut nats = NatsCluster::start();
    let (a, b) = two_boxes(&nats);
    let mut tablets = [Tablet::connect("a1", &a), Tablet::connect("a2", &a), Tablet::connect("b1", &b)];
    const N: u64 = 40;
    let targets = [target(&a), target(&b)];
    let progress = AtomicU64::new(0);
    let replies = Mutex::new(Vec::new());
    let killed = std::thread::scope(|scope| {
        scope.spawn(|| {
            for i in 1..=N {
                let path = if i % 3 == 0 { Unix } else { Http };
                let started = Instant::now();
                let (reply, refused) =
                    publish_until_ok(&targets[i as usize % 2], path, &format!("burst-{i}"));
                if refused > 0 || started.elapsed() > Duration::from_millis(500) {
                    eprintln!("burst-{i}: accepted after {refused} refusals, {:?}", started.elapsed());
                }
                replies.lock().unwrap().push((i, reply, refused));
                progress.store(i, Ordering::SeqCst);
            }
        });
        wait_long("10 emergencies accepted", || progress.load(Ordering::SeqCst) >= 10);
        let leader = nats.stream_leader(STREAM);
        nats.kill9(leader);
        leader
    });
    let replies = replies.into_inner().unwrap();
    let mut seqs: Vec<u64> = replies.iter().map(|(_, reply, _)| seq_of(reply)).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=N).collect::<Vec<_>>(), "accepted seqs are not dense: {replies:?}");
    // Retries of accepted emergencies, on the other box: the same seq, stored once.
    for (i, reply, _) in replies.iter().step_by(7) {
        let retry =
            publish(&targets[(*i as usize + 1) % 2], Http, &emergency(&format!("burst-{i}"))).unwrap();
        assert_eq!((seq_of(&retry), &retry["duplicate"]), (seq_of(reply), &Value::Bool(true)), "{retry}");
    }
    nats.restart(killed);
    nats.wait_all_healthy();
    assert_eq!(seq_of(&publish(&targets[0], Unix, &emergency("after")).unwrap()), N + 1);
    for tablet in &mut tablets {
        tablet.recv_until(N + 1);
    }
    let views: Vec<&Tablet> = tablets.iter().collect();
    assert_all_got(&views, N + 1);
    let stored = assert_boxes_store(&[&a, &b], &views, N + 1);
    for (i, reply, _) in &replies {
        assert_eq!(stored[&seq_of(reply)], format!("burst-{i}"), "{reply}");
    }
    assert_eq!(nats.stream_info(STREAM)["state"]["messages"], N + 1);
    eprintln!("refused tries during the failover: {}", replies.iter().map(|(_, _, r)| r).sum::<usize>());
}

/// `kill -9` of two of the three NATS servers: publishes on either box and path get 503 /
/// "engine unavailable", nothing is broadcast, tablets stay connected and a new one replays the
/// cache; once the servers are back, seqs go on from where they were.
#[test]
fn quorum_lost_refuses_publishes_then_seqs_go_on() {
    let mut nats = NatsCluster::start();
    let (a, b) = two_boxes(&nats);
    let mut tablets = [Tablet::connect("a1", &a), Tablet::connect("b1", &b)];
    for i in 1..=3u64 {
        publish(&target(if i % 2 == 0 { &a } else { &b }), Http, &emergency(&format!("before-{i}"))).unwrap();
    }
    for tablet in &mut tablets {
        tablet.recv_until(3);
    }
    let leader = nats.stream_leader(STREAM);
    let other = (leader + 1) % nats.len();
    let quorum_lost = Instant::now();
    nats.kill9(leader);
    nats.kill9(other);
    for server in [&a, &b] {
        for path in [Http, Unix] {
            assert_engine_unavailable(publish(
                &target(server),
                path,
                &emergency(&format!("refused-{path:?}")),
            ));
        }
        // A close is refused the same way, with the engine's reason.
        assert_engine_unavailable(publish_unix(&server.unix_socket, r#"{"type":"cerrar","seq":1}"#));
        let metrics = server.get("/metrics").body;
        let failures = metric(&metrics, "resq_engine_publish_failures_total");
        assert!(failures >= 2.0, "{metrics}");
    }
    for server in [&a, &b] {
        // Connected to the surviving server, but the stream does not answer: the engine is
        // unavailable to this box, and its monitoring says so.
        wait_engine(server, "disconnected");
    }
    eprintln!("quorum lost: /healthz 503 on both boxes {:?} after the kill", quorum_lost.elapsed());
    // A tablet connecting now replays what the box's cache has.
    let mut late = Tablet::connect("b2", &b);
    late.recv_until(3);
    // And stays so until the quorum is back: no flapping back to "connected" on a survivor's
    // answer naming a leader that is gone.
    let steady = Instant::now();
    while steady.elapsed() < Duration::from_secs(3) {
        for server in [&a, &b] {
            assert_eq!(engine_state(server), "disconnected", "/healthz flapped: {}", health(server));
        }
    }
    nats.restart(leader);
    nats.restart(other);
    nats.wait_all_healthy();
    wait_engine(&a, "connected");
    wait_engine(&b, "connected");
    let (reply, _) = publish_until_ok(&target(&a), Unix, "after-1");
    assert_eq!(seq_of(&reply), 4, "a refused publish was stored after all: {reply}");
    let (reply, _) = publish_until_ok(&target(&b), Http, "after-2");
    assert_eq!(seq_of(&reply), 5, "{reply}");
    for tablet in tablets.iter_mut().chain([&mut late]) {
        tablet.recv_until(5);
    }
    assert_eq!(name_at(&tablets[0], 4), "after-1", "something was broadcast while the quorum was lost");
    let views: Vec<&Tablet> = tablets.iter().chain([&late]).collect();
    assert_all_got(&views, 5);
    assert_boxes_store(&[&a, &b], &views, 5);
}

/// `kill -9` of a box in the middle of a burst published on both boxes: its publisher retries
/// what was in flight on the other box (stored once), its tablets move to the other box with
/// `?since=&stream=`, the box comes back on its address and catches up from the stream, and a
/// tablet moves back: no gap, no duplicate, the same bytes.
#[test]
fn box_killed_mid_burst_its_tablets_move_and_back() {
    let nats = NatsCluster::start();
    let (a, b) = two_boxes(&nats);
    let a_addr = a.addr;
    let mut on_a = [Tablet::connect("a1", &a), Tablet::connect("a2", &a)];
    let mut on_b = Tablet::connect("b1", &b);
    // Two publishers of 20 each, one on each box; the one on the killed box moves to the other
    // and retries there what was in flight, under its key.
    const EACH: u64 = 20;
    const N: u64 = 2 * EACH;
    let targets = [target(&a), target(&b)];
    let accepted = AtomicU64::new(0);
    let stored = Mutex::new(BTreeMap::new());
    let a_dir = std::thread::scope(|scope| {
        for (first, prefix) in [(0usize, "a"), (1, "b")] {
            let (targets, accepted, stored) = (&targets, &accepted, &stored);
            scope.spawn(move || {
                let mut current = first;
                for i in 1..=EACH {
                    let name = format!("{prefix}-{i}");
                    let path = if i % 2 == 0 { Unix } else { Http };
                    let reply = publish(&targets[current], path, &emergency(&name)).unwrap_or_else(|_| {
                        current = 1;
                        publish_until_ok(&targets[current], path, &name).0
                    });
                    assert!(stored.lock().unwrap().insert(seq_of(&reply), name).is_none(), "{reply}");
                    accepted.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        wait_long("10 emergencies accepted", || accepted.load(Ordering::SeqCst) >= 10);
        let dir = a.kill9();
        for tablet in &mut on_a {
            tablet.recv_until_gone();
            tablet.resume(&b);
        }
        dir
    });
    let stored = stored.into_inner().unwrap();
    assert_eq!(stored.keys().copied().collect::<Vec<_>>(), (1..=N).collect::<Vec<_>>(), "{stored:?}");
    for tablet in on_a.iter_mut().chain([&mut on_b]) {
        tablet.recv_until(N);
    }
    let a = restart_box(&nats, a_dir, a_addr, "a", &[]);
    wait_engine(&a, "connected");
    wait_box_seq(&a, N);
    on_a[0].resume(&a);
    assert_eq!(seq_of(&publish(&target(&b), Http, &emergency("back")).unwrap()), N + 1);
    for tablet in on_a.iter_mut().chain([&mut on_b]) {
        tablet.recv_until(N + 1);
    }
    let views: Vec<&Tablet> = on_a.iter().chain([&on_b]).collect();
    assert_all_got(&views, N + 1);
    let history = assert_boxes_store(&[&a, &b], &views, N + 1);
    for (seq, name) in &stored {
        assert_eq!(&history[seq], name, "seq {seq}");
    }
}

/// A box restarted while every NATS server is down: it listens, `/healthz` says the engine is
/// disconnected (503), tablets get what its cache has, publishes get 503; when the engine is
/// back the box reconnects and catches up on what the other box published.
#[test]
fn box_restarted_while_engine_down_serves_its_cache_then_catches_up() {
    let mut nats = NatsCluster::start();
    let (a, b) = two_boxes(&nats);
    for i in 1..=5u64 {
        publish(&target(&b), Unix, &emergency(&format!("e{i}"))).unwrap();
    }
    wait_box_seq(&a, 5);
    let mut before = Tablet::connect("a1", &a);
    before.recv_until(5);
    for index in 0..nats.len() {
        nats.kill9(index);
    }
    let a_addr = a.addr;
    let restarted = Instant::now();
    let a = restart_box(&nats, a.kill9(), a_addr, "a", &[]);
    eprintln!("engine down: the box listened {:?} after its start", restarted.elapsed());
    wait_engine(&a, "disconnected");
    assert_eq!(health(&a)["stream"], before.stream.as_str(), "the restarted box lost its stream");
    assert_engine_unavailable(publish(&target(&a), Http, &emergency("refused")));
    assert_engine_unavailable(publish(&target(&a), Unix, &emergency("refused")));
    let mut cached = Tablet::connect("a2", &a);
    cached.recv_until(5);
    before.recv_until_gone();
    before.resume(&a);
    for index in 0..nats.len() {
        nats.restart(index);
    }
    nats.wait_all_healthy();
    wait_engine(&b, "connected");
    for i in 6..=8u64 {
        let (reply, _) = publish_until_ok(&target(&b), Http, &format!("e{i}"));
        assert_eq!(seq_of(&reply), i, "{reply}");
    }
    wait_engine(&a, "connected");
    let mut on_b = Tablet::connect("b1", &b);
    for tablet in [&mut before, &mut cached, &mut on_b] {
        tablet.recv_until(8);
    }
    assert_all_got(&[&before, &cached, &on_b], 8);
    assert_boxes_store(&[&a, &b], &[&before, &cached, &on_b], 8);
}

const TOKEN_ONE: &str = "tablet-one-token-1111";
const TOKEN_TWO: &str = "tablet-two-token-2222";
const TOKEN_THREE: &str = "tablet-three-token-3333";

/// Boxes `a` and `b` with the subscribe tokens of tablet-1 and tablet-2. The token file's
/// directory goes with them.
fn boxes_with_tokens(nats: &NatsCluster) -> (Server, Server, TempDir) {
    let tokens = TempDir::new();
    let token_file = tokens.path().join("subscribe.tokens");
    std::fs::write(
        &token_file,
        format!("tablet-1 {TOKEN_ONE}\ntablet-2 {TOKEN_TWO}\ntablet-3 {TOKEN_THREE}\n"),
    )
    .unwrap();
    let flags = ["--subscribe-token-file", token_file.to_str().unwrap()];
    let a = start_box(nats, "a", &flags);
    let b = start_box(nats, "b", &flags);
    (a, b, tokens)
}

/// Boxes `a` and `b` with the subscribe tokens of tablet-1 and tablet-2, tablet-1 on `a` and
/// tablet-2 on `b`, and two emergencies both got. The token file's directory goes with them.
fn named_tablets_on_two_boxes(nats: &NatsCluster) -> (Server, Server, Tablet, Tablet, TempDir) {
    let (a, b, tokens) = boxes_with_tokens(nats);
    let mut one = Tablet::connect_with("tablet-1", &a, &format!("&token={TOKEN_ONE}"));
    let mut two = Tablet::connect_with("tablet-2", &b, &format!("&token={TOKEN_TWO}"));
    publish(&target(&a), Http, &emergency("e1")).unwrap();
    publish(&target(&b), Unix, &emergency("e2")).unwrap();
    one.recv_until(2);
    two.recv_until(2);
    (a, b, one, two, tokens)
}

/// `GET /emergencias/{seq}`'s status on `server`, its `fields` only.
fn status_fields<const N: usize>(server: &Server, seq: u64, fields: [&str; N]) -> [Value; N] {
    let status = server.get(&format!("/emergencias/{seq}?token={TOKEN_ONE}")).json()["status"].clone();
    fields.map(|field| status[field].clone())
}

/// Named tablets on two boxes: an ack on one box (WebSocket) and one on the other (HTTP), and a
/// close, are seen on both boxes: the same acks, the same close.
#[test]
fn acks_and_closes_on_one_box_are_seen_on_the_other() {
    let nats = NatsCluster::start();
    let (a, b, mut one, mut two, _tokens) = named_tablets_on_two_boxes(&nats);
    one.send(r#"{"type":"ack","seq":1}"#);
    let seen = two.recv_notice("ack", 1, |ack| ack["by"] == "tablet-1");
    assert_eq!(seen["acked"], 1, "{seen}");
    let response = http_ack(&b, 1, TOKEN_TWO);
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.json()["acked"], 2, "{}", response.body);
    let seen = one.recv_notice("ack", 1, |ack| ack["by"] == "tablet-2");
    assert_eq!(seen["acked"], 2, "{seen}");
    let closed = publish_unix(&a.unix_socket, r#"{"type":"cerrar","seq":1,"motivo":"resuelta"}"#).unwrap();
    assert_eq!(closed["closed"], true, "{closed}");
    two.recv_notice("closed", 1, |_| true);
    let fields = ["acked", "acked_by", "closed", "close"];
    wait_long("the same status on both boxes", || {
        status_fields(&a, 1, fields) == status_fields(&b, 1, fields)
    });
    let [acked, acked_by, closed, close] = status_fields(&a, 1, fields);
    assert_eq!((acked, closed), (2.into(), true.into()));
    assert_eq!(acked_by, serde_json::json!(["tablet-1", "tablet-2"]));
    assert_eq!(close, serde_json::json!({"motivo": "resuelta"}));
    assert_all_got(&[&one, &two], 2);
}

/// `POST /emergencias/{seq}/ack` on `server` as the tablet of `token`.
fn http_ack(server: &Server, seq: u64, token: &str) -> common::HttpResponse {
    let request = format!(
        "POST /emergencias/{seq}/ack?token={token} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    server.http(request.as_bytes())
}

/// One token's tablet acking on two boxes: its ack on `a` reaches `b` before the tablet acks
/// there too; `b` keeps one receipt for the name, so the second ack is a repeat and every box
/// counts one ack and one delivery, by tablet-1.
#[test]
fn one_named_tablet_acking_on_two_boxes_counts_once() {
    let nats = NatsCluster::start();
    let (a, b, _tokens) = boxes_with_tokens(&nats);
    publish(&target(&a), Http, &emergency("e1")).unwrap();
    wait_box_seq(&b, 1);
    // Right after the boxes start, the receipts stream may have no leader yet (a box says
    // "connected" for the emergencies' stream): the ack is refused with a 503, and a retry
    // (acks are idempotent) is taken once it has one.
    let deadline = Instant::now() + ENGINE_PATIENCE;
    let response = loop {
        let response = http_ack(&a, 1, TOKEN_ONE);
        if response.status != 503 || Instant::now() >= deadline {
            break response;
        }
        std::thread::sleep(RETRY_PAUSE);
    };
    assert_eq!((response.status, response.json()["acked"].clone()), (200, 1.into()), "{}", response.body);
    wait_long("the ack on b", || status_fields(&b, 1, ["acked"])[0] == 1);
    let mut on_b = Tablet::connect_with("tablet-1", &b, &format!("&token={TOKEN_ONE}"));
    on_b.recv_until(1);
    let response = http_ack(&b, 1, TOKEN_ONE);
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.json()["acked"], 1, "tablet-1 counted twice on b: {}", response.body);
    assert_eq!(response.json()["duplicate"], true, "{}", response.body);
    for server in [&a, &b] {
        wait_long("tablet-1's delivery on both boxes", || status_fields(server, 1, ["delivered"])[0] == 1);
        let [acked, acked_by, delivered] = status_fields(server, 1, ["acked", "acked_by", "delivered"]);
        assert_eq!((acked, delivered), (1.into(), 1.into()));
        assert_eq!(acked_by, serde_json::json!(["tablet-1"]));
    }
    assert_all_got(&[&on_b], 1);
}

/// Tablets without a name on two boxes: each is labelled with its box (`a/client-...`,
/// `b/client-...`), so the two never count as one, and both boxes count both deliveries and acks.
#[test]
fn unnamed_tablets_on_two_boxes_stay_distinct() {
    let nats = NatsCluster::start();
    let (a, b) = two_boxes(&nats);
    let mut on_a = Tablet::connect("unnamed-a", &a);
    let mut on_b = Tablet::connect("unnamed-b", &b);
    publish(&target(&a), Http, &emergency("e1")).unwrap();
    on_a.recv_until(1);
    on_b.recv_until(1);
    on_a.send(r#"{"type":"ack","seq":1}"#);
    on_b.send(r#"{"type":"ack","seq":1}"#);
    let status = |server: &Server| server.get("/emergencias/1").json()["status"].clone();
    wait_long("both acks and deliveries on both boxes", || {
        [&a, &b].iter().all(|server| {
            let status = status(server);
            status["acked"] == 2 && status["delivered"] == 2
        })
    });
    let acked_by = status(&a)["acked_by"].clone();
    let mut labels: Vec<&str> = acked_by.as_array().unwrap().iter().filter_map(Value::as_str).collect();
    labels.sort();
    assert_eq!(labels.len(), 2, "{acked_by}");
    assert!(labels[0].starts_with("a/client-") && labels[1].starts_with("b/client-"), "{acked_by}");
}

/// "Seen by 2 of 2" on every box: with one tablet on each box, both deliveries count on both;
/// and a delivery made while the quorum is lost (a replay from a box's cache) counts on the
/// other box once the engine is back.
#[test]
fn deliveries_count_on_every_box() {
    let mut nats = NatsCluster::start();
    let (a, b, one, two, _tokens) = named_tablets_on_two_boxes(&nats);
    let delivered = |server: &Server| status_fields(server, 1, ["delivered"])[0].clone();
    wait_long("both deliveries on both boxes", || delivered(&a) == 2 && delivered(&b) == 2);
    assert_all_got(&[&one, &two], 2);
    let leader = nats.stream_leader(STREAM);
    let other = (leader + 1) % nats.len();
    nats.kill9(leader);
    nats.kill9(other);
    wait_engine(&a, "disconnected");
    let mut three = Tablet::connect_with("tablet-3", &a, &format!("&token={TOKEN_THREE}"));
    three.recv_until(2);
    wait_long("the replay's delivery on its box", || delivered(&a) == 3);
    nats.restart(leader);
    nats.restart(other);
    nats.wait_all_healthy();
    wait_long("the delivery made while the quorum was lost, on the other box", || delivered(&b) == 3);
}

/// `--on-unacked` on three boxes: each box broadcasts `unacked`, and the command runs on one box
/// only for each emergency.
#[test]
fn unacked_command_runs_on_one_box_only() {
    let nats = NatsCluster::start();
    let runs = TempDir::new();
    let ran = runs.path().join("ran");
    let names = ["a", "b", "c"];
    let commands: Vec<String> = names
        .iter()
        .map(|name| format!("printf '%s {name}\\n' \"$RESQ_SEQ\" >> {}", ran.display()))
        .collect();
    let boxes: Vec<Server> = names
        .iter()
        .zip(&commands)
        .map(|(name, command)| start_box(&nats, name, &["--ack-timeout", "1", "--on-unacked", command]))
        .collect();
    let mut tablets: Vec<Tablet> =
        boxes.iter().enumerate().map(|(i, server)| Tablet::connect(&format!("t{i}"), server)).collect();
    for i in 1..=3u64 {
        publish(&target(&boxes[i as usize % 3]), Http, &emergency(&format!("e{i}"))).unwrap();
    }
    for tablet in &mut tablets {
        for seq in 1..=3 {
            tablet.recv_notice("unacked", seq, |_| true);
        }
    }
    let lines = || std::fs::read_to_string(&ran).unwrap_or_default();
    wait_long("the commands of seqs 1..3", || (1..=3).all(|seq| lines().contains(&format!("{seq} "))));
    // A later emergency's escalation: by then every box has passed the deadlines of 1..3.
    publish(&target(&boxes[0]), Unix, &emergency("e4")).unwrap();
    for tablet in &mut tablets {
        tablet.recv_notice("unacked", 4, |_| true);
    }
    wait_long("the command of seq 4", || lines().contains("4 "));
    let text = lines();
    for seq in 1..=3 {
        let count = text.lines().filter(|line| line.starts_with(&format!("{seq} "))).count();
        assert_eq!(count, 1, "seq {seq}'s command ran {count} times:\n{text}\n{}", claim_logs(&boxes));
    }
    let views: Vec<&Tablet> = tablets.iter().collect();
    assert_all_got(&views, 4);
}

/// What the boxes logged about escalations and their claims.
fn claim_logs(boxes: &[impl std::borrow::Borrow<Server>]) -> String {
    let lines = boxes.iter().flat_map(|server| {
        let logs = server.borrow().logs();
        logs.lines()
            .filter(|line| line.contains("claim") || line.contains("unacked"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    });
    lines.collect::<Vec<_>>().join("\n")
}

/// The box running an escalation's command is killed: another box takes the escalation over
/// once the claim's lease (`--escalation-time-limit` plus a margin) has run out.
#[test]
fn unacked_command_is_taken_over_when_its_box_dies() {
    let nats = NatsCluster::start();
    let runs = TempDir::new();
    let ran = runs.path().join("ran");
    let names = ["a", "b"];
    let commands: Vec<String> = names
        .iter()
        .map(|name| format!("printf '%s {name}\\n' \"$RESQ_SEQ\" >> {}; exec sleep 5", ran.display()))
        .collect();
    let mut boxes: Vec<Option<Server>> = names
        .iter()
        .zip(&commands)
        .map(|(name, command)| {
            let flags = ["--ack-timeout", "1", "--on-unacked", command, "--escalation-time-limit", "2"];
            Some(start_box(&nats, name, &flags))
        })
        .collect();
    publish(&target(boxes[0].as_ref().unwrap()), Http, &emergency("e1")).unwrap();
    let lines = || std::fs::read_to_string(&ran).unwrap_or_default();
    wait_long("seq 1's command", || lines().contains("1 "));
    let claimed = Instant::now();
    let first = lines();
    let first = first.lines().next().unwrap();
    let winner = names.iter().position(|name| first == format!("1 {name}")).unwrap();
    boxes[winner].take().unwrap().kill9();
    let survivor = names[1 - winner];
    wait_long("the surviving box taking seq 1 over", || lines().contains(&format!("1 {survivor}")));
    let text = lines();
    assert_eq!(text.lines().count(), 2, "{text}");
    // Not before the claim's lease ran out: while its claimer lived, the command was its alone.
    let waited = claimed.elapsed();
    let logs = claim_logs(&[boxes[1 - winner].as_ref().unwrap()]);
    assert!(
        waited >= Duration::from_millis(1900),
        "taken over after {waited:?}, within the lease:\n{text}\n{logs}"
    );
}

/// A box frozen (SIGSTOP) while the other publishes more than its tablets' `--queue`: thawed, it
/// takes in everything from the stream, and its tablets get it all (directly, or dropped as too
/// slow and resuming).
#[test]
fn box_frozen_past_queue_catches_up() {
    let nats = NatsCluster::start();
    let a = start_box(&nats, "a", &["--queue", "4"]);
    let b = start_box(&nats, "b", &[]);
    let mut on_a = [Tablet::connect("a1", &a), Tablet::connect("a2", &a)];
    let mut on_b = Tablet::connect("b1", &b);
    common::signal(a.pid(), "STOP");
    const N: u64 = 40;
    for i in 1..=N {
        let path = if i % 2 == 0 { Unix } else { Http };
        assert_eq!(seq_of(&publish(&target(&b), path, &emergency(&format!("e{i}"))).unwrap()), i);
    }
    common::signal(a.pid(), "CONT");
    on_b.recv_until(N);
    for tablet in &mut on_a {
        let resumed = tablet.recv_until_resuming(&a, N);
        eprintln!("frozen box: {} resumed {resumed} times", tablet.name);
    }
    let views: Vec<&Tablet> = on_a.iter().chain([&on_b]).collect();
    assert_all_got(&views, N);
    assert_boxes_store(&[&a, &b], &views, N);
}

/// Everything killed with `kill -9` (the three NATS servers and both boxes) in the middle of
/// publishes on both boxes, then restarted: the publishes whose reply was lost are retried
/// under their key, and then the acknowledged set equals the stored set, seqs 1..N.
#[test]
fn everything_killed_and_restarted_acknowledged_equals_stored() {
    let mut nats = NatsCluster::start();
    let (a, b) = two_boxes(&nats);
    let mut tablets = [Tablet::connect("a1", &a), Tablet::connect("b1", &b)];
    let targets = [target(&a), target(&b)];
    let (a_addr, b_addr) = (a.addr, b.addr);
    let accepted = AtomicU64::new(0);
    // Per publisher: what it had accepted (name -> seq), and the name in flight when it stopped.
    let outcomes = Mutex::new(Vec::new());
    let (a_dir, b_dir) = std::thread::scope(|scope| {
        for (index, path) in [(0usize, Http), (1, Unix)] {
            let (targets, accepted, outcomes) = (&targets, &accepted, &outcomes);
            scope.spawn(move || {
                let mut acked = BTreeMap::new();
                for i in 1.. {
                    let name = format!("p{index}-{i}");
                    match publish(&targets[index], path, &emergency(&name)) {
                        Ok(reply) => {
                            acked.insert(name, seq_of(&reply));
                            accepted.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => {
                            outcomes.lock().unwrap().push((index, path, acked, name));
                            return;
                        }
                    }
                }
            });
        }
        wait_long("20 emergencies accepted", || accepted.load(Ordering::SeqCst) >= 20);
        let dirs = (a.kill9(), b.kill9());
        for index in 0..nats.len() {
            nats.kill9(index);
        }
        dirs
    });
    for index in 0..nats.len() {
        nats.restart(index);
    }
    nats.wait_all_healthy();
    let a = restart_box(&nats, a_dir, a_addr, "a", &[]);
    let b = restart_box(&nats, b_dir, b_addr, "b", &[]);
    wait_engine(&a, "connected");
    wait_engine(&b, "connected");
    let mut acknowledged: BTreeMap<u64, String> = BTreeMap::new();
    for (index, path, acked, in_flight) in outcomes.into_inner().unwrap() {
        let (reply, _) = publish_until_ok(&targets[index], path, &in_flight);
        for (name, seq) in acked.into_iter().chain([(in_flight, seq_of(&reply))]) {
            assert!(
                acknowledged.insert(seq, name.clone()).is_none(),
                "seq {seq} acknowledged twice ({name})"
            );
        }
    }
    let n = acknowledged.len() as u64;
    wait_box_seq(&a, n);
    wait_box_seq(&b, n);
    for (tablet, server) in tablets.iter_mut().zip([&a, &b]) {
        tablet.recv_until_gone();
        tablet.resume(server);
        tablet.recv_until(n);
    }
    let mut fresh = Tablet::connect("fresh", &b);
    fresh.recv_until(n);
    let views: Vec<&Tablet> = tablets.iter().chain([&fresh]).collect();
    assert_all_got(&views, n);
    let stored = assert_boxes_store(&[&a, &b], &views, n);
    assert_eq!(stored, acknowledged, "the stored set is not the acknowledged set");
    assert_eq!(nats.stream_info(STREAM)["state"]["last_seq"], n);
}

/// The stream deleted (an operator's `nats stream rm RESQ`, the receipts' stream left as it is)
/// and recreated by the boxes: a new stream identity, seqs from 1 again, no receipt of the old
/// history on the new one, and a tablet resuming with the old `&stream=` gets
/// `stream_changed: true` and the new history.
#[test]
fn stream_deleted_and_recreated_gives_stream_changed() {
    let nats = NatsCluster::start();
    let (a, b) = two_boxes(&nats);
    for i in 1..=3u64 {
        publish(&target(&a), Http, &emergency(&format!("old-{i}"))).unwrap();
    }
    let mut tablet = Tablet::connect("b1", &b);
    tablet.recv_until(3);
    // An ack in the old history, which must not stick to the new history's seq 1.
    tablet.send(r#"{"type":"ack","seq":1}"#);
    tablet.recv_notice("ack", 1, |_| true);
    let old_stream = tablet.stream.clone();
    nats.delete_stream(STREAM);
    let (reply, _) = publish_until_ok(&target(&a), Http, "new-1");
    let new_stream = reply["stream"].as_str().unwrap().to_owned();
    assert_ne!(new_stream, old_stream, "{reply}");
    assert_eq!(seq_of(&reply), 1, "{reply}");
    wait_long("box b on the new stream", || stream_of(&b) == new_stream);
    // The box closes the old history's connections (nothing of the new one is sent on them: the
    // seqs would go back), and the tablet resumes as after any close.
    tablet.recv_until_gone();
    assert_eq!(tablet.close_code, Some(1012), "{}: closed without 1012", tablet.name);
    let welcome = tablet.reconnect(&b);
    assert_eq!(welcome["stream"], new_stream.as_str(), "{welcome}");
    assert_eq!(welcome["replay"]["stream_changed"], true, "{welcome}");
    // As the README says a tablet must: start over from seq 0 on the new stream.
    tablet.got.clear();
    tablet.stream = new_stream;
    tablet.recv_until(1);
    assert_eq!(name_at(&tablet, 1), "new-1");
    for server in [&a, &b] {
        let status = server.get("/emergencias/1").json()["status"].clone();
        assert_eq!(status["acked"], 0, "the old history's ack counts on the new seq 1: {status}");
    }
    let mut on_a = Tablet::connect("a1", &a);
    on_a.recv_until(1);
    assert_all_got(&[&tablet, &on_a], 1);
}

/// The harness itself (tests/common/nats.rs): a replicated stream gets a leader; `kill -9` of
/// it elects another, and the killed node restarted on its store catches up.
#[test]
fn nats_harness_elects_a_new_leader_and_restarts_a_node() {
    let mut nats = NatsCluster::start();
    let config = r#"{"name":"HARNESS","subjects":["HARNESS.>"],"num_replicas":3,"storage":"file"}"#;
    let created = nats.js_api("$JS.API.STREAM.CREATE.HARNESS", config);
    assert_eq!(created["config"]["num_replicas"], 3, "{created}");
    let leader = nats.stream_leader("HARNESS");
    nats.kill9(leader);
    wait_long("another leader", || {
        let info = nats.stream_info("HARNESS");
        info["cluster"]["leader"].as_str().is_some_and(|name| nats.index_of(name) != leader)
    });
    nats.restart(leader);
    nats.wait_healthy(leader);
    let (status, jsz) = nats.monitor(leader, "/jsz").unwrap();
    assert_eq!(status, 200);
    let jsz: Value = serde_json::from_str(&jsz).unwrap();
    assert_eq!(jsz["config"]["sync_always"], true, "{jsz}");
}

/// `deploy/site-ca`'s CA and server certificate for localhost and 127.0.0.1, in `dir/site`.
fn site_certificates(dir: &Path) -> PathBuf {
    let site = dir.join("site");
    let user =
        String::from_utf8(std::process::Command::new("id").arg("-un").output().unwrap().stdout).unwrap();
    let output = std::process::Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/site-ca"))
        .args(["--dir", site.to_str().unwrap(), "--owner", user.trim()])
        .args(["--name", "localhost", "--ip", "127.0.0.1", "--no-reload"])
        .output()
        .expect("cannot run deploy/site-ca (is openssl installed?)");
    assert!(output.status.success(), "deploy/site-ca failed: {}", String::from_utf8_lossy(&output.stderr));
    site
}

/// A box's flags for `nats` with `urls` instead of its plain ones, and `extra`.
fn box_flags_with(nats: &NatsCluster, urls: &str, extra: &[String]) -> Vec<String> {
    let mut flags = box_args(nats, "a", None);
    flags[1] = urls.to_owned();
    flags.extend_from_slice(extra);
    flags
}

fn start_with_flags(flags: &[String]) -> Server {
    Server::start(&flags.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The credentials and TLS to NATS: a box connects over `tls://` trusting only the site CA
/// (`--nats-ca-cert`), as a user with its password file, and publishes; with a wrong password
/// it stays disconnected and a publish gets 503. Then a token (`--nats-token`) on a cluster
/// that asks for one.
#[test]
fn credentials_and_tls_to_nats_are_used() {
    let dir = TempDir::new();
    let certs = site_certificates(dir.path());
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let (right, wrong) = (file("nats.password", "s3cret-password\n"), file("wrong.password", "not-it\n"));
    let cert = |name: &str| certs.join(name).display().to_string();
    let nats = NatsCluster::start_with(&format!(
        "authorization {{ users: [ {{ user: resq, password: \"s3cret-password\" }} ] }}\n\
         tls {{ cert_file: \"{}\", key_file: \"{}\" }}",
        cert("server.crt"),
        cert("server.key")
    ));
    let urls = nats.urls().replace("nats://", "tls://");
    let user = |password: &str| -> Vec<String> {
        let flags =
            ["--nats-user", "resq", "--nats-password-file", password, "--nats-ca-cert", &cert("ca.crt")];
        flags.map(str::to_owned).to_vec()
    };
    let good = start_with_flags(&box_flags_with(&nats, &urls, &user(&right)));
    wait_engine(&good, "connected");
    let mut tablet = Tablet::connect("t1", &good);
    assert_eq!(seq_of(&publish(&target(&good), Http, &emergency("over-tls")).unwrap()), 1);
    tablet.recv_until(1);
    let refused = start_with_flags(&box_flags_with(&nats, &urls, &user(&wrong)));
    assert_engine_unavailable(publish(&target(&refused), Http, &emergency("wrong-password")));
    assert_eq!(engine_state(&refused), "disconnected", "{}", health(&refused));
    drop((good, refused, nats));

    let nats = NatsCluster::start_with("authorization { token: \"t0ken-for-resq\" }");
    let token = ["--nats-token".to_owned(), file("nats.token", "t0ken-for-resq\n")];
    let with_token = start_with_flags(&box_flags_with(&nats, &nats.urls(), &token));
    wait_engine(&with_token, "connected");
    assert_eq!(seq_of(&publish(&target(&with_token), Unix, &emergency("with-token")).unwrap()), 1);
}
