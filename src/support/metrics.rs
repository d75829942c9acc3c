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
];

/// The values read from the server's state when the page is rendered.
#[derive(Debug, Default)]
pub struct Gauges {
    pub clients: usize,
    pub last_seq: u64,
    pub history_entries: usize,
    pub history_bytes: usize,
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
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started_at: SystemTime::now(),
            started: Instant::now(),
            delivered: Cell::new(0),
            labelled: RefCell::default(),
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

    /// The whole page, with the gauges as of now.
    pub fn render(&self, gauges: &Gauges) -> String {
        let started = self.started_at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let mut page = String::new();
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
        for (name, kind, help, value) in gauges {
            let _ = write!(page, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n");
        }
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
