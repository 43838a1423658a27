//! The pipeline's side of several nodes acting as one (`[cluster]`): a
//! local leader claims its key cluster-wide and mirrors its tokens into a
//! Redis Stream; a node that finds the key claimed elsewhere follows that
//! generation through one reader thread per remote generation, which feeds
//! the local broadcaster, so local followers join it as usual.
//!
//! Redis trouble never fails a chat: a claim that cannot be made leads
//! locally (no cross-node dedup for that one), and a leader that cannot
//! write its stream goes on for its local clients. After one failure the
//! node's breaker knows Redis is down: claims, watcher checks and writes
//! skip it at once (each chat leads alone, no cluster coordination) until
//! its probe finds Redis back. Redis is never called under a generation's
//! lock nor between two tokens: stream writes, lease renewals and watcher
//! marks are queued to the node's writer thread (`cluster_writer`).
//!
//! Threads: claims run on the cache lane; the streaming thread queues the
//! stream's token batches (and whoever ends the generation its end); the
//! janitor queues lease renewals and watcher marks; the `chorus-cluster`
//! thread writes them; each remote generation has its reader thread.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::cluster_writer::{Write, Writes};
use super::generation::{GenOutcome, Generation};
use super::Shared;
use crate::breaker::Breaker;
use crate::cluster::lease::{Claim, Leases};
use crate::cluster::stream::{End, StreamEvent, StreamReader, StreamWriter};
use crate::outbox::{Frame, Outbox};
use crate::protocol::{ErrorCode, Failure, Finish, Role as Role2};
use crate::redis_pool::RedisPool;

/// Tokens buffered before the stream is written anyway.
const BATCH_TOKENS: usize = 16;
/// Longest a token waits in the buffer when more keep coming.
const BATCH_DELAY: Duration = Duration::from_millis(10);
/// How often, and how many times, a `resume` of an unknown request looks
/// for the record of the node that had it.
const HANDOVER_POLL: Duration = Duration::from_millis(50);
const HANDOVER_TRIES: u32 = 20;
/// How long a remote reader waits for entries before checking the lease.
const READ_BLOCK: Duration = Duration::from_millis(500);

/// This node in the cluster.
pub(crate) struct ClusterNode {
    pub node_id: String,
    /// `node_id` plus a random part drawn at start: generation ids restart
    /// at zero with the process, and a restarted node must never append to
    /// (or be followed through) a stream of its previous life.
    instance: String,
    pub url: String,
    pub pool: RedisPool,
    pub leases: Arc<Leases>,
    pub lease: Duration,
    /// Open while the cluster's Redis is known to be down.
    pub breaker: Arc<Breaker>,
    /// The writer thread's queue.
    writes: Writes,
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

/// A local generation that leads cluster-wide.
pub(crate) struct ClusterLead {
    pub token: String,
    writer: Arc<StreamWriter>,
    pending: Vec<String>,
    last_flush: Instant,
    pub last_renew: Instant,
    /// Set when a batch was lost: the stream has a gap, so it is ended with
    /// an error instead of fed further.
    broken: Arc<AtomicBool>,
}

impl ClusterLead {
    /// Queues the buffered tokens for the writer thread (never blocks).
    fn flush(&mut self, writes: &Writes) {
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

/// What a claim decided for a new local generation.
pub(crate) enum Role {
    /// Lead it (cluster-wide when the lease is ours).
    Lead,
    /// Follow the remote generation with this token.
    Remote(String),
}

impl Shared {
    /// Claims `generation`'s key cluster-wide, when clustering is on.
    pub(super) fn cluster_claim(&self, generation: &Generation) -> Role {
        let Some(node) = &self.cluster else {
            return Role::Lead;
        };
        if !generation.shared {
            return Role::Lead;
        }
        let token = format!("{}/{}", node.instance, generation.id);
        let claim = node
            .breaker
            .call(|| node.leases.claim(&generation.key, &token));
        match claim {
            Ok(Claim::Ours) => {
                let now = Instant::now();
                *generation.cluster.lock() = Some(ClusterPart::Lead(ClusterLead {
                    writer: Arc::new(StreamWriter::new(
                        node.pool.clone(),
                        &token,
                        Duration::from_millis(
                            self.config
                                .timeouts
                                .replay_window_ms
                                .saturating_add(self.config.timeouts.request_ms),
                        ),
                    )),
                    token,
                    pending: Vec::new(),
                    last_flush: now,
                    last_renew: now,
                    broken: Arc::new(AtomicBool::new(false)),
                }));
                Role::Lead
            }
            Ok(Claim::Theirs(remote)) => {
                *generation.cluster.lock() = Some(ClusterPart::Follow {
                    token: remote.clone(),
                    refreshed: None,
                });
                Role::Remote(remote)
            }
            // Known down, or just found so: the breaker logs the outage.
            Err(e) => {
                log::debug!("generation {} leads alone: {e}", generation.id);
                Role::Lead
            }
        }
    }

    /// Mirrors a published token into the generation's stream (batched).
    /// Runs between two tokens on the streaming thread: it only queues.
    pub(super) fn cluster_append(&self, generation: &Generation, token: &str) {
        let Some(node) = &self.cluster else {
            return;
        };
        let mut part = generation.cluster.lock();
        let Some(ClusterPart::Lead(lead)) = part.as_mut() else {
            return;
        };
        lead.pending.push(token.to_owned());
        // Tokens that come faster than BATCH_DELAY share a round trip; the
        // janitor flushes what a pause would otherwise leave behind.
        if lead.pending.len() >= BATCH_TOKENS || lead.last_flush.elapsed() >= BATCH_DELAY {
            lead.flush(&node.writes);
        }
    }

    /// Ends a cluster-wide generation: the rest of its tokens, its end
    /// marker, and its lease given up.
    pub(super) fn cluster_finish(&self, generation: &Generation, outcome: &GenOutcome) {
        let part = generation.cluster.lock().take();
        let Some(node) = &self.cluster else {
            return;
        };
        let mut lead = match part {
            Some(ClusterPart::Lead(lead)) => lead,
            Some(ClusterPart::Follow { token, .. }) => {
                // No longer watching: the leader need not run for us.
                let mut pipe = redis::pipe();
                pipe.cmd("ZREM")
                    .arg(watchers_key(&token))
                    .arg(&node.node_id)
                    .ignore();
                node.writes.send(Write::Commands {
                    pipe,
                    what: "unwatch",
                });
                return;
            }
            None => return,
        };
        let end = match outcome {
            GenOutcome::Finished(Finish::Stop) => End::Stop,
            GenOutcome::Finished(Finish::Length) => End::Length,
            GenOutcome::Finished(Finish::Cancelled) | GenOutcome::Cancelled => End::Cancelled,
            GenOutcome::Failed(f) => End::Failed {
                code: f.code.as_str().to_owned(),
                message: f.message.clone(),
            },
        };
        // Queued behind the stream's token batches, so the end marker
        // follows them; the lease goes in the same round trip.
        node.writes.send(Write::Finish {
            writer: lead.writer.clone(),
            tokens: std::mem::take(&mut lead.pending),
            end,
            keep: Duration::from_millis(self.config.timeouts.replay_window_ms.max(1)),
            release: node.leases.release_command(&generation.key, &lead.token),
            broken: lead.broken.clone(),
        });
    }

    /// Called by the janitor on every tick. A cluster-wide leader flushes
    /// tokens a pause left in its buffer and renews its lease every third
    /// of the lease time; a remote follower with clients attached here
    /// says so in the leader's watcher set, as often.
    pub(super) fn cluster_tick(&self, generation: &Generation, attached_here: bool) {
        let Some(node) = &self.cluster else {
            return;
        };
        // Only queues: the generation's cluster lock is held here, and the
        // streaming thread takes it between two tokens.
        let mut part = generation.cluster.lock();
        match part.as_mut() {
            Some(ClusterPart::Lead(lead)) => {
                if lead.last_flush.elapsed() >= BATCH_DELAY {
                    lead.flush(&node.writes);
                }
                if lead.last_renew.elapsed() < node.lease / 3 {
                    return;
                }
                lead.last_renew = Instant::now();
                node.writes.send(Write::Renew {
                    key: generation.key,
                    token: lead.token.clone(),
                });
            }
            Some(ClusterPart::Follow { token, refreshed }) => {
                if !attached_here || refreshed.is_some_and(|at| at.elapsed() < node.lease / 3) {
                    return;
                }
                *refreshed = Some(Instant::now());
                node.writes.send(Write::Commands {
                    pipe: watch_pipe(&node.node_id, token, node.lease),
                    what: "watch",
                });
            }
            None => {}
        }
    }

    /// True when this generation leads cluster-wide and another node still
    /// has clients following it: then it must go on even with nobody
    /// attached here.
    pub(super) fn cluster_watched(&self, generation: &Generation) -> bool {
        let Some(node) = &self.cluster else {
            return false;
        };
        let token = match generation.cluster.lock().as_ref() {
            Some(ClusterPart::Lead(lead)) => lead.token.clone(),
            _ => return false,
        };
        // While Redis is known down there is no cluster coordination: the
        // answer is "nobody", at once.
        let watching = node.query(|conn| {
            redis::cmd("ZCOUNT")
                .arg(watchers_key(&token))
                .arg(format!("({}", now_ms()))
                .arg("+inf")
                .query::<u64>(conn)
        });
        watching.is_ok_and(|n| n > 0)
    }

    /// The cluster token of `generation`, when it is cluster-wide.
    fn cluster_token(generation: &Generation) -> Option<String> {
        match generation.cluster.lock().as_ref()? {
            ClusterPart::Lead(lead) => Some(lead.token.clone()),
            ClusterPart::Follow { token, .. } => Some(token.clone()),
        }
    }

    /// Records which cluster-wide generation each of `requests` that is
    /// still running receives, so that a `resume` of it can be answered by
    /// any node. Called when a connection closes: only then may its client
    /// come back elsewhere, so Redis sees writes for dropped requests, one
    /// round trip per closed connection, not one write per chat.
    pub(super) fn cluster_handover(&self, requests: &[String]) {
        let Some(node) = &self.cluster else {
            return;
        };
        let t = &self.config.timeouts;
        let keep_ms = t.request_ms.saturating_add(t.replay_window_ms).max(1);
        let mut pipe = redis::pipe();
        let mut any = false;
        for id in requests {
            let Ok(request) = self.lookup(id) else {
                continue;
            };
            let (role, generation) = {
                let st = request.state.lock();
                if st.end.is_some() {
                    // Ended: its own node still replays it; no handover.
                    continue;
                }
                match (&st.role, &st.source) {
                    (Some(role), Some(super::request::Source::Generation(g))) => (*role, g.clone()),
                    _ => continue,
                }
            };
            let Some(token) = Self::cluster_token(&generation) else {
                continue;
            };
            pipe.cmd("SET")
                .arg(request_key(id))
                .arg(format!(
                    "{} {token} {}",
                    role.as_str(),
                    crate::cluster::hex(&generation.key)
                ))
                .arg("PX")
                .arg(keep_ms)
                .ignore();
            any = true;
        }
        if any {
            // Off the connection thread, like every cluster write.
            node.writes.send(Write::Commands {
                pipe,
                what: "resume records",
            });
        }
    }

    /// `resume` of a request this node does not know: if another node
    /// registered it, replays its generation's stream from `from` and then
    /// follows it live to the end, on a thread of its own. The request
    /// cannot be cancelled from here.
    pub(super) fn cluster_resume(
        self: &Arc<Self>,
        outbox: &Arc<Outbox>,
        id: &str,
        from: u64,
    ) -> Result<(), Failure> {
        let not_found = || Failure::new(ErrorCode::NotFound, "no such request, or it expired");
        let Some(node) = &self.cluster else {
            return Err(not_found());
        };
        // The node that had the request writes the record when it notices
        // the old connection closed, which can be a moment after the client
        // is back here: look a few times before answering `not_found`.
        let mut record: Option<String> = None;
        for attempt in 0..HANDOVER_TRIES {
            record = node
                .query(|conn| redis::cmd("GET").arg(request_key(id)).query(conn))
                .ok()
                .flatten();
            if record.is_some() || attempt + 1 == HANDOVER_TRIES {
                break;
            }
            std::thread::sleep(HANDOVER_POLL);
        }
        let fields: Vec<&str> = record.as_deref().unwrap_or("").split(' ').collect();
        let (Some(role), Some(token), Some(key)) = (
            fields.first(),
            fields.get(1),
            fields.get(2).and_then(|h| unhex(h)),
        ) else {
            return Err(not_found());
        };
        let role = match *role {
            "leader" => Role2::Leader,
            _ => Role2::Follower,
        };
        let mut reader = StreamReader::open(&node.url, token, READ_BLOCK)
            .map_err(|e| Failure::new(ErrorCode::UpstreamError, e.to_string()))?;
        let (shared, outbox, id, token) = (
            self.clone(),
            outbox.clone(),
            id.to_owned(),
            (*token).to_owned(),
        );
        std::thread::Builder::new()
            .name("chorus-resume".into())
            .stack_size(super::WORKER_STACK)
            .spawn(move || {
                shared.replay_remote(&mut reader, &outbox, &id, (&token, key), role, from)
            })
            .map_err(|e| Failure::new(ErrorCode::Overloaded, e.to_string()))?;
        Ok(())
    }

    fn replay_remote(
        &self,
        reader: &mut StreamReader,
        outbox: &Outbox,
        id: &str,
        (token, key): (&str, [u8; 32]),
        role: Role2,
        from: u64,
    ) {
        let prefix = crate::protocol::token_prefix(id);
        let _ = outbox.push(Frame::Json(crate::protocol::start(id, role)));
        let mut seq = 0u64;
        let outcome = self.follow_stream(
            reader,
            &key,
            token,
            || !outbox.is_closed(),
            |text| {
                if seq >= from {
                    let frame = Frame::Token {
                        prefix: prefix.clone(),
                        tail: crate::protocol::TokenTail::encode(seq, &text),
                    };
                    if outbox.push_token(frame).is_err() {
                        return false;
                    }
                }
                seq += 1;
                true
            },
        );
        let frame = match outcome.as_ref().map(super::ending::member_result) {
            None => return,
            // Timings belong to the node that served the request.
            Some(Ok(finish)) => crate::protocol::done(
                id,
                finish,
                seq,
                role,
                crate::protocol::Timings {
                    queue_ms: 0.0,
                    prepare_ms: 0.0,
                    ttft_ms: None,
                    total_ms: 0.0,
                },
            ),
            Some(Err(failure)) => crate::protocol::error(Some(id), None, &failure),
        };
        let _ = outbox.push(Frame::Json(frame));
    }

    /// The reader thread of a remote generation: feeds the local broadcast
    /// from the leader's stream until its end, or fails the generation
    /// when the leader's node is gone (its lease lapsed without an end).
    pub(super) fn run_remote(self: &Arc<Self>, generation: Arc<Generation>, token: String) {
        let Some(node) = &self.cluster else {
            return;
        };
        // Tell the leader's node at once that clients here follow it, so it
        // does not stop for lack of interest before the janitor's next tick.
        self.cluster_tick(&generation, true);
        let outcome = match StreamReader::open(&node.url, &token, READ_BLOCK) {
            Ok(mut reader) => self.follow_stream(
                &mut reader,
                &generation.key,
                &token,
                || !generation.is_over(),
                |text| {
                    let published = generation.broadcast.publish(&text).is_some();
                    if published {
                        self.metrics.tokens.inc();
                    }
                    published
                },
            ),
            Err(e) => Some(GenOutcome::Failed(Failure::new(
                ErrorCode::UpstreamError,
                format!("cannot follow the generation on another node: {e}"),
            ))),
        };
        if let Some(outcome) = outcome {
            self.finish_generation(&generation, outcome);
        }
    }

    /// Reads generation `token`'s stream to its end, handing each token to
    /// `on_token`, and returns how it ended. When the stream is quiet, the
    /// leader must still hold the lease of `key`: a lapsed lease without an
    /// end marker means its node is gone. `None` when `wanted` or
    /// `on_token` said to stop.
    fn follow_stream(
        &self,
        reader: &mut StreamReader,
        key: &[u8; 32],
        token: &str,
        wanted: impl Fn() -> bool,
        mut on_token: impl FnMut(String) -> bool,
    ) -> Option<GenOutcome> {
        let node = self.cluster.as_ref()?;
        let lost = |message: String| {
            Some(GenOutcome::Failed(Failure::new(
                ErrorCode::UpstreamError,
                message,
            )))
        };
        while wanted() {
            let events = match reader.read() {
                Ok(events) => events,
                Err(e) => return lost(format!("lost the stream of the leader's node: {e}")),
            };
            if events.is_empty() {
                let holder = node
                    .breaker
                    .call(|| node.leases.holder(key))
                    .map_err(|e| e.to_string());
                // A Redis that cannot answer says nothing about the leader;
                // the read above fails soon enough if it stays away.
                if holder.is_ok() && !matches!(&holder, Ok(Some(t)) if t == token) {
                    return lost("the node leading this generation was lost".into());
                }
                continue;
            }
            for event in events {
                match event {
                    StreamEvent::Token(text) => {
                        if !on_token(text) {
                            return None;
                        }
                    }
                    StreamEvent::End(end) => {
                        return Some(match end {
                            End::Stop => GenOutcome::Finished(Finish::Stop),
                            End::Length => GenOutcome::Finished(Finish::Length),
                            End::Cancelled => GenOutcome::Cancelled,
                            End::Failed { code, message } => {
                                GenOutcome::Failed(failure_of(&code, message))
                            }
                        })
                    }
                }
            }
        }
        None
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

/// The sorted set of nodes still watching generation `token`, scored by
/// when their interest expires (milliseconds since the epoch).
fn watchers_key(token: &str) -> String {
    format!("chorus:v1:watchers:{token}")
}

/// Marks `node_id` as watching generation `token` for one lease time.
fn watch_pipe(node_id: &str, token: &str, lease: Duration) -> redis::Pipeline {
    let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
    let key = watchers_key(token);
    let mut pipe = redis::pipe();
    pipe.cmd("ZADD")
        .arg(&key)
        .arg(now_ms().saturating_add(lease_ms))
        .arg(node_id)
        .ignore()
        .cmd("PEXPIRE")
        .arg(&key)
        .arg(lease_ms.saturating_mul(2))
        .ignore();
    pipe
}

/// The failure an end marker records; an unknown code (a newer node's)
/// reads as `upstream_error`.
fn failure_of(code: &str, message: String) -> Failure {
    let code = ErrorCode::ALL
        .into_iter()
        .find(|c| c.as_str() == code)
        .unwrap_or(ErrorCode::UpstreamError);
    Failure::new(code, message)
}

/// The key bytes of a 64-digit hex string.
fn unhex(text: &str) -> Option<[u8; 32]> {
    let mut key = [0u8; 32];
    if text.len() != 64 {
        return None;
    }
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}

/// Which generation a request receives, for `resume` on any node.
fn request_key(id: &str) -> String {
    format!("chorus:v1:request:{id}")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
