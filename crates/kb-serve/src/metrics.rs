//! Prometheus metrics, kept in memory and rendered as the text exposition format on `/metrics`.
//!
//! A handful of fixed series do not justify a metrics framework: counters are atomics, histograms
//! are small bucket arrays behind a mutex, and labels come from a fixed set (route, status).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Bucket bounds of the request latency histogram, in seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Bucket bounds of the batch size histogram, in queries.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// A cumulative histogram with fixed buckets.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one observation.
    pub fn observe(&mut self, v: f64) {
        for (bound, c) in self.bounds.iter().zip(self.counts.iter_mut()) {
            if v <= *bound {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// Gauges the server samples when `/metrics` is read (they live with what they measure: the
/// queue and the concurrency limit).
#[derive(Debug, Clone, Copy, Default)]
pub struct Sampled {
    /// Keyword requests waiting for the model (queued or being gathered into a batch).
    pub queue_depth: usize,
    /// Keyword requests being handled (parsing, queued or generating).
    pub in_flight: usize,
}

/// All server metrics.
#[derive(Debug)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    batch_size: Mutex<Histogram>,
    inference: Mutex<Histogram>,
    generated_tokens: AtomicU64,
    queries: AtomicU64,
    dropped: AtomicU64,
    connections: AtomicU64,
    open_connections: AtomicU64,
    header_timeouts: AtomicU64,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::default(),
            latency: Mutex::default(),
            batch_size: Mutex::new(Histogram::new(BATCH_BUCKETS)),
            inference: Mutex::new(Histogram::new(LATENCY_BUCKETS)),
            generated_tokens: AtomicU64::new(0),
            queries: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            open_connections: AtomicU64::new(0),
            header_timeouts: AtomicU64::new(0),
            ready: AtomicBool::new(false),
        }
    }
}

/// An open connection, counted in `kb_open_connections` until dropped.
#[derive(Debug)]
pub struct OpenConnection(Arc<Metrics>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it (metrics stay usable).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    /// Records a finished HTTP request.
    pub fn record_request(&self, route: &str, status: u16, latency: Duration) {
        *lock(&self.requests)
            .entry((route.to_string(), status))
            .or_insert(0) += 1;
        lock(&self.latency)
            .entry(route.to_string())
            .or_insert_with(|| Histogram::new(LATENCY_BUCKETS))
            .observe(latency.as_secs_f64());
    }

    /// Records one batched generation of `size` queries that produced `tokens` tokens.
    pub fn record_batch(&self, size: usize, tokens: usize, took: Duration) {
        lock(&self.batch_size).observe(size as f64);
        lock(&self.inference).observe(took.as_secs_f64());
        self.generated_tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
        self.queries.fetch_add(size as u64, Ordering::Relaxed);
    }

    /// Records a queued request dropped before or during generation (timed out, or abandoned
    /// by its client).
    pub fn record_dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Records an accepted connection; it counts as open until the guard is dropped.
    pub fn open_connection(self: &Arc<Self>) -> OpenConnection {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.open_connections.fetch_add(1, Ordering::Relaxed);
        OpenConnection(self.clone())
    }

    /// Records a connection closed for not sending a complete request head in time.
    pub fn record_header_timeout(&self) {
        self.header_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// Marks the model as loaded and warm.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// A copy of the batch size histogram.
    pub fn batch_sizes(&self) -> Histogram {
        lock(&self.batch_size).clone()
    }

    /// The Prometheus text exposition of every metric, with the gauges the caller sampled.
    pub fn render(&self, sampled: &Sampled) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP kb_requests_total HTTP requests by route and status.\n");
        out.push_str("# TYPE kb_requests_total counter\n");
        for ((route, status), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "kb_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }
        out.push_str("# HELP kb_request_duration_seconds HTTP request latency by route.\n");
        out.push_str("# TYPE kb_request_duration_seconds histogram\n");
        for (route, h) in lock(&self.latency).iter() {
            h.render(
                &mut out,
                "kb_request_duration_seconds",
                &format!("route=\"{}\"", escape(route)),
            );
        }
        out.push_str("# HELP kb_batch_size Queries per batched generation.\n");
        out.push_str("# TYPE kb_batch_size histogram\n");
        lock(&self.batch_size).render(&mut out, "kb_batch_size", "");
        out.push_str("# HELP kb_inference_duration_seconds Time of one batched generation.\n");
        out.push_str("# TYPE kb_inference_duration_seconds histogram\n");
        lock(&self.inference).render(&mut out, "kb_inference_duration_seconds", "");
        let gauges: [(&str, &str, &str, u64); 9] = [
            (
                "kb_queue_depth",
                "gauge",
                "Keyword requests waiting for the model.",
                sampled.queue_depth as u64,
            ),
            (
                "kb_keyword_requests_in_flight",
                "gauge",
                "Keyword requests being handled (parsing, queued or generating).",
                sampled.in_flight as u64,
            ),
            (
                "kb_open_connections",
                "gauge",
                "Client connections being served (at most --max_connections).",
                self.open_connections.load(Ordering::Relaxed),
            ),
            (
                "kb_connections_total",
                "counter",
                "Client connections accepted.",
                self.connections.load(Ordering::Relaxed),
            ),
            (
                "kb_header_timeouts_total",
                "counter",
                "Connections closed for not sending a complete request head within --header_timeout_ms (idle keep-alive connections included).",
                self.header_timeouts.load(Ordering::Relaxed),
            ),
            (
                "kb_generated_tokens_total",
                "counter",
                "Tokens generated (per query, excluding the decoder start token).",
                self.generated_tokens.load(Ordering::Relaxed),
            ),
            (
                "kb_queries_total",
                "counter",
                "Queries run through the model.",
                self.queries.load(Ordering::Relaxed),
            ),
            (
                "kb_dropped_requests_total",
                "counter",
                "Requests dropped before or during generation (timed out or client gone).",
                self.dropped.load(Ordering::Relaxed),
            ),
            (
                "kb_model_ready",
                "gauge",
                "1 once the model is loaded and warm.",
                self.ready.load(Ordering::Relaxed) as u64,
            ),
        ];
        for (name, kind, help, v) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
        out
    }
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_histograms() {
        let m = Metrics::default();
        m.record_request("/v1/keywords", 200, Duration::from_millis(30));
        m.record_request("/v1/keywords", 200, Duration::from_millis(300));
        m.record_request("/v1/keywords", 422, Duration::from_millis(1));
        m.record_batch(3, 12, Duration::from_millis(50));
        let text = m.render(&Sampled {
            in_flight: 2,
            ..Sampled::default()
        });
        assert!(
            text.contains("kb_requests_total{route=\"/v1/keywords\",status=\"200\"} 2"),
            "{text}"
        );
        assert!(text.contains("kb_requests_total{route=\"/v1/keywords\",status=\"422\"} 1"));
        assert!(text
            .contains("kb_request_duration_seconds_bucket{route=\"/v1/keywords\",le=\"0.05\"} 2"));
        assert!(text
            .contains("kb_request_duration_seconds_bucket{route=\"/v1/keywords\",le=\"+Inf\"} 3"));
        assert!(text.contains("kb_batch_size_bucket{le=\"2\"} 0"));
        assert!(text.contains("kb_batch_size_bucket{le=\"4\"} 1"));
        assert!(text.contains("kb_batch_size_count 1"));
        assert!(text.contains("kb_generated_tokens_total 12"));
        assert!(text.contains("kb_keyword_requests_in_flight 2"));
        assert!(text.contains("kb_model_ready 0"));
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(escape("a\"b\\c\n"), "a\\\"b\\\\c\\n");
    }
}
