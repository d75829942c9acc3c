//! The operators' console, the server's own page at `/`, in headless Chromium against the real
//! server: `tests/browser/console.mjs` opens pages (each a tablet with a browser context of its
//! own), waits for what an operator would see and clicks; the test publishes (HTTP and the Unix
//! socket) and restarts the server. Every wait is for a condition on the page, with a timeout.
//! Needs node, the npm packages and Chromium, like `tests/browser.rs`; never skips.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::browser::Browser;
use common::{PATIENCE, Server};
use serde_json::{Value, json};

/// A reconnect after a restart waits out the client's backoff (1 s, 2 s, 4 s, ... with jitter).
const RECONNECT_PATIENCE: Duration = Duration::from_secs(30);

fn launch() -> Browser {
    Browser::launch("console.mjs", &[])
}

/// The console's commands.
trait Console {
    fn open(&mut self, page: &str, url: &str) -> Value;
    fn wait_for(&mut self, page: &str, until: Value) -> Value;
    fn wait_up_to(&mut self, page: &str, until: Value, patience: Duration) -> Value;
    fn click(&mut self, page: &str, selector: &str) -> Value;
}

impl Console for Browser {
    fn open(&mut self, page: &str, url: &str) -> Value {
        self.call(json!({"cmd": "open", "page": page, "url": url}))
    }

    fn wait_for(&mut self, page: &str, until: Value) -> Value {
        self.wait_up_to(page, until, PATIENCE)
    }

    fn wait_up_to(&mut self, page: &str, until: Value, patience: Duration) -> Value {
        let timeout_ms = patience.as_millis() as u64;
        self.call(json!({"cmd": "wait", "page": page, "until": until, "timeout_ms": timeout_ms}))
    }

    fn click(&mut self, page: &str, selector: &str) -> Value {
        self.call(json!({"cmd": "click", "page": page, "selector": selector}))
    }
}

fn console_url(server: &Server, query: &str) -> String {
    format!("http://{}/{query}", server.addr)
}

/// The seqs of the cards, as listed (newest first).
fn listed(state: &Value) -> Vec<u64> {
    state["cards"].as_array().unwrap().iter().map(|card| card["seq"].as_u64().unwrap()).collect()
}

/// Publishes `seqs`, odd ones over HTTP and even ones over the Unix socket, each with a
/// `tipo` and a `direccion` the card shows.
fn publish_each(server: &Server, seqs: std::ops::RangeInclusive<u64>) {
    let mut unix = server.unix();
    for seq in seqs {
        let data = json!({"tipo": "incendio", "direccion": format!("Los Aromos {seq}"), "n": seq});
        let published = if seq % 2 == 0 {
            unix.publish(&data.to_string())
        } else {
            let response = server.post(&data.to_string());
            assert_eq!(response.status, 202, "{}", response.body);
            response.json()["seq"].as_u64().unwrap()
        };
        assert_eq!(published, seq);
    }
}

fn assert_no_errors(state: &Value) {
    assert_eq!(state["errors"], json!([]), "uncaught exceptions in the page: {state:#}");
    assert_eq!(state["console"], json!([]), "errors on the page's console: {state:#}");
}

/// Where the screenshot goes: `target/console.png` (README's docs/console.png is one of these).
fn screenshot_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console.png")
}

/// The page shows the connected state, each emergency once (HTTP and Unix alike), newest first,
/// with its main fields; through a restart, with emergencies published while it was away (into
/// the same data dir, by a server on another port) and after, it reconnects by itself and shows
/// every one exactly once, in order.
#[test]
fn the_console_shows_each_emergency_once_and_reconnects_by_itself() {
    let mut browser = launch();
    let server = Server::start(&[]);
    browser.open("tablet", &console_url(&server, ""));
    let state = browser.wait_for("tablet", json!({"state": "open"}));
    assert_eq!(state["state_text"], "Conectado", "{state:#}");

    publish_each(&server, 1..=2);
    let state = browser.wait_for("tablet", json!({"cards": 2}));
    assert_eq!(listed(&state), [2, 1], "{state:#}");
    assert_eq!(state["cards"][0]["fields"]["direccion"], "Los Aromos 2", "{state:#}");
    assert!(state["cards"][0]["classes"].as_array().unwrap().contains(&json!("new")), "{state:#}");
    assert_no_errors(&state);
    browser.call(json!({"cmd": "screenshot", "page": "tablet", "path": screenshot_path()}));

    let addr = server.addr.to_string();
    let dir = server.stop();
    let state = browser.wait_for("tablet", json!({"banner": "down"}));
    assert_eq!(state["state"], "reconnecting", "{state:#}");
    // Published while the page's server is down: into its data dir, by a server it cannot reach.
    let elsewhere = Server::start_in(dir, &[]);
    publish_each(&elsewhere, 3..=4);
    let server = Server::start_in(elsewhere.stop(), &["--listen", &addr]);
    let state = browser.wait_up_to("tablet", json!({"state": "open", "cards": 4}), RECONNECT_PATIENCE);
    assert_eq!(listed(&state), [4, 3, 2, 1], "{state:#}");
    publish_each(&server, 5..=6);
    let state = browser.wait_for("tablet", json!({"cards": 6}));
    assert_eq!(listed(&state), [6, 5, 4, 3, 2, 1], "{state:#}");
    assert_eq!(state["counters"]["received"], "6", "{state:#}");
    assert_eq!(state["errors"], json!([]), "{state:#}");
}

/// A new emergency is highlighted; once a first tap unlocked audio, the alarm rings until
/// "Visto" is pressed on this page, for every unseen one.
#[test]
fn the_alarm_rings_until_each_new_emergency_is_seen() {
    let mut browser = launch();
    let server = Server::start(&["--in-memory"]);
    browser.open("tablet", &console_url(&server, ""));
    let state = browser.wait_for("tablet", json!({"state": "open"}));
    assert_eq!(state["alarm"], "locked", "{state:#}");
    let state = browser.click("tablet", "#state");
    assert_eq!(state["alarm"], "off", "{state:#}");
    publish_each(&server, 1..=2);
    let state = browser.wait_for("tablet", json!({"cards": 2, "alarm": "on"}));
    assert_eq!(state["counters"]["unseen"], "2", "{state:#}");
    browser.click("tablet", "[data-seq='2'] .seen");
    let state = browser.wait_for("tablet", json!({"card": {"seq": 2, "lacks": "new"}}));
    assert_eq!(state["alarm"], "on", "seq 1 is still unseen: {state:#}");
    browser.click("tablet", "[data-seq='1'] .seen");
    let state = browser.wait_for("tablet", json!({"alarm": "off", "card": {"seq": 1, "lacks": "new"}}));
    assert_eq!(state["counters"]["unseen"], "0", "{state:#}");
    assert_no_errors(&state);
}
