//! `/metrics` in Prometheus' text format: requests by route and status, tokens in and out,
//! latency histograms, and each loaded model's queue, running sequences and KV blocks
//! (what a gateway balances on).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A cumulative histogram with fixed bounds (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, plus +Inf.
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds.iter().position(|&b| secs <= b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut total = 0;
        for (i, c) in self.counts.iter().enumerate() {
            total += c.load(Ordering::Relaxed);
            let le = self.bounds.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {total}");
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {total}");
    }
}

const TTFT_BOUNDS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const TPOT_BOUNDS: &[f64] = &[0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5];
const DURATION_BOUNDS: &[f64] = &[0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// Server-wide counters, shared by every HTTP thread.
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub time_to_first_token: Histogram,
    pub time_per_output_token: Histogram,
    request_duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::default(),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            time_to_first_token: Histogram::new(TTFT_BOUNDS),
            time_per_output_token: Histogram::new(TPOT_BOUNDS),
            request_duration: Histogram::new(DURATION_BOUNDS),
        }
    }
}

/// One loaded model's live figures.
pub struct ModelGauges {
    pub name: String,
    pub waiting: usize,
    pub running: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_free: usize,
}

/// The route label of a path: a known route, or "other" (keeps the label set bounded
/// whatever paths clients send).
pub fn route_label(path: &str) -> &'static str {
    const ROUTES: &[&str] = &[
        "/",
        "/api/version",
        "/api/tags",
        "/api/ps",
        "/api/show",
        "/api/copy",
        "/api/delete",
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/api/embeddings",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/metrics",
    ];
    match ROUTES.iter().find(|&&r| r == path) {
        Some(r) => r,
        None if path.starts_with("/v1/models/") => "/v1/models/{model}",
        None => "other",
    }
}

impl Metrics {
    /// Counts a finished request.
    pub fn request(&self, path: &str, status: u16, took: Duration) {
        *self.requests.lock().unwrap_or_else(|e| e.into_inner()).entry((route_label(path), status)).or_default() += 1;
        self.request_duration.observe(took);
    }

    pub fn render(&self, models: &[ModelGauges]) -> String {
        let mut out = String::new();
        out.push_str("# HELP turbine_requests_total HTTP requests answered, by route and status.\n");
        out.push_str("# TYPE turbine_requests_total counter\n");
        for ((route, status), n) in self.requests.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "turbine_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
        }
        for (name, help, v) in [
            ("turbine_prompt_tokens_total", "Prompt tokens admitted.", &self.prompt_tokens),
            ("turbine_generation_tokens_total", "Tokens generated.", &self.generated_tokens),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Ordering::Relaxed));
        }
        self.time_to_first_token.render(
            &mut out,
            "turbine_time_to_first_token_seconds",
            "From a generation request's arrival to its first generated token.",
        );
        self.time_per_output_token.render(
            &mut out,
            "turbine_time_per_output_token_seconds",
            "Time between generated tokens of one request.",
        );
        self.request_duration.render(
            &mut out,
            "turbine_request_duration_seconds",
            "Whole requests, first byte in to last byte out.",
        );
        let _ = writeln!(
            out,
            "# HELP turbine_models_loaded Models in memory.\n# TYPE turbine_models_loaded gauge\nturbine_models_loaded {}",
            models.len()
        );
        let gauges: [(&str, &str, fn(&ModelGauges) -> usize); 4] = [
            ("turbine_requests_waiting", "Requests queued for a model, not yet running.", |m| m.waiting),
            ("turbine_requests_running", "Sequences in a model's running batch.", |m| m.running),
            ("turbine_kv_blocks_used", "KV cache blocks holding tokens.", |m| m.kv_blocks_used),
            ("turbine_kv_blocks_free", "KV cache blocks free.", |m| m.kv_blocks_free),
        ];
        for (name, help, get) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for m in models {
                let _ = writeln!(out, "{name}{{model=\"{}\"}} {}", escape_label(&m.name), get(m));
            }
        }
        out
    }
}

/// Prometheus label escaping: backslash, double quote and newline.
fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.request("/api/chat", 200, Duration::from_millis(30));
        m.request("/api/chat", 200, Duration::from_millis(40));
        m.request("/no/such/path", 404, Duration::from_millis(1));
        m.time_to_first_token.observe(Duration::from_millis(70));
        m.generated_tokens.fetch_add(5, Ordering::Relaxed);
        let gauges =
            ModelGauges { name: "a\"b".into(), waiting: 2, running: 3, kv_blocks_used: 10, kv_blocks_free: 90 };
        let text = m.render(&[gauges]);
        assert!(text.contains("turbine_requests_total{route=\"/api/chat\",status=\"200\"} 2\n"));
        assert!(text.contains("turbine_requests_total{route=\"other\",status=\"404\"} 1\n"));
        assert!(text.contains("turbine_time_to_first_token_seconds_bucket{le=\"0.05\"} 0\n"));
        assert!(text.contains("turbine_time_to_first_token_seconds_bucket{le=\"0.1\"} 1\n"));
        assert!(text.contains("turbine_time_to_first_token_seconds_bucket{le=\"+Inf\"} 1\n"));
        assert!(text.contains("turbine_generation_tokens_total 5\n"));
        assert!(text.contains("turbine_requests_running{model=\"a\\\"b\"} 3\n"));
        assert!(text.contains("turbine_models_loaded 1\n"));
    }
}
