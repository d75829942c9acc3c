//! Health and metrics that tell the truth: `/healthz` reports the storage state (a real full disk,
//! not a simulated one) and answers 503 while commits fail.

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
