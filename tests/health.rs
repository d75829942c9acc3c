//! Health, metrics and logs that tell the truth: `/healthz` reports the storage state (a real full
//! disk, not a simulated one) and answers 503 while commits fail; counters move as things happen;
//! every publish is one log line saying who sent what.

mod common;

use common::{Server, fill_disk};

#[test]
fn healthz_answers_503_while_the_disk_is_full_and_ok_again_once_a_commit_succeeds() {
    let server = Server::start_on_small_disk("512k", &[]);
    let health = server.health();
    assert_eq!((&health["status"], &health["storage"]["state"]), (&"ok".into(), &"ok".into()), "{health}");

    fill_disk(&server.on_disk("filler"));
    let refused = server.post("{}");
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(refused.error().contains("database or disk is full"), "{}", refused.body);
    let response = server.get("/healthz");
    assert_eq!(response.status, 503, "{}", response.body);
    let health = response.json();
    assert_eq!(health["status"], "failing", "{health}");
    let storage = &health["storage"];
    assert_eq!(storage["state"], "failing", "{health}");
    assert!(storage["last_error"].as_str().unwrap().contains("database or disk is full"), "{health}");
    assert!(storage["since"].as_str().unwrap().ends_with('Z'), "{health}");
    // The fields monitoring already reads are still there.
    assert_eq!((health["clients"].as_u64(), health["seq"].as_u64()), (Some(0), Some(0)), "{health}");
    assert!(
        health["history"].is_object() && health["client_list"].is_array() && health["stream"].is_string()
    );

    std::fs::remove_file(server.on_disk("filler")).unwrap();
    assert_eq!(server.post("{}").status, 202);
    let health = server.health();
    assert_eq!((&health["status"], &health["storage"]["state"]), (&"ok".into(), &"ok".into()), "{health}");
    assert!(health["storage"].get("last_error").is_none(), "{health}");
}

#[test]
fn healthz_names_the_version_the_uptime_and_an_in_memory_history() {
    let server = Server::start(&["--in-memory"]);
    let health = server.health();
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["storage"]["state"], "in_memory", "{health}");
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"), "{health}");
    assert!(health["uptime_s"].as_u64().is_some_and(|uptime| uptime < 60), "{health}");
    assert!(health["started_at"].as_str().is_some_and(|at| at.ends_with('Z')), "{health}");
}

#[test]
fn storage_failures_are_counted_by_cause_for_every_emergency_refused() {
    let server = Server::start_on_small_disk("512k", &[]);
    fill_disk(&server.on_disk("filler"));
    assert_eq!(server.post("{}").status, 503);
    let mut unix = server.unix();
    unix.send(b"{}\n{}\n");
    for _ in 0..2 {
        let reply = unix.reply();
        assert!(reply["error"].as_str().unwrap().contains("database or disk is full"), "{reply}");
    }
    let page = server.get("/metrics").body;
    assert!(page.contains("# TYPE resq_push_storage_failures_total counter\n"), "{page}");
    assert!(page.contains("resq_push_storage_failures_total{cause=\"disk_full\"} 3\n"), "{page}");
    assert_eq!(server.get("/healthz").json()["storage"]["cause"], "disk_full");
}

#[test]
fn deliveries_are_counted_as_they_are_written_not_when_the_client_leaves() {
    let server = Server::start(&["--in-memory"]);
    let (mut client, _) = server.subscribe();
    let mut publisher = server.unix();
    for seq in 1..=5 {
        assert_eq!(publisher.publish("{}"), seq);
        client.recv_emergency(seq);
    }
    let page = server.get("/metrics").body;
    let delivered = page
        .lines()
        .find_map(|line| line.strip_prefix("resq_push_delivered_total "))
        .and_then(|value| value.parse::<u64>().ok());
    assert!(delivered.is_some_and(|delivered| delivered >= 5), "{page}");
    assert_eq!(server.clients(), 1, "the client is still connected");
}

#[test]
fn a_retry_recognized_by_its_key_is_not_counted_as_delivered() {
    for flags in [&[][..], &["--in-memory"][..]] {
        let server = Server::start(flags);
        let (mut client, _) = server.subscribe();
        let mut publisher = server.unix();
        let keyed = r#"{"n":1,"idempotency_key":"retry-1"}"#;
        assert_eq!(publisher.publish(keyed), 1, "{flags:?}");
        assert_eq!(publisher.publish(keyed), 1, "{flags:?}: the retry is the same emergency");
        assert_eq!(publisher.publish("{}"), 2, "{flags:?}");
        client.recv_emergency(1);
        client.recv_emergency(2);
        let delivered = "resq_push_delivered_total 2\n";
        common::wait_until(delivered, || server.get("/metrics").body.contains(delivered));
        let page = server.get("/metrics").body;
        assert!(page.contains("resq_push_duplicates_total{source=\"unix\"} 1\n"), "{flags:?}: {page}");
    }
}

#[test]
fn every_publish_is_one_info_line_with_its_seq_path_sender_and_size() {
    let server = Server::start(&["--in-memory"]);
    // Two clients: still one line per emergency, not one per client.
    let (_first, _) = server.subscribe();
    let (_second, _) = server.subscribe();
    let body = r#"{"tipo":"incendio"}"#;
    assert_eq!(server.post(body).status, 202);
    assert_eq!(server.unix().publish(body), 2);
    // SAFETY: getuid has no preconditions and cannot fail.
    let (uid, pid) = (unsafe { libc::getuid() }, std::process::id());
    let over_http = format!(
        "INFO  resq_push::http::routes: published seq 1 ({} bytes) over http from 127.0.0.1:",
        body.len()
    );
    let over_unix = format!(
        "INFO  resq_push::unix::publisher: published seq 2 ({} bytes) over unix from uid {uid} pid {pid}\n",
        body.len()
    );
    server.wait_for_log(&over_http);
    server.wait_for_log(&over_unix);
    let logs = server.logs();
    assert_eq!(logs.matches("published seq").count(), 2, "{logs}");
}

#[test]
fn a_retry_is_logged_as_a_duplicate_and_a_key_conflict_only_as_a_rejection() {
    // SAFETY: getuid has no preconditions and cannot fail.
    let (uid, pid) = (unsafe { libc::getuid() }, std::process::id());
    for flags in [&[][..], &["--in-memory"][..]] {
        let server = Server::start(flags);
        let post_keyed = |body: &str| {
            let request = format!(
                "POST /emergencias HTTP/1.1\r\nHost: t\r\nIdempotency-Key: k-http\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            server.http(request.as_bytes()).status
        };
        assert_eq!(post_keyed(r#"{"n":1}"#), 202, "{flags:?}");
        assert_eq!(post_keyed(r#"{"n":1}"#), 202, "{flags:?}");
        assert_eq!(post_keyed(r#"{"n":2}"#), 409, "{flags:?}");
        let mut unix = server.unix();
        let line = r#"{"n":3,"idempotency_key":"k-unix"}"#;
        assert_eq!(unix.publish(line), 2, "{flags:?}");
        assert_eq!(unix.publish(line), 2, "{flags:?}");
        unix.send(b"{\"n\":4,\"idempotency_key\":\"k-unix\"}\n");
        let refused = unix.reply();
        assert!(refused["error"].as_str().unwrap().contains("idempotency key conflict"), "{refused}");

        server.wait_for_log(
            "INFO  resq_push::http::routes: duplicate of seq 1 (7 bytes) over http from 127.0.0.1:",
        );
        server.wait_for_log(&format!(
            "INFO  resq_push::unix::publisher: duplicate of seq 2 ({} bytes) over unix from uid {uid} pid {pid}\n",
            line.len()
        ));
        server.wait_for_log("rejected 1 line(s) on the Unix socket: idempotency key conflict");
        let logs = server.logs();
        assert_eq!(logs.matches("published seq").count(), 2, "{flags:?}: {logs}");
        assert_eq!(logs.matches("duplicate of seq").count(), 2, "{flags:?}: {logs}");
        let conflicts: Vec<&str> = logs.lines().filter(|line| line.contains("key conflict")).collect();
        assert_eq!(conflicts.len(), 2, "{flags:?}: {logs}");
        assert!(conflicts.iter().all(|line| line.contains(" WARN ")), "{flags:?}: {conflicts:?}");
        assert!(conflicts[0].contains("rejected publish from 127.0.0.1:"), "{flags:?}: {conflicts:?}");
    }
}
