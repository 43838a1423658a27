//! The `/api/stats` snapshot: connections, per-stage occupancy, request
//! outcomes, cache, upstream, time to first token, history and cluster, as
//! one JSON object (its shape is part of the protocol; extra fields are
//! welcome).
//!
//! Threads: built on the connection thread answering `/api/stats`, from
//! counters every other thread updates.

use std::sync::atomic::Ordering;

use super::Shared;
use crate::protocol::{ErrorCode, Role};

/// The `/api/stats` snapshot (shape fixed by the protocol; extra fields welcome).
pub(super) fn stats_json(shared: &Shared) -> serde_json::Value {
    let m = &shared.metrics;
    let stages: serde_json::Map<String, serde_json::Value> = shared
        .pipeline
        .stages()
        .into_iter()
        .map(|(name, s)| (name.to_owned(), serde_json::json!(s)))
        .collect();
    let (p50, p99) = m.ttft_percentiles();
    serde_json::json!({
        "connections": shared.open_connections.load(Ordering::Acquire),
        "stages": stages,
        "requests": {
            "accepted": m.accepted.get(),
            "leader": m.role(Role::Leader),
            "follower": m.role(Role::Follower),
            "cache": m.role(Role::Cache),
            "done": m.done(),
            "cancelled": m.cancelled(),
            "failed": m.failed(),
            "overloaded": m.failures(ErrorCode::Overloaded),
            "timed_out": m.failures(ErrorCode::QueueTimeout) + m.failures(ErrorCode::ProcessingTimeout),
            "in_flight": shared.pipeline.live_requests(),
        },
        "cache": {
            "hits": m.cache_hits.get(),
            "misses": m.cache_misses.get(),
            "entries": shared.pipeline.cache_entries(),
            "backend_up": shared.pipeline.cache_up(),
        },
        "upstream": {
            "calls": m.upstream_calls.get(),
            "aborted": m.upstream_aborted.get(),
            "failures": m.upstream_failures.get(),
            "providers": shared.pipeline.provider_stats(),
            "in_flight": shared.pipeline.generations(),
        },
        "ttft_ms": {"p50": p50, "p99": p99, "recent": m.recent_ttft_ms(60)},
        "history": {
            "pending_writes": shared.history.pending_writes(),
            "commits": shared.history.committed_batches(),
        },
        "cluster": shared.pipeline.cluster_stats(),
        "draining": shared.draining.load(Ordering::Acquire),
    })
}
