//! The janitor: one thread that wakes every `janitor_interval_ms` and
//! enforces what no worker can enforce on itself.
//!
//! - a request waiting in the intake or follower queue past `queue_ms`
//!   gets `queue_timeout`; so does a generation waiting for a preparation or
//!   streaming slot;
//! - a generation preparing past `prepare_ms`, streaming with no token for
//!   `stream_idle_ms`, or alive past `request_ms` fails with
//!   `processing_timeout` and its upstream call is aborted;
//! - a generation whose clients all disconnected is aborted once
//!   `orphan_grace_ms` passed with nobody resuming (unless `complete_orphans`);
//! - whatever outlives `request_ms` is reclaimed: a generation still listed
//!   although it is over is dropped from the list (it would count as in
//!   flight for ever), and a request not ended by then (its generation lost
//!   it) ends with `processing_timeout`;
//! - finished requests are forgotten after `replay_window_ms`, and when
//!   that leaves nothing running, free memory is handed back to the OS
//!   ([`crate::memory`]);
//! - `accepted` frames left for the next write to carry
//!   ([`crate::delivery::Client::send_deferred`]) are released.
//!
//! It works on snapshots (`Arc` clones taken under a brief read lock), so it
//! never holds the active map while ending anything.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::records::{Phase, Source};
use super::shared::Shared;
use crate::protocol::{ErrorCode, Failure, Finish, Stage};

pub(super) fn run(shared: &Arc<Shared>) {
    let t = &shared.config.timeouts;
    let interval = Duration::from_millis(t.janitor_interval_ms.max(1));
    // The pipeline drops its channels on shutdown; that is the janitor's stop signal.
    while shared.channels.read().is_some() {
        std::thread::sleep(interval);
        sweep(shared, Instant::now());
    }
}

pub(super) fn sweep(shared: &Arc<Shared>, now: Instant) {
    let t = &shared.config.timeouts;
    let ms = Duration::from_millis;
    let (requests, generations) = shared.registry.snapshot();
    for request in requests {
        let phase = {
            let st = request.state.lock();
            // Frames deferred by a connection thread wait at most one tick.
            for a in &st.attachments {
                a.client.release_deferred();
            }
            st.phase
        };
        if let Phase::Queued { since } = phase {
            if now.duration_since(since) > ms(t.queue_ms) {
                let failure = Failure::new(
                    ErrorCode::QueueTimeout,
                    format!("waited in the queue longer than {} ms", t.queue_ms),
                );
                // Only if it is still queued when we get its lock.
                shared.end_request(&request, |_, phase| {
                    matches!(phase, Phase::Queued { .. }).then(|| (Err(failure), "".into(), 0))
                });
            }
        }
    }
    // The last answers of a burst are gone and nothing runs: give their
    // memory back (a busy server would only take it again).
    if shared.registry.expire(now, ms(t.replay_window_ms)).idle {
        shared.history.release_memory();
        crate::memory::release();
    }
    for generation in generations {
        let (stage, since, members, orphaned_since) = {
            let st = generation.state.lock();
            if st.outcome.is_some() {
                // Over but still listed: `finish_generation` unlists it right
                // after setting the outcome, so past `request_ms` this is a
                // leak (a bug), reclaimed rather than counted for ever.
                if now.duration_since(generation.created_at) > ms(t.request_ms) {
                    drop(st);
                    log::warn!("generation {} was over but still listed", generation.id);
                    shared.registry.remove_generation(generation.id);
                }
                continue;
            }
            (st.stage, st.since, st.members.clone(), st.orphaned_since)
        };
        let timeout = |message: String| Err(Failure::new(ErrorCode::ProcessingTimeout, message));
        let verdict = match stage {
            Stage::Queued | Stage::WaitingStream if now.duration_since(since) > ms(t.queue_ms) => {
                Some(Err(Failure::new(
                    ErrorCode::QueueTimeout,
                    format!("waited for a worker longer than {} ms", t.queue_ms),
                )))
            }
            Stage::Preparing if now.duration_since(since) > ms(t.prepare_ms) => Some(timeout(
                format!("preparation took longer than {} ms", t.prepare_ms),
            )),
            Stage::Streaming => {
                let last = generation
                    .broadcast
                    .last_token_at()
                    .unwrap_or(since)
                    .max(since);
                (now.duration_since(last) > ms(t.stream_idle_ms))
                    .then(|| timeout(format!("no token for {} ms", t.stream_idle_ms)))
            }
            _ => None,
        };
        let verdict = verdict.or_else(|| {
            (now.duration_since(generation.created_at) > ms(t.request_ms))
                .then(|| timeout(format!("the request took longer than {} ms", t.request_ms)))
        });
        if let Some(outcome) = verdict {
            shared.finish_generation(&generation, outcome);
            continue;
        }
        let attached_here = members
            .iter()
            .any(|m| m.state.lock().attachments.iter().any(|a| a.is_live()));
        shared.cluster_tick(&generation, attached_here);
        if shared.config.cache.complete_orphans {
            continue;
        }
        // Orphaned: nobody is attached and nobody is about to be, on this
        // node or (for a cluster-wide leader) on any other.
        let attached = generation.pending_followers.load(Ordering::Acquire) > 0
            || attached_here
            || shared.cluster_watched(&generation);
        if attached {
            if orphaned_since.is_some() {
                generation.state.lock().orphaned_since = None;
            }
        } else if members.is_empty() {
            shared.finish_generation(&generation, Ok(Finish::Cancelled));
        } else {
            match orphaned_since {
                None => generation.state.lock().orphaned_since = Some(now),
                Some(t0) if now.duration_since(t0) >= ms(t.orphan_grace_ms) => {
                    shared.finish_generation(&generation, Ok(Finish::Cancelled));
                }
                Some(_) => {}
            }
        }
    }
    reclaim_requests(shared, now);
}

/// Ends every request still running past `request_ms` after its
/// generation had its chance to end it (generations are swept first and
/// fail their members with the same timeout): one that nothing else will
/// end, because its generation lost it, must not stay live for ever.
fn reclaim_requests(shared: &Arc<Shared>, now: Instant) {
    let limit = Duration::from_millis(shared.config.timeouts.request_ms);
    let stale = shared
        .registry
        .live()
        .into_iter()
        .filter(|r| now.duration_since(r.accepted_at) > limit);
    for request in stale {
        // Its generation should have ended it: this is a bug, and the log
        // says where it was lost.
        let what = {
            let st = request.state.lock();
            let source = match &st.source {
                Some(Source::Generation(g)) => g.describe(),
                Some(Source::Cached(_)) => "a cached answer".to_owned(),
                None => "no source".to_owned(),
            };
            format!(
                "phase {:?}, role {:?}, announced {}, {} attachments, remote {}; {source}",
                st.phase,
                st.role,
                st.announced,
                st.attachments.len(),
                request.remote
            )
        };
        log::warn!("request {} outlived request_ms ({what})", request.id);
        let failure = Failure::new(
            ErrorCode::ProcessingTimeout,
            format!("the request took longer than {} ms", limit.as_millis()),
        );
        shared.end_request(&request, |st, phase| match (&st.source, phase) {
            (Some(Source::Generation(g)), Phase::Running) => {
                let produced = g.broadcast.detach(&st.attachments);
                g.leave(&request);
                let tokens = produced.ends.len() as u64;
                Some((Err(failure), produced.text.into(), tokens))
            }
            _ => Some((Err(failure), "".into(), 0)),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::records::Generation;
    use crate::pipeline::records::Request;
    use crate::pipeline::Pipeline;

    fn pipeline(dir: &std::path::Path) -> Pipeline {
        let mut config = crate::config::Config::default();
        // The test sweeps by hand, at times of its choosing; the janitor's
        // own sweeps (real time) never reach request_ms.
        config.timeouts.request_ms = 60_000;
        config.timeouts.replay_window_ms = 1_000;
        let history = crate::history::History::open(&dir.join("chat.db"), 1).unwrap();
        let cache = Arc::new(crate::cache::MemoryCache::new(16, Duration::from_secs(60)));
        let provider = Arc::new(crate::llm::Simulated {
            first_token: Duration::from_millis(1),
            token_interval: Duration::from_millis(1),
            tokens: 1,
            token_bytes: 0,
        });
        let metrics = Arc::new(crate::metrics::Metrics::new());
        Pipeline::start(Arc::new(config), history, cache, provider, metrics).unwrap()
    }

    #[test]
    fn what_outlives_request_ms_is_reclaimed() {
        let dir = tempfile::tempdir().unwrap();
        let pipeline = pipeline(dir.path());
        let shared = pipeline.shared.clone();
        // A generation that is over but was left listed, and a request a
        // generation lost: running, but no generation's member any more.
        let leaked = Generation::new(1_000_000, [9; 32], false);
        leaked.state.lock().outcome = Some(Ok(Finish::Cancelled));
        let lost = Request::new("c1".into(), "conv".into(), "m".into());
        {
            let mut st = lost.state.lock();
            st.phase = Phase::Running;
            st.source = Some(Source::Generation(leaked.clone()));
        }
        shared.live_requests.fetch_add(1, Ordering::AcqRel);
        shared.registry.add_generation(&leaked);
        shared.registry.admit(&lost);
        // Within request_ms both are left alone.
        sweep(&shared, Instant::now());
        assert_eq!(pipeline.generations(), 1);
        assert!(!lost.is_ending());
        // Past it, both are reclaimed.
        sweep(&shared, Instant::now() + Duration::from_secs(61));
        assert_eq!(
            pipeline.generations(),
            0,
            "the over generation stayed listed"
        );
        assert!(
            lost.wait_stored(Duration::from_secs(5)),
            "the lost request never ended"
        );
        let end = lost.state.lock().end.clone().unwrap();
        assert_eq!(end.result.unwrap_err().code, ErrorCode::ProcessingTimeout);
        assert_eq!(pipeline.live_requests(), 0);
        pipeline.shutdown();
    }

    #[test]
    fn the_end_of_a_burst_gives_memory_back_once_nothing_runs() {
        let dir = tempfile::tempdir().unwrap();
        let pipeline = pipeline(dir.path());
        let shared = pipeline.shared.clone();
        let window = Duration::from_millis(shared.config.timeouts.replay_window_ms);
        // A burst: 5,000 finished requests in the replay window.
        for i in 0..5_000 {
            let request = Request::new(format!("c{i}"), "conv".into(), "m".into());
            shared.registry.admit(&request);
            shared.registry.finish(&request);
        }
        assert!(shared.registry.capacity() >= 5_000);
        // One request still running: the window passes, the burst is
        // forgotten, but nothing is released (a busy server would only grow
        // the maps again).
        let running = Request::new("running".into(), "other".into(), "m".into());
        shared.registry.admit(&running);
        let releases = crate::memory::releases();
        sweep(&shared, Instant::now() + window + Duration::from_secs(1));
        assert_eq!(
            shared.registry.requests(),
            1,
            "only the running one is left"
        );
        // (A hash map that removed entries reports a little less capacity,
        // but keeps its table.)
        assert!(shared.registry.capacity() >= 5_000);
        assert_eq!(crate::memory::releases(), releases, "released while busy");
        // Nothing running: the next burst's end gives the capacity back.
        shared.registry.finish(&running);
        sweep(&shared, Instant::now() + window + Duration::from_secs(1));
        assert!(
            shared.registry.capacity() < 64,
            "{}",
            shared.registry.capacity()
        );
        assert!(
            crate::memory::releases() > releases,
            "not released when idle"
        );
        pipeline.shutdown();
    }
}
