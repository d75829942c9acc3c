//! The README's browser client, run as it stands in a real browser against the real server.
//!
//! `tests/browser/readme_client.mjs` takes the `<script>` under "### A browser client" out of
//! README.md, points its `const server = ...` line at the server a test started, and runs it in
//! headless Chromium (Debian's `/usr/bin/chromium`, or `RESQ_CHROMIUM`) through Playwright
//! (`playwright-core`, pinned by `tests/browser/package-lock.json`), with `showEmergency`
//! replaced by a recorder. The test says what to do (open a page, wait for so many deliveries,
//! close it) one JSON line at a time and asserts on what the page reported; it publishes and
//! restarts the server itself. Every wait is for an event, with a timeout.
//!
//! Needs `node`, the npm packages (`npm ci` in `tests/browser`; `bash scripts/test` does it) and
//! Chromium (`apt-get install chromium`; `.ci/run` does it). Without them the tests fail with a
//! message saying so: they never skip.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use common::browser::Browser;
use common::{PATIENCE, Server};
use serde_json::{Value, json};

/// A reconnect after a server restart waits out the snippet's backoff (up to 2 s for the
/// second attempt) and any delay Chromium adds after a failed connection.
const RECONNECT_PATIENCE: Duration = Duration::from_secs(30);

/// `tests/browser/readme_client.mjs`, with README.md: its pages share one browser context (so
/// one localStorage).
fn launch() -> Browser {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    Browser::launch("readme_client.mjs", &[readme.as_os_str()])
}

/// The commands of `readme_client.mjs`.
trait ReadmePages {
    fn open(&mut self, page: &str, server: &str, stubs: Value) -> Value;
    /// Waits until `page` has reported `count` events of `kind` and returns its state.
    fn wait(&mut self, page: &str, kind: &str, count: usize) -> Value;
    fn wait_up_to(&mut self, page: &str, kind: &str, count: usize, patience: Duration) -> Value;
    fn close(&mut self, page: &str) -> Value;
}

impl ReadmePages for Browser {
    fn open(&mut self, page: &str, server: &str, stubs: Value) -> Value {
        self.call(json!({"cmd": "open", "page": page, "server": server, "stubs": stubs}))
    }

    fn wait(&mut self, page: &str, kind: &str, count: usize) -> Value {
        self.wait_up_to(page, kind, count, PATIENCE)
    }

    fn wait_up_to(&mut self, page: &str, kind: &str, count: usize, patience: Duration) -> Value {
        let timeout_ms = patience.as_millis() as u64;
        self.call(
            json!({"cmd": "wait", "page": page, "kind": kind, "count": count, "timeout_ms": timeout_ms}),
        )
    }

    fn close(&mut self, page: &str) -> Value {
        self.call(json!({"cmd": "close", "page": page}))
    }
}

fn ws_url(server: &Server) -> String {
    format!("ws://{}", server.addr)
}

/// Publishes `data` over HTTP, or over the Unix socket when `unix` is given; returns its seq.
fn publish(server: &Server, unix: Option<&mut common::UnixPublisher>, data: &Value) -> u64 {
    match unix {
        Some(publisher) => publisher.publish(&data.to_string()),
        None => {
            let response = server.post(&data.to_string());
            assert_eq!(response.status, 202, "{}", response.body);
            response.json()["seq"].as_u64().unwrap()
        }
    }
}

/// Publishes one emergency per seq, alternating HTTP and the Unix socket; returns what each
/// delivery should be.
fn publish_each(server: &Server, seqs: std::ops::RangeInclusive<u64>, tag: &str) -> Vec<Value> {
    let mut unix = server.unix();
    seqs.map(|seq| {
        let data = json!({"tipo": "incendio", "n": seq, "history": tag});
        let via = if seq % 2 == 0 { Some(&mut unix) } else { None };
        assert_eq!(publish(server, via, &data), seq);
        json!({"seq": seq, "data": data})
    })
    .collect()
}

fn assert_no_errors(state: &Value) {
    assert_eq!(state["errors"], json!([]), "uncaught exceptions in the page: {state:#}");
}

/// Each emergency published while the page is connected is shown once, in seq order, with its
/// data; a page that loses the server (here: a restart, same history) reconnects by itself and
/// goes on, and a page opened later resumes from the seq it stored, getting what it missed.
#[test]
fn a_page_shows_each_emergency_once_in_order_and_resumes_where_it_stopped() {
    let mut browser = launch();
    let server = Server::start(&[]);
    let url = ws_url(&server);
    browser.open("tablet", &url, json!({}));
    let state = browser.wait("tablet", "welcome", 1);
    let stream = state["welcomes"][0]["stream"].clone();

    let mut expected = publish_each(&server, 1..=6, "first");
    let state = browser.wait("tablet", "delivery", 6);
    assert_eq!(state["deliveries"], json!(expected), "{state:#}");

    let addr = server.addr.to_string();
    let server = Server::start_in(server.stop(), &["--listen", &addr]);
    let state = browser.wait_up_to("tablet", "welcome", 2, RECONNECT_PATIENCE);
    let replay = &state["welcomes"][1]["replay"];
    assert_eq!(state["welcomes"][1]["stream"], stream, "{state:#}");
    assert_eq!(
        (replay["since"].as_u64(), replay["stream_changed"].as_bool()),
        (Some(6), Some(false)),
        "{state:#}"
    );
    expected.extend(publish_each(&server, 7..=7, "first"));
    let state = browser.wait("tablet", "delivery", 7);
    assert_eq!(state["deliveries"], json!(expected), "{state:#}");
    assert_no_errors(&browser.close("tablet"));

    let missed = publish_each(&server, 8..=9, "first");
    browser.open("reopened", &url, json!({}));
    let state = browser.wait("reopened", "delivery", 2);
    let replay = &state["welcomes"][0]["replay"];
    assert_eq!((replay["since"].as_u64(), replay["count"].as_u64()), (Some(7), Some(2)), "{state:#}");
    assert_eq!(state["deliveries"], json!(missed), "{state:#}");
    let live = publish_each(&server, 10..=10, "first");
    let state = browser.wait("reopened", "delivery", 3);
    assert_eq!(state["deliveries"], json!([missed, live].concat()), "{state:#}");
    assert_no_errors(&state);
    assert_eq!(state["alerts"], json!([]), "{state:#}");
}

/// A page that met a new history (here: an in-memory server restarted, a new stream) and was
/// closed before the new history's first emergency must not keep the old history's seq: the
/// next page would resume after it and silently skip the new history's first seqs (`missed` 0).
#[test]
fn a_page_that_met_a_new_history_resumes_from_its_start() {
    let mut browser = launch();
    let server = Server::start(&["--in-memory"]);
    let url = ws_url(&server);
    browser.open("before", &url, json!({}));
    browser.wait("before", "welcome", 1);
    publish_each(&server, 1..=3, "old");
    let state = browser.wait("before", "delivery", 3);
    let old_stream = state["welcomes"][0]["stream"].clone();

    let addr = server.addr.to_string();
    let server = Server::start_in(server.stop(), &["--in-memory", "--listen", &addr]);
    let state = browser.wait_up_to("before", "welcome", 2, RECONNECT_PATIENCE);
    let welcome = &state["welcomes"][1];
    assert_ne!(welcome["stream"], old_stream, "{state:#}");
    assert_eq!(
        (welcome["replay"]["stream_changed"].as_bool(), welcome["seq"].as_u64()),
        (Some(true), Some(0)),
        "{state:#}"
    );
    // Closed before the new history has anything.
    assert_no_errors(&browser.close("before"));

    let expected = publish_each(&server, 1..=5, "new");
    browser.open("after", &url, json!({}));
    let state = browser.wait("after", "welcome", 1);
    let replay = &state["welcomes"][0]["replay"];
    assert_eq!(
        (replay["stream_changed"].as_bool(), replay["since"].as_u64()),
        (Some(false), Some(0)),
        "the page kept the new stream but resumed after the old history's seq {}: {state:#}",
        replay["since"]
    );
    let state = browser.wait("after", "delivery", 5);
    assert_eq!(state["deliveries"], json!(expected), "{state:#}");
    assert_no_errors(&state);
}

/// With Math.random at either end of its range, the snippet's reconnect delays follow the
/// README: 1 s, 2 s, 4 s, ... up to 30 s and never beyond, with jitter (at most half a step
/// shorter) kept at the cap. The connections really fail: the server is full (503).
#[test]
fn reconnect_delays_grow_to_30_s_and_never_beyond() {
    const ATTEMPTS: usize = 8;
    let mut browser = launch();
    let server = Server::start(&["--in-memory", "--max-clients", "1"]);
    let (_only_client, _) = server.subscribe();
    let url = ws_url(&server);
    let stubs = |random: f64| json!({"random": random, "backoff_attempts": ATTEMPTS});
    browser.open("high", &url, stubs(0.999_999_999));
    browser.open("low", &url, stubs(0.0));
    let delays = |state: &Value| -> Vec<f64> {
        assert_eq!(state["welcomes"], json!([]), "{state:#}");
        assert_eq!(state["sockets"].as_array().unwrap().len(), ATTEMPTS + 1, "{state:#}");
        state["delays"].as_array().unwrap().iter().map(|delay| delay.as_f64().unwrap()).collect()
    };
    let high = delays(&browser.wait("high", "delay", ATTEMPTS + 1));
    let low = delays(&browser.wait("low", "delay", ATTEMPTS + 1));
    assert!(high.iter().chain(&low).all(|&delay| delay <= 30_000.0), "delays over 30 s: {high:?} {low:?}");
    for (attempt, (&top, &bottom)) in high.iter().zip(&low).enumerate() {
        let step = (1000.0 * 2f64.powi(attempt as i32)).min(30_000.0);
        assert!(top <= step && top > step * 0.99, "attempt {attempt}: the step is {step} ms: {high:?}");
        assert!((step / 2.0..=step).contains(&bottom), "attempt {attempt}: the step is {step} ms: {low:?}");
    }
    let at_cap = ATTEMPTS; // 2^8 s is far over the cap
    assert!(high[at_cap] - low[at_cap] >= 10_000.0, "no jitter left at the cap: {high:?} {low:?}");
}

/// The heartbeat's first run can come before the socket is open (a server slow to answer the
/// upgrade, or not answering): it must not call `send` then (that throws), and a connection
/// stuck in CONNECTING is still given up after 45 s with nothing heard. Once open, it pings and
/// hears pongs. The heartbeat runs every 20 ms here.
#[test]
fn the_heartbeat_waits_for_the_socket_to_open() {
    let mut browser = launch();
    // Accepts TCP connections (the kernel does) and never answers the upgrade.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let fast = json!({"heartbeat_ms": 20});
    browser.open("connecting", &format!("ws://{}", silent.local_addr().unwrap()), fast.clone());
    let state = browser.wait("connecting", "tick", 5);
    assert_no_errors(&state);
    assert!(state["ticks"].as_array().unwrap().iter().all(|state| state == 0), "{state:#}");
    assert_eq!(state["sends"], json!([]), "{state:#}");
    // 60 s later by the page's clock, nothing heard: the next run closes the stuck socket.
    browser.call(json!({"cmd": "clock", "page": "connecting", "offset_ms": 60_000}));
    let state = browser.wait("connecting", "close", 1);
    assert_no_errors(&state);

    let server = Server::start(&["--in-memory"]);
    browser.open("open", &ws_url(&server), fast);
    let state = browser.wait("open", "pong", 2);
    assert_no_errors(&state);
    let sends = state["sends"].as_array().unwrap();
    assert!(sends.iter().all(|send| send == &json!({"data": "ping", "readyState": 1})), "{state:#}");
}
