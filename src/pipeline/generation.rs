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

use parking_lot::Mutex;

use super::request::Request;
use crate::broadcast::Broadcast;
use crate::cache::Key;
use crate::delivery::{Attachment, Event};
use crate::llm::AbortSignal;
use crate::protocol::{Outcome, Stage, Usage};

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
    pub cluster: super::cluster::LeadSlot,
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
            Some(super::cluster::ClusterPart::Lead(_)) => "leads cluster-wide",
            Some(super::cluster::ClusterPart::Follow { .. }) => "follows another node",
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
mod tests {
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
