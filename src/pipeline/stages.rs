//! What each pool does with its job: the cache lane (lookup, then lead or
//! follow), the follower pool (join a generation), the preparation pool
//! (the prompt) and the streaming pool (the answer), and the handoffs
//! between them. The stages' own work is elsewhere, each a function of
//! what it needs: the lookup in `answers`, the prompt in `preparation`,
//! the rounds of provider calls and tools in `streaming`; here is what
//! needs the registry, the singleflight and the channels.
//!
//! Threads: each `run_*` function runs on a worker of its pool, one job at a
//! time; a job is handed to the next stage with a `try_send`, so no worker
//! ever waits for another stage's capacity.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Sender, TrySendError};

use super::failures::internal;
use super::records::{Generation, Phase, Source};
use super::shared::{
    Channels, FollowJob, GenTicket, IntakeJob, LeaderJob, RequestTicket, Shared, StreamJob,
};
use super::work::Work;

use crate::cache::CachedAnswer;
use crate::delivery::Event;
use crate::history;
use crate::llm::Prompt;
use crate::protocol::{ErrorCode, Failure, Finish, Outcome, Role, Stage};
use crate::request_key::Key;
use crate::singleflight::{Claim, Leader};

/// Whether a cached answer served to a request is in its conversation's
/// history already.
#[derive(Clone, Copy)]
pub(super) enum AnswerStored {
    Yes,
    No,
}

impl Shared {
    // -- the cache lane ----------------------------------------------------

    /// A chat passes the cache lane twice. First its cache lookup; then its
    /// question (and, for a hit, the cached answer) goes to the history
    /// writer, and `announce` sends `accepted` once that is committed.
    /// Then it comes back here (`stored`): a hit to be served, a miss to
    /// lead or follow. The request keeps its intake reservation until then,
    /// so the way back always has room.
    pub(super) fn run_cache_lane(self: &Arc<Self>, mut job: IntakeJob) {
        let ended = job.ticket.request().is_ending();
        let stateless = job.ticket.request().stateless;
        if job.stored || ended || stateless {
            self.intake_reserved.fetch_sub(1, Ordering::AcqRel);
        }
        if ended {
            // Timed out or shut down meanwhile: already answered.
            job.ticket.release();
            return;
        }
        if job.stored {
            if let Some(answer) = job.hit.take() {
                return self.serve_cached(job.ticket, answer, AnswerStored::Yes);
            }
            return self.lead_or_follow(job.ticket, job.work);
        }
        let cached = if job.work.fresh {
            None
        } else {
            job.work.cache_writes_seen = self.answers.writes_seen();
            self.answers.look_up(&job.work.key)
        };
        if stateless {
            // Nothing to store: accepted at once, and on from here.
            return self.start_stateless(job, cached);
        }
        let mut messages = vec![(history::Role::User, job.work.message.as_str().into())];
        if let Some(answer) = &cached {
            // Stored together: one commit for a hit.
            messages.push((history::Role::Assistant, answer.text.clone()));
        }
        let conversation = job.ticket.request().conversation.clone();
        let shared = self.clone();
        self.history
            .write_all(&conversation, messages, move |stored| {
                shared.announce(stored, job, cached)
            });
    }

    /// Runs on the history writer thread once a chat's question is
    /// committed (or could not be): sends `accepted`, which promises the
    /// question is stored, so a crash right after it loses nothing. Then
    /// sends the chat back to the cache lane, which serves a hit or has a
    /// miss lead or follow. A
    /// request that ended meanwhile (shutdown, the janitor) was told so as a
    /// refused chat and goes no further; so does one whose question could
    /// not be stored (`internal`).
    fn announce(
        self: &Arc<Self>,
        stored: Result<(), history::HistoryError>,
        mut job: IntakeJob,
        cached: Option<Arc<CachedAnswer>>,
    ) {
        let request = job.ticket.request().clone();
        let go_on = match stored {
            Err(e) => {
                log::error!("storing the message of {} failed: {e}", request.id);
                let failure = Failure::new(
                    ErrorCode::Internal,
                    "the message could not be stored; nothing was sent upstream",
                );
                self.end_request(&request, |_, _| Some((Err(failure), "".into(), 0)));
                false
            }
            Ok(()) => {
                let mut st = request.state.lock();
                let ended = matches!(st.phase, Phase::Finishing | Phase::Finished { .. });
                if !ended {
                    st.announced = true;
                    // Under the request's lock, so no ending can come
                    // between. Deferred: the request's next frames (a
                    // cached answer, usually) carry them in the same write.
                    for a in st.attachments.iter().filter(|a| a.is_live()) {
                        a.send_deferred(&[
                            Event::Accepted {
                                id: &request.client_id,
                                conversation: &request.conversation,
                            },
                            Event::State {
                                stage: Stage::Queued,
                                position: Some(job.position),
                            },
                        ]);
                    }
                }
                !ended
            }
        };
        if !go_on {
            self.intake_reserved.fetch_sub(1, Ordering::AcqRel);
            job.ticket.release();
            return;
        }
        // Back to the cache lane, a hit too: serving it here would hold up
        // the history writer's next commit, and the lane writes the answer
        // straight to the client's socket.
        job.hit = cached;
        job.stored = true;
        if let Err((job, _)) = self.send(|c| &c.intake, job, "the intake queue is full") {
            // The reservation keeps room: only a closed channel (shutdown)
            // gets here, and the dropped ticket ends the request.
            self.intake_reserved.fetch_sub(1, Ordering::AcqRel);
            drop(job);
        }
    }

    /// A request that stores nothing goes on from its first pass through
    /// the cache lane: `accepted`, then served from the cache or led or
    /// followed.
    fn start_stateless(self: &Arc<Self>, job: IntakeJob, cached: Option<Arc<CachedAnswer>>) {
        let request = job.ticket.request().clone();
        {
            let mut st = request.state.lock();
            if matches!(st.phase, Phase::Finishing | Phase::Finished { .. }) {
                drop(st);
                job.ticket.release();
                return;
            }
            st.announced = true;
            for a in st.attachments.iter().filter(|a| a.is_live()) {
                a.send_deferred(&[Event::Accepted {
                    id: &request.client_id,
                    conversation: &request.conversation,
                }]);
            }
        }
        match cached {
            // Nothing stored, so the answer is not "stored already", but a
            // stateless request has no history to put it in either.
            Some(answer) => self.serve_cached(job.ticket, answer, AnswerStored::Yes),
            None => self.lead_or_follow(job.ticket, job.work),
        }
    }

    /// The singleflight: a new key makes `ticket`'s request a leader, a key
    /// in flight makes it a follower. A `fresh` request always leads alone.
    pub(super) fn lead_or_follow(self: &Arc<Self>, ticket: RequestTicket, work: Work) {
        self.claim_key(ticket, work, true);
    }

    /// [`Shared::lead_or_follow`]; `may_wait` once per request, so a wait
    /// for a finishing generation happens at most once.
    fn claim_key(self: &Arc<Self>, ticket: RequestTicket, work: Work, may_wait: bool) {
        let id = self.next_generation.fetch_add(1, Ordering::Relaxed);
        if work.fresh {
            let generation = Generation::new(id, work.key, false);
            return self.lead(ticket, work, generation, None);
        }
        match self
            .flights
            .claim(work.key, || Generation::new(id, work.key, true))
        {
            Claim::Leader(leader) => {
                let generation = leader.shared().clone();
                if self.answers.written_since(work.cache_writes_seen) {
                    // An answer was cached since this request's lookup: maybe
                    // this one, by a generation that ended in between.
                    if let Some(answer) = self.answers.look_again(&work.key) {
                        // Give the key up; a follower that claimed it
                        // meanwhile sees it cancelled and looks again.
                        self.finish_generation(&generation, Ok(Finish::Cancelled));
                        leader.complete(Ok(Finish::Cancelled));
                        return self.serve_cached(ticket, answer, AnswerStored::No);
                    }
                }
                self.lead(ticket, work, generation, Some(leader));
            }
            Claim::Follower(call) if may_wait && call.shared().is_over() => {
                // It ended a moment ago: its clients have their `done` and
                // its answer is being written to the cache (the cache write
                // comes after the `done`s, see `finish_generation`). Wait for
                // that, then look again, so a question asked again right
                // after `done` is a cache hit. Bounded by the cache write's
                // own bound; past it the finished generation is followed
                // (its whole answer replayed), which is correct too.
                let bound = std::time::Duration::from_millis(
                    self.config.cache.redis_timeout_ms.saturating_add(100),
                );
                let _ = call.wait_timeout(bound);
                match self.answers.look_again(&work.key) {
                    Some(answer) => self.serve_cached(ticket, answer, AnswerStored::No),
                    None => self.claim_key(ticket, work, false),
                }
            }
            Claim::Follower(call) => self.follow(ticket, call.shared().clone(), work),
        }
    }

    /// Serves a cache hit: the whole answer (start, tokens, done) is pushed
    /// in one go. The question is stored already (before `accepted`); the
    /// answer too when the hit came from the first lookup, which stores
    /// both in one commit, but not when it came from a later look.
    pub(super) fn serve_cached(
        self: &Arc<Self>,
        ticket: RequestTicket,
        answer: Arc<CachedAnswer>,
        stored: AnswerStored,
    ) {
        let request = ticket.release();
        let text: Arc<str> = match stored {
            AnswerStored::Yes => "".into(),
            AnswerStored::No => answer.text.clone(),
        };
        let served = self.end_request(&request, |st, _| {
            st.role = Some(Role::Cache);
            st.source = Some(Source::Cached(answer.clone()));
            st.dequeued_at = Some(Instant::now());
            Some((Ok(Finish::Stop), text, answer.token_count()))
        });
        if served {
            self.metrics.count_role(Role::Cache);
        }
    }

    /// Makes `ticket`'s request the leader of `generation` and queues its preparation.
    pub(super) fn lead(
        self: &Arc<Self>,
        ticket: RequestTicket,
        work: Work,
        generation: Arc<Generation>,
        leader: Option<Leader<Key, Arc<Generation>, Outcome>>,
    ) {
        let remote = match self.cluster_claim(&generation) {
            super::cluster::Claimed::Lead => None,
            super::cluster::Claimed::Remote(token) => Some(token),
        };
        let role = if remote.is_some() {
            Role::Follower
        } else {
            Role::Leader
        };
        let request = ticket.release();
        let gen_ticket = GenTicket {
            shared: self.clone(),
            generation: generation.clone(),
            leader,
        };
        {
            let mut st = request.state.lock();
            if !matches!(st.phase, Phase::Queued { .. }) {
                // Cancelled in the meantime. Followers that already claimed
                // this generation see it cancelled and lead a new one.
                drop(st);
                self.finish_generation(&generation, Ok(Finish::Cancelled));
                return;
            }
            let mut gen = generation.state.lock();
            gen.leader_pending = false;
            if let Some(outcome) = gen.outcome.clone() {
                // Ended before its leader joined (it is wanted until then,
                // so only a shutdown does that): told as a member would
                // have been; dropped for lack of interest, led anew (as a
                // follower does).
                drop(gen);
                drop(st);
                if matches!(outcome, Ok(Finish::Cancelled)) {
                    let ticket = RequestTicket {
                        shared: self.clone(),
                        request: Some(request),
                    };
                    return self.lead_or_follow(ticket, work);
                }
                let result = outcome.clone();
                self.end_request(&request, |_, _| Some((result, "".into(), 0)));
                return;
            }
            st.phase = Phase::Running;
            st.role = Some(role);
            st.source = Some(Source::Generation(generation.clone()));
            gen.members.push(request.clone());
            drop(gen);
            for a in &st.attachments {
                a.send(&[Event::Start { role }]);
                generation.broadcast.subscribe(a, 0);
            }
        }
        self.handover_if_pending(&request);
        // Visible to the janitor only now that it has its member, so it is
        // never mistaken for an unwanted generation.
        self.registry.add_generation(&generation);
        // Its only member may have been cancelled since its lock was let go:
        // then `finish_generation` has already run and its removal from the
        // list came before this insertion. Either that removal follows the
        // insertion, or the outcome is visible here (it is set before the
        // removal); so a generation that is over is never left listed.
        if generation.is_over() {
            self.registry.remove_generation(generation.id);
            return;
        }
        self.metrics.count_role(role);
        if let Some(token) = remote {
            // Another node leads it: one reader thread feeds this node's
            // broadcast; local identical requests follow it as usual.
            generation.set_stage(Stage::Streaming, None);
            let shared = self.clone();
            let spawned = std::thread::Builder::new()
                .name("chorus-remote".into())
                .stack_size(super::WORKER_STACK)
                .spawn(move || {
                    shared.run_remote(gen_ticket.generation.clone(), token);
                    drop(gen_ticket);
                });
            if let Err(e) = spawned {
                let failure = Failure::new(
                    ErrorCode::Overloaded,
                    format!("cannot start a reader for the remote generation: {e}"),
                );
                self.finish_generation(&generation, Err(failure));
            }
            return;
        }
        let position = self
            .channels()
            .and_then(|c| c.as_ref().map(|c| c.prepare.len()));
        generation.set_stage(Stage::Queued, position);
        let job = LeaderJob {
            generation: gen_ticket,
            leader: request,
            work,
        };
        if let Err((job, failure)) = self.send(|c| &c.prepare, job, "the preparation queue is full")
        {
            // Settle the outcome before the refused job (and its ticket) is dropped.
            self.finish_generation(&generation, Err(failure));
            drop(job);
        }
    }

    /// `try_send` on one of the stage channels; a refusal hands the job
    /// back with the failure its requests get.
    pub(super) fn send<J>(
        &self,
        channel: impl Fn(&Channels) -> &Sender<J>,
        job: J,
        full: &str,
    ) -> Result<(), (J, Failure)> {
        let channels = self.channels.read();
        let Some(c) = channels.as_ref() else {
            return Err((
                job,
                Failure::new(ErrorCode::ShuttingDown, "the server is shutting down"),
            ));
        };
        channel(c).try_send(job).map_err(|e| match e {
            TrySendError::Full(job) => (job, Failure::new(ErrorCode::Overloaded, full)),
            TrySendError::Disconnected(job) => (
                job,
                Failure::new(ErrorCode::ShuttingDown, "the server is shutting down"),
            ),
        })
    }

    /// Queues `ticket`'s request to join `generation` as a follower.
    pub(super) fn follow(
        self: &Arc<Self>,
        ticket: RequestTicket,
        generation: Arc<Generation>,
        work: Work,
    ) {
        {
            let mut st = ticket.request().state.lock();
            st.role = Some(Role::Follower);
            st.source = Some(Source::Generation(generation.clone()));
        }
        generation.pending_followers.fetch_add(1, Ordering::AcqRel);
        let job = FollowJob {
            ticket,
            generation: generation.clone(),
            work,
        };
        if let Err((job, failure)) = self.send(|c| &c.follow, job, "the follower queue is full") {
            generation.pending_followers.fetch_sub(1, Ordering::AcqRel);
            let request = job.ticket.release();
            self.end_request(&request, |_, phase| {
                matches!(phase, Phase::Queued { .. }).then(|| (Err(failure), "".into(), 0))
            });
        }
    }

    // -- the follower pool -------------------------------------------------

    pub(super) fn run_follower(self: &Arc<Self>, job: FollowJob) {
        let FollowJob {
            ticket,
            generation,
            work,
        } = job;
        let request = ticket.release();
        let ended = {
            let mut st = request.state.lock();
            if !matches!(st.phase, Phase::Queued { .. }) {
                None
            } else {
                let mut gen = generation.state.lock();
                match gen.outcome.clone() {
                    None => {
                        let now = Instant::now();
                        st.dequeued_at = Some(now);
                        st.joined_at = Some(now);
                        st.phase = Phase::Running;
                        gen.members.push(request.clone());
                        // Counted here, not at the claim: a follower whose
                        // generation was dropped before it joined leads instead.
                        self.metrics.count_role(Role::Follower);
                        let stage = gen.stage;
                        drop(gen);
                        for a in &st.attachments {
                            a.send(&[
                                Event::Start {
                                    role: Role::Follower,
                                },
                                Event::State {
                                    stage,
                                    position: None,
                                },
                            ]);
                            generation.broadcast.subscribe(a, 0);
                        }
                        None
                    }
                    Some(outcome) => Some(outcome),
                }
            }
        };
        generation.pending_followers.fetch_sub(1, Ordering::AcqRel);
        match ended {
            None => self.handover_if_pending(&request),
            // Dropped for lack of interest before this follower could join
            // (a cancel or the janitor raced its claim): it is wanted now, so
            // lead a new generation instead of inheriting the cancel.
            Some(Ok(Finish::Cancelled)) => {
                let ticket = RequestTicket {
                    shared: self.clone(),
                    request: Some(request),
                };
                self.lead_or_follow(ticket, work);
            }
            // It ended before this follower got a worker: replay it whole
            // and end the same way.
            Some(outcome) => {
                self.end_request(&request, |st, phase| {
                    if !matches!(phase, Phase::Queued { .. }) {
                        return None;
                    }
                    let now = Instant::now();
                    st.dequeued_at = Some(now);
                    st.joined_at = Some(now);
                    for a in &st.attachments {
                        a.send(&[Event::Start {
                            role: Role::Follower,
                        }]);
                        generation.broadcast.subscribe(a, 0);
                    }
                    let produced = generation.broadcast.produced();
                    let tokens = produced.ends.len() as u64;
                    self.metrics.count_role(Role::Follower);
                    Some((outcome.clone(), produced.text.into(), tokens))
                });
            }
        }
    }

    // -- the preparation pool ----------------------------------------------

    pub(super) fn run_preparation(self: &Arc<Self>, job: LeaderJob) {
        let LeaderJob {
            generation: ticket,
            leader,
            work,
        } = job;
        let generation = ticket.generation.clone();
        if generation.is_over() {
            return;
        }
        let started = Instant::now();
        // Collect first: a request's lock is never taken under a generation's.
        let members = generation.state.lock().members.clone();
        for member in members {
            member.state.lock().dequeued_at.get_or_insert(started);
        }
        generation.set_stage(Stage::Preparing, None);
        if let Some(prompt) = work.given {
            // Brought by the client: nothing to read, and no tools.
            return self.queue_stream(ticket, *prompt, None, started);
        }
        let prompt = match self.preparation.prompt(&leader.conversation, &work) {
            Ok(prompt) => prompt,
            Err(e) => {
                self.finish_generation(&generation, Err(internal(&e)));
                return;
            }
        };
        self.queue_stream(ticket, prompt, Some(leader.conversation.clone()), started);
    }

    /// Hands a prepared prompt to the streaming pool. `conversation` is
    /// the one the tools may read; `None` offers the model no tools.
    fn queue_stream(
        self: &Arc<Self>,
        ticket: GenTicket,
        prompt: Prompt,
        conversation: Option<String>,
        started: Instant,
    ) {
        let generation = ticket.generation.clone();
        if generation.is_over() {
            return;
        }
        generation.state.lock().prepare_ms = started.elapsed().as_secs_f64() * 1000.0;
        let position = self
            .channels()
            .and_then(|c| c.as_ref().map(|c| c.stream.len()));
        generation.set_stage(Stage::WaitingStream, position);
        let job = StreamJob {
            generation: ticket,
            prompt,
            conversation,
        };
        if let Err((job, failure)) = self.send(|c| &c.stream, job, "the streaming queue is full") {
            self.finish_generation(&generation, Err(failure));
            drop(job);
        }
    }

    // -- the streaming pool ------------------------------------------------

    pub(super) fn run_stream(self: &Arc<Self>, job: StreamJob) {
        let StreamJob {
            generation: ticket,
            mut prompt,
            conversation,
        } = job;
        let generation = ticket.generation.clone();
        if generation.is_over() {
            return;
        }
        generation.set_stage(Stage::Streaming, None);
        let outcome = self
            .streaming
            .answer(&generation, &mut prompt, conversation.as_deref());
        self.finish_generation(&generation, outcome);
        drop(ticket);
    }
}
