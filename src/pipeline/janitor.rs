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
//! - finished requests are forgotten after `replay_window_ms`, and when
//!   that leaves nothing running, free memory is handed back to the OS
//!   ([`crate::memory`]);
//! - `accepted` frames left for the next write to carry
//!   ([`crate::outbox::Outbox::push_deferred`]) are released.
//!
//! It works on snapshots (`Arc` clones taken under a brief read lock), so it
//! never holds the active map while ending anything.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::generation::GenOutcome;
use super::request::Phase;
use super::Shared;
use crate::protocol::{ErrorCode, Failure, Stage};

pub(super) fn run(shared: &Arc<Shared>) {
    let t = &shared.config.timeouts;
    let interval = Duration::from_millis(t.janitor_interval_ms.max(1));
    // The pipeline drops its channels on shutdown; that is the janitor's stop signal.
    while shared.channels.read().is_some() {
        std::thread::sleep(interval);
        sweep(shared, Instant::now());
    }
}

fn sweep(shared: &Arc<Shared>, now: Instant) {
    let t = &shared.config.timeouts;
    let ms = Duration::from_millis;
    let (requests, generations): (Vec<_>, Vec<_>) = {
        let active = shared.active.read();
        (
            active.live.values().cloned().collect(),
            active.generations.values().cloned().collect(),
        )
    };
    for request in requests {
        let phase = {
            let st = request.state.lock();
            // Frames deferred by a connection thread wait at most one tick.
            for a in &st.attachments {
                a.outbox.release_deferred();
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
    let window = ms(t.replay_window_ms);
    let expired = {
        let active = shared.active.read();
        active
            .finished
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > window)
    };
    if expired {
        let mut forgot = 0;
        let running = {
            let mut active = shared.active.write();
            while let Some((at, _)) = active.finished.front() {
                if now.duration_since(*at) <= window {
                    break;
                }
                if let Some((_, id)) = active.finished.pop_front() {
                    active.requests.remove(&id);
                    forgot += 1;
                }
            }
            active.live.len() + active.generations.len()
        };
        // The last answers of a burst are gone: give their memory back.
        crate::memory::idle_after_forgetting(forgot, running);
    }
    for generation in generations {
        let (stage, since, members, orphaned_since) = {
            let st = generation.state.lock();
            if st.outcome.is_some() {
                continue;
            }
            (st.stage, st.since, st.members.clone(), st.orphaned_since)
        };
        let timeout = |message: String| {
            GenOutcome::Failed(Failure::new(ErrorCode::ProcessingTimeout, message))
        };
        let verdict = match stage {
            Stage::Queued | Stage::WaitingStream if now.duration_since(since) > ms(t.queue_ms) => {
                Some(GenOutcome::Failed(Failure::new(
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
            shared.finish_generation(&generation, GenOutcome::Cancelled);
        } else {
            match orphaned_since {
                None => generation.state.lock().orphaned_since = Some(now),
                Some(t0) if now.duration_since(t0) >= ms(t.orphan_grace_ms) => {
                    shared.finish_generation(&generation, GenOutcome::Cancelled);
                }
                Some(_) => {}
            }
        }
    }
}
