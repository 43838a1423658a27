//! `resume` of a request that another node of the cluster accepted.
//!
//! The node that had the request records, when the client's connection
//! closes, where the request's tokens are (`cluster_handover`): the Redis
//! Stream of its generation, and, if it already ended, how many tokens it
//! got and how it ended. A node asked to resume a request it does not know:
//!
//! 1. lists a local stand-in for it at once ([`Request::resumed`], with the
//!    client's attachment), so a repeated `resume` on this node replaces
//!    that attachment like any local resume, and answers nothing yet: the
//!    connection thread never waits for Redis;
//! 2. hands it to this node's lookup thread, which reads the records of
//!    every waiting resume in one `MGET` every [`POLL`] (the old node
//!    writes its record as it notices the close, which can be a moment
//!    after the client is back here), for up to [`WAIT`] before
//!    answering `not_found`; a record that says the request is not
//!    findable yet (still queued there, or on a generation led alone)
//!    keeps it looking, for up to [`PENDING_WAIT`]. The bounds are times,
//!    not counts of looks, so a lookup thread slowed by load answers
//!    `not_found` no later;
//! 3. joins a running request to the local follower of its generation,
//!    shared by every request of that generation on this node (one reader
//!    thread, one Redis connection), which counts as interest for the
//!    leader's node like any follower here; tokens reach the client
//!    through the broadcast, so a full outbox ends the attachment with
//!    `slow_consumer` as everywhere else;
//! 4. replays an ended request from the first tokens of its stream and
//!    ends it as it ended there.
//!
//! Threads: `cluster_resume` runs on connection threads; everything else on
//! the `chorus-lookup` thread.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::cluster_part::ClusterPart;
use super::ending::end_event;
use super::records::Generation;
use super::records::{End, Phase, Request, RequestState, Source};
use super::shared::{GenTicket, Shared};
use crate::cache::CachedAnswer;
use crate::cluster::records;
use crate::cluster::stream::{first_entries, StreamEvent};
use crate::delivery::Attachment;
use crate::delivery::{Client, Event};
use crate::protocol::{ErrorCode, Failure, Finish, Outcome, Role, Stage, Timings};
use crate::request_key::{self, Key};

/// How often, and for how long, a waiting resume looks for its record.
const POLL: Duration = Duration::from_millis(50);
const WAIT: Duration = Duration::from_secs(3);
/// How long, at most, a resume whose record says "accepted there, not
/// findable yet" looks (the default `queue_ms`).
const PENDING_WAIT: Duration = Duration::from_secs(30);

/// Where another node finds a request: written as JSON under
/// `chorus:v1:request:<id>`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct Record {
    /// `leader`, `follower` or `cache`.
    pub role: String,
    /// The cluster token of the stream that holds its tokens.
    pub stream: String,
    /// Hex of the identical-request key.
    pub key: String,
    /// Set once the request ended.
    pub end: Option<RecordEnd>,
    /// The request's node has it but its tokens are nowhere to be read yet
    /// (it is queued, or runs on a generation led alone): look again. The
    /// node replaces this record as soon as they are.
    #[serde(default)]
    pub pending: bool,
}

impl Record {
    /// The record of a request that is not findable yet.
    pub fn pending() -> Record {
        Record {
            role: String::new(),
            stream: String::new(),
            key: String::new(),
            end: None,
            pending: true,
        }
    }
}

/// How a request ended, in its record.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct RecordEnd {
    /// Tokens the request was sent: the first this many of its stream.
    pub tokens: u64,
    /// `stop`, `length` or `cancelled`; absent when it failed.
    pub finish: Option<String>,
    /// The error code and message when it failed.
    pub code: Option<String>,
    pub message: Option<String>,
}

impl RecordEnd {
    pub fn of(result: &Outcome, tokens: u64) -> RecordEnd {
        match result {
            Ok(finish) => RecordEnd {
                tokens,
                finish: Some(finish.as_str().to_owned()),
                code: None,
                message: None,
            },
            Err(f) => RecordEnd {
                tokens,
                finish: None,
                code: Some(f.code.as_str().to_owned()),
                message: Some(f.message.clone()),
            },
        }
    }

    /// How the request ended. Names this version does not know (a newer
    /// node wrote them) read as the closest it does: a finish as `stop`, a
    /// code as `upstream_error`.
    fn result(&self) -> Outcome {
        match &self.finish {
            Some(finish) => Ok(finish.parse().unwrap_or(Finish::Stop)),
            None => Err(Failure::new(
                self.code
                    .as_deref()
                    .and_then(|code| code.parse().ok())
                    .unwrap_or(ErrorCode::UpstreamError),
                self.message.clone().unwrap_or_default(),
            )),
        }
    }
}

impl Shared {
    /// Starts the lookup thread (once, when the pipeline starts, if it is
    /// a cluster node); it stops when the pipeline shuts down.
    pub(super) fn start_lookups(
        self: &Arc<Self>,
    ) -> std::io::Result<Option<std::thread::JoinHandle<()>>> {
        let Some(rx) = self
            .cluster
            .as_ref()
            .and_then(|n| n.lookups.rx.lock().take())
        else {
            return Ok(None);
        };
        let shared = self.clone();
        std::thread::Builder::new()
            .name("chorus-lookup".into())
            .stack_size(256 * 1024)
            .spawn(move || shared.run_lookups(&rx))
            .map(Some)
    }

    /// `resume` of a request this node does not know, on the connection
    /// thread: lists a stand-in and queues its lookup; never waits.
    pub(super) fn cluster_resume(
        self: &Arc<Self>,
        client: &Arc<dyn Client>,
        id: &str,
        from: u64,
    ) -> Result<(), Failure> {
        let not_found = || Failure::new(ErrorCode::NotFound, "no such request, or it expired");
        let Some(node) = &self.cluster else {
            return Err(not_found());
        };
        if node.breaker.is_open() {
            // Redis known down: no cluster, so nobody else's requests.
            return Err(not_found());
        }
        let request = Request::resumed(id, from);
        request
            .state
            .lock()
            .attachments
            .push(Attachment::new(client, id));
        if !self.registry.admit_resumed(&request) {
            // Another resume of it got here first: resume that one.
            return self.resume(client, id, from);
        }
        if node.lookups.tx.try_send(request.clone()).is_err() {
            self.drop_resumed(
                &request,
                &Failure::new(ErrorCode::Overloaded, "too many resumes waiting; try again"),
            );
        }
        Ok(())
    }

    fn run_lookups(self: &Arc<Self>, rx: &Receiver<Arc<Request>>) {
        let Some(node) = &self.cluster else {
            return;
        };
        // Each stand-in was made when its `resume` arrived (`accepted_at`):
        // the waits below count from then.
        let mut waiting: Vec<Arc<Request>> = Vec::new();
        loop {
            if self.channels.read().is_none() {
                let failure = Failure::new(ErrorCode::ShuttingDown, "the server is shutting down");
                for request in waiting.drain(..) {
                    self.drop_resumed(&request, &failure);
                }
                return;
            }
            if waiting.is_empty() {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(request) => waiting.push(request),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                std::thread::sleep(POLL);
            }
            waiting.extend(rx.try_iter());
            // Cancelled (or closed) meanwhile: nothing to look up.
            waiting.retain(|r| matches!(r.state.lock().phase, Phase::Queued { .. }));
            if waiting.is_empty() {
                continue;
            }
            let ids: Vec<&str> = waiting.iter().map(|r| &*r.id).collect();
            let records = node.query(|conn| records::get_all(conn, &ids));
            let not_found = Failure::new(ErrorCode::NotFound, "no such request, or it expired");
            let Ok(records) = records else {
                // Redis is down: no cluster coordination, nothing to find.
                for request in waiting.drain(..) {
                    self.drop_resumed(&request, &not_found);
                }
                continue;
            };
            let mut still = Vec::new();
            for (request, record) in waiting.drain(..).zip(records) {
                let waited = request.accepted_at.elapsed();
                match record.map(|json| serde_json::from_str::<Record>(&json)) {
                    Some(Ok(record)) if record.pending => {
                        if waited >= PENDING_WAIT {
                            self.drop_resumed(&request, &not_found);
                        } else {
                            still.push(request);
                        }
                    }
                    Some(Ok(record)) => self.resolve(&request, &record),
                    Some(Err(e)) => {
                        log::warn!("unreadable resume record of {}: {e}", request.id);
                        self.drop_resumed(&request, &not_found);
                    }
                    None if waited >= WAIT => self.drop_resumed(&request, &not_found),
                    None => still.push(request),
                }
            }
            waiting = still;
            node.lookups
                .waiting
                .store(waiting.len(), std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn resolve(self: &Arc<Self>, request: &Arc<Request>, record: &Record) {
        let role = record.role.parse().unwrap_or(Role::Follower);
        let Some(key) = request_key::unhex(&record.key) else {
            let failure = Failure::new(ErrorCode::NotFound, "no such request, or it expired");
            return self.drop_resumed(request, &failure);
        };
        match &record.end {
            None => self.join_remote(request, role, &record.stream, key),
            Some(end) => self.replay_ended(request, role, &record.stream, end),
        }
    }

    /// Makes `request` a member of this node's follower of the remote
    /// generation `token` (started here if there is none yet).
    fn join_remote(self: &Arc<Self>, request: &Arc<Request>, role: Role, token: &str, key: Key) {
        let Some(generation) = self.remote_generation(token, key) else {
            let failure = Failure::new(
                ErrorCode::Overloaded,
                "cannot start a reader for the remote generation",
            );
            return self.drop_resumed(request, &failure);
        };
        let over = {
            let mut st = request.state.lock();
            if !matches!(st.phase, Phase::Queued { .. }) {
                None
            } else {
                let now = Instant::now();
                st.role = Some(role);
                st.source = Some(Source::Generation(generation.clone()));
                st.dequeued_at = Some(now);
                st.joined_at = Some(now);
                let mut gen = generation.state.lock();
                match gen.outcome.clone() {
                    Some(outcome) => Some(outcome),
                    None => {
                        st.phase = Phase::Running;
                        gen.members.push(request.clone());
                        drop(gen);
                        start_from_resume_point(&st, &generation, role);
                        None
                    }
                }
            }
        };
        generation
            .pending_followers
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        if let Some(outcome) = over {
            // It ended before this resume joined: replay it whole.
            self.end_request(request, |st, _| {
                start_from_resume_point(st, &generation, role);
                let tokens = generation.broadcast.token_count();
                Some((outcome.clone(), "".into(), tokens))
            });
        }
    }

    /// This node's follower of remote generation `token`, started if there
    /// is none; counted as awaited by one more member until the caller
    /// joins it (so the janitor does not drop it as unwanted meanwhile).
    fn remote_generation(self: &Arc<Self>, token: &str, key: Key) -> Option<Arc<Generation>> {
        let node = self.cluster.as_ref()?;
        let mut remotes = node.remotes.lock();
        if let Some(generation) = remotes.get(token).filter(|g| !g.is_over()) {
            generation
                .pending_followers
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            return Some(generation.clone());
        }
        let id = self
            .next_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let generation = Generation::new(id, key, false);
        let _ = generation.stream.set(token.to_owned());
        *generation.cluster.lock() = Some(ClusterPart::Follow {
            token: token.to_owned(),
            refreshed: None,
        });
        generation
            .pending_followers
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        remotes.insert(token.to_owned(), generation.clone());
        drop(remotes);
        generation.set_stage(Stage::Streaming, None);
        self.registry.add_generation(&generation);
        let ticket = GenTicket {
            shared: self.clone(),
            generation: generation.clone(),
            leader: None,
        };
        let (shared, token) = (self.clone(), token.to_owned());
        let spawned = std::thread::Builder::new()
            .name("chorus-remote".into())
            .stack_size(super::WORKER_STACK)
            .spawn(move || {
                shared.run_remote(ticket.generation.clone(), token);
                drop(ticket);
            });
        if let Err(e) = spawned {
            let failure = Failure::new(
                ErrorCode::Overloaded,
                format!("cannot start a reader for the remote generation: {e}"),
            );
            self.finish_generation(&generation, Err(failure));
        }
        Some(generation)
    }

    /// Replays a request that ended on another node: the first `end.tokens`
    /// tokens of its stream, then its end.
    fn replay_ended(
        self: &Arc<Self>,
        request: &Arc<Request>,
        role: Role,
        token: &str,
        end: &RecordEnd,
    ) {
        let not_found = Failure::new(ErrorCode::NotFound, "no such request, or it expired");
        let Some(node) = &self.cluster else {
            return self.drop_resumed(request, &not_found);
        };
        let count = usize::try_from(end.tokens).unwrap_or(usize::MAX);
        let events = node
            .query(|conn| Ok(first_entries(conn, token, count)))
            .ok()
            .and_then(Result::ok);
        let pieces: Vec<String> = events
            .unwrap_or_default()
            .into_iter()
            .filter_map(|e| match e {
                StreamEvent::Token(text) => Some(text),
                StreamEvent::End(_) => None,
            })
            .take(count)
            .collect();
        if pieces.len() != count {
            // The stream expired (or was never complete).
            return self.drop_resumed(request, &not_found);
        }
        let answer = Arc::new(CachedAnswer::from_pieces(pieces.iter().map(String::as_str)));
        let result = end.result();
        let ended = {
            let mut st = request.state.lock();
            if !matches!(st.phase, Phase::Queued { .. }) {
                return;
            }
            st.role = Some(role);
            st.source = Some(Source::Cached(answer.clone()));
            st.phase = Phase::Finishing;
            // Timings belong to the node that served the request.
            let end = End {
                result,
                tokens: end.tokens,
                timings: Timings {
                    queue_ms: 0.0,
                    prepare_ms: 0.0,
                    ttft_ms: None,
                    total_ms: 0.0,
                },
                usage: answer.usage,
            };
            let from = st.resume_from;
            // Sent from the answer like a local cache hit: nothing copied
            // per attachment.
            let events = [
                Event::Start { role },
                Event::Tokens {
                    source: answer.clone(),
                    from,
                    to: end.tokens,
                },
                end_event(request, &end, st.role),
            ];
            for a in st.attachments.iter().filter(|a| a.is_live()) {
                a.send(&events);
            }
            st.attachments.clear();
            st.end = Some(end);
            true
        };
        if ended {
            self.complete_remote(request);
        }
    }

    /// Ends a stand-in that found nothing (or cannot go on): its clients
    /// get `failure`, and it is unlisted.
    fn drop_resumed(&self, request: &Arc<Request>, failure: &Failure) {
        let attachments = {
            let mut st = request.state.lock();
            if !matches!(st.phase, Phase::Queued { .. }) {
                return;
            }
            st.phase = Phase::Finished { at: Instant::now() };
            std::mem::take(&mut st.attachments)
        };
        for a in attachments.iter().filter(|a| a.is_live()) {
            a.send(&[Event::Error { id: None, failure }]);
        }
        self.registry.forget(request);
    }
}

/// Sends `start` to every attachment of a resumed request and subscribes
/// it to `generation` from the `seq` its client resumed from.
fn start_from_resume_point(st: &RequestState, generation: &Generation, role: Role) {
    for a in &st.attachments {
        a.send(&[Event::Start { role }]);
        generation.broadcast.subscribe(a, st.resume_from);
    }
}
