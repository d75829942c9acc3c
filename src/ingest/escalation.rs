//! Escalation: an emergency nobody acked within `--ack-timeout` is stored as escalated, broadcast
//! as `unacked`, and then runs `--on-unacked` once.
//!
//! One task and one timer for every emergency: it sleeps until the earliest deadline (with none,
//! until an emergency is added: an idle server does not wake for it), asks the hub which fell due (each is asked for once), has
//! the journal store them, and only then queues the commands. Each command's start is stored
//! (`ReceiptEvent::CommandStarted`) before it starts: a restart runs the commands of escalated
//! emergencies whose start was never stored (they waited for a slot, or the server stopped
//! first) and never one twice, and an emergency whose deadline passed while the server was down
//! falls due at the first tick. A command is a child process (`/bin/sh -c`) run by threads of its
//! own, so the event loop never waits on it: at most `--max-escalation-children` at once (the
//! rest wait in order), each killed with its process group past `--escalation-time-limit`; its exit status and the end
//! of its stderr are logged.
//!
//! In cluster mode every box tracks every deadline, and before a command starts its box claims
//! it in the engine (`store::nats::claims`): one box runs it, the others ask again once the
//! winner's lease is over, and take it over if the winner did not mark it done by then.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use async_channel::Sender;
use log::{error, info, warn};
use smol::{Timer, future};

use crate::core::SharedEnvelope;
use crate::core::receipts::ReceiptEvent;
use crate::ingest::Publisher;
use crate::store::engine::Claim;
use crate::store::{Engine, in_cluster};
use crate::support::join::join_within;
use crate::support::logger::WarningThrottle;

/// How long escalation waits after the journal did not store the escalations due, before it
/// asks for them again.
const STORE_RETRY: Duration = Duration::from_secs(1);
/// Bytes of a command's stderr kept for the log (its end); the rest is read and dropped.
const STDERR_LOGGED_BYTES: usize = 2048;
/// How long the threads writing a command's stdin and reading its stderr get to end once it has:
/// only a process that left its group can hold them longer.
const PIPE_GRACE: Duration = Duration::from_secs(1);
/// How often a running command is checked for its end.
const CHILD_POLL: Duration = Duration::from_millis(20);
/// Cluster mode: how long after a claim the engine did not answer it is asked again, for as
/// long as the emergency stays unanswered: a failed claim never means "run it here", which
/// would run it on every box, nor "run it nowhere", which would lose it.
const CLAIM_RETRY: Duration = Duration::from_secs(1);

/// What escalation runs, from the flags.
#[derive(Clone, Debug)]
pub struct EscalationSettings {
    /// `--on-unacked`; `None`: escalations are logged and broadcast only.
    pub command: Option<String>,
    pub max_children: usize,
    pub time_limit: Duration,
    /// The history's id, for `RESQ_STREAM`.
    pub stream: String,
}

/// How one command ended.
#[derive(Debug)]
enum ChildEnd {
    Exited(ExitStatus),
    Killed,
    NotStarted(std::io::Error),
}

impl ChildEnd {
    fn label(&self) -> &'static str {
        match self {
            ChildEnd::Exited(status) if status.success() => "ok",
            ChildEnd::Exited(_) => "failed",
            ChildEnd::Killed => "killed",
            ChildEnd::NotStarted(_) => "not_started",
        }
    }
}

/// Runs escalation until the process ends.
pub async fn run(publisher: &Publisher, settings: EscalationSettings) {
    let hub = publisher.hub();
    let (finished, ended) = async_channel::unbounded::<(u64, ChildEnd)>();
    let mut waiting: VecDeque<u64> = VecDeque::new();
    // Cluster mode: commands another box claimed (or whose claim failed), when to ask again.
    let mut contested = Contested::default();
    if settings.command.is_some() {
        waiting.extend(hub.with(|hub| hub.commands_owed()));
        if !waiting.is_empty() {
            warn!(
                "--on-unacked never started for seqs {waiting:?} (the server stopped first): running them now"
            );
        }
    }
    let mut running = 0;
    loop {
        let now = SystemTime::now();
        if publisher.engine().is_some() {
            waiting.extend(contested.due(now));
        }
        let due = hub.with(|hub| hub.due_escalations(SystemTime::now()));
        if !due.is_empty() {
            let seqs: Vec<u64> = due.iter().map(ReceiptEvent::seq).collect();
            if escalate(publisher, &settings, due).await {
                waiting.extend(seqs.into_iter().filter(|_| settings.command.is_some()));
            } else {
                Timer::after(STORE_RETRY).await;
            }
        }
        let free = settings.max_children.saturating_sub(running);
        let starting = claim_commands(publisher, &mut waiting, free).await;
        let starting = match publisher.engine() {
            Some(engine) => {
                let claiming = claim_in_cluster(engine, &settings, starting, &mut contested);
                in_cluster(claiming, engine.cluster_only()).await
            }
            None => starting,
        };
        for (seq, envelope) in starting {
            if start(&settings, seq, &envelope, finished.clone()) {
                running += 1;
            } else {
                publisher.metrics.count("resq_push_escalation_commands_total", "not_started");
            }
        }
        // Commands left waiting with a slot free: their start could not be stored.
        let retry = (!waiting.is_empty() && running < settings.max_children).then(|| now + STORE_RETRY);
        if let Some((seq, end)) = next_wake(publisher, &contested, retry, &ended).await {
            running -= 1;
            publisher.metrics.count("resq_push_escalation_commands_total", end.label());
            if let Some(engine) = publisher.engine() {
                engine.claim_done(seq);
            }
        }
    }
}

/// Waits for what the loop acts on: a command's end (returned), the next deadline, the time to
/// ask again about a contested claim, `retry`, or an emergency added (whose deadline may come
/// first).
async fn next_wake(
    publisher: &Publisher,
    contested: &Contested,
    retry: Option<SystemTime>,
    ended: &async_channel::Receiver<(u64, ChildEnd)>,
) -> Option<(u64, ChildEnd)> {
    let deadline = publisher.hub().with(|hub| hub.next_escalation());
    let wake_at = deadline.into_iter().chain(contested.next()).chain(retry).min();
    let timer = async {
        match wake_at {
            Some(at) => drop(Timer::after(at.duration_since(SystemTime::now()).unwrap_or_default()).await),
            None => future::pending().await,
        }
    };
    let woken = future::or(timer, publisher.emergency_added());
    future::or(async { ended.recv().await.ok() }, async {
        woken.await;
        None
    })
    .await
}

/// Stores the escalations `due`, and with them, without a command, that there is none to
/// run; `false` if they could not be stored (their commands do not run).
async fn escalate(publisher: &Publisher, settings: &EscalationSettings, mut due: Vec<ReceiptEvent>) -> bool {
    let seqs: Vec<u64> = due.iter().map(ReceiptEvent::seq).collect();
    for seq in &seqs {
        warn!("seq {seq}: no tablet acked it within --ack-timeout; escalating");
    }
    if settings.command.is_none() {
        let at = SystemTime::now();
        due.extend(seqs.iter().map(|&seq| ReceiptEvent::CommandStarted { seq, at }));
    }
    // Stored before anything runs: a restart never runs a command twice. No time limit:
    // while storage fails the events wait in the journal, and the commands with them.
    if let Err(rejection) = publisher.record_and_wait(due, None).await {
        error!("escalations of {seqs:?} not stored ({rejection}); their commands do not run");
        return false;
    }
    true
}

/// Takes up to `free` commands from `waiting` and stores that they start, before they do: a
/// restart runs the escalated ones whose start was not stored, and never one twice. One whose
/// emergency was acked or closed meanwhile is not run (and marked so). If the marks cannot be
/// stored the commands stay waiting, for the next round.
async fn claim_commands(
    publisher: &Publisher,
    waiting: &mut VecDeque<u64>,
    free: usize,
) -> Vec<(u64, SharedEnvelope)> {
    let hub = publisher.hub();
    let taken: Vec<u64> = waiting.drain(..free.min(waiting.len())).collect();
    if taken.is_empty() {
        return Vec::new();
    }
    let at = SystemTime::now();
    let marks = taken.iter().map(|&seq| ReceiptEvent::CommandStarted { seq, at }).collect();
    if let Err(rejection) = publisher.record_and_wait(marks, None).await {
        warn!("--on-unacked for seqs {taken:?} waits: their start could not be stored ({rejection})");
        for seq in taken.into_iter().rev() {
            waiting.push_front(seq);
        }
        return Vec::new();
    }
    let mut starting = Vec::new();
    for seq in taken {
        match hub.with(|hub| hub.unanswered_envelope(seq)) {
            Some(envelope) => starting.push((seq, envelope)),
            None => info!("seq {seq} was acked or closed after it escalated: --on-unacked not run"),
        }
    }
    starting
}

/// Cluster mode: the commands to ask the engine about again, with when (bounded by the
/// escalations waiting), and the warning that claims get no answer, once per period.
#[derive(Default)]
struct Contested {
    asks: Vec<(u64, SystemTime)>,
    unanswered: WarningThrottle,
}

impl Contested {
    /// Takes out the seqs to ask about again by `now`.
    fn due(&mut self, now: SystemTime) -> Vec<u64> {
        let (due, later): (Vec<_>, Vec<_>) = self.asks.drain(..).partition(|&(_, until)| until <= now);
        self.asks = later;
        due.into_iter().map(|(seq, _)| seq).collect()
    }

    /// The earliest time to ask again about one.
    fn next(&self) -> Option<SystemTime> {
        self.asks.iter().map(|&(_, at)| at).min()
    }

    /// Asks about `seq` again at `at`.
    fn ask_again(&mut self, seq: u64, at: SystemTime) {
        self.asks.push((seq, at));
    }
}

/// Cluster mode: keeps the commands this box wins in the engine, and notes when to ask again
/// about those another box holds or whose claim got no answer.
async fn claim_in_cluster(
    engine: &Engine,
    settings: &EscalationSettings,
    starting: Vec<(u64, SharedEnvelope)>,
    contested: &mut Contested,
) -> Vec<(u64, SharedEnvelope)> {
    let mut won = Vec::new();
    for (seq, envelope) in starting {
        let claimed = engine.claim(seq, settings.time_limit).recv().await;
        match claimed.unwrap_or_else(|_| Err("the nats thread has stopped".into())) {
            Ok(Claim::Won) => won.push((seq, envelope)),
            Ok(Claim::Held { until }) => {
                info!(
                    "seq {seq}: another box runs --on-unacked; this one takes over if it is not done by then"
                );
                contested.ask_again(seq, until);
            }
            Ok(Claim::Done) => info!("seq {seq}: --on-unacked was run by another box"),
            Err(reason) => {
                contested.unanswered.note(&format!(
                    "seq {seq}: cannot claim --on-unacked in the engine ({reason}): asking again every \
                     {CLAIM_RETRY:?} until it answers, or the emergency is acked or closed"
                ));
                contested.ask_again(seq, SystemTime::now() + CLAIM_RETRY);
            }
        }
    }
    won
}

/// Starts the command for `seq` on a thread of its own; `finished` hears how it ended, even if
/// that thread panics. `false` if no thread could be started (then nothing runs, nothing is told).
fn start(settings: &EscalationSettings, seq: u64, envelope: &str, finished: Sender<(u64, ChildEnd)>) -> bool {
    let Some(command) = settings.command.clone() else { return false };
    let (stream, envelope, limit) = (settings.stream.clone(), envelope.to_owned(), settings.time_limit);
    let spawned = std::thread::Builder::new().name("resq-escalation".into()).spawn(move || {
        let run = std::panic::AssertUnwindSafe(|| run_child(&command, seq, &stream, envelope, limit));
        let end = std::panic::catch_unwind(run)
            .unwrap_or_else(|_| ChildEnd::NotStarted(std::io::Error::other("its thread panicked")));
        let _ = finished.send_blocking((seq, end));
    });
    if let Err(error) = spawned {
        error!("--on-unacked for seq {seq} not run: cannot start a thread: {error}");
        return false;
    }
    true
}

/// Runs one command to its end or its time limit, and logs how it ended. The command is the
/// leader of a process group of its own: past the limit the whole group is killed, so a
/// background process it started cannot keep it, or its stdin and stderr, alive. It has ended
/// when `/bin/sh` has exited and its stdin and stderr are done with (every process of it that
/// held them has ended or closed them).
fn run_child(command: &str, seq: u64, stream: &str, envelope: String, limit: Duration) -> ChildEnd {
    let started = Instant::now();
    let spawned = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .env("RESQ_SEQ", seq.to_string())
        .env("RESQ_STREAM", stream)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(error) => {
            error!("--on-unacked for seq {seq} could not start: {error}");
            return ChildEnd::NotStarted(error);
        }
    };
    // Written and read by threads of their own: a command that never reads its stdin, or
    // writes much to stderr, cannot hold this one past the time limit. Without a thread the
    // pipe is closed at once: the command reads an empty stdin.
    let writer = child.stdin.take().and_then(|mut stdin| {
        let write = move || {
            let _ = stdin.write_all(envelope.as_bytes());
        };
        std::thread::Builder::new().name("resq-escalation-stdin".into()).spawn(write).ok()
    });
    let (tail_sender, tail) = std::sync::mpsc::channel();
    let reader = child.stderr.take().and_then(|stderr| {
        let read = move || {
            let _ = tail_sender.send(tail_of(stderr));
        };
        std::thread::Builder::new().name("resq-escalation-stderr".into()).spawn(read).ok()
    });
    let pipes_done =
        || [&writer, &reader].iter().all(|thread| thread.as_ref().is_none_or(|t| t.is_finished()));
    let end = loop {
        match child.try_wait() {
            Ok(Some(status)) if pipes_done() => break ChildEnd::Exited(status),
            Ok(_) if started.elapsed() >= limit => {
                kill_group(&mut child);
                break ChildEnd::Killed;
            }
            Ok(_) => std::thread::sleep(CHILD_POLL),
            Err(error) => {
                kill_group(&mut child);
                break ChildEnd::NotStarted(error);
            }
        }
    };
    // Only a process that left the group (setsid) can still hold a pipe: then its thread is
    // left behind, detached, rather than holding this one (and the command's slot).
    for thread in [writer, reader].into_iter().flatten() {
        if !join_within(thread, PIPE_GRACE) {
            warn!("--on-unacked for seq {seq}: a process outside its group still holds its stdin or stderr");
        }
    }
    let stderr = tail.try_recv().unwrap_or_default();
    log_end(seq, &end, started.elapsed(), limit, stderr.trim());
    end
}

/// Kills the command's process group (the command and everything it started that stayed in
/// it), then reaps the command.
fn kill_group(child: &mut Child) {
    if let Ok(group) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) with a negative pid signals that process group; it touches no memory.
        unsafe { libc::kill(-group, libc::SIGKILL) };
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn log_end(seq: u64, end: &ChildEnd, took: Duration, limit: Duration, stderr: &str) {
    let stderr = if stderr.is_empty() { String::new() } else { format!("; stderr: {stderr}") };
    match end {
        ChildEnd::Exited(status) if status.success() => {
            info!("--on-unacked for seq {seq} exited 0 after {took:.1?}{stderr}")
        }
        ChildEnd::Exited(status) => {
            warn!("--on-unacked for seq {seq} failed ({status}) after {took:.1?}{stderr}")
        }
        ChildEnd::Killed => {
            warn!("--on-unacked for seq {seq} killed after --escalation-time-limit {limit:?}{stderr}")
        }
        ChildEnd::NotStarted(error) => error!("--on-unacked for seq {seq}: {error}"),
    }
}

/// The last `STDERR_LOGGED_BYTES` of what `pipe` gives until it closes, as one line.
fn tail_of(mut pipe: impl Read) -> String {
    let mut kept: VecDeque<u8> = VecDeque::with_capacity(STDERR_LOGGED_BYTES);
    let mut chunk = [0u8; 1024];
    while let Ok(n) = pipe.read(&mut chunk) {
        if n == 0 {
            break;
        }
        for &byte in &chunk[..n] {
            if kept.len() == STDERR_LOGGED_BYTES {
                kept.pop_front();
            }
            kept.push_back(byte);
        }
    }
    String::from_utf8_lossy(&kept.into_iter().collect::<Vec<u8>>()).replace('\n', " | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_gets_the_envelope_and_its_environment_and_is_killed_past_its_limit() {
        let dir = std::env::temp_dir().join(format!("resq-escalation-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let command = format!(
            "cat > {0}; echo \"$RESQ_SEQ $RESQ_STREAM\" >> {0}; echo oops >&2; exit 3",
            out.display()
        );
        let end = run_child(&command, 7, "s1", r#"{"seq":7}"#.into(), Duration::from_secs(10));
        assert_eq!(end.label(), "failed");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "{\"seq\":7}7 s1\n");
        let end = run_child("sleep 10", 8, "s1", String::new(), Duration::from_millis(100));
        assert_eq!(end.label(), "killed");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn past_its_limit_a_command_is_killed_with_the_background_processes_holding_its_pipes() {
        let started = Instant::now();
        let end = run_child("sleep 1000 & exit 0", 9, "s1", "x".repeat(1 << 20), Duration::from_millis(200));
        assert_eq!(end.label(), "killed");
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    }

    #[test]
    fn only_the_end_of_stderr_is_kept() {
        let long = "x".repeat(5000) + "end";
        let tail = tail_of(long.as_bytes());
        assert_eq!(tail.len(), STDERR_LOGGED_BYTES);
        assert!(tail.ends_with("end"));
    }
}
