//! Publishers can retry safely: an emergency sent again under the same idempotency key (an
//! `"idempotency_key"` member of the object) is the one already stored. The retry gets its seq back with `"duplicate":true` and nothing is broadcast twice; the
//! same key with another body is refused. Each case runs with the durable history (the default)
//! and with `--in-memory`, where the hub decides instead of the journal.

mod common;

use serde_json::Value;

use common::Server;

const DURABLE: &[&str] = &[];
const IN_MEMORY: &[&str] = &["--in-memory"];

/// `(ok, seq, duplicate)` of a publish reply; `duplicate` is absent from a new emergency's reply.
fn summary(reply: &Value) -> (Option<bool>, Option<u64>, Option<bool>) {
    (reply["ok"].as_bool(), reply["seq"].as_u64(), reply["duplicate"].as_bool())
}

/// Publishes an emergency without a key and checks that it is the next frame the client reads:
/// nothing was broadcast in between.
fn next_frame_is_a_new_emergency(server: &Server, client: &mut common::Client, seq: u64) {
    assert_eq!(server.unix().publish(r#"{"marker":true}"#), seq);
    assert_eq!(client.recv_emergency(seq)["data"]["marker"], true);
}

fn a_unix_line_with_a_key_is_published_once_given(flags: &[&str]) {
    let server = Server::start(flags);
    let (mut client, _) = server.subscribe();
    let line = r#"{"tipo":"rescate", "idempotency_key":"ruta5-1020"}"#;
    let mut unix = server.unix();
    assert_eq!(unix.publish(line), 1);
    unix.send(format!("{line}\r\n").as_bytes());
    assert_eq!(summary(&unix.reply()), (Some(true), Some(1), Some(true)));
    // Over HTTP the member is the key too: the key space is one, whatever the path.
    let over_http = server.post(line);
    assert_eq!(over_http.status, 202, "{}", over_http.body);
    assert_eq!(summary(&over_http.json()), (Some(true), Some(1), Some(true)));

    // The key stays in the emergency, byte for byte.
    let event = client.recv_text();
    assert!(event.ends_with(&format!(r#","data":{line}}}"#)), "{event}");
    next_frame_is_a_new_emergency(&server, &mut client, 2);
}

#[test]
fn a_unix_line_with_a_key_is_published_once() {
    a_unix_line_with_a_key_is_published_once_given(DURABLE);
}

#[test]
fn a_unix_line_with_a_key_is_published_once_in_memory() {
    a_unix_line_with_a_key_is_published_once_given(IN_MEMORY);
}

fn the_same_key_twice_in_one_write_is_one_emergency_given(flags: &[&str]) {
    let server = Server::start(flags);
    let (mut client, _) = server.subscribe();
    let line = r#"{"n":1,"idempotency_key":"twice"}"#;
    let mut unix = server.unix();
    unix.send(format!("{line}\n{line}\n{{\"n\":2,\"idempotency_key\":\"twice\"}}\n{{\"n\":3}}\n").as_bytes());
    assert_eq!(summary(&unix.reply()), (Some(true), Some(1), None));
    assert_eq!(summary(&unix.reply()), (Some(true), Some(1), Some(true)));
    assert_eq!(unix.reply()["ok"], false, "the same key with another body in the same write");
    assert_eq!(summary(&unix.reply()), (Some(true), Some(2), None));
    client.recv_emergency(1);
    assert_eq!(client.recv_emergency(2)["data"]["n"], 3);
}

#[test]
fn the_same_key_twice_in_one_write_is_one_emergency() {
    the_same_key_twice_in_one_write_is_one_emergency_given(DURABLE);
}

#[test]
fn the_same_key_twice_in_one_write_is_one_emergency_in_memory() {
    the_same_key_twice_in_one_write_is_one_emergency_given(IN_MEMORY);
}

#[test]
fn a_bad_idempotency_key_member_is_refused_naming_it() {
    let server = Server::start(&[]);
    let mut unix = server.unix();
    for line in [r#"{"idempotency_key":7}"#, r#"{"idempotency_key":""}"#, r#"{"idempotency_key":null}"#] {
        unix.send(format!("{line}\n").as_bytes());
        let reply = unix.reply();
        assert_eq!(reply["ok"], false, "{line}: {reply}");
        assert!(reply["error"].as_str().unwrap().contains("idempotency_key"), "{line}: {reply}");
    }
    // Only a top-level member is a key.
    assert_eq!(unix.publish(r#"{"caller":{"idempotency_key":7}}"#), 1);
    let response = server.post(r#"{"idempotency_key":["a"]}"#);
    assert_eq!(response.status, 400, "{}", response.body);
    assert_eq!(server.last_seq(), 1);
}

fn a_key_is_remembered_as_long_as_its_emergency_is_retained_given(flags: &[&str]) {
    let flags = [flags, &["--history", "2"]].concat();
    let server = Server::start(&flags);
    let mut unix = server.unix();
    let line = r#"{"idempotency_key":"old"}"#;
    assert_eq!(unix.publish(line), 1);
    assert_eq!(unix.publish("{}"), 2);
    unix.send(format!("{line}\n").as_bytes());
    assert_eq!(summary(&unix.reply()), (Some(true), Some(1), Some(true)), "seq 1 is still retained");
    assert_eq!(unix.publish("{}"), 3);
    // Seq 1 has left the history, and its key with it: the same line is a new emergency.
    unix.send(format!("{line}\n").as_bytes());
    assert_eq!(summary(&unix.reply()), (Some(true), Some(4), None));
}

#[test]
fn a_key_is_remembered_as_long_as_its_emergency_is_retained() {
    a_key_is_remembered_as_long_as_its_emergency_is_retained_given(DURABLE);
}

#[test]
fn a_key_is_remembered_as_long_as_its_emergency_is_retained_in_memory() {
    a_key_is_remembered_as_long_as_its_emergency_is_retained_given(IN_MEMORY);
}
