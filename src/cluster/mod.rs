//! Building blocks for several chorus nodes acting as one gateway through
//! a shared Redis: generation leases ([`lease`]) and token streams
//! ([`stream`]). Redis is the distributed engine; chorus adds no consensus
//! of its own.
//!
//! - A node that leads a generation claims its identical-request key with
//!   an expiring lease (`SET … NX PX`) and renews it while it prepares and
//!   streams; a node that finds the key claimed follows that generation.
//! - The leader appends the generation's tokens to a Redis Stream, in
//!   batches, and ends it with an end marker; the stream expires
//!   `replay_window_ms` after the end. Another node reads it with one
//!   reader per generation and feeds its local broadcaster.
//!
//! Every key name, with what it holds and when it expires, is in one table
//! in [`keys`]; the commands on them are here too ([`lease`], [`stream`],
//! `watchers`, `records`). The pipeline's use of them, the policy, is
//! in `pipeline/cluster.rs` and `pipeline/cluster_resume.rs`.
//!
//! Threads: a [`lease::Leases`] is shared by every thread of a node; a
//! [`stream::StreamWriter`] belongs to the streaming thread of its
//! generation, a [`stream::StreamReader`] to its reader thread.

pub mod keys;
pub mod lease;
pub(crate) mod records;
pub mod stream;
pub(crate) mod watchers;

/// Failures talking to the cluster's Redis.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// Redis could not be reached or refused a command.
    #[error("cluster Redis unavailable: {0}")]
    Unavailable(String),
    /// Redis answered with something these primitives never write.
    #[error("unexpected data in the cluster Redis: {0}")]
    Corrupt(String),
}

impl From<redis::RedisError> for ClusterError {
    fn from(e: redis::RedisError) -> Self {
        ClusterError::Unavailable(e.to_string())
    }
}

impl From<r2d2::Error> for ClusterError {
    fn from(e: r2d2::Error) -> Self {
        ClusterError::Unavailable(e.to_string())
    }
}
