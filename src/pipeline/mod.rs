//! The request pipeline: intake, cache lane, singleflight, preparation and
//! streaming, each stage a fixed pool of OS threads fed by a bounded
//! crossbeam channel. This is the heart of chorus.
//!
//! ```text
//!  connection threads ──try_send──▶ [intake] ──▶ cache lane (cache_workers)
//!                                                  │ hit: answer from the cache
//!                                                  │ miss: singleflight claim
//!                                   ┌──────────────┴──────────────┐
//!                              new key: leader               key in flight: follower
//!                                   ▼                             ▼
//!                  [prepare] ──▶ preparation pool        [follow] ──▶ follower pool
//!                  (max_concurrent_leaders)              (max_concurrent_followers)
//!                   load history, assemble prompt          subscribe to the leader's
//!                                   ▼                      broadcast, replay from seq 0
//!                  [prepared] ──▶ streaming pool
//!                  (max_concurrent_llm_streams): provider ──▶ broadcast ──▶ outboxes
//! ```
//!
//! Every queue is bounded and every send is a `try_send`: a full queue
//! answers `overloaded` at once and no connection thread ever blocks on the
//! pipeline. A preparation worker hands its prepared prompt over and is free
//! before the stream starts, so long streams never hold back preparation.
//!
//! Threads and state: the active-request map is a `parking_lot::RwLock`
//! (many readers on resume/cancel/stats, brief writes on accept and end).
//! Each [`request::Request`] and [`generation::Generation`] has its own
//! mutex. Requests end on the history writer thread: their answer is stored
//! first, then the conversation is released and `done` is sent, so a client
//! that reacts to `done` always finds its conversation free and up to date.
//! A janitor thread enforces the timeouts and drops finished requests after
//! the replay window.

mod generation;
mod janitor;
mod key;
mod request;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{bounded, Sender, TrySendError};
use parking_lot::{Mutex, RwLock};

pub use generation::GenOutcome;
pub use key::{identical_request_key, KeyInput};

use crate::broadcast::Attachment;
use crate::cache::{Cache, CachedAnswer, Key};
use crate::config::Config;
use crate::history::{self, History};
use crate::llm::{Flow, Prompt, PromptMessage, Provider, StreamEnd};
use crate::metrics::Metrics;
use crate::outbox::{Frame, Outbox, Replay};
use crate::pool::Pool;
use crate::protocol::{self, Chat, ErrorCode, Failure, Finish, Role, Stage};
use crate::singleflight::{Claim, Group, Leader};
use generation::Generation;
use request::{End, Phase, Request, Source};

type Flights = Group<Key, Arc<Generation>, GenOutcome>;

/// Stack of pipeline worker threads: they run SQLite and provider calls, so
/// they get more than connection threads.
const WORKER_STACK: usize = 512 * 1024;

/// Finished requests kept for `resume` at most, whatever the replay window.
const MAX_REPLAYABLE: usize = 100_000;

/// What a client may ask the pipeline, from its connection thread.
pub struct Pipeline {
    shared: Arc<Shared>,
    pools: Mutex<Vec<Pool>>,
    janitor: Mutex<Option<JoinHandle<()>>>,
}

struct Active {
    /// Live requests, and finished ones still inside the replay window.
    requests: HashMap<Arc<str>, Arc<Request>>,
    /// Requests not yet finished: what the janitor checks for timeouts.
    live: HashMap<Arc<str>, Arc<Request>>,
    /// Finished requests in the order they finished, so expiring the replay
    /// window costs nothing per request still inside it.
    finished: VecDeque<(Instant, Arc<str>)>,
    /// Conversations with a request in flight.
    busy_conversations: HashSet<String>,
    /// Generations not yet over.
    generations: HashMap<u64, Arc<Generation>>,
}

struct Channels {
    intake: Sender<IntakeJob>,
    prepare: Sender<LeaderJob>,
    follow: Sender<FollowJob>,
    stream: Sender<StreamJob>,
}

pub(crate) struct Shared {
    config: Arc<Config>,
    history: History,
    cache: Arc<dyn Cache>,
    provider: Arc<dyn Provider>,
    metrics: Arc<Metrics>,
    flights: Flights,
    active: RwLock<Active>,
    /// `None` once the pipeline shuts down.
    channels: RwLock<Option<Channels>>,
    /// Intake slots taken: counted before the user message is queued for
    /// storage, so an `overloaded` chat leaves no trace in the history.
    intake_reserved: AtomicUsize,
    live_requests: AtomicUsize,
    draining: AtomicBool,
    next_generation: AtomicU64,
}

/// A chat that passed admission, on its way to the cache lane.
struct IntakeJob {
    ticket: RequestTicket,
    work: Work,
}

/// What the leader of a generation needs to prepare it.
struct Work {
    key: Key,
    fresh: bool,
    /// Stored messages before this one.
    history_len: u64,
    message: String,
    model: String,
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_tokens: u32,
}

struct LeaderJob {
    generation: GenTicket,
    leader: Arc<Request>,
    work: Work,
}

struct StreamJob {
    generation: GenTicket,
    prompt: Prompt,
}

struct FollowJob {
    ticket: RequestTicket,
    generation: Arc<Generation>,
    /// To lead a new generation if this one was dropped for lack of interest
    /// before the follower could join it.
    work: Work,
}

/// Ownership of a request that has not been handed to a generation yet.
/// Dropping it unhandled (a bug, a panic) still ends the request.
struct RequestTicket {
    shared: Arc<Shared>,
    request: Option<Arc<Request>>,
}

impl RequestTicket {
    fn request(&self) -> &Arc<Request> {
        // Present until `release`, which consumes the ticket.
        self.request.as_ref().expect("ticket holds its request")
    }

    fn release(mut self) -> Arc<Request> {
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
                .end_request(&request, |_, _| Some((Err(failure), String::new(), 0)));
        }
    }
}

/// Ownership of a generation moving through the stages, with its
/// singleflight leadership. Dropping it before the generation is over (a
/// bug, a panic) fails the generation, so no member waits forever.
struct GenTicket {
    shared: Arc<Shared>,
    generation: Arc<Generation>,
    leader: Option<Leader<Key, Arc<Generation>, GenOutcome>>,
}

impl Drop for GenTicket {
    fn drop(&mut self) {
        if !self.generation.is_over() {
            let failure = Failure::new(
                ErrorCode::Internal,
                "the generation was lost inside the server",
            );
            self.shared
                .finish_generation(&self.generation, GenOutcome::Failed(failure));
        }
        // Read the outcome first: completing takes the singleflight's lock,
        // which must not be taken under the generation's.
        let outcome = self.generation.state.lock().outcome.clone();
        if let (Some(leader), Some(outcome)) = (self.leader.take(), outcome) {
            leader.complete(outcome);
        }
    }
}

/// A snapshot of one stage for `/api/stats`.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct StageStats {
    /// Worker threads.
    pub workers: usize,
    /// Workers running a job.
    pub busy: usize,
    /// Jobs waiting.
    pub queue: usize,
    /// Bound of the queue.
    pub capacity: usize,
}

impl Pipeline {
    /// Starts every pool and the janitor.
    pub fn start(
        config: Arc<Config>,
        history: History,
        cache: Arc<dyn Cache>,
        provider: Arc<dyn Provider>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Pipeline> {
        let w = &config.workers;
        let (intake_tx, intake_rx) = bounded::<IntakeJob>(w.intake_queue);
        let (prepare_tx, prepare_rx) = bounded::<LeaderJob>(w.prepare_queue);
        let (follow_tx, follow_rx) = bounded::<FollowJob>(w.follow_queue);
        let (stream_tx, stream_rx) = bounded::<StreamJob>(w.prepared_queue);
        let shared = Arc::new(Shared {
            config: config.clone(),
            history,
            cache,
            provider,
            metrics: metrics.clone(),
            flights: Group::new(),
            active: RwLock::new(Active {
                requests: HashMap::new(),
                live: HashMap::new(),
                finished: VecDeque::new(),
                busy_conversations: HashSet::new(),
                generations: HashMap::new(),
            }),
            channels: RwLock::new(Some(Channels {
                intake: intake_tx,
                prepare: prepare_tx,
                follow: follow_tx,
                stream: stream_tx,
            })),
            intake_reserved: AtomicUsize::new(0),
            live_requests: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            next_generation: AtomicU64::new(1),
        });
        for (stage, n) in [
            ("cache", w.cache_workers),
            ("prepare", w.max_concurrent_leaders),
            ("follow", w.max_concurrent_followers),
            ("stream", w.max_concurrent_llm_streams),
            ("intake", 0),
        ] {
            metrics
                .pool_workers
                .with_label_values(&[stage])
                .set(n as i64);
        }
        let s = shared.clone();
        let cache_pool = Pool::spawn(
            "cache",
            w.cache_workers,
            WORKER_STACK,
            intake_rx,
            move |job| {
                s.intake_reserved.fetch_sub(1, Ordering::AcqRel);
                s.run_cache_lane(job)
            },
        )?;
        let s = shared.clone();
        let prepare_pool = Pool::spawn(
            "prepare",
            w.max_concurrent_leaders,
            WORKER_STACK,
            prepare_rx,
            move |job| s.run_preparation(job),
        )?;
        let s = shared.clone();
        let follow_pool = Pool::spawn(
            "follow",
            w.max_concurrent_followers,
            WORKER_STACK,
            follow_rx,
            move |job| s.run_follower(job),
        )?;
        let s = shared.clone();
        let stream_pool = Pool::spawn(
            "stream",
            w.max_concurrent_llm_streams,
            WORKER_STACK,
            stream_rx,
            move |job| s.run_stream(job),
        )?;
        let s = shared.clone();
        let janitor = std::thread::Builder::new()
            .name("chorus-janitor".into())
            .spawn(move || janitor::run(&s))?;
        Ok(Pipeline {
            shared,
            pools: Mutex::new(vec![cache_pool, prepare_pool, follow_pool, stream_pool]),
            janitor: Mutex::new(Some(janitor)),
        })
    }

    /// Admits a chat from a connection thread. Never blocks on a queue: on
    /// success `accepted` is already in `outbox`; on failure the caller
    /// answers with the returned error (and nothing was stored).
    pub fn submit(&self, outbox: &Arc<Outbox>, chat: Chat) -> Result<(), Failure> {
        self.shared.submit(outbox, chat)
    }

    /// Cancels `request` on behalf of a client.
    pub fn cancel(&self, request: &str) -> Result<(), Failure> {
        self.shared.cancel(request)
    }

    /// Attaches `outbox` to `request` and replays its tokens from `from`.
    pub fn resume(&self, outbox: &Arc<Outbox>, request: &str, from: u64) -> Result<(), Failure> {
        self.shared.resume(outbox, request, from)
    }

    /// The encoded `history` frame for a conversation.
    pub fn history_frame(&self, conversation: &str, limit: usize) -> Result<Vec<u8>, Failure> {
        let messages = self
            .shared
            .history
            .recent(conversation, limit)
            .map_err(|e| history_failure(&e))?
            .ok_or_else(|| Failure::new(ErrorCode::NotFound, "no such conversation"))?;
        let out: Vec<protocol::HistoryMessage<'_>> = messages
            .iter()
            .map(|m| protocol::HistoryMessage {
                role: m.role.as_str(),
                content: &m.content,
                at: m.at_rfc3339(),
            })
            .collect();
        Ok(protocol::history(conversation, &out))
    }

    /// Stops admitting chats (`shutting_down` from now on).
    pub fn begin_drain(&self) {
        self.shared.draining.store(true, Ordering::Release);
    }

    /// True once draining started.
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Acquire)
    }

    /// Requests not yet ended.
    pub fn live_requests(&self) -> usize {
        self.shared.live_requests.load(Ordering::Acquire)
    }

    /// Ends every request still running with `failure` (the drain deadline).
    pub fn abort_all(&self, failure: Failure) {
        self.shared.abort_all(failure)
    }

    /// Stops every pool and the janitor and waits for them; then waits for
    /// the history writer to commit everything.
    pub fn shutdown(&self) {
        self.shared.draining.store(true, Ordering::Release);
        self.shared.abort_all(Failure::new(
            ErrorCode::ShuttingDown,
            "the server is shutting down",
        ));
        // Dropping the senders ends the workers once their queues are empty.
        self.shared.channels.write().take();
        // Take the pools out first: `/api/stats` reads them meanwhile.
        let pools: Vec<Pool> = self.pools.lock().drain(..).collect();
        for pool in pools {
            pool.join();
        }
        if let Some(janitor) = self.janitor.lock().take() {
            let _ = janitor.join();
        }
        let _ = self.shared.history.sync();
    }

    /// Per-stage occupancy for `/api/stats` and `/metrics`.
    pub fn stages(&self) -> Vec<(&'static str, StageStats)> {
        let w = &self.shared.config.workers;
        let pools = self.pools.lock();
        let busy = |name: &str| {
            pools
                .iter()
                .find(|p| p.name() == name)
                .map_or(0, Pool::busy)
        };
        let channels = self.shared.channels.read();
        let depth = |f: &dyn Fn(&Channels) -> usize| channels.as_ref().map_or(0, f);
        let intake = depth(&|c| c.intake.len());
        let stages = vec![
            (
                "intake",
                StageStats {
                    workers: 0,
                    busy: 0,
                    queue: intake,
                    capacity: w.intake_queue,
                },
            ),
            (
                "cache",
                StageStats {
                    workers: w.cache_workers,
                    busy: busy("cache"),
                    queue: intake,
                    capacity: w.intake_queue,
                },
            ),
            (
                "prepare",
                StageStats {
                    workers: w.max_concurrent_leaders,
                    busy: busy("prepare"),
                    queue: depth(&|c| c.prepare.len()),
                    capacity: w.prepare_queue,
                },
            ),
            (
                "follow",
                StageStats {
                    workers: w.max_concurrent_followers,
                    busy: busy("follow"),
                    queue: depth(&|c| c.follow.len()),
                    capacity: w.follow_queue,
                },
            ),
            (
                "stream",
                StageStats {
                    workers: w.max_concurrent_llm_streams,
                    busy: busy("stream"),
                    queue: depth(&|c| c.stream.len()),
                    capacity: w.prepared_queue,
                },
            ),
        ];
        let m = &self.shared.metrics;
        for (name, s) in &stages {
            m.pool_busy.with_label_values(&[name]).set(s.busy as i64);
            m.queue_depth.with_label_values(&[name]).set(s.queue as i64);
        }
        stages
    }

    /// Entries in the answer cache.
    pub fn cache_entries(&self) -> u64 {
        self.shared.cache.entries()
    }

    /// Generations in flight.
    pub fn generations(&self) -> usize {
        self.shared.active.read().generations.len()
    }
}

/// A history failure as the client sees it: a read pool that stays busy
/// is overload, anything else is internal.
fn history_failure(e: &history::HistoryError) -> Failure {
    match e {
        history::HistoryError::Pool(_) => Failure::new(
            ErrorCode::Overloaded,
            "the history database is busy; try again shortly",
        ),
        other => internal(other),
    }
}

fn internal(e: &dyn std::fmt::Display) -> Failure {
    log::error!("internal error: {e}");
    Failure::new(
        ErrorCode::Internal,
        "internal error; the request was not processed",
    )
}

impl Shared {
    fn channels(&self) -> Option<parking_lot::RwLockReadGuard<'_, Option<Channels>>> {
        let guard = self.channels.read();
        guard.is_some().then_some(guard)
    }

    // -- admission (connection thread) -------------------------------------

    fn submit(self: &Arc<Self>, outbox: &Arc<Outbox>, chat: Chat) -> Result<(), Failure> {
        if self.draining.load(Ordering::Acquire) {
            return Err(Failure::new(
                ErrorCode::ShuttingDown,
                "the server is shutting down",
            ));
        }
        // A conversation id made here is new by construction: it has no
        // stored history to read.
        let is_new = chat.conversation.is_none();
        let conversation = chat
            .conversation
            .clone()
            .unwrap_or_else(protocol::conversation_id);
        // The model sees, and the history keeps, the message as the
        // identical-request key defines it: without surrounding whitespace.
        let message = chat.message.trim().to_owned();
        let request = Request::new(chat.id.clone(), conversation.clone(), message.clone());
        if !self
            .active
            .write()
            .busy_conversations
            .insert(conversation.clone())
        {
            return Err(Failure::new(
                ErrorCode::ConversationBusy,
                "this conversation already has a request in flight",
            ));
        }
        let head = match if is_new {
            Ok(None)
        } else {
            self.history.head(&conversation)
        } {
            Ok(head) => head.unwrap_or(history::Head::EMPTY),
            Err(e) => {
                self.unregister(&request);
                return Err(history_failure(&e));
            }
        };
        let llm = &self.config.llm;
        let model = chat
            .options
            .model
            .clone()
            .unwrap_or_else(|| llm.model.clone());
        let max_tokens = chat.options.max_tokens.unwrap_or(llm.max_tokens);
        let key = identical_request_key(&KeyInput {
            model: &model,
            temperature: chat.options.temperature,
            top_p: chat.options.top_p,
            max_tokens,
            system_prompt: &llm.system_prompt,
            history_digest: &head.digest,
            message: &message,
        });
        // Reserve an intake slot before anything is stored, so an overloaded
        // chat leaves no trace; the channel itself can then never be full.
        let capacity = self.config.workers.intake_queue;
        let position = self.intake_reserved.fetch_add(1, Ordering::AcqRel);
        if position >= capacity {
            self.intake_reserved.fetch_sub(1, Ordering::AcqRel);
            self.unregister(&request);
            self.metrics.count_failure(ErrorCode::Overloaded);
            return Err(Failure::new(
                ErrorCode::Overloaded,
                "the intake queue is full; try again shortly",
            ));
        }
        self.live_requests.fetch_add(1, Ordering::AcqRel);
        self.metrics.accepted.inc();
        let attachment = Attachment::new(outbox.clone(), &request.id);
        request.state.lock().attachments.push(attachment);
        let _ = outbox.push_all([
            Frame::Json(protocol::accepted(&chat.id, &request.id, &conversation)),
            Frame::Json(protocol::state(&request.id, Stage::Queued, Some(position))),
        ]);
        // Visible to cancel, resume, the janitor and shutdown only now that
        // `accepted` is queued and the request is counted: whatever ends it
        // from here on has an attachment to tell and a count to settle.
        {
            let mut active = self.active.write();
            active.requests.insert(request.id.clone(), request.clone());
            active.live.insert(request.id.clone(), request.clone());
        }
        let job = IntakeJob {
            ticket: RequestTicket {
                shared: self.clone(),
                request: Some(request),
            },
            work: Work {
                key,
                fresh: chat.options.fresh,
                history_len: head.len,
                message,
                model,
                temperature: chat.options.temperature,
                top_p: chat.options.top_p,
                max_tokens,
            },
        };
        if let Err((job, _)) = self.send(|c| &c.intake, job, "the intake queue is full") {
            // The reservation makes a full channel impossible; a closed one
            // means shutdown. Either way the dropped ticket ends the request.
            self.intake_reserved.fetch_sub(1, Ordering::AcqRel);
            drop(job);
        }
        Ok(())
    }

    /// Undoes admission of a request refused before `accepted`.
    fn unregister(&self, request: &Arc<Request>) {
        let mut active = self.active.write();
        active.busy_conversations.remove(&request.conversation);
    }

    // -- the cache lane ----------------------------------------------------

    fn run_cache_lane(self: &Arc<Self>, job: IntakeJob) {
        let IntakeJob { ticket, work } = job;
        if ticket.request().is_ending() {
            // Cancelled or timed out while queued: already answered.
            ticket.release();
            return;
        }
        if !work.fresh {
            match self.cache.get(&work.key) {
                Ok(Some(answer)) => {
                    self.metrics.cache_hits.inc();
                    // The question is stored together with the answer.
                    return self.serve_cached(ticket, answer);
                }
                Ok(None) => self.metrics.cache_misses.inc(),
                Err(e) => {
                    self.metrics.cache_errors.inc();
                    self.metrics.cache_misses.inc();
                    log::warn!("cache lookup failed, treating as a miss: {e}");
                }
            }
        }
        self.store_user_message(ticket.request());
        self.lead_or_follow(ticket, work);
    }

    /// The singleflight: a new key makes `ticket`'s request a leader, a key
    /// in flight makes it a follower. A `fresh` request always leads alone.
    fn lead_or_follow(self: &Arc<Self>, ticket: RequestTicket, work: Work) {
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
                self.lead(ticket, work, generation, Some(leader));
            }
            Claim::Follower(call) => self.follow(ticket, call.shared().clone(), work),
        }
    }

    fn serve_cached(self: &Arc<Self>, ticket: RequestTicket, answer: Arc<CachedAnswer>) {
        let request = ticket.release();
        // The whole answer (start, tokens, done) is pushed in one go when the
        // history writer has stored it; see `complete_request`.
        let served = self.end_request(&request, |st, _| {
            st.role = Some(Role::Cache);
            st.source = Some(Source::Cached(answer.clone()));
            st.dequeued_at = Some(Instant::now());
            Some((Ok(Finish::Stop), answer.text.clone(), answer.tokens()))
        });
        if served {
            self.metrics.by_role.with_label_values(&["cache"]).inc();
        }
    }

    /// Queues the request's user message for storage, unless that already happened.
    fn store_user_message(&self, request: &Request) {
        let pending = request.state.lock().pending_user_message.take();
        if let Some(message) = pending {
            let id = request.id.clone();
            self.history.write(
                &request.conversation,
                Some((history::Role::User, message)),
                move |stored| {
                    if let Err(e) = stored {
                        log::error!("storing the message of {id} failed: {e}");
                    }
                },
            );
        }
    }

    /// Makes `ticket`'s request the leader of `generation` and queues its preparation.
    fn lead(
        self: &Arc<Self>,
        ticket: RequestTicket,
        work: Work,
        generation: Arc<Generation>,
        leader: Option<Leader<Key, Arc<Generation>, GenOutcome>>,
    ) {
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
                self.finish_generation(&generation, GenOutcome::Cancelled);
                return;
            }
            st.phase = Phase::Running;
            st.role = Some(Role::Leader);
            st.source = Some(Source::Generation(generation.clone()));
            generation.state.lock().members.push(request.clone());
            for a in &st.attachments {
                let _ = a
                    .outbox
                    .push(Frame::Json(protocol::start(&request.id, Role::Leader)));
                generation.broadcast.subscribe(a, 0);
            }
        }
        // Visible to the janitor only now that it has its member, so it is
        // never mistaken for an unwanted generation.
        self.active
            .write()
            .generations
            .insert(generation.id, generation.clone());
        self.metrics.by_role.with_label_values(&["leader"]).inc();
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
            self.finish_generation(&generation, GenOutcome::Failed(failure));
            drop(job);
        }
    }

    /// `try_send` on one of the stage channels; a refusal hands the job
    /// back with the failure its requests get.
    fn send<J>(
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
    fn follow(self: &Arc<Self>, ticket: RequestTicket, generation: Arc<Generation>, work: Work) {
        {
            let mut st = ticket.request().state.lock();
            st.role = Some(Role::Follower);
            st.source = Some(Source::Generation(generation.clone()));
        }
        self.metrics.by_role.with_label_values(&["follower"]).inc();
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
                matches!(phase, Phase::Queued { .. }).then(|| (Err(failure), String::new(), 0))
            });
        }
    }

    // -- the follower pool -------------------------------------------------

    fn run_follower(self: &Arc<Self>, job: FollowJob) {
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
                        let stage = gen.stage;
                        drop(gen);
                        for a in &st.attachments {
                            let _ = a.outbox.push_all([
                                Frame::Json(protocol::start(&request.id, Role::Follower)),
                                Frame::Json(protocol::state(&request.id, stage, None)),
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
            None => {}
            // Dropped for lack of interest before this follower could join
            // (a cancel or the janitor raced its claim): it is wanted now, so
            // lead a new generation instead of inheriting the cancel.
            Some(GenOutcome::Cancelled) => {
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
                        let _ = a
                            .outbox
                            .push(Frame::Json(protocol::start(&request.id, Role::Follower)));
                        generation.broadcast.subscribe(a, 0);
                    }
                    let produced = generation.broadcast.produced();
                    let tokens = produced.ends.len() as u64;
                    Some((member_result(&outcome), produced.text, tokens))
                });
            }
        }
    }

    // -- the preparation pool ----------------------------------------------

    fn run_preparation(self: &Arc<Self>, job: LeaderJob) {
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
        let stored = match self.history.context(&leader.conversation, work.history_len) {
            Ok(messages) => messages,
            Err(e) => {
                self.finish_generation(&generation, GenOutcome::Failed(internal(&e)));
                return;
            }
        };
        let prompt = assemble_prompt(
            &self.config.llm.system_prompt,
            &stored,
            &work,
            self.config.history.max_context_tokens,
        );
        generation.state.lock().prepare_ms = started.elapsed().as_secs_f64() * 1000.0;
        let position = self
            .channels()
            .and_then(|c| c.as_ref().map(|c| c.stream.len()));
        generation.set_stage(Stage::WaitingStream, position);
        let job = StreamJob {
            generation: ticket,
            prompt,
        };
        if let Err((job, failure)) = self.send(|c| &c.stream, job, "the streaming queue is full") {
            self.finish_generation(&generation, GenOutcome::Failed(failure));
            drop(job);
        }
    }

    // -- the streaming pool ------------------------------------------------

    fn run_stream(self: &Arc<Self>, job: StreamJob) {
        let StreamJob {
            generation: ticket,
            prompt,
        } = job;
        let generation = ticket.generation.clone();
        if generation.is_over() {
            return;
        }
        generation.set_stage(Stage::Streaming, None);
        self.metrics.upstream_calls.inc();
        let broadcast = &generation.broadcast;
        let result = self
            .provider
            .stream(&prompt, &generation.abort, &mut |token| {
                if broadcast.publish(token).is_none() {
                    // The generation was ended from outside (timeout, cancel).
                    return Flow::Stop;
                }
                self.metrics.tokens.inc();
                Flow::Continue
            });
        let outcome = match result {
            Ok(StreamEnd::Stop) => GenOutcome::Finished(Finish::Stop),
            Ok(StreamEnd::Length) => GenOutcome::Finished(Finish::Length),
            // Whoever aborted already set the outcome; this is a fallback.
            Ok(StreamEnd::Aborted) => GenOutcome::Cancelled,
            Err(e) => {
                log::warn!("generation {} failed: {e}", generation.id);
                GenOutcome::Failed(Failure::new(ErrorCode::UpstreamError, e.to_string()))
            }
        };
        self.finish_generation(&generation, outcome);
        drop(ticket);
    }

    // -- ending things -----------------------------------------------------

    /// Ends `generation` with `outcome` (first call wins) and ends every
    /// member request accordingly.
    fn finish_generation(self: &Arc<Self>, generation: &Arc<Generation>, outcome: GenOutcome) {
        let (members, was_streaming) = {
            let mut st = generation.state.lock();
            if st.outcome.is_some() {
                return;
            }
            st.outcome = Some(outcome.clone());
            (
                std::mem::take(&mut st.members),
                st.stage == Stage::Streaming,
            )
        };
        generation.abort.abort();
        let produced = generation.broadcast.finish();
        match &outcome {
            GenOutcome::Finished(Finish::Stop) => {
                let answer = Arc::new(CachedAnswer::from_pieces(produced.pieces()));
                if let Err(e) = self.cache.put(&generation.key, answer) {
                    self.metrics.cache_errors.inc();
                    log::warn!("cache write failed: {e}");
                }
            }
            GenOutcome::Finished(_) => {}
            GenOutcome::Cancelled => {
                if was_streaming {
                    self.metrics.upstream_aborted.inc();
                }
            }
            GenOutcome::Failed(f) => {
                if was_streaming {
                    self.metrics.upstream_aborted.inc();
                }
                if f.code == ErrorCode::UpstreamError {
                    self.metrics.upstream_failures.inc();
                }
            }
        }
        if generation.shared {
            // New identical requests must not join a generation that is over:
            // they find the cache entry written above, or start afresh.
            if let Some(call) = self.flights.get(&generation.key) {
                if Arc::ptr_eq(call.shared(), generation) {
                    self.flights.forget(&generation.key);
                }
            }
        }
        self.active.write().generations.remove(&generation.id);
        let result = member_result(&outcome);
        let tokens = produced.ends.len() as u64;
        for member in members {
            self.end_request(&member, |_, _| {
                Some((result.clone(), produced.text.clone(), tokens))
            });
        }
    }

    /// Ends `request` exactly once. `decide` runs under the request's lock,
    /// with the phase the request was in, and only if nobody ended it yet; it
    /// returns the result, the answer text to store and the tokens the client
    /// was sent, or `None` to leave the request alone. The end is recorded
    /// in the same critical section, so a concurrent `resume` sees either the
    /// running request or its end, never something in between. The answer
    /// (with the question, if it is still pending) is then queued for
    /// storage, and `complete_request` tells the clients once it is stored.
    /// Returns true when this call ended the request.
    fn end_request(
        self: &Arc<Self>,
        request: &Arc<Request>,
        decide: impl FnOnce(
            &mut request::RequestState,
            Phase,
        ) -> Option<(Result<Finish, Failure>, String, u64)>,
    ) -> bool {
        let mut messages = Vec::with_capacity(2);
        let (result, tokens) = {
            let mut st = request.state.lock();
            let phase = st.phase;
            if matches!(phase, Phase::Finishing | Phase::Finished { .. }) {
                return false;
            }
            let Some((result, answer, tokens)) = decide(&mut st, phase) else {
                return false;
            };
            st.phase = Phase::Finishing;
            let timings = self.timings(request, &st, tokens);
            st.end = Some(End {
                result: result.clone(),
                tokens,
                timings,
            });
            if let Some(question) = st.pending_user_message.take() {
                messages.push((history::Role::User, question));
            }
            if !answer.is_empty() {
                messages.push((history::Role::Assistant, answer));
            }
            (result, tokens)
        };
        let (shared, request2) = (self.clone(), request.clone());
        self.history
            .write_all(&request.conversation, messages, move |stored| {
                if let Err(e) = stored {
                    log::error!("storing the answer of {} failed: {e}", request2.id);
                }
                shared.complete_request(&request2, result, tokens);
            });
        true
    }

    fn timings(
        &self,
        request: &Request,
        st: &request::RequestState,
        tokens: u64,
    ) -> protocol::Timings {
        let (prepare_ms, first_token) = match &st.source {
            Some(Source::Generation(g)) => (g.prepare_ms(), g.broadcast.first_token_at()),
            Some(Source::Cached(_)) => (0.0, Some(Instant::now())),
            None => (0.0, None),
        };
        request.timings(st, prepare_ms, if tokens > 0 { first_token } else { None })
    }

    /// Runs on the history writer thread once the answer is stored.
    fn complete_request(
        &self,
        request: &Arc<Request>,
        result: Result<Finish, Failure>,
        tokens: u64,
    ) {
        {
            let mut active = self.active.write();
            active.busy_conversations.remove(&request.conversation);
            active.live.remove(&request.id);
            active
                .finished
                .push_back((Instant::now(), request.id.clone()));
            // Under a flood of short requests the replay window alone would
            // let this map grow with the request rate; past the cap the
            // oldest leave early (a late `resume` then gets `not_found`).
            while active.finished.len() > MAX_REPLAYABLE {
                if let Some((_, id)) = active.finished.pop_front() {
                    active.requests.remove(&id);
                }
            }
        }
        self.live_requests.fetch_sub(1, Ordering::AcqRel);
        let mut st = request.state.lock();
        let timings = self.timings(request, &st, tokens);
        let role = st.role;
        let end = End {
            result: result.clone(),
            tokens,
            timings,
        };
        let end_frame = end_frame(request, &end, role);
        let cached = match (&st.source, &result) {
            (Some(Source::Cached(answer)), Ok(_)) => Some(answer.clone()),
            _ => None,
        };
        for a in st.attachments.iter().filter(|a| a.is_live()) {
            let frames = match &cached {
                Some(answer) => {
                    let mut frames = vec![Frame::Json(protocol::start(&a.request, Role::Cache))];
                    frames.extend(cached_tokens(a, answer, 0, answer.tokens()));
                    frames
                }
                None => Vec::new(),
            };
            let _ = a
                .outbox
                .push_all(frames.into_iter().chain([Frame::Json(end_frame.clone())]));
        }
        st.attachments.clear();
        st.phase = Phase::Finished { at: Instant::now() };
        st.end = Some(end);
        drop(st);
        match &result {
            Ok(Finish::Cancelled) => self
                .metrics
                .by_outcome
                .with_label_values(&["cancelled"])
                .inc(),
            Ok(_) if role.is_none() => self
                .metrics
                .by_outcome
                .with_label_values(&["cancelled"])
                .inc(),
            Ok(_) => self.metrics.by_outcome.with_label_values(&["done"]).inc(),
            Err(f) => self.metrics.count_failure(f.code),
        }
        if let Some(ttft) = timings.ttft_ms {
            if result.is_ok() {
                self.metrics.observe_ttft_ms(ttft);
            }
        }
    }

    // -- client operations -------------------------------------------------

    fn lookup(&self, request: &str) -> Result<Arc<Request>, Failure> {
        self.active
            .read()
            .requests
            .get(request)
            .cloned()
            .ok_or_else(|| Failure::new(ErrorCode::NotFound, "no such request, or it expired"))
    }

    fn cancel(self: &Arc<Self>, id: &str) -> Result<(), Failure> {
        let request = self.lookup(id)?;
        let mut left: Option<Arc<Generation>> = None;
        // Everything under the request's lock (generation and broadcast locks
        // nest inside it): no worker can make the request a member meanwhile,
        // and the tokens counted are exactly those it was sent.
        self.end_request(&request, |st, phase| {
            let Some(Source::Generation(generation)) = st.source.clone() else {
                // Still in the intake queue (a cached answer is never cancelled:
                // it is already ending when it gets its source).
                return Some((Ok(Finish::Cancelled), String::new(), 0));
            };
            if generation.leave(&request) {
                left = Some(generation.clone());
            }
            if phase != Phase::Running {
                // A follower still waiting for a worker: it was sent nothing.
                return Some((Ok(Finish::Cancelled), String::new(), 0));
            }
            // Running (even if the generation just ended and took its
            // members): detach and count what it was sent.
            let produced = generation.broadcast.detach(&st.attachments);
            let tokens = produced.ends.len() as u64;
            Some((Ok(Finish::Cancelled), produced.text, tokens))
        });
        if let Some(generation) = left {
            if generation.is_unwanted() && !self.config.cache.complete_orphans {
                self.finish_generation(&generation, GenOutcome::Cancelled);
            }
        }
        Ok(())
    }

    fn resume(&self, outbox: &Arc<Outbox>, id: &str, from: u64) -> Result<(), Failure> {
        let request = self.lookup(id)?;
        let attachment = Attachment::new(outbox.clone(), id);
        let mut st = request.state.lock();
        let start = st.role.map(|role| Frame::Json(protocol::start(id, role)));
        if let Some(end) = &st.end {
            // Ended (or being stored): replay exactly what it was sent, then
            // its end. Never live: the generation may go on for others.
            let mut frames: Vec<Frame> = start.into_iter().collect();
            match &st.source {
                Some(Source::Generation(g)) if from < end.tokens => {
                    frames.push(Frame::Replay(Replay {
                        broadcast: g.broadcast.clone(),
                        prefix: attachment.prefix.clone(),
                        from,
                        to: end.tokens,
                    }));
                }
                Some(Source::Cached(answer)) => {
                    frames.extend(cached_tokens(&attachment, answer, from, end.tokens));
                }
                _ => {}
            }
            frames.push(Frame::Json(end_frame(&request, end, st.role)));
            let _ = outbox.push_all(frames);
            return Ok(());
        }
        // A connection resuming a request it is still attached to replaces
        // that attachment, so it never gets the stream, or the end, twice.
        if let Some(i) = st
            .attachments
            .iter()
            .position(|a| Arc::ptr_eq(&a.outbox, outbox) && a.is_live())
        {
            let old = st.attachments.swap_remove(i);
            if let Some(Source::Generation(g)) = &st.source {
                g.broadcast.unsubscribe(&old);
            }
        }
        if let (Phase::Running, Some(Source::Generation(g))) = (&st.phase, &st.source) {
            // Live: its tokens from `from` on, its end from `complete_request`.
            if let Some(start) = start {
                let _ = outbox.push(start);
            }
            g.broadcast.subscribe(&attachment, from);
        }
        // Still queued: `start` and the stream come when it gets a role.
        st.attachments.push(attachment);
        Ok(())
    }

    fn abort_all(self: &Arc<Self>, failure: Failure) {
        let (generations, requests): (Vec<_>, Vec<_>) = {
            let active = self.active.read();
            (
                active.generations.values().cloned().collect(),
                active.live.values().cloned().collect(),
            )
        };
        for g in generations {
            self.finish_generation(&g, GenOutcome::Failed(failure.clone()));
        }
        // Whatever the generations did not end: requests still queued.
        for r in requests {
            self.end_request(&r, |st, phase| match (&st.source, phase) {
                (Some(Source::Generation(g)), Phase::Running) => {
                    let produced = g.broadcast.detach(&st.attachments);
                    let tokens = produced.ends.len() as u64;
                    Some((Err(failure.clone()), produced.text, tokens))
                }
                _ => Some((Err(failure.clone()), String::new(), 0)),
            });
        }
    }
}

/// The frame that ends a request for one client: `done`, or `error` when it
/// failed or was cancelled before it had a role.
fn end_frame(request: &Request, end: &End, role: Option<Role>) -> Vec<u8> {
    match (&end.result, role) {
        (Ok(finish), Some(role)) => {
            protocol::done(&request.id, *finish, end.tokens, role, end.timings)
        }
        (Ok(_), None) => protocol::error(
            Some(&request.id),
            Some(&request.client_id),
            &Failure::new(ErrorCode::Cancelled, "cancelled before it started"),
        ),
        (Err(f), _) => protocol::error(Some(&request.id), Some(&request.client_id), f),
    }
}

/// The result a member request gets from its generation's outcome.
fn member_result(outcome: &GenOutcome) -> Result<Finish, Failure> {
    match outcome {
        GenOutcome::Finished(f) => Ok(*f),
        GenOutcome::Cancelled => Ok(Finish::Cancelled),
        GenOutcome::Failed(f) => Err(f.clone()),
    }
}

/// Token frames `from..to` of a cached answer, for one attachment.
fn cached_tokens<'a>(
    a: &'a Attachment,
    answer: &'a CachedAnswer,
    from: u64,
    to: u64,
) -> impl Iterator<Item = Frame> + 'a {
    let skip = usize::try_from(from).unwrap_or(usize::MAX);
    let take = usize::try_from(to.saturating_sub(from)).unwrap_or(usize::MAX);
    answer
        .tails
        .iter()
        .skip(skip)
        .take(take)
        .map(|tail| Frame::Token {
            prefix: a.prefix.clone(),
            tail: tail.clone(),
        })
}

/// A rough token count (about four characters per token, plus a few for
/// the message framing): enough to keep a prompt under a budget without a
/// model-specific tokenizer.
fn estimate_tokens(text: &str) -> usize {
    text.chars().count().div_ceil(4) + 4
}

/// System prompt, then as much recent history as fits in `max_context_tokens`,
/// then the new message (always included).
fn assemble_prompt(
    system: &str,
    stored: &[history::Message],
    work: &Work,
    max_context_tokens: usize,
) -> Prompt {
    let mut budget = max_context_tokens
        .saturating_sub(estimate_tokens(system))
        .saturating_sub(estimate_tokens(&work.message));
    let mut kept = Vec::new();
    for m in stored.iter().rev() {
        let cost = estimate_tokens(&m.content);
        if cost > budget {
            break;
        }
        budget -= cost;
        kept.push(m);
    }
    let mut messages = Vec::with_capacity(kept.len() + 2);
    if !system.is_empty() {
        messages.push(PromptMessage {
            role: "system",
            content: system.to_owned(),
        });
    }
    messages.extend(kept.into_iter().rev().map(|m| PromptMessage {
        role: m.role.as_str(),
        content: m.content.clone(),
    }));
    messages.push(PromptMessage {
        role: "user",
        content: work.message.clone(),
    });
    Prompt {
        model: work.model.clone(),
        messages,
        temperature: work.temperature,
        top_p: work.top_p,
        max_tokens: work.max_tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work(message: &str) -> Work {
        Work {
            key: [0; 32],
            fresh: false,
            history_len: 0,
            message: message.into(),
            model: "m".into(),
            temperature: None,
            top_p: None,
            max_tokens: 10,
        }
    }

    fn stored(n: usize) -> Vec<history::Message> {
        (0..n)
            .map(|i| history::Message {
                role: if i % 2 == 0 {
                    history::Role::User
                } else {
                    history::Role::Assistant
                },
                content: format!("message number {i} with some padding text"),
                at_ms: 0,
            })
            .collect()
    }

    #[test]
    fn prompt_keeps_the_newest_history_within_budget() {
        let all = assemble_prompt("sys", &stored(10), &work("now"), 100_000);
        assert_eq!(all.messages.len(), 12);
        assert_eq!(all.messages[0].role, "system");
        assert_eq!(all.messages[11].content, "now");
        let some = assemble_prompt("sys", &stored(10), &work("now"), 60);
        assert!(some.messages.len() < 12 && some.messages.len() > 2);
        // What is kept is the most recent part, in order.
        assert_eq!(
            some.messages[some.messages.len() - 2].content,
            stored(10)[9].content
        );
        let none = assemble_prompt("sys", &stored(10), &work("now"), 1);
        assert_eq!(none.messages.len(), 2);
    }
}
