//! Knowing that someone saw it: per-tablet deliveries and acks, their broadcast, the roster and
//! `--min-subscribers`, escalation with `--on-unacked`, and open emergencies with their closes;
//! all of it after a restart and a `kill -9` too. Real binary, real WebSocket clients.

mod common;

use serde_json::{Value, json};

use common::{Client, HttpResponse, Server, TempDir, wait_until};

const TOKENS: [(&str, &str); 3] = [
    ("tablet-1", "t1-Zq8xR2vW9mK4pL7s"),
    ("tablet-2", "t2-Hc3nB6yT1gF5dJ0a"),
    ("tablet-3", "t3-Pw4eU8iO2qA6sD9f"),
];

/// A data dir with a subscribe token file naming three tablets.
fn site() -> (TempDir, String) {
    let dir = TempDir::new();
    let file = dir.path().join("subscribe.tokens");
    let lines: String = TOKENS.iter().map(|(name, token)| format!("{name} {token}\n")).collect();
    std::fs::write(&file, lines).unwrap();
    let file = file.to_str().unwrap().to_owned();
    (dir, file)
}

fn start(dir: TempDir, tokens: &str, extra: &[&str]) -> Server {
    Server::start_in(dir, &[&["--subscribe-token-file", tokens], extra].concat())
}

/// Tablet `n` (0-based) connected, its welcome read.
fn tablet(server: &Server, n: usize, query: &str) -> (Client, Value) {
    let mut client = server.ws(&format!("/ws/emergencias?token={}{query}", TOKENS[n].1));
    let welcome = client.recv_json();
    assert_eq!(welcome["type"], "connection", "{welcome}");
    (client, welcome)
}

fn request(server: &Server, method: &str, path: &str, body: &str) -> HttpResponse {
    server.http(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

fn status(server: &Server, seq: u64) -> Value {
    let response = server.get(&format!("/emergencias/{seq}?token={}", TOKENS[0].1));
    assert_eq!(response.status, 200, "{}", response.body);
    response.json()
}

fn ack(client: &mut Client, seq: u64) {
    client.send_text(&json!({"type": "ack", "seq": seq}).to_string());
}

/// Sends a ping and reads up to its pong, returning what came before it: everything the client
/// sent before the ping has been handled by then.
fn round_trip(client: &mut Client) -> Vec<Value> {
    client.send_text(r#"{"type":"ping"}"#);
    let mut before = Vec::new();
    loop {
        let message = client.recv_json();
        if message["type"] == "pong" {
            return before;
        }
        before.push(message);
    }
}

/// Reads messages until one of `kind` for `seq`, and returns it.
fn recv_kind(client: &mut Client, kind: &str, seq: u64) -> Value {
    loop {
        let message = client.recv_json();
        if message["type"] == kind && message["seq"] == seq {
            return message;
        }
    }
}

fn acked_by(status: &Value) -> Vec<String> {
    status["acked_by"].as_array().unwrap().iter().map(|name| name.as_str().unwrap().to_owned()).collect()
}

/// Publishes `{"n":n}` under the idempotency key `k<n>` over HTTP; a retry answers with the
/// emergency's counts as of now.
fn publish_keyed(server: &Server, n: u64) -> Value {
    let body = format!(r#"{{"n":{n},"idempotency_key":"k{n}"}}"#);
    let response = request(server, "POST", "/emergencias", &body);
    assert_eq!(response.status, 202, "{}", response.body);
    response.json()
}

/// With no ack to ride with, receipts are stored on their own within `DELIVERY_FLUSH`: the
/// flush is rung by the first one held, not by a tick.
#[test]
fn a_delivery_alone_is_stored_and_survives_a_crash() {
    let (dir, tokens) = site();
    let server = start(dir, &tokens, &[]);
    let receipts_commits = || server.counter(r#"resq_push_journal_commits_total{carrying="receipts"}"#);
    assert_eq!(publish_keyed(&server, 1)["seq"], 1);
    wait_until("`queued_to` committed", || receipts_commits() == 1);
    let (mut tablet_1, _) = tablet(&server, 0, "&since=0");
    recv_kind(&mut tablet_1, "emergencia", 1);
    wait_until("the delivery seen", || status(&server, 1)["status"]["delivered"] == 1);
    wait_until("the delivery committed", || receipts_commits() == 2);
    drop(tablet_1);
    let server = start(server.kill9(), &tokens, &[]);
    assert_eq!(status(&server, 1)["status"]["delivered"], 1);
}

fn three_named_tablets_two_ack(restart: fn(Server) -> TempDir) {
    let (dir, tokens) = site();
    let server = start(dir, &tokens, &[]);
    let mut tablets: Vec<Client> = (0..3).map(|n| tablet(&server, n, "").0).collect();
    server.wait_for_clients(3);
    let reply = publish_keyed(&server, 1);
    assert_eq!((reply["seq"].as_u64(), reply["queued_to"].as_u64()), (Some(1), Some(3)), "{reply}");
    assert_eq!(reply["acked"], 0, "{reply}");
    for tablet in &mut tablets {
        tablet.recv_emergency(1);
    }
    // tablet-1 acks over its WebSocket, tablet-2 over HTTP (as an SSE page would), then again
    // both ways: counted once.
    ack(&mut tablets[0], 1);
    round_trip(&mut tablets[0]);
    let by_http = request(&server, "POST", &format!("/emergencias/1/ack?token={}", TOKENS[1].1), "");
    assert_eq!(by_http.status, 200, "{}", by_http.body);
    assert_eq!(
        (by_http.json()["acked"].as_u64(), by_http.json()["duplicate"].as_bool()),
        (Some(2), Some(false))
    );
    ack(&mut tablets[1], 1);
    ack(&mut tablets[1], 1);
    let again = request(&server, "POST", &format!("/emergencias/1/ack?token={}", TOKENS[1].1), "").json();
    assert_eq!((again["acked"].as_u64(), again["duplicate"].as_bool()), (Some(2), Some(true)), "{again}");
    let unknown = request(&server, "POST", &format!("/emergencias/99/ack?token={}", TOKENS[1].1), "");
    assert_eq!((unknown.status, unknown.error()), (404, "unknown seq".to_owned()));
    ack(&mut tablets[1], 99);
    round_trip(&mut tablets[1]);

    // The third tablet, which did not ack, is told of both, once each.
    let first = recv_kind(&mut tablets[2], "ack", 1);
    assert_eq!((first["by"].as_str(), first["acked"].as_u64()), (Some("tablet-1"), Some(1)), "{first}");
    let second = recv_kind(&mut tablets[2], "ack", 1);
    assert_eq!((second["by"].as_str(), second["acked"].as_u64()), (Some("tablet-2"), Some(2)), "{second}");
    let extra: Vec<Value> = round_trip(&mut tablets[2]);
    assert!(extra.is_empty(), "a repeated ack was broadcast: {extra:?}");

    wait_until("3 deliveries recorded", || status(&server, 1)["status"]["delivered"] == 3);
    // Deliveries are held for the journal for a moment and go with the next ack: once this one
    // is broadcast, they are committed too.
    assert_eq!(publish_keyed(&server, 2)["seq"], 2);
    for tablet in &mut tablets {
        recv_kind(tablet, "emergencia", 2);
    }
    ack(&mut tablets[0], 2);
    recv_kind(&mut tablets[2], "ack", 2);
    let before = status(&server, 1);
    assert_eq!(before["emergency"]["data"]["n"], 1, "{before}");
    assert_eq!(before["status"]["acked"], 2, "{before}");
    assert_eq!(acked_by(&before["status"]), ["tablet-1", "tablet-2"]);
    assert_eq!(before["status"]["timeline"].as_array().unwrap().len(), 3, "{before}");
    let retry = publish_keyed(&server, 1);
    assert_eq!((retry["acked"].as_u64(), retry["delivered"].as_u64()), (Some(2), Some(3)), "{retry}");
    let missing = server.get(&format!("/emergencias/7?token={}", TOKENS[0].1));
    assert_eq!(missing.status, 404);
    assert_eq!(server.get("/emergencias/1").status, 401, "the status needs the subscribe token");

    drop(tablets);
    let server = start(restart(server), &tokens, &[]);
    let after = status(&server, 1);
    assert_eq!(after["status"]["acked"], 2, "{after}");
    assert_eq!(after["status"]["delivered"], 3, "{after}");
    assert_eq!(after["status"]["queued_to"], 3, "{after}");
    assert_eq!(acked_by(&after["status"]), ["tablet-1", "tablet-2"]);
    // A tablet resuming is replayed the emergencies, then told their status.
    let (mut resumed, welcome) = tablet(&server, 2, "&since=0");
    assert_eq!(
        (welcome["open"].clone(), welcome["replay"]["count"].clone()),
        (json!([]), json!(2)),
        "{welcome}"
    );
    resumed.recv_emergency(1);
    resumed.recv_emergency(2);
    for (seq, acked) in [(1, 2), (2, 1)] {
        let told = resumed.recv_json();
        assert_eq!((told["type"].as_str(), told["seq"].as_u64()), (Some("status"), Some(seq)), "{told}");
        assert_eq!(told["acked"], acked, "{told}");
    }
    // What was acked before the restart still counts once.
    let (mut again, _) = tablet(&server, 0, "&since=1");
    ack(&mut again, 1);
    round_trip(&mut again);
    assert_eq!(status(&server, 1)["status"]["acked"], 2);
}

#[test]
fn three_named_tablets_two_ack_and_it_holds_after_a_restart() {
    three_named_tablets_two_ack(Server::stop);
}

#[test]
fn three_named_tablets_two_ack_and_it_holds_after_kill_9() {
    three_named_tablets_two_ack(Server::kill9);
}

#[test]
fn acks_in_memory_are_counted_and_broadcast_too() {
    let server = Server::start(&["--in-memory"]);
    let (mut a, _) = server.subscribe();
    let (mut b, _) = server.subscribe();
    server.wait_for_clients(2);
    assert_eq!(server.unix().publish("{}"), 1);
    a.recv_emergency(1);
    b.recv_emergency(1);
    ack(&mut a, 1);
    let told = recv_kind(&mut b, "ack", 1);
    assert!(
        told["by"].as_str().unwrap().starts_with("client-"),
        "an unnamed tablet is its connection: {told}"
    );
    assert_eq!(status(&server, 1)["status"]["acked"], 1);
}

/// A command that appends its stdin and its environment to `ran.<seq>` in `dir`.
fn recording_command(dir: &std::path::Path) -> String {
    let out = dir.display();
    format!(
        r#"{{ cat; echo; echo "$RESQ_SEQ $RESQ_STREAM"; }} >> {out}/ran.$RESQ_SEQ; echo alarm raised >&2"#
    )
}

fn runs(dir: &std::path::Path, seq: u64) -> Option<String> {
    std::fs::read_to_string(dir.join(format!("ran.{seq}"))).ok()
}

#[test]
fn an_unacked_emergency_runs_the_command_exactly_once_and_never_again_after_a_restart() {
    let commands = TempDir::new();
    let command = recording_command(commands.path());
    let flags = ["--ack-timeout", "2", "--on-unacked", &command];
    let server = Server::start(&flags);
    let stream = server.health()["stream"].as_str().unwrap().to_owned();
    let (mut client, _) = server.subscribe();
    server.wait_for_clients(1);
    let mut unix = server.unix();
    assert_eq!(unix.publish(r#"{"calle":"nadie"}"#), 1);
    assert_eq!(unix.publish(r#"{"calle":"visto"}"#), 2);
    client.recv_emergency(1);
    client.recv_emergency(2);
    ack(&mut client, 2);
    let unacked = recv_kind(&mut client, "unacked", 1);
    assert_eq!(
        (unacked["ack_timeout_s"].as_f64(), unacked["delivered"].as_u64()),
        (Some(2.0), Some(1)),
        "{unacked}"
    );
    server.wait_for_log("--on-unacked for seq 1 exited 0");
    assert!(server.logs().contains("stderr: alarm raised"), "{}", server.logs());
    let ran = runs(commands.path(), 1).unwrap();
    let (envelope, environment) = ran.split_once('\n').unwrap();
    let envelope: Value = serde_json::from_str(envelope).unwrap();
    assert_eq!((envelope["seq"].as_u64(), envelope["data"]["calle"].as_str()), (Some(1), Some("nadie")));
    assert_eq!(environment, format!("1 {stream}\n"));
    assert_eq!(status(&server, 1)["status"]["escalated"], true);
    let metrics = server.get("/metrics").body;
    assert!(metrics.contains("resq_push_escalations_total{kind=\"unacked\"} 1\n"), "{metrics}");
    assert!(metrics.contains("resq_push_first_ack_seconds_count 1\n"), "{metrics}");

    // After a restart the escalated one is not run again, nor the acked one: a new emergency's
    // escalation shows the timer has looked at them since.
    let server = Server::start_in(server.stop(), &flags);
    let mut unix = server.unix();
    assert_eq!(unix.publish("{}"), 3);
    server.wait_for_log("--on-unacked for seq 3 exited 0");
    assert_eq!(runs(commands.path(), 1), Some(ran), "seq 1 ran again");
    assert_eq!(runs(commands.path(), 2), None, "the acked one escalated");
    assert!(!server.logs().contains("seq 1: no tablet acked"), "{}", server.logs());
}

#[test]
fn a_deadline_that_passed_while_the_server_was_down_escalates_once_after_the_restart() {
    let commands = TempDir::new();
    let command = recording_command(commands.path());
    let server = Server::start(&["--ack-timeout", "3600", "--on-unacked", &command]);
    assert_eq!(server.unix().publish("{}"), 1);
    let dir = server.kill9();
    let flags = ["--ack-timeout", "0.1", "--on-unacked", &command];
    let server = Server::start_in(dir, &flags);
    server.wait_for_log("--on-unacked for seq 1 exited 0");
    let ran = runs(commands.path(), 1).unwrap();
    assert_eq!(ran.matches('\n').count(), 2, "run once");
    // Killed again and restarted: a new emergency's command runs, and seq 1's does not again.
    let server = Server::start_in(server.kill9(), &flags);
    assert_eq!(server.unix().publish("{}"), 2);
    server.wait_for_log("--on-unacked for seq 2 exited 0");
    assert_eq!(runs(commands.path(), 1), Some(ran), "seq 1 ran twice");
}

#[test]
fn healthz_is_degraded_below_min_subscribers_and_the_roster_lists_every_tablet() {
    let (dir, tokens) = site();
    let server = start(dir, &tokens, &["--min-subscribers", "2"]);
    let health = |server: &Server| server.get("/healthz");
    let degraded = health(&server);
    assert_eq!(degraded.status, 503);
    assert_eq!(degraded.json()["status"], "degraded");
    assert_eq!(degraded.json()["reason"], "only 0 of 2 required subscribers connected");
    assert_eq!(degraded.json()["tablets"], json!({"expected": 3, "connected": 0}));
    let (first, _) = tablet(&server, 0, "");
    let (_second, _) = tablet(&server, 0, "");
    wait_until("healthz 200 with two connections", || health(&server).status == 200);
    let roster = server.get(&format!("/tablets?token={}", TOKENS[0].1)).json();
    assert_eq!(roster["min_subscribers"], 2, "{roster}");
    let tablets = roster["tablets"].as_array().unwrap();
    assert_eq!(tablets.len(), 3, "{roster}");
    assert_eq!(
        (tablets[0]["name"].as_str(), tablets[0]["connections"].as_u64()),
        (Some("tablet-1"), Some(2))
    );
    assert_eq!((tablets[1]["connected"].as_bool(), tablets[1]["last_heard"].as_str()), (Some(false), None));
    assert_eq!(health(&server).json()["tablets"], json!({"expected": 3, "connected": 1}));
    drop(first);
    wait_until("healthz 503 with one connection", || health(&server).status == 503);
    assert_eq!(health(&server).json()["reason"], "only 1 of 2 required subscribers connected");
    let metrics = server.get("/metrics").body;
    assert!(metrics.contains("resq_push_tablets_expected 3\n"), "{metrics}");
    assert!(metrics.contains("resq_push_min_subscribers 2\n"), "{metrics}");
}

fn close(server: &Server, seq: u64, body: &str) -> HttpResponse {
    request(server, "POST", &format!("/emergencias/{seq}/cerrar"), body)
}

fn seqs_received(client: &mut Client, count: usize) -> Vec<u64> {
    (0..count).map(|_| client.recv_json()["seq"].as_u64().unwrap()).collect()
}

#[test]
fn fresh_tablets_get_every_open_emergency_however_old_and_closes_are_broadcast() {
    let flags = ["--history", "2"];
    let server = Server::start(&flags);
    let (mut watcher, _) = server.subscribe();
    server.wait_for_clients(1);
    let mut unix = server.unix();
    for seq in 1..=5 {
        assert_eq!(unix.publish(&format!(r#"{{"n":{seq}}}"#)), seq);
    }
    let closed = close(&server, 2, r#"{"motivo":"falsa alarma"}"#);
    assert_eq!(closed.status, 200, "{}", closed.body);
    assert_eq!(closed.json(), json!({"ok": true, "seq": 2, "closed": true, "already_closed": false}));
    let again = close(&server, 2, "");
    assert_eq!(again.json()["already_closed"], true, "{}", again.body);
    assert_eq!(close(&server, 99, "").status, 404);
    assert_eq!(close(&server, 1, "[1]").status, 400);
    unix.send(b"{\"type\":\"cerrar\",\"seq\":3,\"motivo\":\"resuelta\"}\n{\"type\":\"cerrar\",\"seq\":99}\n");
    assert_eq!(unix.reply()["already_closed"], false);
    assert_eq!(unix.reply()["error"], "unknown seq");
    let told = recv_kind(&mut watcher, "closed", 2);
    assert_eq!(told["close"], json!({"motivo": "falsa alarma"}), "{told}");
    assert_eq!(recv_kind(&mut watcher, "closed", 3)["close"], json!({"motivo": "resuelta"}));

    // A fresh tablet gets every open one, even those older than --history, oldest first.
    let (mut fresh, welcome) = server.subscribe();
    assert_eq!(welcome["open"], json!([1, 4, 5]), "{welcome}");
    assert_eq!(seqs_received(&mut fresh, 3), [1, 4, 5]);
    assert_eq!(unix.publish("{}"), 6);
    fresh.recv_emergency(6);
    drop(fresh);

    let server = Server::start_in(server.stop(), &flags);
    let (mut fresh, welcome) = server.subscribe();
    assert_eq!(welcome["open"], json!([1, 4, 5, 6]), "{welcome}");
    assert_eq!(seqs_received(&mut fresh, 4), [1, 4, 5, 6]);
    assert!(round_trip(&mut fresh).is_empty(), "closed ones are not sent");
    assert_eq!(status(&server, 1)["status"]["closed"], false);
    assert_eq!(server.get("/emergencias/3").status, 404, "closed and beyond the history: aged out");
}

#[test]
fn an_upgraded_data_dir_keeps_its_emergencies_closed_neither_escalated_nor_resent() {
    let dir = TempDir::new();
    // The schema as it was before receipts and closes: idempotency keys, no close column.
    common::old_data_dir(&dir, ", idempotency_key TEXT, body_sha1 BLOB", 2);
    let commands = TempDir::new();
    let command = recording_command(commands.path());
    let server = Server::start_in(dir, &["--ack-timeout", "0.1", "--on-unacked", &command]);
    assert_eq!(server.health()["stream"], "00112233aabbccdd");
    let (mut fresh, welcome) = server.subscribe();
    assert_eq!(welcome["open"], json!([]), "{welcome}");
    assert_eq!(server.unix().publish("{}"), 3);
    fresh.recv_emergency(3);
    server.wait_for_log("--on-unacked for seq 3 exited 0");
    assert_eq!((runs(commands.path(), 1), runs(commands.path(), 2)), (None, None), "an old one escalated");
    assert_eq!(status(&server, 1)["status"]["closed"], true);
    assert_eq!(server.poll_all().len(), 3, "the history is kept");
}

#[test]
fn a_chunked_close_or_ack_gets_411_and_its_body_is_never_taken_for_a_request() {
    let server = Server::start(&[]);
    let mut unix = server.unix();
    assert_eq!(unix.publish("{}"), 1);
    assert_eq!(unix.publish("{}"), 2);
    for path in ["/emergencias/1/cerrar", "/emergencias/1/ack"] {
        // What follows the head is another request, as a proxy that ignores the chunking would
        // pass it on: it must not be run.
        let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
        stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let smuggled = "POST /emergencias/2/cerrar HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n";
        let head = format!("POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n{smuggled}");
        std::io::Write::write_all(&mut stream, head.as_bytes()).unwrap();
        let mut reader = std::io::BufReader::new(stream);
        let refused = HttpResponse::read(&mut reader);
        assert_eq!(refused.status, 411, "{path}: {}", refused.body);
        assert!(refused.error().contains("Content-Length"), "{}", refused.body);
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut reader, &mut rest).unwrap();
        assert_eq!(String::from_utf8_lossy(&rest), "", "{path}: the connection went on");
    }
    assert_eq!(status(&server, 1)["status"]["closed"], false);
    assert_eq!(status(&server, 2)["status"]["closed"], false, "the smuggled close ran");
}

#[test]
fn a_command_whose_background_process_outlives_its_time_limit_is_killed_with_it_and_frees_its_slot() {
    let commands = TempDir::new();
    let out = commands.path().display();
    // Seq 1's command starts a process that holds its stderr and waits for it: only killing the
    // whole group ends it.
    let command = format!(
        r#"if [ "$RESQ_SEQ" = 1 ]; then sleep 1000 & echo $! > {out}/pid; wait; fi; echo ran >> {out}/ran.$RESQ_SEQ"#
    );
    let flags = [
        "--ack-timeout",
        "0.1",
        "--on-unacked",
        &command,
        "--max-escalation-children",
        "1",
        "--escalation-time-limit",
        "0.5",
    ];
    let server = Server::start(&flags);
    let mut unix = server.unix();
    assert_eq!(unix.publish("{}"), 1);
    server.wait_for_log("--on-unacked for seq 1 killed after --escalation-time-limit");
    assert_eq!(unix.publish("{}"), 2);
    server.wait_for_log("--on-unacked for seq 2 exited 0");
    assert_eq!(runs(commands.path(), 2).as_deref(), Some("ran\n"));
    let pid = std::fs::read_to_string(commands.path().join("pid")).unwrap();
    let stat = format!("/proc/{}/stat", pid.trim());
    // Gone, or a zombie waiting for whoever adopted it.
    wait_until("the background sleep killed", || {
        std::fs::read_to_string(&stat).map_or(true, |stat| stat.contains(") Z "))
    });
    let metrics = server.get("/metrics").body;
    assert!(metrics.contains("resq_push_escalation_commands_total{outcome=\"killed\"} 1\n"), "{metrics}");
}

#[test]
fn a_command_still_waiting_for_a_slot_when_the_server_is_killed_runs_after_the_restart_and_a_started_one_does_not()
 {
    let commands = TempDir::new();
    let out = commands.path().display();
    // Seq 1's command takes the only slot until the test kills it; seq 2's waits for it.
    let command = format!(
        r#"echo $$ >> {out}/started.$RESQ_SEQ; if [ "$RESQ_SEQ" = 1 ]; then exec sleep 1000; fi; cat > {out}/ran.$RESQ_SEQ"#
    );
    let flags = ["--ack-timeout", "0.1", "--on-unacked", &command, "--max-escalation-children", "1"];
    let server = Server::start(&flags);
    let mut unix = server.unix();
    assert_eq!(unix.publish("{}"), 1);
    assert_eq!(unix.publish("{}"), 2);
    let started = commands.path().join("started.1");
    wait_until("seq 1's command started", || {
        std::fs::read_to_string(&started).is_ok_and(|s| s.ends_with('\n'))
    });
    wait_until("seq 2 escalated", || status(&server, 2)["status"]["escalated"] == true);
    let dir = server.kill9();
    // The first command outlives the server (a group of its own): the test ends it.
    let pid = std::fs::read_to_string(&started).unwrap();
    common::signal(pid.trim().parse().unwrap(), "KILL");

    let server = Server::start_in(dir, &flags);
    server.wait_for_log("--on-unacked for seq 2 exited 0");
    assert_eq!(serde_json::from_str::<Value>(&runs(commands.path(), 2).unwrap()).unwrap()["seq"], 2);
    assert_eq!(std::fs::read_to_string(&started).unwrap(), pid, "seq 1's command ran twice");
    assert!(server.logs().contains("never started for seqs [2]"), "{}", server.logs());
}

#[test]
fn with_max_open_0_an_unacked_emergency_still_escalates() {
    let commands = TempDir::new();
    let command = recording_command(commands.path());
    let server = Server::start(&["--max-open", "0", "--ack-timeout", "0.1", "--on-unacked", &command]);
    assert_eq!(server.unix().publish("{}"), 1);
    server.wait_for_log("--on-unacked for seq 1 exited 0");
    assert_eq!(status(&server, 1)["status"]["escalated"], true);
}

#[test]
fn a_close_answered_holds_after_kill_9() {
    let server = Server::start(&[]);
    assert_eq!(server.unix().publish("{}"), 1);
    let closed = close(&server, 1, r#"{"motivo":"resuelta"}"#);
    assert_eq!(closed.json()["already_closed"], false, "{}", closed.body);
    let server = Server::start_in(server.kill9(), &[]);
    let after = status(&server, 1);
    assert_eq!(
        (&after["status"]["closed"], &after["status"]["close"]),
        (&json!(true), &json!({"motivo": "resuelta"}))
    );
    let (_fresh, welcome) = server.subscribe();
    assert_eq!(welcome["open"], json!([]), "{welcome}");
}
