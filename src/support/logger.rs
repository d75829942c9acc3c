//! A minimal `log` backend writing one line per record to stderr, filtered by `RUST_LOG`, and
//! `WarningThrottle`, which keeps a repeated warning from flooding it.
//!
//! `RUST_LOG` takes env_logger's `level` and `module=level` directives, comma-separated: `info`,
//! `debug`, `warn,resq_push::ws::session=debug`; a directive of another form (a bare module name,
//! a `/pattern`) is ignored. Unset means `info`. Hand-written: env_logger without default
//! features costs 17 KB of binary and env_filter (its parser alone) 8.4 KB, for the 70 lines of
//! `StderrLogger` (BENCHMARKS.md, "Crates considered for hand-written parts").

use std::cell::Cell;
use std::io::Write;
use std::time::{Duration, Instant, SystemTime};

use log::{LevelFilter, Log, Metadata, Record, warn};

use crate::support::timestamp::rfc3339_millis;

struct StderrLogger {
    default_level: LevelFilter,
    /// Module-path prefixes with their own level; the longest matching prefix wins.
    module_levels: Vec<(String, LevelFilter)>,
}

impl StderrLogger {
    fn from_spec(spec: &str) -> Self {
        let mut logger = StderrLogger { default_level: LevelFilter::Info, module_levels: Vec::new() };
        for directive in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            match directive.split_once('=') {
                Some((module, level)) => {
                    if let Ok(level) = level.trim().parse() {
                        logger.module_levels.push((module.trim().to_owned(), level));
                    }
                }
                None => {
                    if let Ok(level) = directive.parse() {
                        logger.default_level = level;
                    }
                }
            }
        }
        logger.module_levels.sort_by_key(|(module, _)| std::cmp::Reverse(module.len()));
        logger
    }

    fn level_for(&self, target: &str) -> LevelFilter {
        self.module_levels
            .iter()
            .find(|(module, _)| target.starts_with(module.as_str()))
            .map_or(self.default_level, |(_, level)| *level)
    }

    fn max_level(&self) -> LevelFilter {
        self.module_levels.iter().map(|(_, level)| *level).fold(self.default_level, |a, b| a.max(b))
    }
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level_for(metadata.target())
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            let line = format!(
                "{} {:<5} {}: {}\n",
                rfc3339_millis(SystemTime::now()),
                record.level(),
                record.target(),
                record.args()
            );
            // A failed log write must not take the server down; there is nowhere to report it.
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

/// Installs the logger configured by `RUST_LOG`. Call once, before anything logs.
pub fn init() {
    let spec = std::env::var("RUST_LOG").unwrap_or_default();
    let logger = StderrLogger::from_spec(&spec);
    log::set_max_level(logger.max_level());
    // Fails only if a logger is already installed, in which case that one keeps working.
    let _ = log::set_logger(Box::leak(Box::new(logger)));
}

/// Logs a repeated warning at most once per `WarningThrottle::PERIOD`, with how many were held
/// back, so that a flood of refused connections cannot flood the log.
#[derive(Default)]
pub struct WarningThrottle {
    last_logged: Cell<Option<Instant>>,
    held_back: Cell<u64>,
}

impl WarningThrottle {
    const PERIOD: Duration = Duration::from_secs(10);

    pub fn note(&self, message: &str) {
        let now = Instant::now();
        if self.last_logged.get().is_some_and(|last| now < last + Self::PERIOD) {
            self.held_back.set(self.held_back.get() + 1);
            return;
        }
        match self.held_back.replace(0) {
            0 => warn!("{message}"),
            held_back => warn!("{message} (and {held_back} more in the last {:?})", Self::PERIOD),
        }
        self.last_logged.set(Some(now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_levels_override_the_default() {
        let logger = StderrLogger::from_spec("warn, resq_push::session=debug,bogus=nonsense");
        assert_eq!(logger.level_for("resq_push::hub"), LevelFilter::Warn);
        assert_eq!(logger.level_for("resq_push::session"), LevelFilter::Debug);
        assert_eq!(logger.max_level(), LevelFilter::Debug);
        assert_eq!(StderrLogger::from_spec("").level_for("x"), LevelFilter::Info);
    }
}
