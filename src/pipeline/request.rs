//! One accepted chat request: who is attached to it, where its tokens come
//! from, and how it ended.
//!
//! Threads: created by a connection thread; then read and changed by the
//! pipeline workers that move it along, by connection threads that cancel or
//! resume it, by the janitor, and finally by the history writer thread that
//! completes it. All mutable state sits behind one mutex per request. Lock
//! order: a request's lock may be held while taking a broadcast's lock, never
//! the other way round.

use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use super::generation::Generation;
use crate::cache::CachedAnswer;
use crate::delivery::Attachment;
use crate::protocol::{Outcome, Role, Timings, Usage};

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
