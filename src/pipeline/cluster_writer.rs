//! The cluster's writes to Redis, done by one thread of their own: token
//! batches of the generations this node leads, their end markers and lease
//! releases, lease renewals, "we still watch it" marks and the records that
//! let another node answer a `resume`.
//!
//! Why a thread: these writes used to run where they were decided, on the
//! streaming thread (under the generation's cluster lock, between two
//! tokens) and on the janitor. A frozen Redis then stalled every running
//! generation's tokens by the Redis timeout. Now the deciding thread only
//! queues the write (`try_send` on a bounded channel, never blocking), and
//! this thread does them in order, so a stream's tokens still precede its
//! end marker. While Redis is known to be down (the node's breaker is
//! open) queued writes are dropped at once; a dropped or failed token batch
//! marks its stream broken, so it is ended with an error rather than read
//! with a gap. A full queue drops the write the same way.
//!
//! Threads: any thread queues ([`Writes::send`]); the `chorus-cluster`
//! thread runs them until every sender is gone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};

use crate::breaker::{Breaker, BreakerError};
use crate::cluster::lease::Leases;
use crate::cluster::stream::StreamWriter;
use crate::protocol::{ErrorCode, Failure, Outcome};
use crate::redis_pool::RedisPool;
use crate::request_key::Key;

/// Writes waiting at most; past it new ones are dropped (a Redis that slow
/// is as good as down for the cluster).
const QUEUE: usize = 16_384;
/// Writes sent in one round trip at most.
const BATCH: usize = 512;

/// One write to the cluster's Redis.
pub(crate) enum Write {
    /// Tokens of a stream this node leads, in order.
    Append {
        writer: Arc<StreamWriter>,
        tokens: Vec<String>,
        /// Set when a batch is lost: the stream has a gap from then on.
        broken: Arc<AtomicBool>,
    },
    /// The last tokens, the end marker and `also` (the lease's release, or
    /// the resume record of a request whose stream this is), atomically.
    Finish {
        writer: Arc<StreamWriter>,
        tokens: Vec<String>,
        end: Outcome,
        keep: Duration,
        also: redis::Pipeline,
        broken: Arc<AtomicBool>,
    },
    /// Extends a lease this node holds.
    Renew { key: Key, token: String },
    /// Any other commands (watcher marks, resume records), not atomic.
    Commands(redis::Pipeline),
}

/// The sending side, held by the cluster node.
pub(crate) struct Writes {
    /// `None` once dropped: the thread then runs what is queued and stops.
    tx: Option<Sender<Write>>,
    thread: Option<JoinHandle<()>>,
}

impl Writes {
    /// Starts the writer thread.
    pub fn start(
        pool: RedisPool,
        leases: Arc<Leases>,
        breaker: Arc<Breaker>,
    ) -> std::io::Result<Writes> {
        let (tx, rx) = bounded(QUEUE);
        let thread = std::thread::Builder::new()
            .name("chorus-cluster".into())
            .stack_size(256 * 1024)
            .spawn(move || run(&rx, &pool, &leases, &breaker))?;
        Ok(Writes {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Writes waiting for the writer thread.
    pub fn queued(&self) -> usize {
        self.tx.as_ref().map_or(0, Sender::len)
    }

    /// Queues `write`; never blocks. A write that finds the queue full is
    /// dropped (a lost token batch breaks its stream).
    pub fn send(&self, write: Write) {
        let Some(tx) = &self.tx else {
            return lost(&write);
        };
        if let Err(TrySendError::Full(write) | TrySendError::Disconnected(write)) =
            tx.try_send(write)
        {
            lost(&write);
        }
    }
}

impl Drop for Writes {
    /// Lets the thread run what is queued (at once while Redis is known
    /// down: the breaker drops it) and waits for it.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            crate::threads::join(thread, "cluster writer");
        }
    }
}

/// What dropping `write` unrun means.
fn lost(write: &Write) {
    match write {
        Write::Append { broken, .. } | Write::Finish { broken, .. } => {
            broken.store(true, Ordering::Release);
        }
        Write::Renew { .. } | Write::Commands(_) => {}
    }
}

fn run(rx: &Receiver<Write>, pool: &RedisPool, leases: &Leases, breaker: &Breaker) {
    while let Ok(first) = rx.recv() {
        // Everything queued meanwhile goes in the same round trip: one
        // write per round trip cannot keep up with hundreds of streams
        // flushing every few milliseconds, and a queue that only grows
        // delays every stream and record until writes are dropped.
        let (renewals, writes): (Vec<Write>, Vec<Write>) = std::iter::once(first)
            .chain(rx.try_iter().take(BATCH - 1))
            .partition(|w| matches!(w, Write::Renew { .. }));
        if !writes.is_empty() {
            match breaker.call(|| perform_all(&writes, pool)) {
                Ok(()) => {}
                // Logged once per outage by the breaker.
                Err(BreakerError::Open) => writes.iter().for_each(lost),
                Err(BreakerError::Failed(e)) => {
                    log::debug!("{} cluster writes failed: {e}", writes.len());
                    writes.iter().for_each(lost);
                }
            }
        }
        // A renewal's answer says whether the lease is still ours, so each
        // is a call of its own (one per lead generation every third of the
        // lease time: few).
        for renewal in &renewals {
            let Write::Renew { key, token } = renewal else {
                continue;
            };
            match breaker.call(|| leases.renew(key, token).map_err(|e| e.to_string())) {
                Ok(true) | Err(BreakerError::Open) => {}
                Ok(false) => log::warn!("lease of {token} was lost"),
                Err(BreakerError::Failed(e)) => log::debug!("a lease renewal failed: {e}"),
            }
        }
    }
}

/// Runs `writes` (no renewals) in one round trip, as one transaction: a
/// stream's end marker goes with its lease's release, and no reader sees a
/// key between its creation and its expiry being set.
fn perform_all(writes: &[Write], pool: &RedisPool) -> Result<(), String> {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for write in writes {
        match write {
            Write::Append {
                writer,
                tokens,
                broken,
            } => {
                if !broken.load(Ordering::Acquire) {
                    let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
                    writer.queue_append(&mut pipe, &tokens);
                }
            }
            Write::Finish {
                writer,
                tokens,
                end,
                keep,
                also,
                broken,
            } => {
                if broken.load(Ordering::Acquire) {
                    let failed = Err(Failure::new(
                        ErrorCode::UpstreamError,
                        "the leader's node lost its stream",
                    ));
                    writer.queue_finish(&mut pipe, &[], &failed, *keep, also);
                } else {
                    let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
                    writer.queue_finish(&mut pipe, &tokens, end, *keep, also);
                }
            }
            Write::Commands(commands) => {
                for cmd in commands.cmd_iter() {
                    pipe.add_command(cmd.clone()).ignore();
                }
            }
            Write::Renew { .. } => {}
        }
    }
    if pipe.cmd_iter().next().is_none() {
        return Ok(());
    }
    let mut conn = pool.get().map_err(|e| e.to_string())?;
    pipe.query::<()>(&mut *conn).map_err(|e| e.to_string())
}
