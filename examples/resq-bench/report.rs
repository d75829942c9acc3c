//! A run's results: a table for people (metric, value, target, verdict) and a JSON object for
//! tools. Verdicts against timing targets are informative only; only correctness failures (lost,
//! duplicated or out-of-order messages, failed or dropped connections) make the run fail.

use std::fmt::Write as _;

use serde_json::{Map, Value, json};

/// Latency percentiles over a set of samples, in microseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Percentiles {
    pub count: usize,
    pub mean: f64,
    pub p50: u32,
    pub p90: u32,
    pub p99: u32,
    pub p999: u32,
    pub max: u32,
}

impl Percentiles {
    /// Sorts `samples` in place.
    pub fn of(samples: &mut [u32]) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1];
        let sum: u64 = samples.iter().map(|&s| u64::from(s)).sum();
        Percentiles {
            count: samples.len(),
            mean: sum as f64 / samples.len() as f64,
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max: samples[samples.len() - 1],
        }
    }

    pub fn json_ms(&self) -> Value {
        let ms = |us: u32| f64::from(us) / 1000.0;
        json!({
            "count": self.count, "mean": round3(self.mean / 1000.0), "p50": ms(self.p50), "p90": ms(self.p90),
            "p99": ms(self.p99), "p999": ms(self.p999), "max": ms(self.max),
        })
    }

    pub fn summary_ms(&self) -> String {
        let ms = |us: u32| f64::from(us) / 1000.0;
        format!(
            "p50 {:.2} / p90 {:.2} / p99 {:.2} / p99.9 {:.2} / max {:.2} ms (n={})",
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.p999),
            ms(self.max),
            self.count
        )
    }
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

struct Row {
    metric: String,
    value: String,
    target: String,
    verdict: &'static str,
}

/// One mode's results.
pub struct Report {
    pub mode: String,
    rows: Vec<Row>,
    /// Lines printed above the table (long values such as the server's command line).
    notes: Vec<String>,
    pub json: Map<String, Value>,
    /// Correctness failures: any makes the bench exit non-zero.
    pub failures: Vec<String>,
}

impl Report {
    pub fn new(mode: &str) -> Report {
        let mut json = Map::new();
        json.insert("mode".into(), json!(mode));
        Report { mode: mode.to_owned(), rows: Vec::new(), notes: Vec::new(), json, failures: Vec::new() }
    }

    /// A line above the table.
    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    /// A row with no target.
    pub fn info(&mut self, metric: &str, value: impl Into<String>) {
        self.rows.push(Row {
            metric: metric.into(),
            value: value.into(),
            target: String::new(),
            verdict: "",
        });
    }

    /// A row against a target: `met` says whether the value meets it (timing: informative).
    pub fn target(&mut self, metric: &str, value: impl Into<String>, target: &str, met: bool) {
        self.rows.push(Row {
            metric: metric.into(),
            value: value.into(),
            target: target.into(),
            verdict: if met { "ok" } else { "MISSED" },
        });
    }

    /// A correctness count that must be zero; non-zero is a failure of the run.
    pub fn must_be_zero(&mut self, metric: &str, count: u64) {
        self.rows.push(Row {
            metric: metric.into(),
            value: count.to_string(),
            target: "0".into(),
            verdict: if count == 0 { "ok" } else { "FAIL" },
        });
        if count > 0 {
            self.failures.push(format!("{}: {metric} = {count}", self.mode));
        }
    }

    pub fn set(&mut self, key: &str, value: Value) {
        self.json.insert(key.into(), value);
    }

    pub fn table(&self) -> String {
        let width = |f: fn(&Row) -> &str, head: &str| {
            self.rows.iter().map(|r| f(r).len()).max().unwrap_or(0).max(head.len())
        };
        let (m, v, t) =
            (width(|r| &r.metric, "metric"), width(|r| &r.value, "value"), width(|r| &r.target, "target"));
        let mut out = String::new();
        let _ = writeln!(out, "== resq-bench {} ==", self.mode);
        for note in &self.notes {
            let _ = writeln!(out, "{note}");
        }
        let _ = writeln!(out, "{:<m$}  {:<v$}  {:<t$}  verdict", "metric", "value", "target");
        let _ = writeln!(out, "{}", "-".repeat(m + v + t + 13));
        for row in &self.rows {
            let _ =
                writeln!(out, "{:<m$}  {:<v$}  {:<t$}  {}", row.metric, row.value, row.target, row.verdict);
        }
        out
    }

    pub fn to_json(&self) -> Value {
        let mut json = self.json.clone();
        json.insert("failures".into(), json!(self.failures));
        json.insert("ok".into(), json!(self.failures.is_empty()));
        Value::Object(json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranks() {
        let mut samples: Vec<u32> = (1..=1000).rev().collect();
        let p = Percentiles::of(&mut samples);
        assert_eq!((p.p50, p.p90, p.p99, p.p999, p.max), (500, 900, 990, 999, 1000));
    }
}
