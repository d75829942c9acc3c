//! Counters for `GET /metrics`, in the Prometheus text format.
//!
//! Plain `Cell` counters on the one thread; labelled families live in a small ordered map keyed
//! by static strings, so counting allocates nothing. Gauges (clients, history) are filled in by
//! whoever renders the page (the `/metrics` handler reads them from the hub): this module is a
//! leaf and knows nothing of the hub or of HTTP.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Labelled counter families: (metric name, help, label name).
const FAMILIES: &[(&str, &str, &str)] = &[
    ("resq_push_published_total", "Emergencies published, by ingest path.", "source"),
    (
        "resq_push_duplicates_total",
        "Retries recognized by their idempotency key (answered, not published again), by ingest path.",
        "source",
    ),
    ("resq_push_clients_dropped_total", "WebSocket clients the server disconnected, by reason.", "reason"),
    ("resq_push_connections_refused_total", "Connections refused at a connection limit.", "limit"),
    ("resq_push_connections_evicted_total", "Idle connections closed to make room for new ones.", "limit"),
    ("resq_push_http_responses_total", "HTTP responses, by status code.", "status"),
    ("resq_push_unix_rejections_total", "Unix-socket lines rejected, by reason.", "reason"),
    (
        "resq_push_storage_failures_total",
        "Emergencies refused because storage did not take them, by cause.",
        "cause",
    ),
    (
        "resq_push_journal_commits_total",
        "Journal transactions handed back: with emergencies (any receipts beside them), or receipts only.",
        "carrying",
    ),
    ("resq_push_acks_total", "Tablets' first acks of an emergency (repeats are not counted).", "kind"),
    ("resq_push_closes_total", "Emergencies closed by a publisher.", "kind"),
    ("resq_push_escalations_total", "Emergencies nobody acked within --ack-timeout.", "kind"),
    ("resq_push_escalation_commands_total", "--on-unacked commands run, by how they ended.", "outcome"),
];

/// Upper bounds of the publish-to-first-ack histogram, in seconds: 1 s to 5 min, around the
/// 60-80 s turnout targets of station alerting.
pub const FIRST_ACK_BUCKETS: [f64; 10] = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 90.0, 120.0, 300.0];

/// The values read from the server's state when the page is rendered.
#[derive(Debug, Default)]
pub struct Gauges {
    pub clients: usize,
    pub last_seq: u64,
    pub history_entries: usize,
    pub history_bytes: usize,
    /// Named tablets (subscribe token names), and those of them connected.
    pub tablets_expected: usize,
    pub tablets_connected: usize,
    /// `--min-subscribers`, 0 without it.
    pub min_subscribers: usize,
    pub open_emergencies: usize,
    pub open_unacked: usize,
}

#[derive(Debug)]
pub struct Metrics {
    started_at: SystemTime,
    /// The same moment on the monotonic clock: the uptime survives the wall clock jumping (a
    /// board without a real-time clock until NTP answers).
    started: Instant,
    /// Emergencies written to WebSocket clients (replay included).
    delivered: Cell<u64>,
    labelled: RefCell<BTreeMap<(&'static str, &'static str), u64>>,
    /// Publish to first ack: a count per bucket of `FIRST_ACK_BUCKETS` (not cumulative), the
    /// ones beyond the last, and the sum in seconds.
    first_ack: RefCell<([u64; FIRST_ACK_BUCKETS.len() + 1], f64)>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started_at: SystemTime::now(),
            started: Instant::now(),
            delivered: Cell::new(0),
            labelled: RefCell::default(),
            first_ack: RefCell::default(),
        }
    }
}

impl Metrics {
    pub fn started_at(&self) -> SystemTime {
        self.started_at
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn count(&self, family: &'static str, label: &'static str) {
        *self.labelled.borrow_mut().entry((family, label)).or_insert(0) += 1;
    }

    pub fn count_delivered(&self, events: u64) {
        self.delivered.set(self.delivered.get() + events);
    }

    /// An emergency's first ack came `after` its publish.
    pub fn observe_first_ack(&self, after: Duration) {
        let seconds = after.as_secs_f64();
        let bucket =
            FIRST_ACK_BUCKETS.iter().position(|bound| seconds <= *bound).unwrap_or(FIRST_ACK_BUCKETS.len());
        let mut histogram = self.first_ack.borrow_mut();
        histogram.0[bucket] += 1;
        histogram.1 += seconds;
    }

    fn render_first_ack(&self, page: &mut String) {
        let name = "resq_push_first_ack_seconds";
        let (counts, sum) = *self.first_ack.borrow();
        let _ = write!(
            page,
            "# HELP {name} Time from publish to an emergency's first ack.\n# TYPE {name} histogram\n"
        );
        let mut cumulative = 0;
        for (bound, count) in FIRST_ACK_BUCKETS.iter().zip(counts) {
            cumulative += count;
            let _ = writeln!(page, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += counts[FIRST_ACK_BUCKETS.len()];
        let _ = write!(
            page,
            "{name}_bucket{{le=\"+Inf\"}} {cumulative}\n{name}_sum {sum}\n{name}_count {cumulative}\n"
        );
    }

    /// The whole page, with the gauges as of now.
    pub fn render(&self, gauges: &Gauges) -> String {
        let started = self.started_at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let mut page = String::new();
        let roster: [(&str, &str, &str, f64); 5] = [
            (
                "resq_push_tablets_expected",
                "gauge",
                "Named tablets: the subscribe tokens' names.",
                gauges.tablets_expected as f64,
            ),
            (
                "resq_push_tablets_connected",
                "gauge",
                "Named tablets with at least one connection.",
                gauges.tablets_connected as f64,
            ),
            (
                "resq_push_min_subscribers",
                "gauge",
                "--min-subscribers (0: none).",
                gauges.min_subscribers as f64,
            ),
            (
                "resq_push_open_emergencies",
                "gauge",
                "Emergencies not closed.",
                gauges.open_emergencies as f64,
            ),
            (
                "resq_push_open_unacked",
                "gauge",
                "Open emergencies no tablet has acked.",
                gauges.open_unacked as f64,
            ),
        ];
        let gauges: [(&str, &str, &str, f64); 6] = [
            ("resq_push_clients", "gauge", "Connected WebSocket clients.", gauges.clients as f64),
            ("resq_push_last_seq", "gauge", "The last sequence number assigned.", gauges.last_seq as f64),
            (
                "resq_push_history_entries",
                "gauge",
                "Emergencies retained for catch-up.",
                gauges.history_entries as f64,
            ),
            (
                "resq_push_history_bytes",
                "gauge",
                "Bytes of emergencies retained for catch-up.",
                gauges.history_bytes as f64,
            ),
            (
                "resq_push_delivered_total",
                "counter",
                "Emergencies written to WebSocket clients.",
                self.delivered.get() as f64,
            ),
            ("resq_push_start_time_seconds", "gauge", "Start time of the process, Unix seconds.", started),
        ];
        for (name, kind, help, value) in gauges.into_iter().chain(roster) {
            let _ = write!(page, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n");
        }
        self.render_first_ack(&mut page);
        let labelled = self.labelled.borrow();
        for (family, help, label) in FAMILIES {
            let _ = write!(page, "# HELP {family} {help}\n# TYPE {family} counter\n");
            for ((_, value), count) in labelled.range((*family, "")..).take_while(|((f, _), _)| f == family) {
                let _ = writeln!(page, "{family}{{{label}=\"{value}\"}} {count}");
            }
        }
        page
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_gauges_and_labelled_counters() {
        let metrics = Metrics::default();
        metrics.count("resq_push_published_total", "unix");
        metrics.count("resq_push_published_total", "unix");
        metrics.count("resq_push_http_responses_total", "401");
        metrics.count_delivered(3);
        let page = metrics.render(&Gauges { last_seq: 7, ..Gauges::default() });
        assert!(page.contains("# TYPE resq_push_clients gauge\nresq_push_clients 0\n"), "{page}");
        assert!(page.contains("resq_push_published_total{source=\"unix\"} 2\n"), "{page}");
        assert!(page.contains("resq_push_http_responses_total{status=\"401\"} 1\n"), "{page}");
        assert!(page.contains("resq_push_delivered_total 3\n"), "{page}");
        assert!(page.contains("resq_push_last_seq 7\n"), "{page}");
        assert!(page.contains("# TYPE resq_push_unix_rejections_total counter\n"), "{page}");
    }
}
