//! A generation's part in the cluster, kept in the generation itself: it
//! leads cluster-wide (its stream writer, the tokens not yet written, its
//! lease's renewal) or follows another node's generation. What to do with
//! it is `cluster`'s business; this file only holds it, so that the
//! generation's record does not depend on the cluster's policy.
//!
//! Threads: behind the generation's `cluster` mutex; the streaming thread
//! appends between two tokens, the janitor flushes and renews, whoever
//! ends the generation takes it.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::cluster_writer::{Write, Writes};
use crate::cluster::stream::StreamWriter;

/// Tokens buffered before the stream is written anyway.
const BATCH_TOKENS: usize = 16;
/// Longest a token waits in the buffer when more keep coming.
const BATCH_DELAY: Duration = Duration::from_millis(10);

/// A local generation that leads cluster-wide.
pub(crate) struct ClusterLead {
    pub token: String,
    pub writer: Arc<StreamWriter>,
    pub pending: Vec<String>,
    pub last_flush: Instant,
    pub last_renew: Instant,
    /// Set when a batch was lost: the stream has a gap, so it is ended with
    /// an error instead of fed further.
    pub broken: Arc<AtomicBool>,
}

impl ClusterLead {
    /// Buffers one token. Tokens that come faster than `BATCH_DELAY`
    /// share a round trip; the janitor's [`ClusterLead::flush_if_due`]
    /// writes what a pause would otherwise leave behind.
    pub fn append(&mut self, token: &str, writes: &Writes) {
        self.pending.push(token.to_owned());
        if self.pending.len() >= BATCH_TOKENS || self.last_flush.elapsed() >= BATCH_DELAY {
            self.flush(writes);
        }
    }

    /// Writes the buffer if its oldest token may have waited `BATCH_DELAY`.
    pub fn flush_if_due(&mut self, writes: &Writes) {
        if self.last_flush.elapsed() >= BATCH_DELAY {
            self.flush(writes);
        }
    }

    /// Queues the buffered tokens for the writer thread (never blocks).
    pub fn flush(&mut self, writes: &Writes) {
        self.last_flush = Instant::now();
        if self.pending.is_empty() {
            return;
        }
        writes.send(Write::Append {
            writer: self.writer.clone(),
            tokens: std::mem::take(&mut self.pending),
            broken: self.broken.clone(),
        });
    }
}

/// A generation's part in the cluster.
pub(crate) enum ClusterPart {
    /// It leads cluster-wide.
    Lead(ClusterLead),
    /// It follows the generation `token` of another node; `refreshed` is
    /// when this node last said it is still watching.
    Follow {
        token: String,
        refreshed: Option<Instant>,
    },
}

/// The per-generation slot for its [`ClusterPart`].
pub(crate) type LeadSlot = Mutex<Option<ClusterPart>>;
