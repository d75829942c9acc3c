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

/// After the server was down: the only console errors are the browser's own reports of the
/// connections the server refused meanwhile (a page cannot silence them); no exception at all.
fn assert_only_outage_errors(state: &Value) {
    assert_eq!(state["errors"], json!([]), "uncaught exceptions in the page: {state:#}");
    let console = state["console"].as_array().unwrap();
    let outage =
        |entry: &&Value| entry["text"].as_str().is_some_and(|text| text.contains("net::ERR_CONNECTION_"));
    assert!(console.iter().all(|entry| outage(&entry)), "errors on the page's console: {state:#}");
}

fn assert_no_errors(state: &Value) {
    assert_eq!(state["errors"], json!([]), "uncaught exceptions in the page: {state:#}");
    assert_eq!(state["console"], json!([]), "errors on the page's console: {state:#}");
}

/// Where a test's screenshot goes: `target/console-<name>.png` (README's docs/console.png is
/// `acks`'s).
fn screenshot_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("target/console-{name}.png"))
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
    browser.call(json!({"cmd": "screenshot", "page": "tablet", "path": screenshot_path("first")}));

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
    assert_only_outage_errors(&state);
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

/// A reload (or a tab the browser discarded) resumes after the last seq, so the server replays
/// nothing the page had: the page rebuilds its cards, and an open one not acked on this device
/// rings again. A new device is sent the open ones: they ring too.
#[test]
fn a_reloaded_or_new_page_shows_the_open_emergencies_and_rings_for_them() {
    let mut browser = launch();
    let server = Server::start(&["--in-memory"]);
    browser.open("tablet", &console_url(&server, ""));
    browser.wait_for("tablet", json!({"state": "open"}));
    publish_each(&server, 1..=2);
    browser.wait_for("tablet", json!({"cards": 2}));
    browser.click("tablet", "[data-seq='2'] .seen");
    browser.wait_for("tablet", json!({"card": {"seq": 2, "lacks": "new", "seen_by": "visto por"}}));
    common::wait_until("the page's ack", || status(&server, 2)["acked"] == 1);

    browser.call(json!({"cmd": "reload", "page": "tablet"}));
    let state =
        browser.wait_for("tablet", json!({"state": "open", "cards": 2, "card": {"seq": 1, "has": "new"}}));
    assert_eq!(listed(&state), [2, 1], "{state:#}");
    assert_eq!(state["cards"][0]["fields"]["direccion"], "Los Aromos 2", "{state:#}");
    assert!(
        !state["cards"][0]["classes"].as_array().unwrap().contains(&json!("new")),
        "acked here: {state:#}"
    );
    assert_eq!(state["counters"]["unseen"], "1", "{state:#}");
    // Audio needs a tap after every load; then it rings for seq 1.
    browser.click("tablet", "#state");
    browser.wait_for("tablet", json!({"alarm": "on"}));

    browser.open("new", &console_url(&server, ""));
    let state = browser.wait_for("new", json!({"cards": 2, "card": {"seq": 1, "has": "new"}}));
    assert_eq!(state["counters"]["unseen"], "2", "{state:#}");
    assert_no_errors(&state);
}

/// A server with another history (a wiped data dir, another box) numbers from 1 again: the page
/// drops the old cards instead of mistaking the new seq 1 for the old one.
#[test]
fn a_new_history_starts_the_list_over() {
    let mut browser = launch();
    let server = Server::start(&["--in-memory"]);
    browser.open("tablet", &console_url(&server, ""));
    browser.wait_for("tablet", json!({"state": "open"}));
    publish_each(&server, 1..=2);
    browser.wait_for("tablet", json!({"cards": 2}));
    let addr = server.addr.to_string();
    drop(server.stop());
    let server = Server::start(&["--in-memory", "--listen", &addr]);
    let published = server.post(&json!({"tipo": "otra", "direccion": "Nueva 1"}).to_string());
    assert_eq!(published.status, 202, "{}", published.body);
    let fresh = json!({"seq": 1, "has": "new", "fields": {"direccion": "Nueva 1"}});
    let state = browser.wait_up_to("tablet", json!({"banner": "stream", "card": fresh}), RECONNECT_PATIENCE);
    assert_eq!(listed(&state), [1], "{state:#}");
    assert_only_outage_errors(&state);
}

const TABLETS: [(&str, &str); 3] = [
    ("tablet-1", "tok-one-Xk2Lm9Nq4Rs7"),
    ("tablet-2", "tok-two-Yb5Cd8Ef1Gh4"),
    ("tablet-3", "tok-three-Zc6De9Fg2Hi"),
];

/// A data dir with a subscribe token file naming the three tablets; its path.
fn site() -> (common::TempDir, String) {
    let dir = common::TempDir::new();
    let file = dir.path().join("subscribe.tokens");
    let lines: String = TABLETS.iter().map(|(name, token)| format!("{name} {token}\n")).collect();
    std::fs::write(&file, lines).unwrap();
    let file = file.to_str().unwrap().to_owned();
    (dir, file)
}

/// `GET /emergencias/{seq}`'s status, with tablet-1's token (which a server without tokens ignores).
fn status(server: &Server, seq: u64) -> Value {
    let response = server.get(&format!("/emergencias/{seq}?token={}", TABLETS[0].1));
    assert_eq!(response.status, 200, "{}", response.body);
    response.json()["status"].clone()
}

/// Two named tablets, one page over WebSocket and one over Server-Sent Events (EventSource):
/// an ack from either shows on the other and in `GET /emergencias/{seq}`; the roster shows both,
/// an emergency nobody acks within `--ack-timeout` turns red on both, a closed one is dimmed; and
/// through a restart, with emergencies published while the pages' server was down and after, the
/// SSE page too reconnects by itself and shows each exactly once, in order.
#[test]
fn acks_show_on_every_page_over_websocket_and_sse_alike() {
    let mut browser = launch();
    let (dir, tokens) = site();
    let flags = ["--subscribe-token-file", tokens.as_str(), "--ack-timeout", "3"];
    let server = Server::start_in(dir, &flags);
    let ws = format!("?token={}", TABLETS[0].1);
    browser.open("ws", &console_url(&server, &ws));
    let sse = format!("?transport=sse&token={}", TABLETS[1].1);
    browser.open("sse", &console_url(&server, &sse));
    for page in ["ws", "sse"] {
        let state = browser.wait_for(page, json!({"state": "open"}));
        assert_no_errors(&state);
    }
    let state = browser.call(json!({"cmd": "state", "page": "sse"}));
    assert_eq!(state["transport"], "Server-Sent Events", "{state:#}");

    publish_each(&server, 1..=1);
    let seen_by_one = json!({"card": {"seq": 1, "seen_by": "visto por tablet-1: 1 de 2"}});
    browser.wait_for("sse", json!({"cards": 1, "roster_connected": 2}));
    browser.wait_for("ws", json!({"cards": 1, "roster_connected": 2}));
    browser.click("ws", "[data-seq='1'] .seen");
    browser.wait_for("sse", seen_by_one.clone());
    browser.wait_for("ws", seen_by_one);
    let acked = status(&server, 1);
    assert_eq!((&acked["acked_by"], &acked["acked"]), (&json!(["tablet-1"]), &json!(1)), "{acked}");
    // The SSE page acks over HTTP (it cannot send on its stream).
    browser.click("sse", "[data-seq='1'] .seen");
    let both = json!({"card": {"seq": 1, "seen_by": "visto por tablet-1, tablet-2: 2 de 2"}});
    browser.wait_for("ws", both.clone());
    let state = browser.wait_for("sse", both);
    assert_no_errors(&state);
    let acked = status(&server, 1);
    assert_eq!(
        (&acked["acked_by"], &acked["acked"]),
        (&json!(["tablet-1", "tablet-2"]), &json!(2)),
        "{acked}"
    );

    // Nobody acks seq 2: red on both pages after --ack-timeout. Seq 1 is closed: dimmed.
    publish_each(&server, 2..=2);
    let closed = server.http(
        b"POST /emergencias/1/cerrar HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(closed.status, 200, "{}", closed.body);
    let settled = json!({"card": {"seq": 2, "has": "escalated"}});
    for page in ["ws", "sse"] {
        browser.wait_for(page, settled.clone());
        let state = browser.wait_for(page, json!({"card": {"seq": 1, "has": "closed"}}));
        assert_eq!(state["cards"][0]["badge"], "SIN RESPUESTA", "{state:#}");
        assert_no_errors(&state);
    }
    browser.call(json!({"cmd": "screenshot", "page": "ws", "path": screenshot_path("acks")}));

    let addr = server.addr.to_string();
    let dir = server.stop();
    for page in ["ws", "sse"] {
        browser.wait_for(page, json!({"banner": "down"}));
    }
    let elsewhere = Server::start_in(dir, &flags);
    publish_each(&elsewhere, 3..=4);
    let server = Server::start_in(elsewhere.stop(), &[&flags[..], &["--listen", &addr]].concat());
    for page in ["ws", "sse"] {
        let state = browser.wait_up_to(page, json!({"state": "open", "cards": 4}), RECONNECT_PATIENCE);
        assert_eq!(listed(&state), [4, 3, 2, 1], "{page}: {state:#}");
    }
    publish_each(&server, 5..=5);
    for page in ["ws", "sse"] {
        let state = browser.wait_for(page, json!({"cards": 5}));
        assert_eq!(listed(&state), [5, 4, 3, 2, 1], "{page}: {state:#}");
        assert_eq!(state["counters"]["received"], "5", "{page}: {state:#}");
        assert_only_outage_errors(&state);
    }
}

/// The README's ten-line frontend, as it stands, on a page of another origin (so the server
/// lists it in `--allowed-origin`): each emergency once, newest first, and a tap acks it.
#[test]
fn the_readme_frontend_works_as_written() {
    let mut browser = launch();
    let server = Server::start(&["--in-memory", "--allowed-origin", "*"]);
    let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    let server_url = format!("http://{}", server.addr);
    browser.call(json!({"cmd": "open_readme", "page": "module", "readme": readme, "server": server_url}));
    browser.wait_for("module", json!({"title": "open"}));
    publish_each(&server, 1..=2);
    let state = browser.wait_for("module", json!({"list": 2}));
    assert_eq!(state["list"], json!(["#2 incendio Los Aromos 2", "#1 incendio Los Aromos 1"]), "{state:#}");
    browser.click("module", "#list li:last-child");
    common::wait_until("the README page's ack", || status(&server, 1)["acked"] == 1);
    assert_no_errors(&browser.call(json!({"cmd": "state", "page": "module"})));
}

/// On a tablet in portrait the side panel goes under the list, in landscape beside it; neither
/// scrolls sideways, even for long fields, and "Visto" stays a large target.
#[test]
fn the_console_fits_a_tablet_in_portrait_and_landscape() {
    let mut browser = launch();
    let server = Server::start(&["--in-memory"]);
    let url = console_url(&server, "");
    for (page, width, height) in [("portrait", 600, 960), ("landscape", 1024, 700)] {
        let viewport = json!({"width": width, "height": height});
        browser.call(json!({"cmd": "open", "page": page, "url": url, "viewport": viewport}));
        browser.wait_for(page, json!({"state": "open"}));
    }
    let long = "Avenida Libertador Bernardo O'Higgins 1234, departamento 56, torre B".repeat(3);
    let published =
        server.post(&json!({"tipo": "incendio", "direccion": long, "nota": "x".repeat(300)}).to_string());
    assert_eq!(published.status, 202, "{}", published.body);
    for (page, beside) in [("portrait", false), ("landscape", true)] {
        let state = browser.wait_for(page, json!({"cards": 1}));
        let layout = &state["layout"];
        assert_eq!(layout["overflows"], false, "{page} scrolls sideways: {state:#}");
        assert_eq!(layout["side_beside_list"], beside, "{page}: {state:#}");
        assert!(layout["seen_button_width"].as_f64().unwrap() >= 120.0, "{page}: {state:#}");
        browser.call(json!({"cmd": "screenshot", "page": page, "path": screenshot_path(page)}));
        assert_no_errors(&state);
    }
}
