//! This node's part of the cluster, as state: its Redis pool and breaker,
//! its leases, the writer thread's queue, the remote generations it
//! follows and the resumes waiting for their record. The policy that uses
//! it is in `cluster` (claims, leading, following, handover) and
//! `cluster_resume` (a `resume` of a request another node accepted).
//!
//! Threads: held by the pipeline's shared state; read by every thread that
//! touches the cluster.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};
use parking_lot::Mutex;

use super::cluster_writer::Writes;
use super::records::{Generation, Request};
use crate::breaker::Breaker;
use crate::cluster::lease::Leases;
use crate::redis_pool::RedisPool;

/// Resumes waiting for the lookup thread at most; past it `overloaded`.
const QUEUE: usize = 1024;

/// This node in the cluster.
pub(crate) struct ClusterNode {
    pub node_id: String,
    /// `node_id` plus a random part drawn at start: generation ids restart
    /// at zero with the process, and a restarted node must never append to
    /// (or be followed through) a stream of its previous life.
    pub(super) instance: String,
    pub url: String,
    pub pool: RedisPool,
    pub leases: Arc<Leases>,
    pub lease: Duration,
    /// Open while the cluster's Redis is known to be down.
    pub breaker: Arc<Breaker>,
    /// The writer thread's queue.
    pub(super) writes: Writes,
    /// Remote generations followed by a reader thread here, by token.
    pub(super) remotes: Mutex<HashMap<String, Arc<Generation>>>,
    /// Resumes waiting for their record (`cluster_resume`).
    pub(super) lookups: Lookups,
}

impl ClusterNode {
    /// Connects lazily to the cluster's Redis; starts the writer thread.
    pub fn new(config: &crate::config::ClusterConfig) -> Result<ClusterNode, String> {
        let timeout = Duration::from_millis(config.redis_timeout_ms.max(1));
        let pool =
            crate::redis_pool::pool(&config.redis_url, timeout, 8).map_err(|e| e.to_string())?;
        let lease = Duration::from_millis(config.lease_ms.max(100));
        let node_id = if config.node_id.is_empty() {
            crate::protocol::random_id("n-")[..10].to_owned()
        } else {
            config.node_id.clone()
        };
        let instance = format!("{node_id}.{}", &crate::protocol::random_id("")[..8]);
        let leases = Arc::new(Leases::new(pool.clone(), lease));
        let breaker = Arc::new(crate::redis_pool::breaker(
            &pool,
            "the cluster's Redis",
            "every node leads its generations alone until it is back",
        ));
        let writes = Writes::start(pool.clone(), leases.clone(), breaker.clone())
            .map_err(|e| e.to_string())?;
        Ok(ClusterNode {
            leases,
            instance,
            node_id,
            url: config.redis_url.clone(),
            pool,
            lease,
            breaker,
            writes,
            remotes: Mutex::new(HashMap::new()),
            lookups: Lookups::new(),
        })
    }

    /// Runs `f` on a pooled connection unless Redis is known to be down;
    /// a failure marks it down.
    pub fn query<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, String> {
        self.breaker
            .call(|| {
                let mut conn = self.pool.get().map_err(|e| e.to_string())?;
                f(&mut conn).map_err(|e| e.to_string())
            })
            .map_err(|e| e.to_string())
    }
}

/// The queue of resumes waiting for their record.
pub(crate) struct Lookups {
    pub(super) tx: Sender<Arc<Request>>,
    pub(super) rx: Mutex<Option<Receiver<Arc<Request>>>>,
    /// Resumes the lookup thread is looking for, as of its last round.
    pub waiting: std::sync::atomic::AtomicUsize,
}

impl Lookups {
    /// Resumes handed to the lookup thread and not yet taken by it (those
    /// it already looks for are in [`Lookups::waiting`]).
    pub fn queued(&self) -> usize {
        self.tx.len()
    }

    pub fn new() -> Lookups {
        let (tx, rx) = bounded(QUEUE);
        Lookups {
            tx,
            rx: Mutex::new(Some(rx)),
            waiting: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}
