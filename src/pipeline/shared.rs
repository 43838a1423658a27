//! The pipeline's shared state and the jobs that move through its pools:
//! [`Shared`] (every stage's handle on the configuration, the history,
//! the answer cache, the two slow stages, the cluster node, the metrics,
//! the singleflight and the [`Registry`]), the bounded channels between
//! the stages, the job each stage receives, and the tickets that make a
//! lost job end its request or generation instead of leaving it waiting.
//!
//! The work of a stage is a function of only what it needs:
//! [`Preparation`] and [`Streaming`] hold their own parts, and
//! [`Answers`] the cache. What moves a request from one stage to the
//! next, and ends it, is in the sibling files, each an `impl Shared` block
//! for one part of a request's life (`client`, `stages`, `ending`,
//! `cluster`, `cluster_resume`); none of them is imported here.
//!
//! Threads: one `Arc<Shared>` is held by every pool worker, the janitor,
//! the cluster's threads and every connection (through the pipeline).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::Arc;

use crossbeam_channel::Sender;
use parking_lot::RwLock;

use super::answers::Answers;
use super::cluster_node::ClusterNode;
use super::preparation::Preparation;
use super::records::{Generation, Request};
use super::registry::Registry;
use super::streaming::Streaming;
use super::work::Work;
use crate::config::Config;
use crate::history::History;
use crate::llm::Prompt;
use crate::metrics::Metrics;
use crate::protocol::{ErrorCode, Failure, Outcome};
use crate::request_key::Key;
use crate::singleflight::{Group, Leader};

pub(super) type Flights = Group<Key, Arc<Generation>, Outcome>;

/// How long a chat or `history` for a conversation waits for the previous
/// request's messages to be stored before answering `conversation_busy`.
pub(super) const STORE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

pub(super) struct Channels {
    pub(super) intake: Sender<IntakeJob>,
    pub(super) prepare: Sender<LeaderJob>,
    pub(super) follow: Sender<FollowJob>,
    pub(super) stream: Sender<StreamJob>,
}

pub(crate) struct Shared {
    pub(super) config: Arc<Config>,
    /// Where questions and answers are stored.
    pub(super) history: History,
    pub(super) answers: Answers,
    pub(super) preparation: Preparation,
    pub(super) streaming: Streaming,
    /// `None` unless `[cluster] enabled`.
    pub(super) cluster: Option<Arc<ClusterNode>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) flights: Flights,
    pub(super) registry: Registry,
    /// `None` once the pipeline shuts down.
    pub(super) channels: RwLock<Option<Channels>>,
    /// Intake slots taken: counted before the user message is queued for
    /// storage, so an `overloaded` chat leaves no trace in the history.
    pub(super) intake_reserved: AtomicUsize,
    pub(super) live_requests: AtomicUsize,
    pub(super) draining: AtomicBool,
    pub(super) next_generation: AtomicU64,
}

/// A chat that passed admission, on its way to the cache lane.
pub(super) struct IntakeJob {
    pub(super) ticket: RequestTicket,
    pub(super) work: Work,
    /// Its place in the intake queue when it was admitted, for `accepted`'s
    /// `state` frame.
    pub(super) position: usize,
    /// Its question is stored and `accepted` sent: the second pass through
    /// the cache lane (see `run_cache_lane`).
    pub(super) stored: bool,
    /// On the second pass of a hit: the answer to serve (stored already).
    pub(super) hit: Option<Arc<crate::cache::CachedAnswer>>,
}

pub(super) struct LeaderJob {
    pub(super) generation: GenTicket,
    pub(super) leader: Arc<Request>,
    pub(super) work: Work,
}

pub(super) struct StreamJob {
    pub(super) generation: GenTicket,
    pub(super) prompt: Prompt,
    /// The conversation, for the tools that read it; `None` when the model
    /// is offered no tools (a prompt the client brought whole).
    pub(super) conversation: Option<String>,
}

pub(super) struct FollowJob {
    pub(super) ticket: RequestTicket,
    pub(super) generation: Arc<Generation>,
    /// To lead a new generation if this one was dropped for lack of interest
    /// before the follower could join it.
    pub(super) work: Work,
}

/// Ownership of a request that has not been handed to a generation yet.
/// Dropping it unhandled (a bug, a panic) still ends the request.
pub(super) struct RequestTicket {
    pub(super) shared: Arc<Shared>,
    pub(super) request: Option<Arc<Request>>,
}

impl RequestTicket {
    pub(super) fn request(&self) -> &Arc<Request> {
        // Present until `release`, which consumes the ticket.
        self.request.as_ref().expect("ticket holds its request")
    }

    pub(super) fn release(mut self) -> Arc<Request> {
        self.request.take().expect("ticket holds its request")
    }
}

impl Drop for RequestTicket {
    fn drop(&mut self) {
        if let Some(request) = self.request.take() {
            let failure = Failure::new(
                ErrorCode::Internal,
                "the request was lost inside the server",
            );
            self.shared
                .end_request(&request, |_, _| Some((Err(failure), "".into(), 0)));
        }
    }
}

/// Ownership of a generation moving through the stages, with its
/// singleflight leadership. Dropping it before the generation is over (a
/// bug, a panic) fails the generation, so no member waits forever.
pub(super) struct GenTicket {
    pub(super) shared: Arc<Shared>,
    pub(super) generation: Arc<Generation>,
    pub(super) leader: Option<Leader<Key, Arc<Generation>, Outcome>>,
}

impl Drop for GenTicket {
    fn drop(&mut self) {
        if !self.generation.is_over() {
            let failure = Failure::new(
                ErrorCode::Internal,
                "the generation was lost inside the server",
            );
            self.shared
                .finish_generation(&self.generation, Err(failure));
        }
        // Read the outcome first: completing takes the singleflight's lock,
        // which must not be taken under the generation's.
        let outcome = self.generation.state.lock().outcome.clone();
        if let (Some(leader), Some(outcome)) = (self.leader.take(), outcome) {
            leader.complete(outcome);
        }
    }
}

impl Shared {
    pub(super) fn channels(&self) -> Option<parking_lot::RwLockReadGuard<'_, Option<Channels>>> {
        let guard = self.channels.read();
        guard.is_some().then_some(guard)
    }
}
