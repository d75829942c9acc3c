//! Start-up and shutdown: invalid flags fail clearly; SIGTERM and SIGINT close every client with
//! 1001, exit 0 and remove the Unix socket.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};

use common::{
    PATIENCE, Server, TempDir, UnixPublisher, run_to_exit, run_to_exit_with_log, signal, wait_until,
};
use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;

#[test]
fn sigterm_closes_clients_with_1001_and_exits_cleanly() {
    let mut server = Server::start(&[]);
    let mut clients: Vec<_> = (0..3).map(|_| server.subscribe().0).collect();
    let seq = server.unix().publish("{}");
    server.terminate();
    for client in &mut clients {
        // Events queued before the signal are delivered before the Close.
        client.recv_emergency(seq);
        let close = client.recv_close().expect("a close frame with a code");
        assert_eq!(close.code, CloseCode::Away);
        assert_eq!(close.reason, "server shutting down");
    }
    let status = server.wait_exit();
    assert!(status.success(), "{status:?}\n{}", server.logs());
    assert!(!server.unix_socket.exists(), "the socket file is left behind");
    assert!(server.logs().contains("all connections closed"), "{}", server.logs());
}

#[test]
fn sigint_also_shuts_down_cleanly() {
    let mut server = Server::start(&[]);
    let (mut client, _) = server.subscribe();
    signal(server.pid(), "INT");
    assert_eq!(client.recv_close().map(|f| f.code), Some(CloseCode::Away));
    assert!(server.wait_exit().success());
}

#[test]
fn every_invalid_flag_exits_2_with_the_flag_named() {
    // On a loopback port of its own, in case one starts after all.
    let quiet = |args: &[&'static str]| [&["--in-memory", "--listen", "127.0.0.1:0"], args].concat();
    let cases = [
        (quiet(&["--bogus"]), "--bogus"),
        (quiet(&["stray"]), "stray"),
        (quiet(&["--queue", "many"]), "--queue"),
        (quiet(&["--queue"]), "--queue"),
        (quiet(&["--queue", "1", "--queue", "2"]), "--queue"),
        (quiet(&["--ping-interval", "often"]), "--ping-interval"),
        (quiet(&["--queue", "0"]), "--queue must be at least 1"),
        (vec!["--in-memory", "--listen", "nowhere"], "--listen"),
    ];
    for (args, flag) in &cases {
        let run = run_to_exit(args);
        assert_eq!(run.code, Some(2), "{args:?} exit code; stderr:\n{}", run.stderr);
        assert!(run.stderr.contains(flag), "{args:?}: the error does not name {flag}:\n{}", run.stderr);
        assert!(run.stdout.is_empty(), "{args:?} printed on stdout: {}", run.stdout);
    }
}

#[test]
fn refused_flags_and_start_up_errors_are_written_even_with_rust_log_off() {
    let run = run_to_exit_with_log(&["--in-memory", "--listen", "127.0.0.1:0", "--bogus"], "off");
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("--bogus"), "the error does not name --bogus:\n{}", run.stderr);
    let missing = ["--in-memory", "--listen", "127.0.0.1:0", "--publish-token-file", "/nonexistent/tokens"];
    let run = run_to_exit_with_log(&missing, "off");
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("/nonexistent/tokens"), "the error does not name the file:\n{}", run.stderr);
}

#[test]
fn listen_takes_localhost_by_name() {
    let server = Server::start(&["--listen", "localhost:0"]);
    assert_eq!(server.addr.ip().to_string(), "127.0.0.1", "{}", server.logs());
    assert_eq!(server.health()["status"], "ok");
}

#[test]
fn listen_refuses_other_host_names_without_a_lookup() {
    let run = run_to_exit(&["--in-memory", "--listen", "dispatch.lan:8000"]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("--listen") && run.stderr.contains("host name"), "{}", run.stderr);
}

/// Everything the server logs at start with `RUST_LOG` set to `spec`: up to its answer to a
/// publish on the Unix socket, which comes only once start-up is over. Its stderr goes to a file,
/// so that every line written before that answer is read.
fn logs_at_start_with_rust_log(spec: &str) -> String {
    let dir = TempDir::new();
    let socket = dir.path().join("resq.sock");
    let stderr = dir.path().join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_resq-push"))
        .args(["--in-memory", "--listen", "127.0.0.1:0", "--unix-socket", socket.to_str().unwrap()])
        .env("RUST_LOG", spec)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    wait_until(&format!("the Unix socket with RUST_LOG={spec}"), || socket.exists());
    UnixPublisher::connect(&socket).publish("{}");
    let _ = child.kill();
    let _ = child.wait();
    std::fs::read_to_string(&stderr).unwrap()
}

#[test]
fn a_rust_log_the_logger_does_not_understand_gets_one_warning_naming_it() {
    let logs = logs_at_start_with_rust_log("verbose");
    assert!(logs.contains("listening on"), "{logs}");
    let warnings: Vec<&str> = logs.lines().filter(|line| line.contains("RUST_LOG")).collect();
    assert_eq!(warnings.len(), 1, "{logs}");
    assert!(warnings[0].contains(" WARN ") && warnings[0].contains(r#"ignored "verbose""#), "{logs}");

    // Shown even when the level it sets would hide warnings.
    let logs = logs_at_start_with_rust_log("error,resq_push=loud");
    assert!(logs.contains(r#"ignored "resq_push=loud""#), "{logs}");
    assert!(!logs.contains("listening on"), "the error level was not kept:\n{logs}");
}

#[test]
fn version_prints_the_name_and_version() {
    let run = run_to_exit(&["--version"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.stdout, format!("resq-push {}\n", env!("CARGO_PKG_VERSION")));
}

/// The flags of README.md's "Configuration" table, in its order.
fn readme_flags() -> Vec<String> {
    let readme = include_str!("../README.md");
    let section = readme.split("\n## Configuration\n").nth(1).unwrap();
    let flags: Vec<String> = section
        .lines()
        .skip_while(|line| !line.starts_with("| flag |"))
        .take_while(|line| line.starts_with('|'))
        .filter_map(|row| row.strip_prefix("| `")?.split('`').next().map(str::to_owned))
        .collect();
    assert!(flags.len() > 20, "{flags:?}");
    flags
}

#[test]
fn help_is_short_lines_under_headings_and_lists_every_flag() {
    let run = run_to_exit(&["--help"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let help = run.stdout;
    assert!(help.starts_with("Usage: resq-push [options]\n"), "{help}");
    for line in help.lines() {
        assert!(line.chars().count() <= 100, "a line of {} columns:\n{line}", line.chars().count());
    }
    for heading in ["Network:", "Access:", "History:", "Time limits:", "Limits:", "Logging:"] {
        assert!(help.lines().any(|line| line == heading), "no heading {heading}:\n{help}");
    }
    for flag in readme_flags().iter().map(String::as_str).chain(["--version", "--help"]) {
        let listed = help.lines().filter(|line| {
            line.trim_start().starts_with(&format!("{flag} "))
                || line.trim() == flag
                || line.trim_start().starts_with(&format!("{flag},"))
        });
        assert_eq!(listed.count(), 1, "{flag} is not listed once:\n{help}");
    }
}

/// What a tablet got before the server closed it: the seqs, in order, and the close code.
fn read_until_close(mut client: common::Client) -> (Vec<u64>, Option<CloseCode>) {
    let mut seqs = Vec::new();
    loop {
        match client.ws.read().unwrap() {
            Message::Text(text) => {
                let event: serde_json::Value = serde_json::from_str(&text).unwrap();
                seqs.push(event["seq"].as_u64().unwrap());
            }
            Message::Close(frame) => return (seqs, frame.map(|frame| frame.code)),
            _ => {}
        }
    }
}

/// SIGTERM in the middle of a burst of Unix-socket lines (many reads, so several commits are in
/// flight when the signal comes): every line answered "ok" must have reached the connected
/// tablet before its Close 1001, and its `queued_to` must count that tablet.
fn shutdown_during_a_burst(flags: &[&str]) {
    const LINES: usize = 2000;
    let mut server = Server::start(flags);
    let (client, _) = server.subscribe();
    let tablet = std::thread::spawn(move || read_until_close(client));
    let publisher = UnixStream::connect(&server.unix_socket).unwrap();
    publisher.set_read_timeout(Some(PATIENCE)).unwrap();
    // About 1 KB a line: the server reads the burst 16 KiB at a time, a commit per read.
    let padding = "x".repeat(1000);
    let burst: String = (0..LINES).map(|n| format!("{{\"n\":{n},\"pad\":\"{padding}\"}}\n")).collect();
    let mut writer = publisher.try_clone().unwrap();
    // The server stops reading once it has shut down, so the write may fail part way.
    let writing = std::thread::spawn(move || writer.write_all(burst.as_bytes()).is_ok());
    let mut replies = BufReader::new(publisher);
    let mut acknowledged = Vec::new();
    let mut answered = 0;
    loop {
        let mut line = String::new();
        match replies.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if answered == 0 {
            server.terminate();
        }
        answered += 1;
        let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
        if reply["ok"] == true {
            acknowledged.push((reply["seq"].as_u64().unwrap(), reply["queued_to"].as_u64().unwrap()));
        }
    }
    let (seqs, close) = tablet.join().unwrap();
    let _ = writing.join().unwrap();
    assert!(server.wait_exit().success(), "{}", server.logs());
    assert_eq!(close, Some(CloseCode::Away), "{}", server.logs());
    let unsent: Vec<u64> =
        acknowledged.iter().map(|&(seq, _)| seq).filter(|seq| !seqs.contains(seq)).collect();
    assert!(
        unsent.is_empty(),
        "{} of {} acknowledged emergencies never reached the tablet before its close: {unsent:?}",
        unsent.len(),
        acknowledged.len()
    );
    assert!(acknowledged.iter().all(|&(_, queued_to)| queued_to == 1), "{acknowledged:?}");
    assert!(acknowledged.len() < LINES, "the signal came after the whole burst: nothing was tested");
    println!("{answered} lines answered, {} acknowledged and sent before the close", acknowledged.len());
}

#[test]
fn shutdown_sends_every_acknowledged_emergency_before_closing() {
    shutdown_during_a_burst(&[]);
}

#[test]
fn shutdown_sends_every_acknowledged_emergency_before_closing_in_memory() {
    shutdown_during_a_burst(&["--in-memory"]);
}
