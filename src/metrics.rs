//! Counters, gauges and the time-to-first-token histogram, exposed as
//! Prometheus text on `/metrics` and summarised in `/api/stats`.
//!
//! Threads: every thread updates metrics (they are atomics, so updating is
//! cheap and lock-free); the connection thread serving `/metrics` gathers
//! them. Queue depths and pool occupancy are read from the pipeline when a
//! scrape happens rather than updated on every change.

use std::collections::VecDeque;

use parking_lot::Mutex;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::protocol::{ErrorCode, Finish, Outcome, Role};

/// The `outcome` label of a request that ended with `done` (a finish
/// other than `cancelled`).
const DONE: &str = "done";
/// The `outcome` label counted, besides its code, for every failure.
const FAILED: &str = "failed";

/// How many recent TTFT samples `/api/stats` computes percentiles over.
const TTFT_WINDOW: usize = 1024;

/// Every metric of one server.
pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections.
    pub connections: IntGauge,
    /// Requests accepted.
    pub accepted: IntCounter,
    /// Requests by role: leader, follower, cache.
    pub by_role: IntCounterVec,
    /// Requests by outcome: done, cancelled, failed, and each error code.
    pub by_outcome: IntCounterVec,
    /// Cache lookups that found an answer.
    pub cache_hits: IntCounter,
    /// Cache lookups that did not.
    pub cache_misses: IntCounter,
    /// Cache operations that failed (and were treated as misses).
    pub cache_errors: IntCounter,
    /// 1 while the cache backend is reachable, 0 during an outage.
    pub cache_backend_up: IntGauge,
    /// Generations started on the provider.
    pub upstream_calls: IntCounter,
    /// Generations aborted before their end.
    pub upstream_aborted: IntCounter,
    /// Generations that failed.
    pub upstream_failures: IntCounter,
    /// Tokens published by generations.
    pub tokens: IntCounter,
    /// Tool calls the model made (each run, or refused with an error result).
    pub tool_calls: IntCounter,
    /// Workers per stage.
    pub pool_workers: IntGaugeVec,
    /// Busy workers per stage (set at scrape time).
    pub pool_busy: IntGaugeVec,
    /// Queue depth per stage (set at scrape time).
    pub queue_depth: IntGaugeVec,
    /// Time from accept to first token, in seconds.
    pub ttft: Histogram,
    recent_ttft_ms: Mutex<VecDeque<f64>>,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let connections = IntGauge::new("chorus_connections", "Open WebSocket connections")
            .unwrap_or_else(|e| panic!("metric definition: {e}"));
        let counter = |name: &str, help: &str| {
            IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric definition: {e}"))
        };
        let accepted = counter("chorus_requests_accepted_total", "Chat requests accepted");
        let by_role = IntCounterVec::new(
            Opts::new(
                "chorus_requests_total",
                "Chat requests by the role that answered them",
            ),
            &["role"],
        )
        .unwrap_or_else(|e| panic!("metric definition: {e}"));
        let by_outcome = IntCounterVec::new(
            Opts::new(
                "chorus_request_outcomes_total",
                "Finished chat requests by outcome",
            ),
            &["outcome"],
        )
        .unwrap_or_else(|e| panic!("metric definition: {e}"));
        let cache_hits = counter("chorus_cache_hits_total", "Cache lookups that hit");
        let cache_misses = counter("chorus_cache_misses_total", "Cache lookups that missed");
        let cache_errors = counter(
            "chorus_cache_errors_total",
            "Cache operations that failed and counted as misses",
        );
        let cache_backend_up = IntGauge::new(
            "chorus_cache_backend_up",
            "1 while the cache backend is reachable, 0 during an outage",
        )
        .unwrap_or_else(|e| panic!("metric definition: {e}"));
        let upstream_calls = counter(
            "chorus_upstream_calls_total",
            "Generations started on the model provider",
        );
        let upstream_aborted = counter(
            "chorus_upstream_aborted_total",
            "Generations aborted before their end",
        );
        let upstream_failures =
            counter("chorus_upstream_failures_total", "Generations that failed");
        let tokens = counter("chorus_tokens_total", "Tokens produced by generations");
        let tool_calls = counter("chorus_tool_calls_total", "Tool calls the model made");
        let gauge_vec = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["stage"])
                .unwrap_or_else(|e| panic!("metric definition: {e}"))
        };
        let pool_workers = gauge_vec("chorus_pool_workers", "Worker threads per stage");
        let pool_busy = gauge_vec("chorus_pool_busy", "Busy worker threads per stage");
        let queue_depth = gauge_vec("chorus_queue_depth", "Jobs waiting per stage");
        let ttft = Histogram::with_opts(
            HistogramOpts::new(
                "chorus_ttft_seconds",
                "Time from accepting a chat to its first token",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
        )
        .unwrap_or_else(|e| panic!("metric definition: {e}"));
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(connections.clone()),
            Box::new(accepted.clone()),
            Box::new(by_role.clone()),
            Box::new(by_outcome.clone()),
            Box::new(cache_hits.clone()),
            Box::new(cache_misses.clone()),
            Box::new(cache_errors.clone()),
            Box::new(cache_backend_up.clone()),
            Box::new(upstream_calls.clone()),
            Box::new(upstream_aborted.clone()),
            Box::new(upstream_failures.clone()),
            Box::new(tokens.clone()),
            Box::new(tool_calls.clone()),
            Box::new(pool_workers.clone()),
            Box::new(pool_busy.clone()),
            Box::new(queue_depth.clone()),
            Box::new(ttft.clone()),
        ];
        for c in collectors {
            // Names are fixed above and unique, so registration cannot collide.
            let _ = registry.register(c);
        }
        for role in Role::ALL {
            by_role.with_label_values(&[role.as_str()]);
        }
        for outcome in [DONE, Finish::Cancelled.as_str(), FAILED] {
            by_outcome.with_label_values(&[outcome]);
        }
        Metrics {
            registry,
            connections,
            accepted,
            by_role,
            by_outcome,
            cache_hits,
            cache_misses,
            cache_errors,
            cache_backend_up,
            upstream_calls,
            upstream_aborted,
            upstream_failures,
            tokens,
            tool_calls,
            pool_workers,
            pool_busy,
            queue_depth,
            ttft,
            recent_ttft_ms: Mutex::new(VecDeque::with_capacity(TTFT_WINDOW)),
        }
    }

    /// Records one request's time to first token.
    pub fn observe_ttft_ms(&self, ms: f64) {
        self.ttft.observe(ms / 1000.0);
        let mut recent = self.recent_ttft_ms.lock();
        if recent.len() == TTFT_WINDOW {
            recent.pop_front();
        }
        recent.push_back(ms);
    }

    /// Counts a request answered in `role`.
    pub fn count_role(&self, role: Role) {
        self.by_role.with_label_values(&[role.as_str()]).inc();
    }

    /// Counts how a request ended: `done`, `cancelled`, or `failed` and its
    /// error code.
    pub fn count_outcome(&self, outcome: &Outcome) {
        match outcome {
            Ok(Finish::Cancelled) => self.count(Finish::Cancelled.as_str()),
            Ok(_) => self.count(DONE),
            Err(failure) => self.count_failure(failure.code),
        }
    }

    /// Counts a request that ended with an error `code`.
    pub fn count_failure(&self, code: ErrorCode) {
        self.count(FAILED);
        self.count(code.as_str());
    }

    fn count(&self, outcome: &str) {
        self.by_outcome.with_label_values(&[outcome]).inc();
    }

    /// Requests that ended with `done`.
    pub fn done(&self) -> u64 {
        self.by_outcome.with_label_values(&[DONE]).get()
    }

    /// Requests that ended cancelled.
    pub fn cancelled(&self) -> u64 {
        self.by_outcome
            .with_label_values(&[Finish::Cancelled.as_str()])
            .get()
    }

    /// Requests that failed, whatever the code.
    pub fn failed(&self) -> u64 {
        self.by_outcome.with_label_values(&[FAILED]).get()
    }

    /// Requests that failed with `code`.
    pub fn failures(&self, code: ErrorCode) -> u64 {
        self.by_outcome.with_label_values(&[code.as_str()]).get()
    }

    /// Requests answered in `role`.
    pub fn role(&self, role: Role) -> u64 {
        self.by_role.with_label_values(&[role.as_str()]).get()
    }

    /// The 50th and 99th percentile of recent TTFTs, in milliseconds.
    pub fn ttft_percentiles(&self) -> (f64, f64) {
        let mut samples: Vec<f64> = self.recent_ttft_ms.lock().iter().copied().collect();
        if samples.is_empty() {
            return (0.0, 0.0);
        }
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        (at(0.5), at(0.99))
    }

    /// The most recent TTFTs, oldest first, at most `n`.
    pub fn recent_ttft_ms(&self, n: usize) -> Vec<f64> {
        let recent = self.recent_ttft_ms.lock();
        recent
            .iter()
            .skip(recent.len().saturating_sub(n))
            .copied()
            .collect()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Encoding into a String only fails on invalid metric names, which are fixed here.
        let _ = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out);
        out
    }

    /// The content type of [`Metrics::render`].
    pub fn content_type() -> &'static str {
        "text/plain; version=0.0.4; charset=utf-8"
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_has_every_family_and_percentiles_work() {
        let m = Metrics::new();
        m.connections.set(3);
        m.cache_hits.inc();
        for ms in 1..=100 {
            m.observe_ttft_ms(f64::from(ms));
        }
        m.count_failure(ErrorCode::Overloaded);
        let text = m.render();
        for name in [
            "chorus_connections 3",
            "chorus_cache_hits_total 1",
            "chorus_ttft_seconds_bucket",
            "chorus_request_outcomes_total{outcome=\"overloaded\"} 1",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        let (p50, p99) = m.ttft_percentiles();
        assert_eq!((p50.round(), p99.round()), (51.0, 99.0));
        assert_eq!(m.recent_ttft_ms(2), vec![99.0, 100.0]);
    }
}
