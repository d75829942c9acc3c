//! The Unix socket: newline-delimited JSON in, one reply line per input line out; the socket
//! file's mode, stale files, and a second instance on a socket in use.

mod common;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::Command;
use std::time::Duration;

use common::{Server, TempDir, UnixPublisher, run_to_exit, spawn_command, spawn_raw, wait_until};

#[test]
fn several_lines_in_one_write_and_one_line_over_several_writes() {
    let server = Server::start(&[]);
    let (mut client, _) = server.subscribe();
    let mut unix = server.unix();
    unix.send(b"{\"n\":1}\n{\"n\": 2}\r\n{\"n\":3}\n");
    for seq in 1..=3 {
        let reply = unix.reply();
        assert_eq!(
            (reply["ok"].as_bool(), reply["seq"].as_u64(), reply["queued_to"].as_u64()),
            (Some(true), Some(seq), Some(1))
        );
    }
    for piece in [&b"{\"n\""[..], b":", b"4, \"s\":\"a", b"b\"}", b"\n"] {
        unix.send(piece);
    }
    assert_eq!(unix.reply()["seq"], 4);
    for seq in 1..=3 {
        client.recv_emergency(seq);
    }
    let fourth = client.recv_text();
    assert!(fourth.ends_with(r#","data":{"n":4, "s":"ab"}}"#), "{fourth}");
}

#[test]
fn bad_and_long_lines_get_error_lines_and_the_connection_keeps_working() {
    let server = Server::start(&["--max-body-bytes", "64"]);
    let (mut client, _) = server.subscribe();
    let mut unix = server.unix();
    let long = format!("{{\"x\":\"{}\"}}", "y".repeat(200));
    unix.send(format!("nonsense\n[1]\n\n{long}\n{{\"good\":1}}\n\x00\x01\x02\n").as_bytes());
    let replies: Vec<_> = (0..6).map(|_| unix.reply()).collect();
    assert!(replies[0]["error"].as_str().unwrap().starts_with("invalid JSON"), "{}", replies[0]);
    assert_eq!(replies[1]["error"], "the emergency must be a JSON object");
    assert_eq!(replies[2]["error"], "empty body: send one JSON object");
    assert_eq!(replies[3]["error"], "emergency larger than 64 bytes");
    assert_eq!((replies[4]["ok"].as_bool(), replies[4]["seq"].as_u64()), (Some(true), Some(1)));
    assert!(replies[5]["error"].as_str().unwrap().starts_with("invalid JSON"), "{}", replies[5]);
    // A long line split over writes is still one error, and the next line works.
    unix.send(&long.as_bytes()[..100]);
    unix.send(&long.as_bytes()[100..]);
    unix.send(b"\n{\"good\":2}\n");
    assert_eq!(unix.reply()["error"], "emergency larger than 64 bytes");
    assert_eq!(unix.reply()["seq"], 2);
    client.recv_emergency(1);
    client.recv_emergency(2);
    assert_eq!(server.last_seq(), 2);
}

#[test]
fn a_line_of_exactly_max_body_bytes_is_accepted_with_either_line_ending() {
    let server = Server::start(&["--max-body-bytes", "64"]);
    let body = format!("{{\"x\":\"{}\"}}", "y".repeat(56));
    assert_eq!(body.len(), 64);
    assert_eq!(server.post(&body).status, 202, "HTTP takes it as a body");
    let mut unix = server.unix();
    assert_eq!(unix.publish(&body), 2);
    unix.send(format!("{body}\r\n").as_bytes());
    let reply = unix.reply();
    assert_eq!((reply["ok"].as_bool(), reply["seq"].as_u64()), (Some(true), Some(3)), "{reply}");
    unix.send(format!("{body} \r\n").as_bytes());
    assert_eq!(unix.reply()["error"], "emergency larger than 64 bytes");
}

#[test]
fn a_last_line_without_newline_is_published_at_end_of_input() {
    let server = Server::start(&[]);
    let mut unix = server.unix();
    unix.send(b"{\"last\":true}");
    unix.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(unix.reply()["seq"], 1);
}

#[test]
fn a_partial_line_is_dropped_when_the_read_fails() {
    let server = Server::start(&[]);
    let (mut client, _) = server.subscribe();
    let mut unix = server.unix();
    unix.send(b"{\"whole\":1}\n{\"partial\":1}");
    // Closing a Unix socket with input unread makes the peer's next read fail with ECONNRESET
    // (not end-of-file): wait until the reply to the whole line is here, and leave it unread.
    let mut byte = 0u8;
    let peeked = unsafe { libc::recv(unix.stream.as_raw_fd(), (&raw mut byte).cast(), 1, libc::MSG_PEEK) };
    assert_eq!(peeked, 1, "no reply to the whole line");
    drop(unix);
    wait_until("the read error handled", || {
        server.logs().contains("dropped a partial line") || server.last_seq() > 1
    });
    assert_eq!(server.last_seq(), 1, "the partial line was published:\n{}", server.logs());
    assert_eq!(server.unix().publish("{\"after\":1}"), 2);
    client.recv_emergency(1);
    assert!(client.recv_text().ends_with(r#","data":{"after":1}}"#));
}

#[test]
fn the_socket_is_group_writable_at_most() {
    let server = Server::start(&[]);
    let metadata = std::fs::metadata(&server.unix_socket).unwrap();
    assert!(metadata.file_type().is_socket());
    assert_eq!(metadata.permissions().mode() & 0o777, 0o660);
}

#[test]
fn a_stale_socket_file_does_not_stop_a_start() {
    let dir = TempDir::new();
    let path = dir.path().join("resq.sock");
    // A socket file nobody listens on, as a killed instance leaves behind.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = Server::start_in(dir, &[]);
    server.wait_for_log("removing stale socket");
    assert_eq!(server.unix().publish("{}"), 1);
}

#[test]
fn a_second_instance_on_a_live_socket_fails_and_leaves_the_first_alone() {
    let first = Server::start(&[]);
    let (mut second, logs) =
        spawn_raw(&["--listen", "127.0.0.1:0", "--unix-socket", first.unix_socket.to_str().unwrap()]);
    let status = second.wait().unwrap();
    assert!(!status.success());
    wait_until("the second instance's error", || logs.lock().unwrap().contains("in use by a running server"));
    assert_eq!(first.unix().publish("{}"), 1);
}

#[test]
fn a_path_that_is_not_a_socket_is_never_replaced() {
    let dir = TempDir::new();
    let path = dir.path().join("precious.txt");
    std::fs::write(&path, "keep me").unwrap();
    let (mut server, logs) = spawn_raw(&["--listen", "127.0.0.1:0", "--unix-socket", path.to_str().unwrap()]);
    assert!(!server.wait().unwrap().success());
    wait_until("the error", || logs.lock().unwrap().contains("is not a socket"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
}

#[test]
fn a_publisher_over_the_limit_takes_the_slot_of_the_longest_idle_one() {
    let server = Server::start(&["--max-unix-connections", "2"]);
    let mut oldest = server.unix();
    assert_eq!(oldest.publish("{}"), 1);
    let mut idle = server.unix();
    assert_eq!(idle.publish("{}"), 2);
    let mut newcomer = server.unix();
    assert_eq!(newcomer.publish("{}"), 3);
    // The oldest idle publisher was closed to make room; the other one still works.
    let mut rest = Vec::new();
    oldest.stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert_eq!(idle.publish("{}"), 4);
    server.wait_for_log("closed the publisher idle longest");
}

/// The socket path and the line of README.md's Unix-socket example.
fn readme_example() -> (String, String) {
    let readme = include_str!("../README.md");
    let section = readme.split("\n### Unix socket\n").nth(1).unwrap().split("\n## ").next().unwrap();
    let started = section.split("`cargo run --release -- --unix-socket ").nth(1).unwrap();
    let path = started.split('`').next().unwrap().to_owned();
    let example = section.lines().find(|line| line.starts_with("echo '")).unwrap();
    let line = example.strip_prefix("echo '").unwrap().split("' |").next().unwrap().to_owned();
    let connected = example.split("UNIX-CONNECT:").nth(1).unwrap().split_whitespace().next().unwrap();
    assert_eq!(connected, path, "the example starts on one socket and connects to another");
    (path, line)
}

#[test]
fn the_readme_example_works_from_a_checkout() {
    let (path, line) = readme_example();
    assert!(
        !path.starts_with('/'),
        "{path}: a checkout has no such directory; the example needs a path of its own"
    );
    let dir = TempDir::new();
    let mut command = Command::new(env!("CARGO_BIN_EXE_resq-push"));
    command.current_dir(dir.path()).args(["--in-memory", "--listen", "127.0.0.1:0", "--unix-socket", &path]);
    let (mut server, logs) = spawn_command(command);
    wait_until("the server to listen", || logs.lock().unwrap().contains("listening on"));
    let mut publisher = UnixPublisher::connect(&dir.path().join(&path));
    assert_eq!(publisher.publish(&line), 1);
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn a_socket_whose_directory_is_missing_is_refused_naming_the_directory() {
    let dir = TempDir::new();
    let missing = dir.path().join("resq-push");
    let path = missing.join("ingest.sock");
    let run =
        run_to_exit(&["--in-memory", "--listen", "127.0.0.1:0", "--unix-socket", path.to_str().unwrap()]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let expected = format!("its directory {} does not exist", missing.display());
    assert!(run.stderr.contains(&expected), "{}", run.stderr);
    assert!(!missing.exists(), "the directory was created");
}

#[test]
fn a_write_of_more_lines_than_the_journal_queues_waits_for_room_instead_of_refusing_any() {
    /// Twice `store::journal::MAX_QUEUED`, the submissions that may wait for the storage thread.
    const LINES: u64 = 2 * 4096;
    let server = Server::start(&[]);
    // As on a slow disk: another connection holds SQLite's write lock, so the storage thread
    // waits in its first commit (rusqlite's busy timeout is 5 s) while the lines come in.
    let database = server.dir.path().join("data/history.sqlite3");
    let holder = rusqlite::Connection::open(database).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let mut unix = server.unix();
    let lines = "{}\n".repeat(LINES as usize);
    unix.send(lines.as_bytes());
    // The server reads and stages the lines in milliseconds, and says nothing until the first
    // commit: held this long, the queue is full for the rest of them.
    std::thread::sleep(Duration::from_millis(500));
    holder.execute_batch("ROLLBACK").unwrap();
    let mut refused = Vec::new();
    for line in 1..=LINES {
        let reply = unix.reply();
        if reply["ok"] != true {
            refused.push(reply);
            continue;
        }
        assert_eq!(reply["seq"], line - refused.len() as u64, "out of order: {reply}");
    }
    assert!(refused.is_empty(), "{} of {LINES} refused, the first: {}", refused.len(), refused[0]);
    assert_eq!(server.last_seq(), LINES);
}
