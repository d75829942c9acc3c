//! UTC timestamps in RFC 3339 form (`2026-11-27T21:04:05.123Z`), for envelopes, `/healthz` and
//! log lines.
//!
//! The calendar is humantime's: `format_rfc3339_millis` took 2.3 KB of binary and a fifth of the
//! instructions of the hand-written `format!` it replaced (BENCHMARKS.md, "Crates considered for
//! hand-written parts"). This file keeps it from failing on times it cannot print.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The last instant humantime prints, 9999-12-31T23:59:59.999Z: past it its `Display` fails,
/// which would make `to_string` panic.
const LATEST: Duration = Duration::from_millis(253_402_300_799_999);

/// Formats `time` as RFC 3339 UTC with milliseconds; times before 1970 print as the epoch, times
/// after 9999 as its last millisecond.
pub fn rfc3339_millis(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default().min(LATEST);
    humantime::format_rfc3339_millis(UNIX_EPOCH + since_epoch).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hint::black_box;
    use std::time::Instant;

    fn at(secs: u64, millis: u64) -> String {
        rfc3339_millis(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis))
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_798_405_445, 123), "2026-12-27T21:04:05.123Z");
        assert_eq!(at(4_107_542_399, 999), "2100-02-28T23:59:59.999Z");
    }

    #[test]
    fn times_it_cannot_print_are_clamped_instead_of_panicking() {
        assert_eq!(rfc3339_millis(UNIX_EPOCH - Duration::from_secs(1)), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(253_402_300_799, 999), "9999-12-31T23:59:59.999Z");
        assert_eq!(at(253_402_300_800, 0), "9999-12-31T23:59:59.999Z");
        assert_eq!(at(1 << 40, 0), "9999-12-31T23:59:59.999Z");
    }

    /// `cargo test --release --lib timestamp -- --ignored --nocapture`: the cost of one timestamp,
    /// paid once per emergency and once per log line.
    #[test]
    #[ignore = "a timing, not a check"]
    fn time_a_million_timestamps() {
        let base = UNIX_EPOCH + Duration::from_secs(1_798_405_445);
        let start = Instant::now();
        for i in 0..1_000_000 {
            black_box(rfc3339_millis(black_box(base + Duration::from_micros(i * 1_337))));
        }
        println!("{:.1} ns per timestamp", start.elapsed().as_nanos() as f64 / 1e6);
    }
}
