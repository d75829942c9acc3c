//! A minimal `log` backend writing one line per record to stderr, filtered by `RUST_LOG`, and
//! `WarningThrottle`, which keeps a repeated warning (or error) from flooding it.
//!
//! `RUST_LOG` takes env_logger's `level` and `module=level` directives, comma-separated: `info`,
//! `debug`, `warn,resq_push::ws::session=debug`. Unset means `info`. A directive of another form
//! (`verbose`, a bare module name, a `/pattern`) is ignored and named in one warning at start.
//! Hand-written: env_logger without default features costs 17 KB of binary and env_filter (its
//! parser alone) 8.4 KB, for the 70 lines of `StderrLogger` (BENCHMARKS.md, "Crates considered
//! for hand-written parts").

use std::cell::Cell;
use std::fmt;
use std::io::Write;
use std::time::{Duration, Instant, SystemTime};

use log::{Level, LevelFilter, Log, Metadata, Record, log};

use crate::support::timestamp::rfc3339_millis;

const LEVELS: &str = "off, error, warn, info, debug, trace";

struct StderrLogger {
    default_level: LevelFilter,
    /// Module-path prefixes with their own level; the longest matching prefix wins.
    module_levels: Vec<(String, LevelFilter)>,
    /// The directives of `RUST_LOG` that were not understood, each with why.
    ignored: Vec<(String, String)>,
}

impl StderrLogger {
    fn from_spec(spec: &str) -> Self {
        let mut logger =
            StderrLogger { default_level: LevelFilter::Info, module_levels: Vec::new(), ignored: Vec::new() };
        for directive in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            match parse_directive(directive) {
                Ok((None, level)) => logger.default_level = level,
                Ok((Some(module), level)) => logger.module_levels.push((module.to_owned(), level)),
                Err(why) => logger.ignored.push((directive.to_owned(), why)),
            }
        }
        logger.module_levels.sort_by_key(|(module, _)| std::cmp::Reverse(module.len()));
        logger
    }

    /// The one warning about what `RUST_LOG` said that was ignored, if anything was.
    fn ignored_warning(&self) -> Option<String> {
        if self.ignored.is_empty() {
            return None;
        }
        let each: Vec<String> =
            self.ignored.iter().map(|(directive, why)| format!("{directive:?} ({why})")).collect();
        Some(format!(
            "RUST_LOG: ignored {}; a directive is LEVEL or MODULE=LEVEL, LEVEL one of {LEVELS}",
            each.join(", ")
        ))
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

/// One directive: `LEVEL` (no module) or `MODULE=LEVEL`; the error says why it is not one.
fn parse_directive(directive: &str) -> Result<(Option<&str>, LevelFilter), String> {
    let (module, level) = match directive.split_once('=') {
        Some((module, level)) => (Some(module.trim()), level.trim()),
        None => (None, directive),
    };
    match module {
        Some("") => return Err("no module before =".to_owned()),
        Some(module) if module.contains('-') => {
            return Err(format!("module paths are written with _, like {}", module.replace('-', "_")));
        }
        _ => {}
    }
    match (level.parse(), module) {
        (Ok(level), _) => Ok((module, level)),
        (Err(_), None) => Err("not a level".to_owned()),
        (Err(_), Some(_)) => Err(format!("{level:?} is not a level")),
    }
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level_for(metadata.target())
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            write_line(record.level(), record.target(), record.args());
        }
    }

    fn flush(&self) {}
}

fn write_line(level: Level, target: &str, message: &fmt::Arguments) {
    let line = format!("{} {level:<5} {target}: {message}\n", rfc3339_millis(SystemTime::now()));
    // A failed log write must not take the server down; there is nowhere to report it.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Installs the logger configured by `RUST_LOG`. Call once, before anything logs.
pub fn init() {
    let spec = std::env::var("RUST_LOG").unwrap_or_default();
    let logger = StderrLogger::from_spec(&spec);
    // Past the filter: a `RUST_LOG` of `error,...` must not hide that part of it was ignored.
    if let Some(warning) = logger.ignored_warning() {
        write_line(Level::Warn, module_path!(), &format_args!("{warning}"));
    }
    log::set_max_level(logger.max_level());
    // Fails only if a logger is already installed, in which case that one keeps working.
    let _ = log::set_logger(Box::leak(Box::new(logger)));
}

/// Writes an error line whatever `RUST_LOG` says: for what the process exits with (a refused
/// flag, a failed start), which `RUST_LOG=off` must not leave unexplained.
pub fn error_past_filter(message: &str) {
    write_line(Level::Error, "resq_push", &format_args!("{message}"));
}

/// Logs a repeated warning at most once per `WarningThrottle::PERIOD`, with how many were held
/// back, so that a flood of refused connections or tokens, or of failing commits, cannot flood
/// the log. Its cells belong to one thread: each thread that logs keeps its own.
#[derive(Default)]
pub struct WarningThrottle {
    last_logged: Cell<Option<Instant>>,
    held_back: Cell<u64>,
}

impl WarningThrottle {
    const PERIOD: Duration = Duration::from_secs(10);

    /// Logs `message` as a warning, unless one was logged less than `PERIOD` ago.
    pub fn note(&self, message: &str) {
        self.note_at(Level::Warn, message);
    }

    /// Logs `message` at `level`, unless one was logged less than `PERIOD` ago.
    pub fn note_at(&self, level: Level, message: &str) {
        match self.admit(Instant::now()) {
            None => {}
            Some(0) => log!(level, "{message}"),
            Some(held_back) => log!(level, "{message} (and {held_back} more in the last {:?})", Self::PERIOD),
        }
    }

    /// Whether a note at `now` is logged, with how many were held back since the last one.
    fn admit(&self, now: Instant) -> Option<u64> {
        if self.last_logged.get().is_some_and(|last| now < last + Self::PERIOD) {
            self.held_back.set(self.held_back.get() + 1);
            return None;
        }
        self.last_logged.set(Some(now));
        Some(self.held_back.replace(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_logs_once_a_period_and_counts_what_it_held_back() {
        let throttle = WarningThrottle::default();
        let start = Instant::now();
        assert_eq!(throttle.admit(start), Some(0));
        for second in 1..10 {
            assert_eq!(throttle.admit(start + Duration::from_secs(second)), None);
        }
        assert_eq!(throttle.admit(start + WarningThrottle::PERIOD), Some(9));
        assert_eq!(throttle.admit(start + WarningThrottle::PERIOD * 3), Some(0));
    }

    #[test]
    fn module_levels_override_the_default() {
        let logger = StderrLogger::from_spec("warn, resq_push::session=debug,bogus=nonsense");
        assert_eq!(logger.level_for("resq_push::hub"), LevelFilter::Warn);
        assert_eq!(logger.level_for("resq_push::session"), LevelFilter::Debug);
        assert_eq!(logger.max_level(), LevelFilter::Debug);
        assert_eq!(StderrLogger::from_spec("").level_for("x"), LevelFilter::Info);
        assert_eq!(StderrLogger::from_spec("DEBUG").level_for("x"), LevelFilter::Debug);
    }

    #[test]
    fn a_spec_that_is_understood_gets_no_warning() {
        for spec in ["", "info", "warn,resq_push::ws::session=debug", " off , resq_push = TRACE "] {
            assert_eq!(StderrLogger::from_spec(spec).ignored_warning(), None, "{spec:?}");
        }
    }

    #[test]
    fn directives_not_understood_are_named_in_one_warning() {
        let logger = StderrLogger::from_spec("verbose");
        assert_eq!(logger.level_for("resq_push"), LevelFilter::Info);
        let warning = logger.ignored_warning().unwrap();
        assert!(warning.starts_with(r#"RUST_LOG: ignored "verbose" (not a level)"#), "{warning}");

        let logger = StderrLogger::from_spec("warn,resq_push=loud,=debug,resq-push=debug");
        assert_eq!(logger.level_for("resq_push"), LevelFilter::Warn);
        let warning = logger.ignored_warning().unwrap();
        assert!(warning.contains(r#""resq_push=loud" ("loud" is not a level)"#), "{warning}");
        assert!(warning.contains(r#""=debug" (no module before =)"#), "{warning}");
        assert!(warning.contains(r#""resq-push=debug" (module paths are written with _, like resq_push)"#));
    }
}
