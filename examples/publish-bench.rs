//! Publish throughput and latency of a running resq-push binary, with durability on and off.
//!
//! Starts the server (release build) on a temporary data dir, publishes over the Unix socket one
//! emergency at a time (each waits for its `{"ok":true}`, so each pays a commit) and in bursts (many
//! lines in one write, committed together), and prints the figures. Not a test: nothing is
//! asserted.
//!
//! ```sh
//! cargo build --release && cargo run --release --example publish-bench -- target/release/resq-push
//! cargo run --release --example publish-bench -- target/release/resq-push --history 100000
//! ```
//!
//! Arguments after the binary go to the server. With `--history N` among them, the history is
//! first filled with N emergencies (in bursts, not measured), so that every measured commit also
//! deletes the oldest from a full table, as on a site that has run for a while.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SINGLE: usize = 500;
const BURST: usize = 1000;
const BURSTS: usize = 5;

fn main() {
    let binary = std::env::args().nth(1).unwrap_or_else(|| "target/release/resq-push".into());
    let server_args: Vec<String> = std::env::args().skip(2).collect();
    let fill = history_flag(&server_args);
    let dir = std::env::temp_dir().join(format!("resq-publish-bench-{}", std::process::id()));
    println!("| history | mode | emergencies | per second | p50 | p99 | max |");
    println!("|---|---|---|---|---|---|---|");
    for durable in [true, false] {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut server = start(&binary, &dir, durable, &server_args);
        let socket = dir.join("resq.sock");
        wait_for(&socket);
        fill_history(&socket, fill);
        let label = if durable { "durable (SQLite, fsync)" } else { "--in-memory" };
        let single = single(&socket);
        report(label, "one at a time", &single, single.iter().sum());
        let (bursts, elapsed) = bursts(&socket);
        report(label, &format!("bursts of {BURST} lines"), &bursts, elapsed);
        let _ = server.kill();
        let _ = server.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The value of `--history` among the server's arguments: how many emergencies fill it.
fn history_flag(args: &[String]) -> usize {
    let value = args.iter().skip_while(|arg| *arg != "--history").nth(1);
    value.map_or(0, |value| value.parse().expect("--history takes a number"))
}

fn start(binary: &str, dir: &Path, durable: bool, extra: &[String]) -> Child {
    let mut command = Command::new(binary);
    command
        .args(["--listen", "127.0.0.1:0", "--unix-socket"])
        .arg(dir.join("resq.sock"))
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if durable {
        command.arg("--data-dir").arg(dir.join("data"));
    } else {
        command.arg("--in-memory");
    }
    command.spawn().expect("start the server binary")
}

fn wait_for(socket: &PathBuf) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "the server did not open {}", socket.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn payload(n: usize) -> String {
    format!(r#"{{"n":{n},"tipo":"incendio","direccion":"Los Aromos {n}","pad":"{}"}}"#, "x".repeat(400))
}

/// Publishes `count` emergencies in bursts, unmeasured.
fn fill_history(socket: &Path, count: usize) {
    if count == 0 {
        return;
    }
    let started = Instant::now();
    let (mut writer, mut replies) = connect(socket);
    for first in (0..count).step_by(BURST) {
        let lines = first..(first + BURST).min(count);
        let burst: String = lines.clone().map(|n| format!("{}\n", payload(n))).collect();
        writer.write_all(burst.as_bytes()).expect("write");
        lines.for_each(|_| read_ok(&mut replies));
    }
    eprintln!("filled the history with {count} emergencies in {:.1?}", started.elapsed());
}

fn connect(socket: &Path) -> (UnixStream, BufReader<UnixStream>) {
    let stream = UnixStream::connect(socket).expect("connect");
    let writer = stream.try_clone().expect("clone");
    (writer, BufReader::new(stream))
}

fn read_ok(replies: &mut BufReader<UnixStream>) {
    let mut reply = String::new();
    replies.read_line(&mut reply).expect("reply");
    assert!(reply.starts_with(r#"{"ok":true"#), "{reply}");
}

/// Latency of each publish when each waits for its reply.
fn single(socket: &Path) -> Vec<Duration> {
    let stream = UnixStream::connect(socket).expect("connect");
    let mut writer = stream.try_clone().expect("clone");
    let mut replies = BufReader::new(stream);
    let mut latencies = Vec::with_capacity(SINGLE);
    for n in 0..SINGLE {
        let started = Instant::now();
        writer.write_all(format!("{}\n", payload(n)).as_bytes()).expect("write");
        let mut reply = String::new();
        replies.read_line(&mut reply).expect("reply");
        assert!(reply.starts_with(r#"{"ok":true"#), "{reply}");
        latencies.push(started.elapsed());
    }
    latencies
}

/// Time from writing a burst to reading its last reply, per burst; and the total.
fn bursts(socket: &Path) -> (Vec<Duration>, Duration) {
    let stream = UnixStream::connect(socket).expect("connect");
    let mut writer = stream.try_clone().expect("clone");
    let mut replies = BufReader::new(stream);
    let mut times = Vec::new();
    for _ in 0..BURSTS {
        let lines: String = (0..BURST).map(|n| format!("{}\n", payload(n))).collect();
        let started = Instant::now();
        writer.write_all(lines.as_bytes()).expect("write");
        for _ in 0..BURST {
            let mut reply = String::new();
            replies.read_line(&mut reply).expect("reply");
            assert!(reply.starts_with(r#"{"ok":true"#), "{reply}");
        }
        times.push(started.elapsed());
    }
    let total = times.iter().sum();
    (times, total)
}

fn report(label: &str, mode: &str, samples: &[Duration], elapsed: Duration) {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q) as usize];
    let count = if mode.starts_with("bursts") { samples.len() * BURST } else { samples.len() };
    println!(
        "| {label} | {mode} | {count} | {:.0} | {:.2?} | {:.2?} | {:.2?} |",
        count as f64 / elapsed.as_secs_f64(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
}
