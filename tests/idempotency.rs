//! Publishers can retry safely: an emergency sent again under the same idempotency key (the
//! `Idempotency-Key` header, or an `"idempotency_key"` member of the object) is the one already
//! stored. The retry gets its seq back with `"duplicate":true` and nothing is broadcast twice; the
//! same key with another body is refused. Each case runs with the durable history (the default)
//! and with `--in-memory`, where the hub decides instead of the journal.

mod common;

use serde_json::Value;

use common::{HttpResponse, Server};

const DURABLE: &[&str] = &[];
const IN_MEMORY: &[&str] = &["--in-memory"];

/// `POST /emergencias` with `headers` (each ending in `\r\n`) before the body.
fn post_with(server: &Server, headers: &str, body: &str) -> HttpResponse {
    server.http(
        format!(
            "POST /emergencias HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n{headers}\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

fn post_keyed(server: &Server, key: &str, body: &str) -> HttpResponse {
    post_with(server, &format!("Idempotency-Key: {key}\r\n"), body)
}

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

fn http_retry_gets_the_original_seq_and_is_broadcast_once_given(flags: &[&str]) {
    let server = Server::start(flags);
    let (mut client, _) = server.subscribe();
    let body = r#"{"tipo":"incendio","direccion":"Los Aromos 123"}"#;
    let first = post_keyed(&server, "alta-7f3a", body);
    assert_eq!(first.status, 202, "{}", first.body);
    assert_eq!(summary(&first.json()), (Some(true), Some(1), None), "{}", first.body);

    let retry = post_keyed(&server, "alta-7f3a", body);
    assert_eq!(retry.status, 202, "{}", retry.body);
    let reply = retry.json();
    assert_eq!(summary(&reply), (Some(true), Some(1), Some(true)), "{reply}");
    assert_eq!(reply["stream"], first.json()["stream"]);
    assert_eq!(reply["queued_to"], 0, "a retry queues nothing: {reply}");

    assert_eq!(client.recv_emergency(1)["data"]["tipo"], "incendio");
    next_frame_is_a_new_emergency(&server, &mut client, 2);
    assert_eq!(server.last_seq(), 2);
}

#[test]
fn an_http_retry_gets_the_original_seq_and_is_broadcast_once() {
    http_retry_gets_the_original_seq_and_is_broadcast_once_given(DURABLE);
}

#[test]
fn an_http_retry_gets_the_original_seq_and_is_broadcast_once_in_memory() {
    http_retry_gets_the_original_seq_and_is_broadcast_once_given(IN_MEMORY);
}

fn the_same_key_with_another_body_is_refused_given(flags: &[&str]) {
    let server = Server::start(flags);
    let (mut client, _) = server.subscribe();
    assert_eq!(post_keyed(&server, "k-1", r#"{"n":1}"#).status, 202);
    let conflict = post_keyed(&server, "k-1", r#"{"n":2}"#);
    assert_eq!(conflict.status, 409, "{}", conflict.body);
    assert!(conflict.head.starts_with("HTTP/1.1 409 Conflict\r\n"), "{}", conflict.head);
    let error = conflict.error();
    assert!(error.contains("idempotency key") && error.contains("seq 1"), "{error}");

    let mut unix = server.unix();
    unix.send(b"{\"n\":3,\"idempotency_key\":\"k-1\"}\n");
    let line = unix.reply();
    assert_eq!(line["ok"], false, "{line}");
    assert!(line["error"].as_str().unwrap().contains("idempotency key"), "{line}");

    client.recv_emergency(1);
    next_frame_is_a_new_emergency(&server, &mut client, 2);
}

#[test]
fn the_same_key_with_another_body_is_refused_with_409() {
    the_same_key_with_another_body_is_refused_given(DURABLE);
}

#[test]
fn the_same_key_with_another_body_is_refused_with_409_in_memory() {
    the_same_key_with_another_body_is_refused_given(IN_MEMORY);
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

fn concurrent_posts_with_one_key_are_one_emergency_given(flags: &[&str]) {
    let server = Server::start(flags);
    let (mut client, _) = server.subscribe();
    let replies: Vec<Value> = std::thread::scope(|scope| {
        let posts: Vec<_> =
            (0..8).map(|_| scope.spawn(|| post_keyed(&server, "all-at-once", r#"{"n":1}"#).json())).collect();
        posts.into_iter().map(|post| post.join().unwrap()).collect()
    });
    assert!(replies.iter().all(|reply| reply["ok"] == true && reply["seq"] == 1), "{replies:?}");
    let duplicates = replies.iter().filter(|reply| reply["duplicate"] == true).count();
    assert_eq!(duplicates, 7, "{replies:?}");
    client.recv_emergency(1);
    next_frame_is_a_new_emergency(&server, &mut client, 2);
}

#[test]
fn concurrent_posts_with_one_key_are_one_emergency() {
    concurrent_posts_with_one_key_are_one_emergency_given(DURABLE);
}

#[test]
fn concurrent_posts_with_one_key_are_one_emergency_in_memory() {
    concurrent_posts_with_one_key_are_one_emergency_given(IN_MEMORY);
}

#[test]
fn a_bad_idempotency_key_header_gets_400_naming_it() {
    let server = Server::start(&[]);
    let too_long = "k".repeat(129);
    let cases = [
        "Idempotency-Key: \r\n".to_owned(),
        format!("Idempotency-Key: {too_long}\r\n"),
        "Idempotency-Key: two words\r\n".to_owned(),
        "Idempotency-Key: cl\u{e9}\r\n".to_owned(),
        "Idempotency-Key: a\r\nIdempotency-Key: b\r\n".to_owned(),
    ];
    for headers in &cases {
        let response = post_with(&server, headers, "{}");
        assert_eq!(response.status, 400, "{headers:?}: {}", response.body);
        assert!(response.error().contains("Idempotency-Key"), "{headers:?}: {}", response.body);
    }
    assert_eq!(server.last_seq(), 0);
    let longest = post_keyed(&server, &"k".repeat(128), "{}");
    assert_eq!(longest.status, 202, "{}", longest.body);
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

#[test]
fn the_header_and_the_member_must_agree() {
    let server = Server::start(&[]);
    let differ = post_keyed(&server, "a", r#"{"idempotency_key":"b"}"#);
    assert_eq!(differ.status, 400, "{}", differ.body);
    assert!(differ.error().contains("Idempotency-Key"), "{}", differ.body);
    let agree = post_keyed(&server, "a", r#"{"idempotency_key":"a"}"#);
    assert_eq!(agree.status, 202, "{}", agree.body);
    let by_member = server.post(r#"{"idempotency_key":"a"}"#);
    assert_eq!(summary(&by_member.json()), (Some(true), Some(1), Some(true)));
}

fn a_key_is_remembered_as_long_as_its_emergency_is_retained_given(flags: &[&str]) {
    // Open emergencies stay on disk beyond the history, and their keys with them: none is open.
    let flags = [flags, &["--history", "2", "--max-open", "0"]].concat();
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
