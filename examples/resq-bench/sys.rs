//! What the bench reads from the kernel: RSS and CPU of a process from `/proc`, the open-file
//! limit, and a spawned server's life (start-up time, SIGTERM, exit).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// One reading of a process's memory and CPU.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    /// `VmRSS` from `/proc/PID/status`, KiB.
    pub rss_kib: u64,
    /// `VmHWM` (peak RSS), KiB.
    pub hwm_kib: u64,
    /// utime + stime from `/proc/PID/stat`, in clock ticks.
    pub cpu_ticks: u64,
    /// utime alone (user space), clock ticks.
    pub user_ticks: u64,
    /// Threads of the process.
    pub threads: u64,
    /// When it was taken.
    pub at: Option<Instant>,
    /// Machine-wide busy and total CPU ticks (all CPUs) from `/proc/stat`, at the same moment:
    /// what other processes used shows whether a run shared the machine.
    pub machine_busy_ticks: u64,
    pub machine_total_ticks: u64,
    /// Context switches of all the process's threads (`/proc/PID/task/*/status`): voluntary ones
    /// are the times a thread slept and was woken, involuntary ones preemptions.
    pub voluntary_switches: u64,
    pub involuntary_switches: u64,
}

impl ProcSample {
    /// CPU seconds (user + kernel) between `self` and a later sample.
    pub fn cpu_secs_until(&self, later: &ProcSample) -> f64 {
        later.cpu_ticks.saturating_sub(self.cpu_ticks) as f64 / clock_ticks_per_sec() as f64
    }

    /// User-space CPU seconds between `self` and a later sample (the rest is kernel time).
    pub fn user_secs_until(&self, later: &ProcSample) -> f64 {
        later.user_ticks.saturating_sub(self.user_ticks) as f64 / clock_ticks_per_sec() as f64
    }

    /// CPU seconds that processes other than `self`'s and `other`'s used on the whole machine
    /// between the two pairs of samples (builds, other benchmarks, ...).
    pub fn others_secs(before: (&ProcSample, &ProcSample), after: (&ProcSample, &ProcSample)) -> f64 {
        let busy = after.0.machine_busy_ticks.saturating_sub(before.0.machine_busy_ticks);
        let ours = after.0.cpu_ticks.saturating_sub(before.0.cpu_ticks)
            + after.1.cpu_ticks.saturating_sub(before.1.cpu_ticks);
        busy.saturating_sub(ours) as f64 / clock_ticks_per_sec() as f64
    }

    /// Wake-ups (voluntary context switches of every thread) between `self` and a later sample.
    pub fn wakeups_until(&self, later: &ProcSample) -> u64 {
        later.voluntary_switches.saturating_sub(self.voluntary_switches)
    }

    /// Preemptions (involuntary context switches) between `self` and a later sample.
    pub fn preemptions_until(&self, later: &ProcSample) -> u64 {
        later.involuntary_switches.saturating_sub(self.involuntary_switches)
    }

    /// Wall-clock seconds between `self` and a later sample.
    pub fn wall_secs_until(&self, later: &ProcSample) -> f64 {
        match (self.at, later.at) {
            (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64(),
            _ => 0.0,
        }
    }
}

pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

/// Reads `/proc/PID/status` and `/proc/PID/stat`; `None` if the process is gone.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (busy, total) = machine_ticks();
    let (voluntary, involuntary) = context_switches(pid);
    // Fields after the command name (which may hold spaces) start at field 3, `state`.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(ProcSample {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
        cpu_ticks: utime + stime,
        user_ticks: utime,
        threads: field("Threads:"),
        at: Some(Instant::now()),
        machine_busy_ticks: busy,
        machine_total_ticks: total,
        voluntary_switches: voluntary,
        involuntary_switches: involuntary,
    })
}

/// Voluntary and involuntary context switches summed over the threads of `pid` (threads that
/// already exited are not counted).
fn context_switches(pid: u32) -> (u64, u64) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return (0, 0) };
    let mut sums = (0, 0);
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else { continue };
        for line in status.lines() {
            let number = |rest: &str| rest.trim().parse::<u64>().unwrap_or(0);
            if let Some(rest) = line.strip_prefix("voluntary_ctxt_switches:") {
                sums.0 += number(rest);
            } else if let Some(rest) = line.strip_prefix("nonvoluntary_ctxt_switches:") {
                sums.1 += number(rest);
            }
        }
    }
    sums
}

/// Busy and total ticks of all CPUs since boot (busy: all but idle and iowait).
fn machine_ticks() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().next().and_then(|l| l.strip_prefix("cpu ")) else { return (0, 0) };
    let ticks: Vec<u64> = line.split_whitespace().take(8).map(|t| t.parse().unwrap_or(0)).collect();
    let total: u64 = ticks.iter().sum();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Raises this process's open-file limit as far as it goes (children inherit it); returns it.
pub fn raise_nofile_limit(wanted: libc::rlim_t) -> libc::rlim_t {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid rlimit to fill and then read.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_max < wanted {
            // Only root may raise the hard limit; else take the soft limit up to the hard one.
            let raised = libc::rlimit { rlim_cur: wanted, rlim_max: wanted };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return wanted;
            }
        }
        limit.rlim_cur = limit.rlim_max.min(wanted.max(limit.rlim_cur));
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    limit.rlim_cur
}

/// Parses a CPU list such as `0`, `0,1` or `0-3`.
pub fn parse_cpus(list: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("bad CPU list {list:?}");
        match part.split_once('-') {
            Some((a, b)) => {
                cpus.extend(a.parse::<usize>().map_err(|_| bad())?..=b.parse::<usize>().map_err(|_| bad())?)
            }
            None => cpus.push(part.parse().map_err(|_| bad())?),
        }
    }
    if cpus.is_empty() || cpus.iter().any(|&c| c >= libc::CPU_SETSIZE as usize) {
        return Err(format!("bad CPU list {list:?}"));
    }
    Ok(cpus)
}

/// Pins the calling thread (and the threads and children it makes later) to `cpus`.
pub fn pin_to(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays within it (checked above).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A server the bench started itself.
pub struct SpawnedServer {
    child: Option<Child>,
    pub pid: u32,
    /// From `spawn` to the first `200` from `GET /healthz`.
    pub startup: Duration,
    pub binary_bytes: u64,
    pub command: String,
    pub log: PathBuf,
    exit_status: Option<ExitStatus>,
}

impl SpawnedServer {
    /// Starts `binary` with `args`, its stderr and stdout appended to `log`, and waits until it
    /// answers `GET /healthz` on `addr`.
    pub fn start(
        binary: &Path,
        args: &[String],
        addr: SocketAddr,
        log: &Path,
        cpus: Option<&[usize]>,
    ) -> Result<SpawnedServer, String> {
        let binary_bytes =
            binary_size(binary).ok_or_else(|| format!("{}: no such program", binary.display()))?;
        let log_file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("cannot open server log {}: {e}", log.display()))?;
        let log_clone = log_file.try_clone().map_err(|e| e.to_string())?;
        let command_line = format!("{} {}", binary.display(), args.join(" "));
        let started = Instant::now();
        let mut command = Command::new(binary);
        if let Some(cpus) = cpus {
            let cpus = cpus.to_vec();
            // SAFETY: sched_setaffinity is async-signal-safe; nothing else runs in the child.
            unsafe {
                command.pre_exec(move || pin_to(&cpus));
            }
        }
        let mut child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_clone)
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let pid = child.id();
        let deadline = started + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("server exited at start ({status}); see {}", log.display()));
            }
            if healthz_ok(addr) {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(format!("server did not answer /healthz within 10 s; see {}", log.display()));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        let startup = started.elapsed();
        Ok(SpawnedServer {
            child: Some(child),
            pid,
            startup,
            binary_bytes,
            command: command_line,
            log: log.to_owned(),
            exit_status: None,
        })
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        // SAFETY: kill with a valid signal number on our own child's pid.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
    }

    /// The exit status, if it has exited (without waiting).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        self.exit_status = Some(status);
        Some(status)
    }

    pub fn has_exited(&self) -> bool {
        self.child.is_none()
    }

    /// Waits up to `limit` for the server to exit (SIGKILL after that).
    pub fn wait(&mut self, limit: Duration) -> (Duration, Option<ExitStatus>) {
        let started = Instant::now();
        let Some(child) = self.child.as_mut() else { return (Duration::ZERO, self.exit_status) };
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return (started.elapsed(), Some(status));
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                return (started.elapsed(), None);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGTERM, then wait: how long the shutdown took and how it ended.
    pub fn stop(&mut self) -> (Duration, Option<ExitStatus>) {
        self.terminate();
        self.wait(Duration::from_secs(10))
    }
}

impl Drop for SpawnedServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Bytes of `program`, found as a path or on `PATH` as a shell would.
fn binary_size(program: &Path) -> Option<u64> {
    if program.components().count() > 1 {
        return std::fs::metadata(program).ok().map(|m| m.len());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find_map(|dir| std::fs::metadata(dir.join(program)).ok()).map(|m| m.len())
}

/// One blocking `GET /healthz`; true on a 200.
fn healthz_ok(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

/// TCP listen-queue counters from `/proc/net/netstat` (machine-wide): `ListenOverflows`,
/// `ListenDrops`, `SyncookiesSent`. A connect storm that overflows the accept backlog shows here,
/// and each dropped SYN costs its client a 1 s retransmission.
pub fn listen_counters() -> Vec<(&'static str, u64)> {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else { return Vec::new() };
    let pairs: Vec<(&str, u64)> = names
        .split_whitespace()
        .zip(values.split_whitespace())
        .map(|(n, v)| (n, v.parse().unwrap_or(0)))
        .collect();
    ["ListenOverflows", "ListenDrops", "SyncookiesSent"]
        .into_iter()
        .map(|name| (name, pairs.iter().find(|(n, _)| *n == name).map_or(0, |(_, v)| *v)))
        .collect()
}
