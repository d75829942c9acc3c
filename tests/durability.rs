//! Durable history: what was acknowledged survives `kill -9` with the same seq and data, the
//! sequence goes on after a restart, resuming clients get exactly what they missed, retention
//! holds on disk, and a wiped or broken data dir is never a silent gap.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Server, TempDir, spawn_raw, wait_until};

/// Publishes over the Unix socket in batches of `batch` lines until the server goes away,
/// recording every acknowledged (seq, data).
fn publish_until_gone(socket: std::path::PathBuf, batch: usize, acked: Arc<Mutex<BTreeMap<u64, String>>>) {
    let Ok(stream) = UnixStream::connect(&socket) else { return };
    let mut writer = stream.try_clone().unwrap();
    let mut replies = BufReader::new(stream);
    for round in 0.. {
        let lines: Vec<String> = (0..batch)
            .map(|i| format!(r#"{{"round":{round}, "line":{i},"text":"calle {round}-{i}"}}"#))
            .collect();
        if writer.write_all(lines.iter().map(|l| format!("{l}\n")).collect::<String>().as_bytes()).is_err() {
            return;
        }
        for line in lines {
            let mut reply = String::new();
            if replies.read_line(&mut reply).unwrap_or(0) == 0 {
                return;
            }
            let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
            if reply["ok"] == true {
                acked.lock().unwrap().insert(reply["seq"].as_u64().unwrap(), line);
            }
        }
    }
}

#[test]
fn kill_9_during_a_burst_loses_nothing_that_was_acknowledged() {
    let server = Server::start(&[]);
    let stream_id = server.health()["stream"].as_str().unwrap().to_owned();
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let publishers: Vec<_> = (0..3)
        .map(|n| {
            let (socket, acked) = (server.unix_socket.clone(), Arc::clone(&acked));
            std::thread::spawn(move || publish_until_gone(socket, 1 + n * 7, acked))
        })
        .collect();
    wait_until("300 acknowledged emergencies", || acked.lock().unwrap().len() >= 300);
    let dir = server.kill9();
    for publisher in publishers {
        publisher.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    let server = Server::start_in(dir, &["--max-poll-bytes", "16777216"]);
    let health = server.health();
    assert_eq!(health["stream"], stream_id.as_str());
    let stored = server.poll_all();
    let seqs: Vec<u64> = stored.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    let last = *seqs.last().unwrap();
    assert_eq!(
        seqs,
        (1..=last).collect::<Vec<_>>(),
        "seqs on disk are not 1..={last} without gaps or repeats"
    );
    assert_eq!(health["seq"], last);
    for (seq, data) in &acked {
        let event = &stored[*seq as usize - 1];
        let raw = serde_json::to_string(&event["data"]).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(data).unwrap(),
            event["data"],
            "seq {seq}: {raw}"
        );
    }
    // The bytes too: the stored envelope carries the data verbatim.
    let (seq, data) = acked.iter().next_back().unwrap();
    let page = server.get(&format!("/emergencias?since={}", seq - 1)).body;
    assert!(page.contains(&format!(r#","data":{data}}}"#)), "{page}");
    // The sequence goes on.
    assert_eq!(server.unix().publish("{}"), last + 1);
    println!("{} acknowledged before kill -9, {last} on disk", acked.len());
}

#[test]
fn a_client_resuming_after_a_restart_gets_exactly_what_it_missed() {
    let server = Server::start(&[]);
    let (mut client, welcome) = server.subscribe();
    let stream = welcome["stream"].as_str().unwrap().to_owned();
    let mut unix = server.unix();
    for n in 1..=5 {
        unix.publish(&format!(r#"{{"n":{n}}}"#));
        client.recv_emergency(n);
    }
    drop(client);
    for n in 6..=8 {
        unix.publish(&format!(r#"{{"n":{n}}}"#));
    }
    drop(unix);
    let dir = server.kill9();

    let server = Server::start_in(dir, &[]);
    let mut client = server.ws(&format!("/ws/emergencias?since=5&stream={stream}"));
    let welcome = client.recv_json();
    assert_eq!(welcome["stream"], stream.as_str());
    assert_eq!(
        welcome["replay"],
        serde_json::json!({"since": 5, "count": 3, "missed": 0, "reset": false, "stream_changed": false})
    );
    for n in 6..=8 {
        assert_eq!(client.recv_emergency(n)["data"]["n"], n);
    }
    assert_eq!(server.unix().publish(r#"{"n":9}"#), 9);
    client.recv_emergency(9);
}

#[test]
fn retention_by_count_holds_on_disk_across_restarts() {
    // Open emergencies stay beyond the history (tests/acks.rs): here none stays open.
    let server = Server::start(&["--history", "5", "--max-open", "0"]);
    let mut unix = server.unix();
    for n in 1..=12 {
        unix.publish(&format!(r#"{{"n":{n}}}"#));
    }
    drop(unix);
    let dir = server.stop();

    let server = Server::start_in(dir, &["--history", "5", "--max-open", "0"]);
    let seqs: Vec<u64> = server.poll_all().iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [8, 9, 10, 11, 12]);
    let mut client = server.ws("/ws/emergencias?since=3");
    let welcome = client.recv_json();
    assert_eq!(welcome["history"], serde_json::json!({"first_seq": 8, "last_seq": 12, "count": 5}));
    assert_eq!(welcome["replay"]["missed"], 4);
    for seq in 8..=12 {
        client.recv_emergency(seq);
    }
    assert_eq!(server.unix().publish("{}"), 13);
    // The database holds no more than the limit either.
    let dir = server.stop();
    let count = sqlite_count(&dir);
    assert_eq!(count, 5);
}

/// Rows in the emergencies table, read with SQLite itself.
fn sqlite_count(dir: &TempDir) -> i64 {
    let db = rusqlite::Connection::open(dir.path().join("data/history.sqlite3")).unwrap();
    db.query_row("SELECT COUNT(*) FROM emergencies", [], |row| row.get(0)).unwrap()
}

#[test]
fn retention_by_age_empties_the_history_but_keeps_the_sequence() {
    let server = Server::start(&["--history-max-age", "1"]);
    let mut unix = server.unix();
    unix.publish("{}");
    unix.publish("{}");
    drop(unix);
    let dir = server.stop();
    // The history's age limit is what is under test: let it pass.
    std::thread::sleep(Duration::from_millis(1100));
    let server = Server::start_in(dir, &["--history-max-age", "1"]);
    let health = server.health();
    assert_eq!(health["history"]["count"], 0);
    assert_eq!(health["seq"], 2);
    assert_eq!(server.unix().publish("{}"), 3);
}

#[test]
fn a_wiped_data_dir_is_a_new_history_and_resuming_clients_are_told() {
    let server = Server::start(&[]);
    let mut unix = server.unix();
    for _ in 0..3 {
        unix.publish("{}");
    }
    drop(unix);
    let old_stream = server.health()["stream"].as_str().unwrap().to_owned();
    let dir = server.stop();
    std::fs::remove_dir_all(dir.path().join("data")).unwrap();

    let server = Server::start_in(dir, &[]);
    let new_stream = server.health()["stream"].as_str().unwrap().to_owned();
    assert_ne!(new_stream, old_stream);
    server.unix().publish(r#"{"after":"wipe"}"#);
    // The client's seq 3 belongs to the old history: it gets everything from the start.
    let mut client = server.ws(&format!("/ws/emergencias?since=3&stream={old_stream}"));
    let welcome = client.recv_json();
    assert_eq!(welcome["replay"]["stream_changed"], true);
    assert_eq!(welcome["replay"]["count"], 1);
    assert_eq!(client.recv_emergency(1)["data"]["after"], "wipe");
}

#[test]
fn a_corrupt_or_unusable_data_dir_fails_at_start_with_a_clear_error() {
    let dir = TempDir::new();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("history.sqlite3"), vec![0x5a; 8192]).unwrap();
    let (mut child, logs) = spawn_raw(&["--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()]);
    assert!(!child.wait().unwrap().success());
    wait_until("the error", || logs.lock().unwrap().contains("is unusable"));
    assert_eq!(
        std::fs::read(data.join("history.sqlite3")).unwrap(),
        vec![0x5a; 8192],
        "the file was touched"
    );

    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let (mut child, logs) = spawn_raw(&["--listen", "127.0.0.1:0", "--data-dir", file.to_str().unwrap()]);
    assert!(!child.wait().unwrap().success());
    wait_until("the error", || logs.lock().unwrap().contains("cannot create data dir"));
}

/// Overwrites the root page of the emergencies table with garbage: the file is still a
/// database, and the table is not.
fn corrupt_the_emergencies_table(path: &std::path::Path) {
    let (root, page_size) = {
        let db = rusqlite::Connection::open(path).unwrap();
        let root: i64 = db
            .query_row("SELECT rootpage FROM sqlite_schema WHERE name = 'emergencies'", [], |row| row.get(0))
            .unwrap();
        let page_size: i64 = db.query_row("PRAGMA page_size", [], |row| row.get(0)).unwrap();
        (root as usize, page_size as usize)
    };
    let mut bytes = std::fs::read(path).unwrap();
    bytes[(root - 1) * page_size..root * page_size].fill(0x5a);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_database_that_fails_its_integrity_check_stops_the_start_saying_what_to_do() {
    let server = Server::start(&[]);
    let mut unix = server.unix();
    for n in 0..8 {
        unix.publish(&format!(r#"{{"n":{n},"text":"{}"}}"#, "x".repeat(1000)));
    }
    drop(unix);
    let dir = server.stop();
    let data = dir.path().join("data");
    corrupt_the_emergencies_table(&data.join("history.sqlite3"));
    let (mut child, logs) = spawn_raw(&["--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()]);
    assert!(!child.wait().unwrap().success());
    wait_until("the error", || logs.lock().unwrap().contains("failed its integrity check"));
    let logs = logs.lock().unwrap().clone();
    assert!(logs.contains("or restore it from a backup"), "{logs}");
    assert!(!logs.contains("Invalid parameter name"), "{logs}");
}

#[test]
fn two_servers_cannot_share_a_data_dir() {
    let first = Server::start(&[]);
    let data = first.dir.path().join("data");
    let (mut second, logs) = spawn_raw(&["--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()]);
    assert!(!second.wait().unwrap().success());
    wait_until("the error", || logs.lock().unwrap().contains("in use by another resq-push"));
    assert_eq!(first.unix().publish("{}"), 1);
}

#[test]
fn in_memory_mode_says_it_is_not_durable() {
    let server = Server::start(&["--in-memory"]);
    server.wait_for_log("the history is NOT durable");
    assert_eq!(server.unix().publish("{}"), 1);
}

#[test]
fn a_retry_after_kill_9_gets_the_original_seq_and_nothing_is_broadcast_again() {
    let server = Server::start(&[]);
    let body = r#"{"tipo":"incendio","idempotency_key":"before-the-crash"}"#;
    let post = |server: &Server| {
        server.http(
            b"POST /emergencias HTTP/1.1\r\nHost: t\r\nConnection: close\r\nIdempotency-Key: by-header\r\n\
              Content-Length: 2\r\n\r\n{}",
        )
    };
    assert_eq!(server.unix().publish(body), 1);
    assert_eq!(post(&server).json()["seq"], 2);
    // The publisher's replies were lost in the crash: it cannot know that both were stored.
    let dir = server.kill9();

    let server = Server::start_in(dir, &[]);
    let (mut client, welcome) = server.subscribe();
    // Both are still open, so a fresh tablet is sent them first, once.
    assert_eq!(welcome["open"], serde_json::json!([1, 2]), "{welcome}");
    client.recv_emergency(1);
    client.recv_emergency(2);
    let mut unix = server.unix();
    unix.send(format!("{body}\n").as_bytes());
    let reply = unix.reply();
    assert_eq!((reply["seq"].as_u64(), reply["duplicate"].as_bool()), (Some(1), Some(true)), "{reply}");
    let retry = post(&server);
    assert_eq!(retry.status, 202, "{}", retry.body);
    assert_eq!((retry.json()["seq"].as_u64(), retry.json()["duplicate"].as_bool()), (Some(2), Some(true)));
    assert_eq!(unix.publish(r#"{"after":"restart"}"#), 3);
    assert_eq!(client.recv_emergency(3)["data"]["after"], "restart", "a retry was broadcast");
    assert_eq!(server.poll_all().len(), 3);
}

#[test]
fn a_data_dir_from_before_idempotency_keys_is_migrated() {
    let dir = TempDir::new();
    // The schema as it was before keys: no key or body digest columns.
    common::old_data_dir(&dir, "", 1);
    let server = Server::start_in(dir, &[]);
    assert_eq!(server.health()["stream"], "00112233aabbccdd");
    assert_eq!(server.poll_all().len(), 1);
    let mut unix = server.unix();
    let line = r#"{"idempotency_key":"after-upgrade"}"#;
    assert_eq!(unix.publish(line), 2);
    unix.send(format!("{line}\n").as_bytes());
    assert_eq!(unix.reply()["duplicate"], true);
    // And again after a restart, from the migrated table.
    let dir = server.stop();
    let server = Server::start_in(dir, &[]);
    let mut unix = server.unix();
    unix.send(format!("{line}\n").as_bytes());
    let reply = unix.reply();
    assert_eq!((reply["seq"].as_u64(), reply["duplicate"].as_bool()), (Some(2), Some(true)), "{reply}");
}

#[test]
fn a_data_dir_removed_under_a_running_server_refuses_every_publish_and_fails_health() {
    let server = Server::start(&[]);
    let data = server.dir.path().join("data");
    let mut unix = server.unix();
    assert_eq!(unix.publish(r#"{"before":"removal"}"#), 1);
    std::fs::remove_dir_all(&data).unwrap();

    let refused = server.post(r#"{"after":"removal"}"#);
    assert_eq!(refused.status, 503, "{}", refused.body);
    let named = format!("data dir {} was removed or replaced", data.display());
    assert!(refused.error().contains(&named), "{}", refused.body);
    unix.send(b"{\"after\":1}\n{\"after\":2}\n");
    for _ in 0..2 {
        let reply = unix.reply();
        assert_eq!(reply["ok"], false, "acknowledged after the removal: {reply}");
        assert!(reply["error"].as_str().unwrap().contains(&named), "{reply}");
    }
    let response = server.get("/healthz");
    assert_eq!(response.status, 503, "{}", response.body);
    let health = response.json();
    let storage = &health["storage"];
    assert_eq!(
        (&storage["state"], &storage["cause"]),
        (&"failing".into(), &"data_dir_gone".into()),
        "{health}"
    );
    assert!(storage["last_error"].as_str().unwrap().contains(&named), "{health}");
    assert_eq!(health["seq"], 1, "{health}");
    let page = server.get("/metrics").body;
    assert!(page.contains("resq_push_storage_failures_total{cause=\"data_dir_gone\"} 3\n"), "{page}");
    let logs = server.logs();
    let reported: Vec<&str> = logs.lines().filter(|line| line.contains("was removed or replaced")).collect();
    assert!(reported.iter().filter(|line| line.contains(" ERROR ")).count() == 1, "{logs}");
    // Nothing was acknowledged after the removal, so a restart (a new history) loses nothing it said "ok" to.
    assert!(!data.exists(), "the data dir was created again");
}
