//! The two records everything in the pipeline revolves around, which
//! refer to each other and so live together: a [`Request`] and the
//! [`Generation`] it receives.
//!
//! # Request
//!
//! One accepted chat request: who is attached to it, where its tokens come
//! from, and how it ended.
//!
//! Threads: created by a connection thread; then read and changed by the
//! pipeline workers that move it along, by connection threads that cancel or
//! resume it, by the janitor, and finally by the history writer thread that
//! completes it. All mutable state sits behind one mutex per request. Lock
//! order: a request's lock may be held while taking a broadcast's lock, never
//! the other way round.
//!
//! # Generation
//!
//! One upstream generation and the requests sharing it.
//!
//! Threads: the leader's job carries it from the cache lane to a preparation
//! worker and then to a streaming worker; follower workers join requests to
//! it; connection threads cancel members; the janitor reads its stage and
//! fails it on timeouts. `state` is one mutex; the broadcast has its own.
//! Lock order: a generation's `state` is never held while taking a request's
//! lock or the broadcast's lock, except where noted at the call.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use super::cluster_part::LeadSlot;
use crate::broadcast::Broadcast;
use crate::cache::CachedAnswer;
use crate::delivery::{Attachment, Event};
use crate::llm::AbortSignal;
use crate::protocol::{Outcome, Role, Stage, Timings, Usage};
use crate::request_key::Key;

/// Where a request's tokens come from.
#[derive(Clone)]
pub(crate) enum Source {
    /// A live or finished generation (leader or follower).
    Generation(Arc<Generation>),
    /// A cached answer.
    Cached(Arc<CachedAnswer>),
}

/// How a request ended, kept for `resume` during the replay window.
#[derive(Debug, Clone)]
pub(crate) struct End {
    pub result: Outcome,
    pub tokens: u64,
    pub timings: Timings,
    /// What the generation cost upstream, as reported (whatever the role).
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Waiting in the intake or follower queue.
    Queued { since: Instant },
    /// Attached to a generation, or being served from the cache.
    Running,
    /// Its end is decided and its answer is being stored.
    Finishing,
    /// Over; kept only so `resume` can replay it.
    Finished { at: Instant },
}

pub(crate) struct RequestState {
    pub phase: Phase,
    pub role: Option<Role>,
    pub attachments: Vec<Arc<Attachment>>,
    pub source: Option<Source>,
    /// When it left the queues.
    pub dequeued_at: Option<Instant>,
    /// When a follower joined its generation (its first token cannot predate this).
    pub joined_at: Option<Instant>,
    pub end: Option<End>,
    /// `accepted` went out: only once the user's message is stored, because
    /// `accepted` promises it is (see `Shared::announce`). An end before
    /// that is told as a refusal of the chat, not of a request. A stand-in
    /// for a request accepted on another node starts announced.
    pub announced: bool,
    /// For a request resumed from another node while its record is looked
    /// up: the `seq` to replay from (the latest `resume` wins).
    pub resume_from: u64,
    /// Its connection closed while its tokens were nowhere another node
    /// could find them (it was still queued, or runs on a generation led
    /// alone): its resume record is written as soon as they are, when it
    /// joins a generation that has a stream or when it ends.
    pub handover_pending: bool,
}

/// One chat request. Share it as `Arc<Request>`.
pub(crate) struct Request {
    pub id: Arc<str>,
    pub client_id: String,
    pub conversation: String,
    /// The model it asked for (after the default); empty for a stand-in
    /// of a request another node accepted.
    pub model: String,
    pub accepted_at: Instant,
    /// Accepted by another node of the cluster and resumed here: this node
    /// only relays it (no history, no conversation, not counted as live).
    pub remote: bool,
    /// Brought its whole prompt (the HTTP API): no conversation, nothing
    /// stored, `accepted` as soon as it is admitted.
    pub stateless: bool,
    pub state: Mutex<RequestState>,
    /// Notified when the request's messages are stored (phase `Finished`).
    pub stored: Condvar,
}

impl Request {
    pub fn new(client_id: String, conversation: String, model: String) -> Arc<Request> {
        Request::build(
            crate::protocol::random_id("r-").into(),
            client_id,
            conversation,
            model,
            false,
            false,
        )
    }

    /// A request that brings its whole prompt (see [`Request::stateless`]).
    pub fn stateless(client_id: String, model: String) -> Arc<Request> {
        Request::build(
            crate::protocol::random_id("r-").into(),
            client_id,
            String::new(),
            model,
            false,
            true,
        )
    }

    /// The local stand-in of request `id`, accepted by another node and
    /// resumed here (see [`Request::remote`]).
    pub fn resumed(id: &str, from: u64) -> Arc<Request> {
        let request = Request::build(
            id.into(),
            String::new(),
            String::new(),
            String::new(),
            true,
            false,
        );
        request.state.lock().resume_from = from;
        request
    }

    fn build(
        id: Arc<str>,
        client_id: String,
        conversation: String,
        model: String,
        remote: bool,
        stateless: bool,
    ) -> Arc<Request> {
        let now = Instant::now();
        Arc::new(Request {
            id,
            client_id,
            conversation,
            model,
            accepted_at: now,
            remote,
            stateless,
            state: Mutex::new(RequestState {
                phase: Phase::Queued { since: now },
                role: None,
                attachments: Vec::new(),
                source: None,
                dequeued_at: None,
                joined_at: None,
                end: None,
                announced: remote,
                resume_from: 0,
                handover_pending: false,
            }),
            stored: Condvar::new(),
        })
    }

    /// Waits until the request's messages are stored, at most `timeout`;
    /// true when they are. What blocks it: the history writer not having
    /// committed yet; what wakes it: `complete_request`.
    pub fn wait_stored(&self, timeout: std::time::Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock();
        while !matches!(st.phase, Phase::Finished { .. }) {
            if self.stored.wait_until(&mut st, deadline).timed_out() {
                return matches!(st.phase, Phase::Finished { .. });
            }
        }
        true
    }

    /// True once its end is decided.
    pub fn is_ending(&self) -> bool {
        matches!(
            self.state.lock().phase,
            Phase::Finishing | Phase::Finished { .. }
        )
    }

    /// Timings as of now, from what the request recorded.
    pub fn timings(
        &self,
        st: &RequestState,
        prepare_ms: f64,
        first_token: Option<Instant>,
    ) -> Timings {
        let ms = |t: Instant| t.saturating_duration_since(self.accepted_at).as_secs_f64() * 1000.0;
        let now = Instant::now();
        let first_token = match (first_token, st.joined_at) {
            (Some(t), Some(joined)) => Some(t.max(joined)),
            (t, _) => t,
        };
        Timings {
            queue_ms: round(ms(st.dequeued_at.unwrap_or(now))),
            prepare_ms: round(prepare_ms),
            ttft_ms: first_token.map(|t| round(ms(t))),
            total_ms: round(ms(now)),
        }
    }
}

/// Milliseconds with three decimals: microsecond resolution is plenty and
/// keeps frames short.
pub(crate) fn round(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

pub(crate) struct GenState {
    pub stage: Stage,
    /// When `stage` was entered.
    pub since: Instant,
    /// Requests that receive this generation and have not ended yet.
    pub members: Vec<Arc<Request>>,
    /// Set exactly once; from then on the generation is over.
    pub outcome: Option<Outcome>,
    /// Since when no member has had a live attachment.
    pub orphaned_since: Option<Instant>,
    pub prepare_ms: f64,
    /// False once a tool whose result changes over time (the clock) went
    /// into the answer: it must not be cached.
    pub cacheable: bool,
    /// A generation claimed in the singleflight is visible to identical
    /// requests, which follow it, before its leader is a member (`lead`
    /// first claims the key cluster-wide). Until the leader joins, the
    /// generation is wanted by it: a follower that leaves meanwhile must not
    /// find it unwanted and end it under its leader.
    pub leader_pending: bool,
    /// What the upstream reported the rounds so far cost, if it did.
    pub usage: Option<Usage>,
}

/// A generation; share it as `Arc<Generation>`.
pub(crate) struct Generation {
    pub id: u64,
    /// The identical-request key (for the cache write).
    pub key: Key,
    /// True when registered in the singleflight (false for `fresh` requests).
    pub shared: bool,
    pub broadcast: Arc<Broadcast<Attachment>>,
    pub abort: AbortSignal,
    pub created_at: Instant,
    /// Followers claimed but not yet joined by a follower worker; they keep
    /// the generation wanted while they wait.
    pub pending_followers: AtomicUsize,
    pub state: Mutex<GenState>,
    /// Set when this generation leads cluster-wide (`[cluster]`).
    pub cluster: LeadSlot,
    /// The cluster token of its Redis stream (its own when it leads
    /// cluster-wide, the leader's when it follows another node); kept after
    /// the end, for the resume records of its requests.
    pub stream: std::sync::OnceLock<String>,
}

impl Generation {
    /// What the log says of this generation when something it holds is
    /// found stuck: enough to tell which path lost it.
    pub fn describe(&self) -> String {
        let st = self.state.lock();
        let cluster = match &*self.cluster.lock() {
            Some(super::cluster_part::ClusterPart::Lead(_)) => "leads cluster-wide",
            Some(super::cluster_part::ClusterPart::Follow { .. }) => "follows another node",
            None => "local",
        };
        format!(
            "generation {} ({cluster}, stream {:?}): stage {:?} for {:?}, over {}, {} members, \
             {} pending followers, {} tokens, age {:?}",
            self.id,
            self.stream.get(),
            st.stage,
            st.since.elapsed(),
            st.outcome.is_some(),
            st.members.len(),
            self.pending_followers
                .load(std::sync::atomic::Ordering::Acquire),
            self.broadcast.token_count(),
            self.created_at.elapsed(),
        )
    }

    pub fn new(id: u64, key: Key, shared: bool) -> Arc<Generation> {
        let now = Instant::now();
        Arc::new(Generation {
            id,
            key,
            shared,
            broadcast: Broadcast::new(),
            abort: AbortSignal::new(),
            created_at: now,
            pending_followers: AtomicUsize::new(0),
            state: Mutex::new(GenState {
                stage: Stage::Queued,
                since: now,
                members: Vec::new(),
                outcome: None,
                orphaned_since: None,
                prepare_ms: 0.0,
                cacheable: true,
                leader_pending: shared,
                usage: None,
            }),
            cluster: Mutex::new(None),
            stream: std::sync::OnceLock::new(),
        })
    }

    pub fn is_over(&self) -> bool {
        self.state.lock().outcome.is_some()
    }

    pub fn prepare_ms(&self) -> f64 {
        self.state.lock().prepare_ms
    }

    /// Moves to `stage` and tells every attached client, each with its own
    /// request id. `position` is the queue position for `queued` and
    /// `waiting_stream`.
    pub fn set_stage(&self, stage: Stage, position: Option<usize>) {
        {
            let mut st = self.state.lock();
            if st.outcome.is_some() {
                return;
            }
            st.stage = stage;
            st.since = Instant::now();
        }
        self.broadcast
            .for_each_subscriber(|a| a.send(&[Event::State { stage, position }]));
    }

    /// Restarts the clock of the current stage without telling anyone: a
    /// tool round is progress, so the janitor's idle timeout counts from
    /// its end.
    pub fn mark_progress(&self) {
        self.state.lock().since = Instant::now();
    }

    /// Sends a `tool` frame (a call, a piece of output, a result) to every
    /// request attached to this generation.
    pub fn tool_frame(&self, name: &str, phase: &str, text: &str) {
        self.broadcast
            .for_each_subscriber(|a| a.send(&[Event::Tool { name, phase, text }]));
    }

    /// Removes `request` from the members; true when it was one.
    pub fn leave(&self, request: &Arc<Request>) -> bool {
        let mut st = self.state.lock();
        let before = st.members.len();
        st.members.retain(|m| !Arc::ptr_eq(m, request));
        st.members.len() != before
    }

    /// True when no request wants this generation any more: no member, no
    /// leader about to join and no follower waiting to join.
    pub fn is_unwanted(&self) -> bool {
        let st = self.state.lock();
        st.members.is_empty()
            && !st.leader_pending
            && self.pending_followers.load(Ordering::Acquire) == 0
    }
}

#[cfg(test)]
mod generation_tests {
    use super::*;

    /// A follower of a generation claimed in the singleflight can cancel
    /// while the leader is still claiming the key cluster-wide: finding the
    /// generation unwanted then ended it under its leader, which joined a
    /// finished generation and was never ended (seen in two-node chaos
    /// runs as requests stuck at `seq` 0).
    #[test]
    fn a_claimed_generation_is_wanted_until_its_leader_joins() {
        let claimed = Generation::new(1, [7; 32], true);
        assert!(!claimed.is_unwanted());
        // What `lead` does when the leader joins; the leader then leaves.
        claimed.state.lock().leader_pending = false;
        assert!(claimed.is_unwanted());
        // A `fresh` generation is nobody else's: no leader pending.
        assert!(Generation::new(2, [7; 32], false).is_unwanted());
    }
}
