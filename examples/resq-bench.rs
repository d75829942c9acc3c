//! resq-bench: a load generator for resq-push, for sizing hardware and tracking performance.
//!
//! Modes (see BENCHMARKS.md for the figures and exact commands):
//!
//! - `idle`: N passive clients connect and stay, answering pings; server RSS per client.
//! - `fanout`: N clients, a publisher at a fixed rate; delivery latency percentiles from the
//!   timestamp in each payload, lost / duplicated / out-of-order messages, server CPU.
//! - `burst`: N clients, publishes as fast as replies come; server CPU per delivered message, and
//!   probes that check accepts, `/healthz` and pings are not starved meanwhile.
//! - `storm`: N clients connect at once; time to each welcome.
//! - `acks`: N clients, a few emergencies, twice: without acks, then with every client acking
//!   every emergency; server CPU per delivered emergency in each, the ack broadcasts, and bytes on
//!   disk per emergency (receipts included).
//! - `resume-storm`: M emergencies, then N clients reconnect at once with `?since=` M-50 back
//!   while a slow publisher goes on: time until every client holds the latest seq, each client's
//!   books from its `since`, ping gaps during the storm.
//! - `--smoke`: the modes but acks, small, in a few seconds (resume-storm not against a
//!   `--server-cmd` peer: they keep no history). Exits non-zero only if a message is lost,
//!   duplicated or out of order, or a connection fails or is dropped: never on timing.
//!
//! Server RSS and CPU come from `/proc/PID` of `--pid`, or of the server started with
//! `--spawn-server PATH` (which also gives start-up time, binary size and shutdown time), or of
//! any other server started with `--server-cmd` (the peers of bench/peers, for side by side runs).
//! Publisher and clients share one clock (`Instant`), so latency needs no clock sync.
//!
//! ```sh
//! cargo build --release --examples
//! target/release/examples/resq-bench --spawn-server target/release/resq-push fanout --clients 1000
//! ```

#[path = "resq-bench/client.rs"]
mod client;
#[path = "resq-bench/publish.rs"]
mod publish;
#[path = "resq-bench/report.rs"]
mod report;
#[path = "resq-bench/resume.rs"]
mod resume;
#[path = "resq-bench/sys.rs"]
mod sys;
#[path = "resq-bench/tls.rs"]
mod tls;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use argh::FromArgs;
use serde_json::{Value, json};
use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::net::TcpStream;
use smol::{Executor, Task, Timer, future};

use client::{ClientReport, End, Fleet, Target};
use publish::{Ingest, PublishLog};
use report::{Percentiles, Report, round3};
use sys::{ProcSample, SpawnedServer};

/// resq-bench: load generator for resq-push. Modes: idle, fanout, burst, storm, acks,
/// resume-storm; or --smoke for a quick correctness run of them (exit 1 only if something is lost
/// or a connection fails).
#[derive(FromArgs)]
struct Args {
    /// server URL (default ws://127.0.0.1:8000; the path defaults to /ws/emergencias); wss://
    /// needs --tls-dir, and takes plain HTTP (healthz, --ingest http) on the next port
    #[argh(option, default = "String::from(\"ws://127.0.0.1:8000\")")]
    url: String,
    /// for wss://: a directory made by deploy/site-ca; clients trust its ca.crt, a spawned server
    /// serves its server.crt and server.key on --url's port
    #[argh(option)]
    tls_dir: Option<PathBuf>,
    /// the server's Unix socket, for --ingest unix (with --spawn-server: passed to the server)
    #[argh(option)]
    unix_socket: Option<PathBuf>,
    /// start this resq-push binary for each run, on --url's port, with a raised open-file limit
    #[argh(option)]
    spawn_server: Option<PathBuf>,
    /// start this command for each run instead (another server, e.g. "node
    /// bench/peers/uws/server.js"; space-separated): the bench appends `--listen HOST:PORT`, the
    /// mode's `--ping-interval` if any, and --server-args; it must answer GET /healthz
    #[argh(option)]
    server_cmd: Option<String>,
    /// extra flags for the spawned server, space-separated (e.g. "--ping-interval 1")
    #[argh(option, default = "String::new()")]
    server_args: String,
    /// where the spawned server's log goes (default /tmp/resq-bench-server.log)
    #[argh(option, default = "PathBuf::from(\"/tmp/resq-bench-server.log\")")]
    server_log: PathBuf,
    /// pid of an already running server, to read its RSS and CPU from /proc
    #[argh(option)]
    pid: Option<u32>,
    /// executor threads of the bench (default 1: leaves the other core to the server)
    #[argh(option, default = "1")]
    threads: usize,
    /// pin the bench to these CPUs, e.g. 1 or 2-3 (default: not pinned)
    #[argh(option)]
    bench_cpus: Option<String>,
    /// pin the spawned server to these CPUs, e.g. 0 (default: not pinned)
    #[argh(option)]
    server_cpus: Option<String>,
    /// also write the JSON result to this file
    #[argh(option)]
    json: Option<PathBuf>,
    /// bearer token for the WebSocket upgrades (servers run with --subscribe-token-file)
    #[argh(option)]
    token: Option<String>,
    /// bearer token for POST /emergencias (servers run with --publish-token-file)
    #[argh(option)]
    publish_token: Option<String>,
    /// run every mode small (a few seconds); for CI
    #[argh(switch)]
    smoke: bool,
    #[argh(subcommand)]
    mode: Option<Mode>,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Mode {
    Idle(IdleArgs),
    Fanout(FanoutArgs),
    Burst(BurstArgs),
    Storm(StormArgs),
    Acks(AcksArgs),
    ResumeStorm(ResumeStormArgs),
}

/// The access point reboots: N clients reconnect at once, each resuming `--behind` emergencies
/// back, while the publisher goes on slowly. Time until every client holds the latest seq, loss
/// and duplicates per client, and ping gaps during the storm.
#[derive(FromArgs)]
#[argh(subcommand, name = "resume-storm")]
struct ResumeStormArgs {
    /// clients (default 5000)
    #[argh(option, default = "5000")]
    clients: usize,
    /// emergencies published before the storm (default 200)
    #[argh(option, default = "200")]
    emergencies: u64,
    /// each client resumes with ?since=<last seq - behind> (default 50)
    #[argh(option, default = "50")]
    behind: u64,
    /// emergencies per second published during the storm (default 2)
    #[argh(option, default = "2.0")]
    rate: f64,
    /// seconds to go on once every client has caught up, for the ping gaps (default 5)
    #[argh(option, default = "5.0")]
    hold: f64,
    /// the server's --ping-interval for the run, seconds (default 1; unless --server-args has one)
    #[argh(option, default = "1.0")]
    ping_interval: f64,
    /// bytes of each published JSON object (default 512)
    #[argh(option, default = "512")]
    size: usize,
    /// the target: every client caught up within this many seconds (default 5)
    #[argh(option, default = "5.0")]
    within: f64,
}

/// N clients, `count` emergencies at `rate`, first without acks, then each client acking each
/// one: what acks cost per delivered emergency, in server CPU and bytes on disk.
#[derive(FromArgs)]
#[argh(subcommand, name = "acks")]
struct AcksArgs {
    /// clients (default 1000)
    #[argh(option, default = "1000")]
    clients: usize,
    /// emergencies in each phase (default 10)
    #[argh(option, default = "10")]
    count: u64,
    /// emergencies per second (default 0.5: each is followed by clients x clients ack frames)
    #[argh(option, default = "0.5")]
    rate: f64,
    /// bytes of each published JSON object (default 512)
    #[argh(option, default = "512")]
    size: usize,
    /// connects in flight at once (default 64)
    #[argh(option, default = "64")]
    concurrency: usize,
}

/// N passive clients connect and are held (answering pings): server RSS per client, idle CPU.
#[derive(FromArgs)]
#[argh(subcommand, name = "idle")]
struct IdleArgs {
    /// clients (default 10000)
    #[argh(option, default = "10000")]
    clients: usize,
    /// seconds to hold them once all are connected (default 20)
    #[argh(option, default = "20.0")]
    hold: f64,
    /// connects in flight at once (default 64; the server's --max-http-connections is 1024)
    #[argh(option, default = "64")]
    concurrency: usize,
}

/// N clients and a publisher at a fixed rate: latency percentiles, loss, server CPU.
#[derive(FromArgs)]
#[argh(subcommand, name = "fanout")]
struct FanoutArgs {
    /// clients (default 1000)
    #[argh(option, default = "1000")]
    clients: usize,
    /// emergencies per second (default 50)
    #[argh(option, default = "50.0")]
    rate: f64,
    /// bytes of each published JSON object (default 512)
    #[argh(option, default = "512")]
    size: usize,
    /// seconds of publishing (default 20)
    #[argh(option, default = "20.0")]
    duration: f64,
    /// http or unix (default http)
    #[argh(option, default = "String::from(\"http\")")]
    ingest: String,
    /// connects in flight at once (default 64; the server's --max-http-connections is 1024)
    #[argh(option, default = "64")]
    concurrency: usize,
}

/// N clients, publishes as fast as the server replies: server CPU per delivered message, and
/// whether accepts, /healthz and pings keep going meanwhile.
#[derive(FromArgs)]
#[argh(subcommand, name = "burst")]
struct BurstArgs {
    /// clients (default 1000)
    #[argh(option, default = "1000")]
    clients: usize,
    /// bytes of each published JSON object (default 512)
    #[argh(option, default = "512")]
    size: usize,
    /// seconds of publishing (default 10)
    #[argh(option, default = "10.0")]
    duration: f64,
    /// at most this many publishes (default: no limit)
    #[argh(option, default = "u64::MAX")]
    count: u64,
    /// http or unix (default: unix with --unix-socket, else http)
    #[argh(option)]
    ingest: Option<String>,
    /// publishes in flight on the publisher connection (default 16)
    #[argh(option, default = "16")]
    window: usize,
    /// seconds between probes (a new WebSocket client, a GET /healthz) during the burst (default 0.2)
    #[argh(option, default = "0.2")]
    probe_interval: f64,
    /// with --spawn-server: send SIGTERM at the end of the burst, while still publishing, and
    /// check that everything accepted is delivered before the 1001 close
    #[argh(switch)]
    sigterm: bool,
    /// connects in flight at once (default 64; the server's --max-http-connections is 1024)
    #[argh(option, default = "64")]
    concurrency: usize,
}

/// N clients connect at once: time from the start to each welcome.
#[derive(FromArgs)]
#[argh(subcommand, name = "storm")]
struct StormArgs {
    /// clients (default 5000)
    #[argh(option, default = "5000")]
    clients: usize,
    /// the target: every welcome within this many seconds (default 2)
    #[argh(option, default = "2.0")]
    within: f64,
}

/// The server a run starts itself.
enum Spawn {
    /// A resq-push binary: the bench passes its listen, socket, TLS and `--max-clients` flags.
    ResqPush(PathBuf),
    /// Any other server (`--server-cmd`): program and arguments, given `--listen` only.
    Command(Vec<String>),
}

/// What every run needs.
struct Ctx {
    target: Target,
    unix_socket: Option<PathBuf>,
    spawn: Option<Spawn>,
    server_args: Vec<String>,
    /// `--tls-dir`, for a spawned server's certificate.
    tls_dir: Option<PathBuf>,
    server_log: PathBuf,
    server_cpus: Option<Vec<usize>>,
    pid: Option<u32>,
    ex: &'static Executor<'static>,
    machine: Value,
}

fn main() -> ExitCode {
    let args: Args = argh::from_env();
    let nofile = sys::raise_nofile_limit(65536);
    let pinning = |list: &Option<String>| list.as_deref().map(sys::parse_cpus).transpose();
    let (bench_cpus, server_cpus) = match (pinning(&args.bench_cpus), pinning(&args.server_cpus)) {
        (Ok(b), Ok(s)) => (b, s),
        (Err(error), _) | (_, Err(error)) => {
            eprintln!("resq-bench: {error}");
            return ExitCode::from(2);
        }
    };
    if let Some(cpus) = &bench_cpus
        && let Err(error) = sys::pin_to(cpus)
    {
        eprintln!("resq-bench: cannot pin the bench to {cpus:?}: {error}");
        return ExitCode::from(2);
    }
    let target = match Target::parse(
        &args.url,
        args.token.clone(),
        args.publish_token.clone(),
        args.tls_dir.as_deref(),
    ) {
        Ok(target) => target,
        Err(error) => {
            eprintln!("resq-bench: {error}");
            return ExitCode::from(2);
        }
    };
    let ex: &'static Executor<'static> = Box::leak(Box::new(Executor::new()));
    for _ in 1..args.threads.max(1) {
        std::thread::spawn(|| smol::block_on(ex.run(future::pending::<()>())));
    }
    let spawn = match (&args.spawn_server, &args.server_cmd) {
        (Some(_), Some(_)) => {
            eprintln!("resq-bench: give --spawn-server or --server-cmd, not both");
            return ExitCode::from(2);
        }
        (Some(binary), None) => Some(Spawn::ResqPush(binary.clone())),
        (None, Some(command)) if command.trim().is_empty() => {
            eprintln!("resq-bench: --server-cmd is empty");
            return ExitCode::from(2);
        }
        (None, Some(command)) => {
            Some(Spawn::Command(command.split_whitespace().map(str::to_owned).collect()))
        }
        (None, None) => None,
    };
    let unix_socket = match (&args.unix_socket, &args.spawn_server, args.smoke) {
        (Some(path), _, _) => Some(path.clone()),
        (None, Some(_), true) => {
            Some(std::env::temp_dir().join(format!("resq-bench-{}.sock", std::process::id())))
        }
        _ => None,
    };
    let ctx = Ctx {
        target,
        unix_socket,
        spawn,
        server_args: args.server_args.split_whitespace().map(str::to_owned).collect(),
        tls_dir: args.tls_dir.clone(),
        server_log: args.server_log.clone(),
        server_cpus,
        pid: args.pid,
        ex,
        machine: machine(nofile, args.threads, &bench_cpus),
    };
    let reports = match (args.smoke, args.mode) {
        (true, None) => smoke(&ctx),
        (false, Some(mode)) => vec![run_mode(&ctx, mode)],
        (true, Some(_)) => {
            eprintln!("resq-bench: --smoke runs every mode itself; give no mode with it");
            return ExitCode::from(2);
        }
        (false, None) => {
            eprintln!(
                "resq-bench: give a mode (idle, fanout, burst, storm, acks, resume-storm) or --smoke; see --help"
            );
            return ExitCode::from(2);
        }
    };
    let mut failed = false;
    let mut setup_error = false;
    let mut jsons = Vec::new();
    for result in reports {
        match result {
            Ok(report) => {
                print!("{}", report.table());
                failed |= !report.failures.is_empty();
                jsons.push(report.to_json());
            }
            Err(error) => {
                eprintln!("resq-bench: {error}");
                setup_error = true;
                jsons.push(json!({"error": error, "ok": false}));
            }
        }
    }
    let json = if jsons.len() == 1 {
        jsons.remove(0)
    } else {
        json!({"mode": "smoke", "ok": !failed && !setup_error, "runs": jsons})
    };
    let text = json.to_string();
    println!("{text}");
    if let Some(path) = &args.json
        && let Err(error) = std::fs::write(path, format!("{text}\n"))
    {
        eprintln!("resq-bench: cannot write {}: {error}", path.display());
    }
    if setup_error {
        ExitCode::from(2)
    } else if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn run_mode(ctx: &Ctx, mode: Mode) -> Result<Report, String> {
    match mode {
        Mode::Idle(a) => idle(ctx, &a, &[]),
        Mode::Fanout(a) => fanout(ctx, &a),
        Mode::Burst(a) => burst(ctx, &a),
        Mode::Storm(a) => storm(ctx, &a),
        Mode::Acks(a) => acks(ctx, &a),
        Mode::ResumeStorm(a) => resume::resume_storm(ctx, &a),
    }
}

/// Every mode at a small size, a few seconds in all.
fn smoke(ctx: &Ctx) -> Vec<Result<Report, String>> {
    let ingest = if ctx.unix_socket.is_some() { "unix" } else { "http" };
    let mut runs = vec![
        storm(ctx, &StormArgs { clients: 100, within: 2.0 }),
        idle(ctx, &IdleArgs { clients: 200, hold: 1.0, concurrency: 64 }, &["--ping-interval", "0.2"]),
        fanout(
            ctx,
            &FanoutArgs {
                clients: 100,
                rate: 50.0,
                size: 512,
                duration: 1.0,
                ingest: "http".into(),
                concurrency: 64,
            },
        ),
        burst(
            ctx,
            &BurstArgs {
                clients: 100,
                size: 512,
                duration: 1.0,
                count: 2000,
                ingest: Some(ingest.into()),
                window: 16,
                probe_interval: 0.2,
                sigterm: false,
                concurrency: 64,
            },
        ),
    ];
    // The peers keep no history to resume from.
    if !matches!(ctx.spawn, Some(Spawn::Command(_))) {
        let resume = ResumeStormArgs {
            clients: 200,
            emergencies: 100,
            behind: 50,
            rate: 5.0,
            hold: 1.0,
            ping_interval: 0.3,
            size: 512,
            within: 5.0,
        };
        runs.push(resume::resume_storm(ctx, &resume));
    }
    runs
}

fn machine(nofile: libc::rlim_t, threads: usize, bench_cpus: &Option<Vec<usize>>) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim()))
        .unwrap_or("unknown");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "nproc": cpuinfo.lines().filter(|l| l.starts_with("processor")).count(),
        "cpu": model,
        "kernel": kernel.trim(),
        "bench_nofile_limit": nofile,
        "bench_threads": threads,
        "bench_cpus": bench_cpus,
    })
}

/// The server under test: spawned for this run, or given by --pid, or unknown.
struct Server {
    spawned: Option<SpawnedServer>,
    pid: Option<u32>,
}

impl Server {
    fn sample(&self) -> Option<ProcSample> {
        self.pid.and_then(sys::sample)
    }
}

fn start_server(
    ctx: &Ctx,
    report: &mut Report,
    clients: usize,
    mode_args: &[&str],
) -> Result<Server, String> {
    report.set("machine", ctx.machine.clone());
    report.set("url", json!(ctx.target.ws_url));
    let (binary, args) = match &ctx.spawn {
        None => {
            report.note(format!("server: {} (not spawned; pid {:?})", ctx.target.ws_url, ctx.pid));
            return Ok(Server { spawned: None, pid: ctx.pid });
        }
        Some(Spawn::Command(words)) => (PathBuf::from(&words[0]), peer_args(ctx, &words[1..], mode_args)),
        Some(Spawn::ResqPush(binary)) => (binary.clone(), resq_push_args(ctx, clients, mode_args)),
    };
    let spawned = SpawnedServer::start(
        &binary,
        &args,
        ctx.target.http_addr,
        &ctx.server_log,
        ctx.server_cpus.as_deref(),
    )?;
    spawned_rows(ctx, report, spawned)
}

/// A resq-push's flags for a run: where to listen, the socket, TLS, room for the clients.
fn resq_push_args(ctx: &Ctx, clients: usize, mode_args: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec!["--listen".into(), ctx.target.http_addr.to_string()];
    if let (Some(_), Some(dir)) = (&ctx.target.tls, &ctx.tls_dir) {
        let file = |name: &str| dir.join(name).display().to_string();
        args.extend(["--tls-listen".into(), ctx.target.addr.to_string()]);
        args.extend(["--tls-cert".into(), file("server.crt"), "--tls-key".into(), file("server.key")]);
    }
    if let Some(path) = &ctx.unix_socket {
        args.extend(["--unix-socket".into(), path.display().to_string()]);
    }
    if !ctx.server_args.iter().any(|a| a == "--max-clients") {
        args.extend(["--max-clients".into(), (clients + 100).max(1000).to_string()]);
    }
    args.extend(mode_args.iter().map(|a| a.to_string()));
    args.extend(ctx.server_args.iter().cloned());
    args
}

/// Another server's flags (`--server-cmd`): its own words, `--listen`, the mode's ping interval
/// (the one resq-push flag every peer takes), then --server-args.
fn peer_args(ctx: &Ctx, words: &[String], mode_args: &[&str]) -> Vec<String> {
    let mut args = words.to_vec();
    args.extend(["--listen".into(), ctx.target.http_addr.to_string()]);
    if let Some(i) = mode_args.iter().position(|a| *a == "--ping-interval")
        && let Some(value) = mode_args.get(i + 1)
        && !ctx.server_args.iter().any(|a| a == "--ping-interval")
    {
        args.extend(["--ping-interval".into(), value.to_string()]);
    }
    args.extend(ctx.server_args.iter().cloned());
    args
}

/// The rows every spawned server gets: its command, start-up, size, idle RSS.
fn spawned_rows(ctx: &Ctx, report: &mut Report, spawned: SpawnedServer) -> Result<Server, String> {
    let pid = spawned.pid;
    report.set("server_command", json!(spawned.command));
    report.set("server_cpus", json!(ctx.server_cpus));
    report.note(format!("server: {}", spawned.command));
    report.note(format!("server log: {}", spawned.log.display()));
    let ms = spawned.startup.as_secs_f64() * 1000.0;
    report.target("start-up (spawn to first /healthz 200)", format!("{ms:.1} ms"), "< 50 ms", ms < 50.0);
    report.set("startup_ms", json!(round3(ms)));
    report.info(
        "release binary size",
        format!("{} bytes ({:.2} MiB)", spawned.binary_bytes, mib(spawned.binary_bytes)),
    );
    report.set("binary_bytes", json!(spawned.binary_bytes));
    // Let the /healthz connection close before measuring the idle server.
    std::thread::sleep(Duration::from_millis(200));
    if let Some(idle) = sys::sample(pid) {
        let idle_mib = idle.rss_kib as f64 / 1024.0;
        report.target(
            "server RSS idle (no clients)",
            format!("{idle_mib:.2} MiB"),
            "< 2 MiB",
            idle_mib < 2.0,
        );
        report.set("idle_rss_kib", json!(idle.rss_kib));
        report.info("server threads", idle.threads.to_string());
    }
    Ok(Server { spawned: Some(spawned), pid: Some(pid) })
}

fn stop_server(report: &mut Report, server: Server) {
    if let Some(mut spawned) = server.spawned
        && !spawned.has_exited()
    {
        let (took, status) = spawned.stop();
        report.info(
            "shutdown (SIGTERM to exit)",
            format!(
                "{:.1} ms, {}",
                took.as_secs_f64() * 1000.0,
                status.map_or("killed".into(), |s| s.to_string())
            ),
        );
        report.set("shutdown_ms", json!(round3(took.as_secs_f64() * 1000.0)));
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn self_sample() -> Option<ProcSample> {
    sys::sample(std::process::id())
}

/// Starts `clients` client tasks; the returned sender's drop (or close) stops them.
fn launch(
    ctx: &Ctx,
    t0: Instant,
    clients: usize,
    gate: Option<usize>,
    record_latency: bool,
) -> (Arc<Fleet>, async_channel::Sender<()>, Vec<Task<ClientReport>>) {
    launch_acking(ctx, t0, clients, gate, record_latency, false)
}

/// As `launch`; with `ack`, every client acks every emergency it gets.
fn launch_acking(
    ctx: &Ctx,
    t0: Instant,
    clients: usize,
    gate: Option<usize>,
    record_latency: bool,
    ack: bool,
) -> (Arc<Fleet>, async_channel::Sender<()>, Vec<Task<ClientReport>>) {
    let (stop_tx, stop_rx) = async_channel::bounded(1);
    let fleet = Arc::new(Fleet { ack, ..Fleet::new(ctx.target.clone(), t0, clients, gate, stop_rx) });
    let tasks =
        (0..clients).map(|i| ctx.ex.spawn(client::run(Arc::clone(&fleet), i, record_latency))).collect();
    (fleet, stop_tx, tasks)
}

/// Waits until every client has its welcome or has failed, or `limit`; returns the time taken.
async fn all_connected(fleet: &Fleet, clients: usize, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut last_print = started;
    loop {
        let (welcomed, failed) = (fleet.welcomed.load(Relaxed), fleet.failed.load(Relaxed));
        if welcomed + failed >= clients || started.elapsed() > limit {
            return started.elapsed();
        }
        if last_print.elapsed() > Duration::from_secs(2) {
            eprintln!("resq-bench: {welcomed} of {clients} clients welcomed, {failed} failed");
            last_print = Instant::now();
        }
        Timer::after(Duration::from_millis(5)).await;
    }
}

/// Waits until no running client is behind `seq`, or `limit`.
async fn drained(fleet: &Fleet, seq: u64, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    loop {
        if fleet.behind(seq) == 0 {
            return true;
        }
        if Instant::now() > until {
            return false;
        }
        Timer::after(Duration::from_millis(2)).await;
    }
}

async fn collect(stop: async_channel::Sender<()>, tasks: Vec<Task<ClientReport>>) -> Vec<ClientReport> {
    stop.close();
    let mut reports = Vec::with_capacity(tasks.len());
    for task in tasks {
        reports.push(task.await);
    }
    reports
}

/// What a fleet's reports add up to.
#[derive(Default)]
struct Books {
    welcomed: usize,
    failures: BTreeMap<String, usize>,
    /// Ends other than our stop (and other than `expected_close`), by kind.
    dropped: BTreeMap<String, usize>,
    events: u64,
    lost: u64,
    duplicates: u64,
    out_of_order: u64,
    other_texts: u64,
    latency: Percentiles,
    min_pings: u64,
    max_ping_gap: Duration,
}

impl Books {
    fn of(reports: &mut [ClientReport], published: &[u64], expected_close: Option<u16>) -> Books {
        let mut books = Books { min_pings: u64::MAX, ..Books::default() };
        let mut latencies = Vec::new();
        for r in reports.iter_mut() {
            if let Some(failure) = &r.failure {
                *books.failures.entry(failure.clone()).or_default() += 1;
                continue;
            }
            books.welcomed += 1;
            let dropped = match &r.end {
                End::Stopped => None,
                End::ServerClose(code, _) if Some(*code) == expected_close => None,
                End::ServerClose(code, reason) => Some(format!("server closed {code} {reason}")),
                End::Eof => Some("connection ended without Close".into()),
                End::Error(e) => Some(format!("error: {e}")),
                End::NeverConnected => Some("never connected".into()),
            };
            if let Some(kind) = dropped {
                *books.dropped.entry(kind).or_default() += 1;
            }
            books.events += r.events;
            books.lost += r.lost(published);
            books.duplicates += r.duplicates;
            books.out_of_order += r.out_of_order;
            books.other_texts += r.other_texts;
            books.min_pings = books.min_pings.min(r.pings);
            books.max_ping_gap = books.max_ping_gap.max(r.max_ping_gap.unwrap_or_default());
            latencies.append(&mut r.latencies_us);
        }
        if books.welcomed == 0 {
            books.min_pings = 0;
        }
        books.latency = Percentiles::of(&mut latencies);
        books
    }

    fn failed(&self) -> u64 {
        self.failures.values().sum::<usize>() as u64
    }

    fn dropped_count(&self) -> u64 {
        self.dropped.values().sum::<usize>() as u64
    }

    /// Rows and JSON for connection and correctness books.
    fn add_to(&self, report: &mut Report, with_messages: bool) {
        report.must_be_zero("connections failed", self.failed());
        for (kind, n) in &self.failures {
            report.info(&format!("  failure: {kind}"), n.to_string());
        }
        report.must_be_zero("connections dropped by the server", self.dropped_count());
        for (kind, n) in &self.dropped {
            report.info(&format!("  dropped: {kind}"), n.to_string());
        }
        if with_messages {
            report.must_be_zero("messages lost", self.lost);
            report.must_be_zero("messages duplicated", self.duplicates);
            report.must_be_zero("messages out of order", self.out_of_order);
        }
        report.set(
            "clients",
            json!({
                "welcomed": self.welcomed, "failed": self.failed(), "failures": self.failures,
                "dropped": self.dropped_count(), "dropped_by_kind": self.dropped,
            }),
        );
        if with_messages {
            report.set(
                "messages",
                json!({
                    "delivered": self.events, "lost": self.lost, "duplicated": self.duplicates,
                    "out_of_order": self.out_of_order, "other_texts": self.other_texts,
                    "latency_ms": self.latency.json_ms(),
                }),
            );
        }
    }
}

/// Server and bench CPU over a phase.
fn cpu_rows(
    report: &mut Report,
    key: &str,
    label: &str,
    before: Option<(ProcSample, ProcSample)>,
    after: Option<(ProcSample, ProcSample)>,
    delivered: u64,
) -> Option<f64> {
    let ((server_a, bench_a), (server_b, bench_b)) = (before?, after?);
    let wall = server_a.wall_secs_until(&server_b);
    let server_cpu = server_a.cpu_secs_until(&server_b);
    let server_user = server_a.user_secs_until(&server_b);
    let bench_cpu = bench_a.cpu_secs_until(&bench_b);
    report.info(
        &format!("server CPU {label}"),
        format!(
            "{server_cpu:.2} s in {wall:.2} s ({:.0}% of one core; user {server_user:.2} s, kernel {:.2} s)",
            100.0 * server_cpu / wall.max(1e-9),
            server_cpu - server_user
        ),
    );
    report.info(
        &format!("bench CPU {label}"),
        format!("{bench_cpu:.2} s ({:.0}% of one core)", 100.0 * bench_cpu / wall.max(1e-9)),
    );
    let others = ProcSample::others_secs((&server_a, &bench_a), (&server_b, &bench_b));
    let cores = (server_b.machine_total_ticks.saturating_sub(server_a.machine_total_ticks)) as f64
        / sys::clock_ticks_per_sec() as f64
        / wall.max(1e-9);
    report.info(
        &format!("other CPU (other processes, softirq) {label}"),
        format!(
            "{others:.2} s ({:.0}% of one core, of {cores:.0} cores){}",
            100.0 * others / wall.max(1e-9),
            if others > 0.1 * wall { ": the machine was shared, timings are pessimistic" } else { "" }
        ),
    );
    let (wakeups, preemptions) = (server_a.wakeups_until(&server_b), server_a.preemptions_until(&server_b));
    report.info(
        &format!("server wake-ups {label}"),
        format!(
            "{:.1}/s ({wakeups} voluntary context switches, all threads; {preemptions} preemptions)",
            wakeups as f64 / wall.max(1e-9)
        ),
    );
    let per_message = (delivered > 0).then(|| server_cpu * 1e6 / delivered as f64);
    report.set(
        key,
        json!({
            "wall_s": round3(wall), "server_cpu_s": round3(server_cpu), "server_user_s": round3(server_user),
            "bench_cpu_s": round3(bench_cpu), "others_cpu_s": round3(others),
            "server_rss_kib": server_b.rss_kib, "server_hwm_kib": server_b.hwm_kib,
            "bench_rss_kib": bench_b.rss_kib, "delivered": delivered,
            "server_cpu_us_per_delivered": per_message.map(round3),
            "server_wakeups": wakeups, "server_preemptions": preemptions,
            "server_wakeups_per_s": round3(wakeups as f64 / wall.max(1e-9)),
        }),
    );
    per_message
}

/// The server's and the bench's own readings, taken together.
fn pair(server_pid: Option<u32>) -> Option<(ProcSample, ProcSample)> {
    Some((sys::sample(server_pid?)?, self_sample()?))
}

fn idle(ctx: &Ctx, a: &IdleArgs, mode_args: &[&str]) -> Result<Report, String> {
    let mut report = Report::new("idle");
    let server = start_server(ctx, &mut report, a.clients, mode_args)?;
    report.set("params", json!({"clients": a.clients, "hold_s": a.hold, "concurrency": a.concurrency}));
    let base = server.sample();
    let t0 = Instant::now();
    let (fleet, stop, tasks) = launch(ctx, t0, a.clients, Some(a.concurrency), false);
    let (connect_time, loaded, held, mut reports) = smol::block_on(ctx.ex.run(async {
        let connect_time = all_connected(&fleet, a.clients, Duration::from_secs(120)).await;
        let loaded = pair(server.pid);
        eprintln!("resq-bench: idle: holding {} clients for {} s", fleet.welcomed.load(Relaxed), a.hold);
        Timer::after(Duration::from_secs_f64(a.hold)).await;
        let held = pair(server.pid);
        (connect_time, loaded, held, collect(stop, tasks).await)
    }));
    let books = Books::of(&mut reports, &[], None);
    report.info("clients welcomed", format!("{} of {}", books.welcomed, a.clients));
    report.info(
        "connect time (all)",
        format!(
            "{:.2} s ({:.0} connects/s, {} in flight)",
            connect_time.as_secs_f64(),
            books.welcomed as f64 / connect_time.as_secs_f64().max(1e-9),
            a.concurrency
        ),
    );
    if let (Some(base), Some((loaded, _)), Some((held, _))) = (base, loaded, held) {
        let above = held.rss_kib.max(loaded.rss_kib).saturating_sub(base.rss_kib);
        let per_client = above as f64 / books.welcomed.max(1) as f64;
        report.info("server RSS before clients", format!("{:.2} MiB", base.rss_kib as f64 / 1024.0));
        report.info(
            "server RSS all connected / after hold",
            format!("{:.2} / {:.2} MiB", loaded.rss_kib as f64 / 1024.0, held.rss_kib as f64 / 1024.0),
        );
        report.target(
            "server RSS per client above base",
            format!("{per_client:.2} KiB"),
            "<= 3 KiB",
            per_client <= 3.0,
        );
        report.set(
            "rss_kib",
            json!({"before": base.rss_kib, "connected": loaded.rss_kib, "after_hold": held.rss_kib,
                   "peak": held.hwm_kib, "per_client": round3(per_client)}),
        );
    }
    cpu_rows(&mut report, "hold", "during hold", loaded, held, 0);
    report.info("pings per client during hold (min)", books.min_pings.to_string());
    report.info("longest gap between pings", format!("{:.2} s", books.max_ping_gap.as_secs_f64()));
    report.set(
        "pings",
        json!({"min_per_client": books.min_pings, "max_gap_s": round3(books.max_ping_gap.as_secs_f64())}),
    );
    books.add_to(&mut report, false);
    if let Some(sample) = server.sample() {
        report.info("server RSS after clients left", format!("{:.2} MiB", sample.rss_kib as f64 / 1024.0));
        report.set("rss_after_kib", json!(sample.rss_kib));
    }
    stop_server(&mut report, server);
    Ok(report)
}

fn ingest_of(ctx: &Ctx, name: &str) -> Result<Ingest, String> {
    match name {
        "http" => Ok(Ingest::Http),
        "unix" => ctx
            .unix_socket
            .clone()
            .map(Ingest::Unix)
            .ok_or_else(|| "--ingest unix needs --unix-socket".into()),
        other => Err(format!("unknown --ingest {other}: http or unix")),
    }
}

/// Publisher rows; a refused publish or a broken publisher connection fails the run unless
/// `refusals_expected` (a burst ended by SIGTERM).
fn publish_rows(report: &mut Report, log: &mut PublishLog, refusals_expected: bool) {
    let accepted = log.accepted.len();
    let secs = log.seconds();
    report.info(
        "publishes accepted / refused",
        format!("{accepted} / {} in {secs:.2} s ({:.0}/s)", log.rejected, accepted as f64 / secs.max(1e-9)),
    );
    if let Some(error) = &log.first_error {
        report.info("  publisher stopped on", error.clone());
    }
    if !refusals_expected {
        report.must_be_zero("publishes refused or publisher failed", log.rejected + u64::from(log.broken));
    }
    let rtt = Percentiles::of(&mut log.rtt_us);
    report.info("publish round trip", rtt.summary_ms());
    let contiguous = log.accepted.windows(2).all(|w| w[1] == w[0] + 1);
    if !contiguous {
        report.info("  note", "accepted seqs are not contiguous: another publisher is active".to_string());
    }
    report.set(
        "publish",
        json!({"accepted": accepted, "refused": log.rejected, "seconds": round3(secs),
               "first_error": log.first_error, "rtt_ms": rtt.json_ms(),
               "max_schedule_lag_ms": round3(log.max_lag.as_secs_f64() * 1000.0)}),
    );
}

fn fanout(ctx: &Ctx, a: &FanoutArgs) -> Result<Report, String> {
    let mut report = Report::new("fanout");
    let ingest = ingest_of(ctx, &a.ingest)?;
    let server = start_server(ctx, &mut report, a.clients, &[])?;
    report.set("params", json!({"clients": a.clients, "rate": a.rate, "size": a.size, "duration_s": a.duration, "ingest": ingest.name()}));
    let count = (a.rate * a.duration).round().max(1.0) as u64;
    let t0 = Instant::now();
    let (fleet, stop, tasks) = launch(ctx, t0, a.clients, Some(a.concurrency), true);
    let (mut log, drained_ok, before, after, mut reports) = smol::block_on(ctx.ex.run(async {
        all_connected(&fleet, a.clients, Duration::from_secs(120)).await;
        eprintln!("resq-bench: fanout: {count} emergencies at {}/s to {} clients", a.rate, a.clients);
        let before = pair(server.pid);
        let log = publish::paced(
            t0,
            &ingest,
            &ctx.target,
            a.rate,
            count,
            a.size,
            Duration::from_secs_f64(a.duration * 2.0 + 10.0),
            None,
        )
        .await;
        let last = log.accepted.iter().copied().max().unwrap_or(0);
        let drained_ok = drained(&fleet, last, Duration::from_secs(5)).await;
        let after = pair(server.pid);
        (log, drained_ok, before, after, collect(stop, tasks).await)
    }));
    let books = Books::of(&mut reports, &log.accepted, None);
    report.info("clients welcomed", format!("{} of {}", books.welcomed, a.clients));
    report.info("ingest / rate / size", format!("{} / {}/s / {} bytes", ingest.name(), a.rate, a.size));
    publish_rows(&mut report, &mut log, false);
    report.info("  latest send vs schedule", format!("{:.2} ms", log.max_lag.as_secs_f64() * 1000.0));
    let expected = log.accepted.len() as u64 * books.welcomed as u64;
    report.info(
        "messages delivered / expected",
        format!(
            "{} / {expected}{}",
            books.events,
            if drained_ok { "" } else { " (drain timed out after 5 s)" }
        ),
    );
    let p99_target = if a.clients <= 1000 { 15.0 } else { 50.0 };
    let p99 = f64::from(books.latency.p99) / 1000.0;
    report.info("delivery latency", books.latency.summary_ms());
    report.target(
        "delivery latency p99",
        format!("{p99:.2} ms"),
        &format!("< {p99_target} ms"),
        p99 < p99_target,
    );
    let per_message = cpu_rows(&mut report, "publish_phase", "while publishing", before, after, books.events);
    if let Some(us) = per_message {
        report.info("server CPU per delivered message", format!("{us:.2} µs"));
    }
    books.add_to(&mut report, true);
    stop_server(&mut report, server);
    Ok(report)
}

fn acks(ctx: &Ctx, a: &AcksArgs) -> Result<Report, String> {
    let mut report = Report::new("acks");
    if !matches!(ctx.spawn, Some(Spawn::ResqPush(_))) {
        return Err("acks needs --spawn-server: it measures each phase's data dir".into());
    }
    report.set("params", json!({"clients": a.clients, "count": a.count, "rate": a.rate, "size": a.size}));
    let mut per_delivery = Vec::new();
    for ack in [false, true] {
        let phase = if ack { "with acks" } else { "without acks" };
        let data_dir = std::env::temp_dir().join(format!("resq-bench-acks-{}-{ack}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data_dir);
        let dir_arg = data_dir.display().to_string();
        // Each bench client is a tablet without a token name: every one's receipts are kept.
        let unnamed = a.clients.to_string();
        let args = ["--data-dir", &dir_arg, "--max-unnamed-receipts", &unnamed];
        let server = start_server(ctx, &mut report, a.clients, &args)?;
        let t0 = Instant::now();
        let (fleet, stop, tasks) = launch_acking(ctx, t0, a.clients, Some(a.concurrency), false, ack);
        let expected_acks = if ack { a.count * (a.clients as u64).pow(2) } else { 0 };
        let (log, settled, before, after, mut reports) = smol::block_on(ctx.ex.run(async {
            all_connected(&fleet, a.clients, Duration::from_secs(120)).await;
            eprintln!("resq-bench: acks: {} emergencies to {} clients, {phase}", a.count, a.clients);
            let before = pair(server.pid);
            let limit = Duration::from_secs_f64(a.count as f64 / a.rate * 2.0 + 10.0);
            let log =
                publish::paced(t0, &Ingest::Http, &ctx.target, a.rate, a.count, a.size, limit, None).await;
            let last = log.accepted.iter().copied().max().unwrap_or(0);
            let mut settled = drained(&fleet, last, Duration::from_secs(10)).await;
            let until = Instant::now() + Duration::from_secs(300);
            while fleet.acks_seen.load(Relaxed) < expected_acks && Instant::now() < until {
                Timer::after(Duration::from_millis(20)).await;
            }
            settled &= fleet.acks_seen.load(Relaxed) >= expected_acks;
            let after = pair(server.pid);
            (log, settled, before, after, collect(stop, tasks).await)
        }));
        let books = Books::of(&mut reports, &log.accepted, None);
        report.info(
            &format!("{phase}: delivered / acks seen"),
            format!(
                "{} / {} of {expected_acks}{}",
                books.events,
                fleet.acks_seen.load(Relaxed),
                if settled { "" } else { " (timed out)" }
            ),
        );
        let key = if ack { "with_acks" } else { "without_acks" };
        if let Some(us) = cpu_rows(&mut report, key, phase, before, after, books.events) {
            report.info(&format!("{phase}: server CPU per delivered emergency"), format!("{us:.2} µs"));
            per_delivery.push(us);
            let frames = books.events + fleet.acks_seen.load(Relaxed);
            let per_frame = us * books.events as f64 / frames.max(1) as f64;
            report.info(
                &format!("{phase}: server CPU per frame sent (emergencies and acks)"),
                format!("{per_frame:.2} µs"),
            );
        }
        books.add_to(&mut report, true);
        stop_server(&mut report, server);
        let disk = disk_bytes(&data_dir);
        report.info(
            &format!("{phase}: bytes on disk per emergency"),
            format!("{:.0} ({disk} bytes in {})", disk as f64 / a.count.max(1) as f64, data_dir.display()),
        );
        report.set(&format!("{key}_disk_bytes"), json!(disk));
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    if let [without, with] = per_delivery[..] {
        report.info(
            "server CPU per delivered emergency, acks / none",
            format!("{:.1}x", with / without.max(1e-9)),
        );
    }
    Ok(report)
}

/// Bytes of the files in a stopped server's data dir (its WAL checkpointed at close).
fn disk_bytes(dir: &std::path::Path) -> u64 {
    let entries = std::fs::read_dir(dir).into_iter().flatten().flatten();
    entries.filter_map(|entry| entry.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum()
}

/// What the probes saw during a burst.
#[derive(Default)]
struct Probes {
    welcome_us: Vec<u32>,
    healthz_us: Vec<u32>,
    failures: Vec<String>,
}

async fn probe_loop(target: Target, interval: Duration, stop: async_channel::Receiver<()>) -> Probes {
    let mut probes = Probes::default();
    let body = async {
        loop {
            Timer::after(interval).await;
            let started = Instant::now();
            match client::connect(&target).await {
                Ok((mut ws, _)) => {
                    probes.welcome_us.push(started.elapsed().as_micros() as u32);
                    let _ = future::or(
                        async {
                            ws.close(None).await.ok();
                        },
                        async {
                            Timer::after(Duration::from_millis(200)).await;
                        },
                    )
                    .await;
                }
                Err(e) => probes.failures.push(format!("websocket probe: {e}")),
            }
            let started = Instant::now();
            match healthz(&target).await {
                Ok(()) => probes.healthz_us.push(started.elapsed().as_micros() as u32),
                Err(e) => probes.failures.push(format!("healthz probe: {e}")),
            }
        }
    };
    // Stop first: a probe that fails because the server was told to shut down is no failure.
    future::or(
        async {
            let _ = stop.recv().await;
        },
        body,
    )
    .await;
    probes
}

async fn healthz(target: &Target) -> Result<(), String> {
    let mut stream = TcpStream::connect(target.http_addr).await.map_err(|e| e.to_string())?;
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", target.authority);
    stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.map_err(|e| e.to_string())?;
    if head.starts_with(b"HTTP/1.1 200") { Ok(()) } else { Err(String::from_utf8_lossy(&head).into_owned()) }
}

fn burst(ctx: &Ctx, a: &BurstArgs) -> Result<Report, String> {
    let mut report = Report::new("burst");
    let ingest_name = a
        .ingest
        .clone()
        .unwrap_or_else(|| if ctx.unix_socket.is_some() { "unix".into() } else { "http".into() });
    let ingest = ingest_of(ctx, &ingest_name)?;
    if a.sigterm && ctx.spawn.is_none() {
        return Err("burst --sigterm needs --spawn-server".into());
    }
    let mut server = start_server(ctx, &mut report, a.clients, &[])?;
    report.set("params", json!({"clients": a.clients, "size": a.size, "duration_s": a.duration, "ingest": ingest.name(), "window": a.window, "sigterm": a.sigterm}));
    let t0 = Instant::now();
    let (fleet, stop, tasks) = launch(ctx, t0, a.clients, Some(a.concurrency), true);
    let (probe_stop, probe_rx) = async_channel::bounded::<()>(1);
    let server_pid = server.pid;
    let run = smol::block_on(ctx.ex.run(async {
        all_connected(&fleet, a.clients, Duration::from_secs(120)).await;
        eprintln!(
            "resq-bench: burst: {} s of publishes as fast as they come, {} clients, {} ingest",
            a.duration,
            a.clients,
            ingest.name()
        );
        let probes =
            ctx.ex.spawn(probe_loop(ctx.target.clone(), Duration::from_secs_f64(a.probe_interval), probe_rx));
        let before = pair(server_pid);
        let deadline = Instant::now() + Duration::from_secs_f64(a.duration);
        let mut shutdown = None;
        let log = if a.sigterm {
            let spawned = server.spawned.as_mut().expect("checked above");
            let publishing = publish::flood(
                t0,
                &ingest,
                &ctx.target,
                a.size,
                a.window,
                deadline + Duration::from_secs(20),
                a.count,
            );
            let signal = async {
                Timer::at(deadline).await;
                // The probes measure the burst; once SIGTERM is sent, refusing them is correct.
                probe_stop.close();
                let sent = Instant::now();
                spawned.terminate();
                loop {
                    if let Some(status) = spawned.exited() {
                        return (sent.elapsed(), status.to_string());
                    }
                    if sent.elapsed() > Duration::from_secs(15) {
                        return (sent.elapsed(), "still running after 15 s".to_string());
                    }
                    Timer::after(Duration::from_millis(1)).await;
                }
            };
            let (log, exit) = future::zip(publishing, signal).await;
            shutdown = Some(exit);
            log
        } else {
            publish::flood(t0, &ingest, &ctx.target, a.size, a.window, deadline, a.count).await
        };
        let last = log.accepted.iter().copied().max().unwrap_or(0);
        let drained_ok = drained(&fleet, last, Duration::from_secs(10)).await;
        let after = pair(server_pid);
        probe_stop.close();
        let probes = probes.await;
        (log, drained_ok, before, after, probes, shutdown, collect(stop, tasks).await)
    }));
    let (mut log, drained_ok, before, after, mut probes, shutdown, mut reports) = run;
    let books = Books::of(&mut reports, &log.accepted, a.sigterm.then_some(1001));
    report.info("clients welcomed", format!("{} of {}", books.welcomed, a.clients));
    report.info("ingest / size / window", format!("{} / {} bytes / {}", ingest.name(), a.size, a.window));
    publish_rows(&mut report, &mut log, a.sigterm);
    report.info(
        "messages delivered",
        format!("{}{}", books.events, if drained_ok { "" } else { " (drain timed out after 10 s)" }),
    );
    report.info("delivery latency", books.latency.summary_ms());
    if let Some(us) = cpu_rows(&mut report, "publish_phase", "while publishing", before, after, books.events)
    {
        report.target(
            "server CPU per delivered message (user+sys)",
            format!("{us:.2} µs"),
            "<= 3 µs",
            us <= 3.0,
        );
    }
    let welcome = Percentiles::of(&mut probes.welcome_us);
    let health = Percentiles::of(&mut probes.healthz_us);
    report.info("probe: new client to welcome, during burst", welcome.summary_ms());
    report.info("probe: GET /healthz, during burst", health.summary_ms());
    report
        .info("longest gap between pings (any client)", format!("{:.2} s", books.max_ping_gap.as_secs_f64()));
    report.must_be_zero("probes failed", probes.failures.len() as u64);
    for failure in probes.failures.iter().take(5) {
        report.info("  probe failure", failure.clone());
    }
    report.set(
        "probes",
        json!({"welcome_ms": welcome.json_ms(), "healthz_ms": health.json_ms(), "failures": probes.failures,
               "max_ping_gap_s": round3(books.max_ping_gap.as_secs_f64())}),
    );
    if let Some((took, status)) = shutdown {
        report.info(
            "SIGTERM during burst: time to exit",
            format!("{:.1} ms, {status}", took.as_secs_f64() * 1000.0),
        );
        report.set("sigterm_to_exit_ms", json!(round3(took.as_secs_f64() * 1000.0)));
    }
    books.add_to(&mut report, true);
    stop_server(&mut report, server);
    Ok(report)
}

fn storm(ctx: &Ctx, a: &StormArgs) -> Result<Report, String> {
    let mut report = Report::new("storm");
    let server = start_server(ctx, &mut report, a.clients, &[])?;
    report.set("params", json!({"clients": a.clients, "within_s": a.within}));
    let before = pair(server.pid);
    let counters_before = sys::listen_counters();
    let t0 = Instant::now();
    let (fleet, stop, tasks) = launch(ctx, t0, a.clients, None, false);
    let (took, after, mut reports) = smol::block_on(ctx.ex.run(async {
        let took = all_connected(&fleet, a.clients, Duration::from_secs(60)).await;
        let after = pair(server.pid);
        (took, after, collect(stop, tasks).await)
    }));
    let mut welcome_us: Vec<u32> = reports
        .iter()
        .filter_map(|r| r.welcomed_at.map(|at| (at - t0).as_micros().min(u128::from(u32::MAX)) as u32))
        .collect();
    let within = welcome_us.iter().filter(|&&us| f64::from(us) <= a.within * 1e6).count();
    let times = Percentiles::of(&mut welcome_us);
    let books = Books::of(&mut reports, &[], None);
    report.info(
        "clients welcomed",
        format!("{} of {} in {:.2} s", books.welcomed, a.clients, took.as_secs_f64()),
    );
    report.target(
        &format!("welcomed within {} s", a.within),
        format!("{within} of {}", a.clients),
        &format!("all {}", a.clients),
        within == a.clients,
    );
    report.info("time from start to welcome", times.summary_ms());
    report.set("welcome_ms", times.json_ms());
    report.set("welcomed_within", json!(within));
    let counters: Vec<(&str, u64)> = sys::listen_counters()
        .into_iter()
        .zip(counters_before)
        .map(|((name, after), (_, before))| (name, after.saturating_sub(before)))
        .collect();
    report.info(
        "kernel (machine-wide) during storm",
        counters.iter().map(|(n, v)| format!("{n} {v}")).collect::<Vec<_>>().join(", "),
    );
    report.set("kernel_listen_counters", json!(counters.iter().copied().collect::<BTreeMap<_, _>>()));
    cpu_rows(&mut report, "storm", "during storm", before, after, 0);
    if let Some((sample, _)) = after {
        report.info(
            "server RSS after storm / peak",
            format!("{:.2} / {:.2} MiB", sample.rss_kib as f64 / 1024.0, sample.hwm_kib as f64 / 1024.0),
        );
    }
    books.add_to(&mut report, false);
    stop_server(&mut report, server);
    Ok(report)
}
