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

use super::cluster_node::ClusterNode;
use super::cluster_part::{ClusterLead, ClusterPart};
use super::cluster_resume::{Record, RecordEnd};
use super::cluster_writer::Write;
use super::records::Generation;
use super::records::{Request, Source};
use super::shared::Shared;
use crate::cluster::lease::Claim;
use crate::cluster::stream::{StreamEvent, StreamReader, StreamWriter};
use crate::cluster::{records, watchers};
use crate::protocol::{ErrorCode, Failure, Outcome};
use crate::request_key::{self, Key};

/// How long a remote reader waits for entries before checking the lease.
const READ_BLOCK: Duration = Duration::from_millis(500);
/// Pause between a remote reader's further tries after its stream read
/// failed twice in a row.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// What a claim decided for a new local generation.
pub(crate) enum Claimed {
    /// Lead it (cluster-wide when the lease is ours).
    Lead,
    /// Follow the remote generation with this token.
    Remote(String),
}

impl Shared {
    /// Claims `generation`'s key cluster-wide, when clustering is on.
    pub(super) fn cluster_claim(&self, generation: &Generation) -> Claimed {
        let Some(node) = &self.cluster else {
            return Claimed::Lead;
        };
        if !generation.shared {
            return Claimed::Lead;
        }
        let token = format!("{}/{}", node.instance, generation.id);
        let claim = node
            .breaker
            .call(|| node.leases.claim(&generation.key, &token));
        match claim {
            Ok(Claim::Ours) => {
                let _ = generation.stream.set(token.clone());
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
                Claimed::Lead
            }
            Ok(Claim::Theirs(remote)) => {
                let _ = generation.stream.set(remote.clone());
                *generation.cluster.lock() = Some(ClusterPart::Follow {
                    token: remote.clone(),
                    refreshed: None,
                });
                Claimed::Remote(remote)
            }
            // Known down, or just found so: the breaker logs the outage.
            Err(e) => {
                log::debug!("generation {} leads alone: {e}", generation.id);
                Claimed::Lead
            }
        }
    }

    /// Ends a cluster-wide generation: the rest of its tokens, its end
    /// marker, and its lease given up.
    pub(super) fn cluster_finish(&self, generation: &Generation, outcome: &Outcome) {
        let part = generation.cluster.lock().take();
        let Some(node) = &self.cluster else {
            return;
        };
        let mut lead = match part {
            Some(ClusterPart::Lead(lead)) => lead,
            Some(ClusterPart::Follow { token, .. }) => {
                // No longer watching: the leader need not run for us.
                let mut pipe = redis::pipe();
                watchers::unwatch(&mut pipe, &node.node_id, &token);
                node.writes.send(Write::Commands(pipe));
                return;
            }
            None => return,
        };
        let end = outcome.clone();
        // Queued behind the stream's token batches, so the end marker
        // follows them; the lease goes in the same round trip.
        node.writes.send(Write::Finish {
            writer: lead.writer.clone(),
            tokens: std::mem::take(&mut lead.pending),
            end,
            keep: Duration::from_millis(self.config.timeouts.replay_window_ms.max(1)),
            also: {
                let mut release = redis::pipe();
                release.add_command(node.leases.release_command(&generation.key, &lead.token));
                release
            },
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
                lead.flush_if_due(&node.writes);
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
                let mut pipe = redis::pipe();
                watchers::watch(&mut pipe, &node.node_id, token, node.lease);
                node.writes.send(Write::Commands(pipe));
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
        let watching = node.query(|conn| watchers::count(conn, &token));
        watching.is_ok_and(|n| n > 0)
    }

    /// Records, for each of `requests`, where another node finds it for a
    /// `resume` (see `cluster_resume`). Called when a connection closes:
    /// only then may its client come back elsewhere, so Redis sees one
    /// round trip per closed connection, not one write per chat.
    /// - running, on a cluster-wide generation: the generation's stream;
    /// - ended: the stream and how many of its tokens the request got, and
    ///   how it ended; a request whose answer is in no stream (a cache hit,
    ///   a generation led alone) gets a short stream of its own with the
    ///   tokens it was sent.
    ///
    /// Requests still queued, or running on a generation led alone, are
    /// recorded later, once they are findable (`handover_if_pending`).
    pub(super) fn cluster_handover(&self, requests: &[String]) {
        let Some(node) = &self.cluster else {
            return;
        };
        let t = &self.config.timeouts;
        let keep = Duration::from_millis(t.request_ms.saturating_add(t.replay_window_ms));
        let mut pipe = redis::pipe();
        let mut any = false;
        for id in requests {
            let Ok(request) = self.lookup(id) else {
                continue;
            };
            if request.remote {
                // Its own node's record already says where it is.
                continue;
            }
            let Some(handover) = self.handover_of(node, &request) else {
                // Not findable yet: recorded once it is (see
                // `handover_if_pending`). Meanwhile a record that says so
                // keeps a resume elsewhere waiting for it (under load a
                // request can wait in a queue longer than a lookup would
                // wait for a record that does not exist).
                let pending = {
                    let mut st = request.state.lock();
                    st.handover_pending = st.end.is_none();
                    st.handover_pending
                };
                if let (true, Ok(record)) = (pending, serde_json::to_string(&Record::pending())) {
                    records::set(&mut pipe, id, &record, keep);
                    any = true;
                }
                continue;
            };
            let set_record =
                |pipe: &mut redis::Pipeline| records::set(pipe, id, &handover.record, keep);
            match handover.own_stream {
                None => {
                    set_record(&mut pipe);
                    any = true;
                }
                Some((writer, tokens, end)) => {
                    // Its stream first, then the record, in one round trip.
                    let mut record = redis::pipe();
                    set_record(&mut record);
                    node.writes.send(Write::Finish {
                        writer: Arc::new(writer),
                        tokens,
                        end,
                        keep: Duration::from_millis(t.replay_window_ms.max(1)),
                        also: record,
                        broken: Arc::new(AtomicBool::new(false)),
                    });
                }
            }
        }
        if any {
            // Off the connection thread, like every cluster write.
            node.writes.send(Write::Commands(pipe));
        }
    }

    /// Writes the resume record of `request` if its connection closed
    /// before another node could have found it (see
    /// [`RequestState::handover_pending`](super::records::RequestState)).
    /// Called when it joins a generation and when it ends.
    pub(super) fn handover_if_pending(&self, request: &Request) {
        if self.cluster.is_some() && std::mem::take(&mut request.state.lock().handover_pending) {
            self.cluster_handover(&[request.id.to_string()]);
        }
    }

    /// The resume record of `request`, and the stream to write first when
    /// its tokens are in none.
    fn handover_of(&self, node: &ClusterNode, request: &Request) -> Option<Handover> {
        let st = request.state.lock();
        let role = st.role?;
        let end = st
            .end
            .as_ref()
            .map(|end| RecordEnd::of(&end.result, end.tokens));
        let (stream, key, own) = match &st.source {
            Some(Source::Generation(g)) => match g.stream.get() {
                Some(token) => (token.clone(), g.key, None),
                None => {
                    let end = st.end.as_ref()?;
                    let produced = g.broadcast.produced();
                    let tokens = produced.pieces().take(clamp(end.tokens)).map(str::to_owned);
                    (String::new(), g.key, Some((tokens.collect(), &end.result)))
                }
            },
            Some(Source::Cached(answer)) => {
                let end = st.end.as_ref()?;
                let tokens = answer.pieces().take(clamp(end.tokens)).map(str::to_owned);
                (
                    String::new(),
                    [0; 32],
                    Some((tokens.collect(), &end.result)),
                )
            }
            None => return None,
        };
        let (stream, own_stream) = match own {
            None => (stream, None),
            Some((tokens, result)) => {
                let token = format!("{}/r/{}", node.instance, request.id);
                let writer = StreamWriter::new(
                    node.pool.clone(),
                    &token,
                    Duration::from_millis(self.config.timeouts.replay_window_ms.max(1)),
                );
                (token, Some((writer, tokens, result.clone())))
            }
        };
        let record = Record {
            role: role.as_str().to_owned(),
            stream,
            key: request_key::hex(&key),
            end,
            pending: false,
        };
        Some(Handover {
            record: serde_json::to_string(&record).ok()?,
            own_stream,
        })
    }

    /// The reader thread of a remote generation: feeds the local broadcast
    /// from the leader's stream until its end, or fails the generation
    /// when the leader's node is gone (its lease lapsed without an end).
    pub(super) fn run_remote(self: &Arc<Self>, generation: Arc<Generation>, token: String) {
        let Some(node) = &self.cluster else {
            return;
        };
        // One reader per remote generation on this node: resumes of its
        // requests join this generation instead of starting their own.
        node.remotes
            .lock()
            .entry(token.clone())
            .or_insert_with(|| generation.clone());
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
            Err(e) => Some(Err(Failure::new(
                ErrorCode::UpstreamError,
                format!("cannot follow the generation on another node: {e}"),
            ))),
        };
        if let Some(outcome) = outcome {
            self.finish_generation(&generation, outcome);
        }
        let mut remotes = node.remotes.lock();
        if remotes
            .get(&token)
            .is_some_and(|g| Arc::ptr_eq(g, &generation))
        {
            remotes.remove(&token);
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
        key: &Key,
        token: &str,
        wanted: impl Fn() -> bool,
        mut on_token: impl FnMut(String) -> bool,
    ) -> Option<Outcome> {
        let node = self.cluster.as_ref()?;
        let lost = |message: String| Some(Err(Failure::new(ErrorCode::UpstreamError, message)));
        // Since when reads have failed without a success in between.
        let mut failing: Option<Instant> = None;
        while wanted() {
            let events = match reader.read() {
                Ok(events) => {
                    failing = None;
                    events
                }
                // One failed read (a reply late on a saturated machine, a
                // dropped connection) does not end the generation for every
                // client here: read on, on a new connection, from where the
                // last read stopped. Only a Redis failing for a whole lease,
                // the time after which a silent leader counts as lost too,
                // ends it. The first retry is at once; later ones pause, so
                // a failure a new connection does not cure (an entry that
                // does not decode) cannot spin.
                Err(e) => {
                    let again = failing.is_some();
                    if failing.get_or_insert_with(Instant::now).elapsed() >= node.lease {
                        return lost(format!("lost the stream of the leader's node: {e}"));
                    }
                    log::debug!("reading the stream {token} failed, reading on: {e}");
                    if again {
                        std::thread::sleep(RETRY_PAUSE);
                    }
                    // A reconnect that fails shows as the next read's failure.
                    let _ = reader.reconnect();
                    continue;
                }
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
                    StreamEvent::End(end) => return Some(end),
                }
            }
        }
        None
    }
}

/// A request's resume record, and its own stream when it needs one.
struct Handover {
    record: String,
    own_stream: Option<(StreamWriter, Vec<String>, Outcome)>,
}

fn clamp(tokens: u64) -> usize {
    usize::try_from(tokens).unwrap_or(usize::MAX)
}
