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
//! Its heart is `Shared::lead_or_follow` (in `stages`): the moment a chat that
//! missed the cache becomes a generation's leader or one of its
//! followers. Everything before it admits and looks up; everything after
//! it prepares, streams, fans out and ends what that decision made.
//!
//! Threads and state: what runs is listed in the `registry` (one
//! `parking_lot::RwLock`, taken last and only for a map operation: its
//! module states the rule). Each `records::Request` and
//! `records::Generation` has its own mutex. A request's end (`done` or
//! `error`) is sent the moment it is decided; its question and answer then
//! go to the history writer, and its conversation is released when they
//! are stored. A chat or `history` for that conversation arriving in
//! between waits for the commit (well under a millisecond) instead of
//! being refused, so a client that reacts to `done` always finds its
//! conversation free and up to date. A janitor thread enforces the
//! timeouts and drops finished requests after the replay window.
//!
//! Each stage's own work is a function of only what it needs: the cache
//! lane asks `answers::Answers` (the cache and its write count), a
//! preparation worker `preparation::Preparation` (the history and the
//! prompt settings), a streaming worker `streaming::Streaming` (the
//! provider, the tools and their limits, the way out for tokens). What
//! moves a request between the stages and ends it needs the registry,
//! the singleflight and the channels, and is `Shared`'s.
//!
//! Where things are, each file importing only files listed after it
//! (no cycle; `tests/protocol/architecture.rs` checks):
//!
//! - `client`: admission, `cancel`, `resume`;
//! - `stages`: what each pool does with its job, from the cache lane to
//!   the stream, and the handoffs between them;
//! - `janitor`: the timeouts;
//! - `cluster` and `cluster_resume`: the node's policy in a cluster
//!   (claims, leading and following across nodes, handover, `resume` of a
//!   request another node accepted);
//! - `ending`: how generations and requests end, exactly once;
//! - `shared`: the state every stage shares, the jobs and their channels;
//! - `streaming`: the rounds of upstream calls and tools of one answer;
//! - `preparation`: the prompt; `answers`: the answer cache;
//! - `failures`: the one mapping of errors to protocol codes;
//! - `registry`: what is running, under one lock;
//! - `cluster_node`: this node's cluster state;
//! - `records`: the two records everything revolves around, a request and
//!   the generation it receives;
//! - `cluster_part`: a generation's cluster state; `cluster_writer`: the
//!   writes to Redis, on a thread of their own;
//! - `work`: what a chat asks for; `key`: the identical-request key.
//!
//! The files before `shared` work on it, one part of a request's life
//! each (`impl Shared` blocks, and the janitor's functions of it);
//! `shared` imports none of them.

mod answers;
mod client;
mod cluster;
mod cluster_node;
mod cluster_part;
mod cluster_resume;
mod cluster_writer;
mod ending;
mod failures;
mod janitor;
mod key;
mod preparation;
mod records;
mod registry;
mod shared;
mod stages;
mod streaming;
#[cfg(test)]
mod tests;
mod work;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::bounded;
use parking_lot::{Mutex, RwLock};

use crate::cache::Cache;
use crate::config::Config;
use crate::delivery::Client;
use crate::history::History;
use crate::llm::Provider;
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::protocol::{Chat, ErrorCode, Failure};
use crate::singleflight::Group;
use shared::{Channels, FollowJob, IntakeJob, LeaderJob, Shared, StreamJob};

pub use failures::history_failure;
pub use work::GivenPrompt;

/// Stack of pipeline worker threads: they run SQLite and provider calls, so
/// they get more than connection threads.
const WORKER_STACK: usize = 512 * 1024;

/// What a client may ask the pipeline, from its connection thread.
pub struct Pipeline {
    shared: Arc<Shared>,
    pools: Mutex<Vec<Pool>>,
    /// The janitor and, on a cluster node, the resume lookup thread,
    /// with their names: joined at shutdown.
    threads: Mutex<Vec<(JoinHandle<()>, &'static str)>>,
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
            let node =
                cluster_node::ClusterNode::new(&config.cluster).map_err(std::io::Error::other)?;
            log::info!(
                "cluster node {} on {}",
                node.node_id,
                config.cluster.redis_url
            );
            Some(Arc::new(node))
        } else {
            None
        };
        let preparation = preparation::Preparation::new(
            history.clone(),
            config.llm.system_prompt.clone(),
            config.history.max_context_tokens,
        );
        let streaming = streaming::Streaming::new(
            provider,
            toolbox,
            &config.tools,
            history.clone(),
            cluster.clone(),
            metrics.clone(),
        );
        let shared = Arc::new(Shared {
            config: config.clone(),
            history,
            answers: answers::Answers::new(cache, metrics.clone()),
            preparation,
            streaming,
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
        self.shared.streaming.provider().endpoint_stats()
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
        m.cache_backend_up
            .set(i64::from(self.shared.answers.backend().is_up()));
        stages
    }

    /// Entries in the answer cache, when the backend can tell.
    pub fn cache_entries(&self) -> Option<u64> {
        self.shared.answers.backend().entries()
    }

    /// False while the cache backend is unreachable.
    pub fn cache_up(&self) -> bool {
        self.shared.answers.backend().is_up()
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
