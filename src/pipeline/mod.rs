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
//!                  (max_concurrent_llm_streams): provider ──▶ broadcast ──▶ clients
//! ```
//!
//! Every queue is bounded and every send is a `try_send`: a full queue
//! answers `overloaded` at once and no connection thread ever blocks on the
//! pipeline. A preparation worker hands its prepared prompt over and is free
//! before the stream starts, so long streams never hold back preparation.
//!
//! Threads and state: what runs is listed in the `registry` (one
//! `parking_lot::RwLock`, taken last and only for a map operation: its
//! module states the rule). Each `request::Request` and `generation::Generation` has its own
//! mutex. A request's end (`done` or `error`) is sent the moment it is
//! decided; its question and answer then go to the history writer, and its
//! conversation is released when they are stored. A chat or `history` for
//! that conversation arriving in between waits for the commit (well under a
//! millisecond) instead of being refused, so a client that reacts to `done`
//! always finds its conversation free and up to date.
//! A janitor thread enforces the timeouts and drops finished requests after
//! the replay window.
//!
//! Where things are: `client` admits chats and handles `cancel` and
//! `resume`; `stages` is the work of each pool; `ending` is how
//! generations and requests end, exactly once; `registry` what is
//! running, under one lock; `janitor` the timeouts;
//! `generation` and `request` the two records everything revolves
//! around; `key` the identical-request key; `prompt` the prompt;
//! `cluster` the node's part in a cluster, with `cluster_writer` (its
//! writes to Redis, on a thread of their own) and `cluster_resume`
//! (`resume` of a request another node accepted).

mod client;
mod cluster;
mod cluster_part;
mod cluster_resume;
mod cluster_writer;
mod ending;
mod janitor;
mod key;
mod prompt;
mod records;
mod registry;
mod stages;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Sender};
use parking_lot::{Mutex, RwLock};

pub use key::{identical_request_key, Input, KeyInput};

use crate::cache::{Cache, Key};
use crate::config::Config;
use crate::delivery::Client;
use crate::history::{self, History};
use crate::llm::{Prompt, Provider};
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::protocol::{Chat, ErrorCode, Failure, Outcome};
use crate::singleflight::{Group, Leader};
use records::Generation;
use records::Request;

type Flights = Group<Key, Arc<Generation>, Outcome>;

/// Stack of pipeline worker threads: they run SQLite and provider calls, so
/// they get more than connection threads.
const WORKER_STACK: usize = 512 * 1024;

/// How long a chat or `history` for a conversation waits for the previous
/// request's messages to be stored before answering `conversation_busy`.
const STORE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// What a client may ask the pipeline, from its connection thread.
pub struct Pipeline {
    shared: Arc<Shared>,
    pools: Mutex<Vec<Pool>>,
    /// The janitor and, on a cluster node, the resume lookup thread,
    /// with their names: joined at shutdown.
    threads: Mutex<Vec<(JoinHandle<()>, &'static str)>>,
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
    /// `None` when tools are disabled (or none is enabled).
    toolbox: Option<crate::tools::Toolbox>,
    /// `None` unless `[cluster] enabled`.
    cluster: Option<cluster::ClusterNode>,
    metrics: Arc<Metrics>,
    flights: Flights,
    registry: registry::Registry,
    /// `None` once the pipeline shuts down.
    channels: RwLock<Option<Channels>>,
    /// Intake slots taken: counted before the user message is queued for
    /// storage, so an `overloaded` chat leaves no trace in the history.
    intake_reserved: AtomicUsize,
    live_requests: AtomicUsize,
    draining: AtomicBool,
    next_generation: AtomicU64,
    /// Answers written to the cache so far (see [`Work::cache_writes_seen`]).
    cache_writes: AtomicU64,
}

/// A chat that passed admission, on its way to the cache lane.
struct IntakeJob {
    ticket: RequestTicket,
    work: Work,
    /// Its place in the intake queue when it was admitted, for `accepted`'s
    /// `state` frame.
    position: usize,
    /// Its question is stored and `accepted` sent: the second pass through
    /// the cache lane (see `run_cache_lane`).
    stored: bool,
    /// On the second pass of a hit: the answer to serve (stored already).
    hit: Option<Arc<crate::cache::CachedAnswer>>,
}

/// What the leader of a generation needs to prepare it.
struct Work {
    key: Key,
    fresh: bool,
    /// Stored messages before this one.
    history_len: u64,
    /// [`Shared::cache_writes`] just before the cache lane's lookup: if it
    /// moved by the time this request would lead, an identical answer may
    /// have been cached in between, so the cache is asked again.
    cache_writes_seen: u64,
    message: String,
    model: String,
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_tokens: u32,
    /// The whole prompt, when the client brought it (the HTTP API):
    /// preparation then reads no history, and the model gets no tools.
    given: Option<Box<Prompt>>,
}

/// A request that brings its whole prompt, as an OpenAI client does: no
/// conversation, no stored history, no system prompt or option added, and
/// none of chorus's own tools.
#[derive(Debug, Clone)]
pub struct GivenPrompt {
    /// The client's id for it (may be empty).
    pub id: String,
    /// What goes upstream, as given; an empty model means the configured one.
    pub prompt: Prompt,
    /// No cache read and no joining a generation in flight.
    pub fresh: bool,
}

struct LeaderJob {
    generation: GenTicket,
    leader: Arc<Request>,
    work: Work,
}

struct StreamJob {
    generation: GenTicket,
    prompt: Prompt,
    /// The conversation, for the tools that read it; `None` when the model
    /// is offered no tools (a prompt the client brought whole).
    conversation: Option<String>,
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
                .end_request(&request, |_, _| Some((Err(failure), "".into(), 0)));
        }
    }
}

/// Ownership of a generation moving through the stages, with its
/// singleflight leadership. Dropping it before the generation is over (a
/// bug, a panic) fails the generation, so no member waits forever.
struct GenTicket {
    shared: Arc<Shared>,
    generation: Arc<Generation>,
    leader: Option<Leader<Key, Arc<Generation>, Outcome>>,
}

impl Drop for GenTicket {
    fn drop(&mut self) {
        if !self.generation.is_over() {
            let failure = Failure::new(
                ErrorCode::Internal,
                "the generation was lost inside the server",
            );
            self.shared
                .finish_generation(&self.generation, Err(failure));
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
        // The configuration was validated, so the names are known.
        let toolbox = crate::tools::Toolbox::new(&config.tools.builtins, &config.tools.direct)
            .ok()
            .filter(|t| config.tools.enabled && !t.is_empty());
        let cluster = if config.cluster.enabled {
            let node = cluster::ClusterNode::new(&config.cluster).map_err(std::io::Error::other)?;
            log::info!(
                "cluster node {} on {}",
                node.node_id,
                config.cluster.redis_url
            );
            Some(node)
        } else {
            None
        };
        let shared = Arc::new(Shared {
            config: config.clone(),
            history,
            cache,
            provider,
            toolbox,
            cluster,
            metrics: metrics.clone(),
            flights: Group::new(),
            registry: registry::Registry::default(),
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
            cache_writes: AtomicU64::new(0),
        });
        let lookups = shared.start_lookups()?;
        let s = shared.clone();
        let cache_pool = Pool::spawn(
            "cache",
            w.cache_workers,
            WORKER_STACK,
            intake_rx,
            move |job| s.run_cache_lane(job),
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
            threads: Mutex::new(
                std::iter::once((janitor, "janitor"))
                    .chain(lookups.map(|l| (l, "cluster lookup")))
                    .collect(),
            ),
        })
    }

    /// Admits a chat from a connection thread. Never blocks on a queue: on
    /// success `accepted` is on its way to `client`; on failure the caller
    /// answers with the returned error (and nothing was stored).
    /// Admits a chat; returns its request id.
    pub fn submit(&self, client: &Arc<dyn Client>, chat: Chat) -> Result<String, Failure> {
        self.shared.submit(client, chat)
    }

    /// Admits a request that brings its whole prompt (the HTTP API); returns
    /// its request id. Like [`Pipeline::submit`], it never blocks on a queue.
    pub fn submit_prompt(
        &self,
        client: &Arc<dyn Client>,
        given: GivenPrompt,
    ) -> Result<String, Failure> {
        self.shared.submit_prompt(client, given)
    }

    /// Tells the pipeline that a connection closed while `requests` (its
    /// chats and resumes) may still run, so that, in a cluster, another
    /// node can take a `resume` of them.
    pub fn connection_closed(&self, requests: &[String]) {
        self.shared.cluster_handover(requests);
    }

    /// Cancels `request` on behalf of a client.
    pub fn cancel(&self, request: &str) -> Result<(), Failure> {
        self.shared.cancel(request)
    }

    /// The model `request` asked for, when this node knows the request.
    pub fn model_of(&self, request: &str) -> Option<String> {
        self.shared.model_of(request)
    }

    /// Attaches `client` to `request` and replays its tokens from `from`.
    pub fn resume(
        &self,
        client: &Arc<dyn Client>,
        request: &str,
        from: u64,
    ) -> Result<(), Failure> {
        self.shared.resume(client, request, from)
    }

    /// The stored history, once every answer already ended in
    /// `conversation` is committed, so that a client reading it after its
    /// `done` finds its answer there.
    pub fn stored_history(&self, conversation: &str) -> &History {
        self.shared.await_stored(conversation);
        &self.shared.history
    }

    /// The most bytes one `history` answer may take.
    pub fn history_max_answer_bytes(&self) -> usize {
        self.shared.config.history.max_answer_bytes
    }

    /// Stops admitting chats (`shutting_down` from now on).
    pub fn begin_drain(&self) {
        self.shared.draining.store(true, Ordering::Release);
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
        let threads: Vec<_> = self.threads.lock().drain(..).collect();
        for (thread, what) in threads {
            crate::threads::join(thread, what);
        }
        let _ = self.shared.history.sync();
    }

    /// Counters of each upstream endpoint, for `/api/stats`.
    pub fn provider_stats(&self) -> Vec<crate::llm::EndpointStats> {
        self.shared.provider.endpoint_stats()
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
        let stage = |name, workers, queue, capacity| {
            let busy = busy(name);
            (
                name,
                StageStats {
                    workers,
                    busy,
                    queue,
                    capacity,
                },
            )
        };
        // The cache lane drains the intake queue itself: both show that queue.
        let intake = depth(&|c| c.intake.len());
        let stages = vec![
            stage("intake", 0, intake, w.intake_queue),
            stage("cache", w.cache_workers, intake, w.intake_queue),
            stage(
                "prepare",
                w.max_concurrent_leaders,
                depth(&|c| c.prepare.len()),
                w.prepare_queue,
            ),
            stage(
                "follow",
                w.max_concurrent_followers,
                depth(&|c| c.follow.len()),
                w.follow_queue,
            ),
            stage(
                "stream",
                w.max_concurrent_llm_streams,
                depth(&|c| c.stream.len()),
                w.prepared_queue,
            ),
        ];
        let m = &self.shared.metrics;
        for (name, s) in &stages {
            m.pool_workers
                .with_label_values(&[name])
                .set(s.workers as i64);
            m.pool_busy.with_label_values(&[name]).set(s.busy as i64);
            m.queue_depth.with_label_values(&[name]).set(s.queue as i64);
        }
        m.cache_backend_up.set(i64::from(self.shared.cache.is_up()));
        stages
    }

    /// Entries in the answer cache, when the backend can tell.
    pub fn cache_entries(&self) -> Option<u64> {
        self.shared.cache.entries()
    }

    /// False while the cache backend is unreachable.
    pub fn cache_up(&self) -> bool {
        self.shared.cache.is_up()
    }

    /// The cluster's state for `/api/stats`, when clustering is on:
    /// whether its Redis is up, writes waiting for the writer thread, and
    /// resumes waiting for their record.
    pub fn cluster_stats(&self) -> Option<serde_json::Value> {
        let node = self.shared.cluster.as_ref()?;
        let waiting = node
            .lookups
            .waiting
            .load(std::sync::atomic::Ordering::Relaxed);
        Some(serde_json::json!({
            "redis_up": !node.breaker.is_open(),
            "writes_queued": node.writes.queued(),
            "resumes_waiting": waiting + node.lookups.queued(),
            "remote_generations": node.remotes.lock().len(),
        }))
    }

    /// Generations in flight.
    pub fn generations(&self) -> usize {
        self.shared.registry.generations()
    }
}

// How the layers' errors reach clients: the one place they map to codes.
// (Cache errors never do: a failing cache is a miss.)

/// A provider failure as the clients of its generation see it.
/// The detail (the upstream's own words) goes to the log only, where the
/// caller writes it.
fn llm_failure(e: &crate::llm::LlmError) -> Failure {
    let code = match e {
        crate::llm::LlmError::Timeout { .. } => ErrorCode::ProcessingTimeout,
        _ => ErrorCode::UpstreamError,
    };
    Failure::new(code, e.client_message())
}

/// A history failure as the client sees it: a read pool that stays busy
/// is overload, anything else is internal.
pub fn history_failure(e: &history::HistoryError) -> Failure {
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
}
