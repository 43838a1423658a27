//! The server: one listening port, an accept thread, one thread per
//! connection, and the orderly shutdown.
//!
//! Threads:
//! - the accept thread (`accept`) only accepts and spawns: each accepted socket gets
//!   its own thread (stack `connection_stack_kib`) that reads the HTTP head,
//!   answers plain HTTP, or upgrades and runs the WebSocket loop;
//! - the thread that calls [`Server::shutdown`] (main, on the stop signal)
//!   drains: new chats get `shutting_down`, `/healthz` says
//!   `draining`, running streams get up to `drain_ms` to finish, then every
//!   remaining request ends with `shutting_down`, every WebSocket is closed
//!   with 1001 and the history is flushed to SQLite.
//!
//! The accept thread sleeps in `poll(2)` on the listener and an eventfd, so
//! stopping it is an explicit wake-up, not a connection to ourselves.
//!
//! Every request's `Host` is checked against `server.allowed_hosts` before
//! anything else ([`crate::authority`]), and every plain HTTP answer ends
//! with a lingering close ([`http::linger_close`]). Everything a
//! connection thread counts or registers is held by a drop guard
//! (`ThreadSlot`, `ConnectionSlot`, `Registration`), so a thread that
//! panics gives it all back.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustix::event::{eventfd, EventfdFlags};
use socket2::{Domain, Socket, Type};

mod accept;
#[cfg(test)]
mod tests;

use crate::authority::{self, HostPolicy};
use crate::cache::{Cache, MemoryCache, RedisCache};
use crate::config::{CacheBackend, Config, LlmProvider};
use crate::history::History;
use crate::llm::{Endpoint, OpenAi, Provider, RetryPolicy, Simulated};
use crate::metrics::Metrics;
use crate::net::descriptors::{self, Exhaustion};
use crate::net::http;
use crate::net::static_files::{self, StaticFiles};
use crate::outbox::{Frame, Outbox};
use crate::pipeline::Pipeline;
use crate::protocol::{ErrorCode, Failure};
use crate::ws::{self, Limits};

/// How long a client may take to send its whole HTTP request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Failures that stop the server from starting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The listening address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// The SQLite history could not be opened.
    #[error("cannot open the history database: {0}")]
    History(#[from] crate::history::HistoryError),
    /// A configured feature is not available in this build.
    #[error("{0}")]
    Unsupported(String),
    /// Threads or descriptors could not be created.
    #[error("cannot start: {0}")]
    Io(#[from] io::Error),
}

/// State shared by the accept thread and every connection thread.
pub(crate) struct Shared {
    config: Arc<Config>,
    pipeline: Pipeline,
    history: History,
    metrics: Arc<Metrics>,
    static_files: StaticFiles,
    /// The `Host` values answered.
    hosts: HostPolicy,
    /// The warning about refusing connections for lack of descriptors.
    exhaustion: Exhaustion,
    /// Open WebSocket connections by id, so shutdown can close them.
    connections: Mutex<HashMap<u64, Arc<Outbox>>>,
    ws_connections: AtomicUsize,
    /// Connection threads alive (plain HTTP and WebSocket).
    connection_threads: AtomicUsize,
    next_connection: AtomicU64,
    draining: AtomicBool,
    stopping: AtomicBool,
    started_at: Instant,
}

/// A running server.
pub struct Server {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    accept_waker: Arc<OwnedFd>,
    accept_thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Opens the history, starts the pipeline and listens. Returns once the
    /// port is bound (so `local_addr` is final, also with port 0).
    pub fn start(config: Config) -> Result<Server, ServerError> {
        descriptors::raise_limit(config.server.max_connections);
        start_fanout_pool(config.workers.fanout_threads);
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new());
        let history = History::open(
            &PathBuf::from(&config.history.sqlite_path),
            config.history.read_pool_size,
        )?;
        let cache: Arc<dyn Cache> = match config.cache.backend {
            CacheBackend::Memory => Arc::new(MemoryCache::new(
                config.cache.max_entries,
                Duration::from_secs(config.cache.ttl_s),
            )),
            CacheBackend::Redis => Arc::new(
                RedisCache::new(
                    &config.cache.redis_url,
                    Duration::from_secs(config.cache.ttl_s),
                    Duration::from_millis(config.cache.redis_timeout_ms),
                    config.cache.redis_pool_size,
                )
                .map_err(|e| ServerError::Unsupported(e.to_string()))?,
            ),
        };
        let provider: Arc<dyn Provider> = match config.llm.provider {
            LlmProvider::Simulated => {
                let s = &config.llm.simulated;
                Arc::new(Simulated {
                    first_token: Duration::from_millis(s.first_token_ms),
                    token_interval: Duration::from_millis(s.token_interval_ms),
                    tokens: s.tokens,
                    token_bytes: s.token_bytes,
                })
            }
            LlmProvider::OpenAi => Arc::new(openai_provider(&config.llm)),
        };
        let pipeline = Pipeline::start(
            config.clone(),
            history.clone(),
            cache,
            provider,
            metrics.clone(),
        )?;
        let static_files = StaticFiles::from_config(&config.server.static_dir);
        let listener = bind(&config.server.bind, config.server.listen_backlog)?;
        let local_addr = listener.local_addr()?;
        let hosts = HostPolicy::new(&config.server.allowed_hosts, local_addr);
        let shared = Arc::new(Shared {
            config,
            pipeline,
            history,
            metrics,
            static_files,
            hosts,
            exhaustion: Exhaustion::default(),
            connections: Mutex::new(HashMap::new()),
            ws_connections: AtomicUsize::new(0),
            connection_threads: AtomicUsize::new(0),
            next_connection: AtomicU64::new(1),
            draining: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            started_at: Instant::now(),
        });
        let accept_waker = Arc::new(
            eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC).map_err(io::Error::from)?,
        );
        let accept_thread = {
            let (shared, waker) = (shared.clone(), accept_waker.clone());
            std::thread::Builder::new()
                .name("chorus-accept".into())
                .spawn(move || accept::accept_loop(&listener, &shared, &waker))?
        };
        Ok(Server {
            shared,
            local_addr,
            accept_waker,
            accept_thread: Some(accept_thread),
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The orderly shutdown described in the module docs.
    pub fn shutdown(&mut self) {
        let shared = &self.shared;
        if shared.draining.swap(true, Ordering::AcqRel) {
            return;
        }
        log::info!(
            "draining: no new chats, waiting up to {} ms for running ones",
            shared.config.timeouts.drain_ms
        );
        shared.pipeline.begin_drain();
        let deadline = Instant::now() + Duration::from_millis(shared.config.timeouts.drain_ms);
        while shared.pipeline.live_requests() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        shared.pipeline.abort_all(Failure::new(
            ErrorCode::ShuttingDown,
            "the server is shutting down",
        ));
        // Joins the pools and waits until every answer is stored and every
        // final frame queued.
        shared.pipeline.shutdown();
        shared.stopping.store(true, Ordering::Release);
        let _ = rustix::io::write(&*self.accept_waker, &1u64.to_ne_bytes());
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        let outboxes: Vec<Arc<Outbox>> = shared.connections.lock().values().cloned().collect();
        for outbox in outboxes {
            let _ = outbox.push(Frame::Close(1001, "server shutting down"));
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while shared.ws_connections.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        shared.history.shutdown();
        log::info!("stopped");
    }
}

/// The OpenAI-compatible provider over the configured endpoints: the
/// `[[llm.providers]]` list, or the one endpoint of `[llm]`. Keys are read
/// from the environment here, once.
fn openai_provider(llm: &crate::config::LlmConfig) -> OpenAi {
    let primary = crate::config::ProviderConfig::default();
    let entries = if llm.providers.is_empty() {
        std::slice::from_ref(&primary)
    } else {
        &llm.providers[..]
    };
    let or = |value: &str, fallback: &str| {
        if value.is_empty() {
            fallback.to_owned()
        } else {
            value.to_owned()
        }
    };
    let endpoints = entries
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let base_url = or(&p.base_url, &llm.base_url);
            let key_env = or(&p.api_key_env, &llm.api_key_env);
            let api_key = std::env::var(&key_env).ok().filter(|k| !k.is_empty());
            let name = if p.name.is_empty() {
                // Scheme and path say little; host and port tell endpoints apart.
                let host = base_url
                    .split("://")
                    .nth(1)
                    .and_then(|rest| rest.split('/').next())
                    .unwrap_or(&base_url);
                format!("{i}:{host}")
            } else {
                p.name.clone()
            };
            log::info!(
                "upstream {name}: {base_url}, API key {}",
                if api_key.is_some() {
                    format!("from ${key_env}")
                } else {
                    format!("none (${key_env} is not set)")
                }
            );
            Endpoint {
                name,
                base_url,
                model: (!p.model.is_empty()).then(|| p.model.clone()),
                api_key,
            }
        })
        .collect();
    OpenAi::new(
        endpoints,
        RetryPolicy {
            max_retries: llm.max_retries,
            base: Duration::from_millis(llm.retry_base_ms),
            max: Duration::from_millis(llm.retry_max_ms),
        },
        Duration::from_millis(llm.connect_timeout_ms),
        Duration::from_millis(llm.read_timeout_ms),
    )
}

/// Sizes rayon's global pool, which the broadcaster uses to hand a token to
/// a big audience. It can be built once per process: a second server in the
/// same process shares the first one's.
fn start_fanout_pool(threads: usize) {
    let built = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("chorus-fanout-{i}"))
        .build_global();
    if let Err(e) = built {
        log::debug!("the fan-out pool already exists: {e}");
    }
}

fn bind(addr: &str, backlog: i32) -> Result<TcpListener, ServerError> {
    let err = |source: io::Error| ServerError::Bind {
        addr: addr.to_owned(),
        source,
    };
    let parsed: SocketAddr = addr
        .parse()
        .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let socket = Socket::new(Domain::for_address(parsed), Type::STREAM, None).map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    socket.bind(&parsed.into()).map_err(err)?;
    // std fixes the backlog at 128; a burst of browsers needs more.
    socket.listen(backlog).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    Ok(socket.into())
}

fn handle_connection(mut tcp: TcpStream, shared: &Arc<Shared>) {
    // The listener is non-blocking and accepted sockets inherit nothing on
    // Linux, but be explicit: the head is read with blocking reads and a timeout.
    if tcp.set_nonblocking(false).is_err() {
        return;
    }
    let answered = match http::read_request(&mut tcp, HEAD_TIMEOUT) {
        Ok(request) => match route(tcp, request, shared) {
            Some(tcp) => tcp,
            None => return,
        },
        Err(http::HttpError::Closed) => return,
        Err(http::HttpError::TooLarge) => {
            let _ = http::respond_error(&mut tcp, 413, "request head too large");
            tcp
        }
        Err(e) => {
            let _ = http::respond_error(&mut tcp, 400, &e.to_string());
            tcp
        }
    };
    http::linger_close(&answered);
}

/// Answers `req`. Gives the socket back when it got a plain HTTP answer
/// (to be closed with a linger), `None` once it was a WebSocket.
fn route(mut tcp: TcpStream, req: http::Request, shared: &Arc<Shared>) -> Option<TcpStream> {
    let host_allowed = shared.hosts.allows(req.header("host"));
    if req.path == "/ws" && req.method == "GET" && host_allowed {
        return upgrade(tcp, req, shared);
    }
    let written = if req.method == "HEAD" {
        plain(
            &mut http::HeadOnly::new(&mut tcp),
            &req,
            host_allowed,
            shared,
        )
    } else {
        plain(&mut tcp, &req, host_allowed, shared)
    };
    if let Err(e) = written {
        log::debug!("HTTP answer failed: {e}");
    }
    Some(tcp)
}

/// Every answer that is not a WebSocket, written to `out` (the socket, or
/// its head-only view for `HEAD`).
fn plain(
    out: &mut impl std::io::Write,
    req: &http::Request,
    host_allowed: bool,
    shared: &Shared,
) -> io::Result<()> {
    if !host_allowed {
        return http::respond_error(out, 421, "host not allowed (see server.allowed_hosts)");
    }
    let path = req.path.as_str();
    #[cfg(test)]
    if path == tests::PANIC_PATH {
        panic!("a connection thread panics on purpose (test)");
    }
    let known = path == "/"
        || path == "/ws"
        || path == "/healthz"
        || path == "/metrics"
        || path == "/api/stats"
        || path.starts_with("/static/");
    if !known {
        return http::respond_error(out, 404, "not found");
    }
    let allowed = req.method == "GET" || (req.method == "HEAD" && path != "/ws");
    if !allowed {
        return http::respond(
            out,
            405,
            "application/json",
            &[("Allow", if path == "/ws" { "GET" } else { "GET, HEAD" })],
            br#"{"error":"method not allowed"}"#,
        );
    }
    answer(out, path, shared)
}

/// The plain HTTP endpoints, written to `out` (the socket, or its
/// head-only view for `HEAD`).
fn answer(out: &mut impl std::io::Write, path: &str, shared: &Shared) -> io::Result<()> {
    match path {
        "/healthz" => {
            let (status, body) = if shared.draining.load(Ordering::Acquire) {
                (503, serde_json::json!({"status": "draining"}))
            } else {
                (
                    200,
                    serde_json::json!({
                        "status": "ok",
                        "version": env!("CARGO_PKG_VERSION"),
                        "uptime_s": shared.started_at.elapsed().as_secs(),
                    }),
                )
            };
            http::respond(
                out,
                status,
                "application/json",
                &[],
                body.to_string().as_bytes(),
            )
        }
        "/metrics" => {
            shared.pipeline.stages();
            let body = shared.metrics.render();
            http::respond(out, 200, Metrics::content_type(), &[], body.as_bytes())
        }
        "/api/stats" => {
            let body = stats_json(shared).to_string();
            http::respond(out, 200, "application/json", &[], body.as_bytes())
        }
        "/" => static_files::serve_static(out, &shared.static_files, "index.html"),
        _ => match path
            .strip_prefix("/static/")
            .and_then(static_files::safe_relative_path)
        {
            Some(file) => static_files::serve_static(out, &shared.static_files, &file),
            None => http::respond_error(out, 404, "not found"),
        },
    }
}

/// The `/api/stats` snapshot (shape fixed by the protocol; extra fields welcome).
fn stats_json(shared: &Shared) -> serde_json::Value {
    let m = &shared.metrics;
    let stages: serde_json::Map<String, serde_json::Value> = shared
        .pipeline
        .stages()
        .into_iter()
        .map(|(name, s)| (name.to_owned(), serde_json::json!(s)))
        .collect();
    let (p50, p99) = m.ttft_percentiles();
    serde_json::json!({
        "connections": shared.ws_connections.load(Ordering::Acquire),
        "stages": stages,
        "requests": {
            "accepted": m.accepted.get(),
            "leader": m.role("leader"),
            "follower": m.role("follower"),
            "cache": m.role("cache"),
            "done": m.outcome("done"),
            "cancelled": m.outcome("cancelled"),
            "failed": m.outcome("failed"),
            "overloaded": m.outcome("overloaded"),
            "timed_out": m.outcome("queue_timeout") + m.outcome("processing_timeout"),
            "in_flight": shared.pipeline.live_requests(),
        },
        "cache": {
            "hits": m.cache_hits.get(),
            "misses": m.cache_misses.get(),
            "entries": shared.pipeline.cache_entries(),
            "backend_up": shared.pipeline.cache_up(),
        },
        "upstream": {
            "calls": m.upstream_calls.get(),
            "aborted": m.upstream_aborted.get(),
            "failures": m.upstream_failures.get(),
            "providers": shared.pipeline.provider_stats(),
            "in_flight": shared.pipeline.generations(),
        },
        "ttft_ms": {"p50": p50, "p99": p99, "recent": m.recent_ttft_ms(60)},
        "history": {
            "pending_writes": shared.history.pending_writes(),
            "commits": shared.history.committed_batches(),
        },
        "cluster": shared.pipeline.cluster_stats(),
        "draining": shared.draining.load(Ordering::Acquire),
    })
}

/// Logs a failed refusal and gives the socket back for its lingering close.
fn refusal_written(tcp: TcpStream, written: io::Result<()>) -> Option<TcpStream> {
    if let Err(e) = written {
        log::debug!("HTTP answer failed: {e}");
    }
    Some(tcp)
}

/// The WebSocket handshake and, once it succeeds, the connection's whole
/// life. Gives the socket back when it refused the handshake.
fn upgrade(mut tcp: TcpStream, req: http::Request, shared: &Arc<Shared>) -> Option<TcpStream> {
    let server = &shared.config.server;
    let key = req.header("sec-websocket-key").map(str::to_owned);
    let is_upgrade = req.header_has_token("upgrade", "websocket")
        && req.header_has_token("connection", "upgrade")
        && req.header("sec-websocket-version") == Some("13");
    let Some(key) = key.filter(|_| is_upgrade) else {
        let written = http::respond(
            &mut tcp,
            426,
            "application/json",
            &[("Sec-WebSocket-Version", "13")],
            br#"{"error":"this endpoint speaks WebSocket (version 13)"}"#,
        );
        return refusal_written(tcp, written);
    };
    if !http::authorized(&req, &server.auth_tokens) {
        let written = http::respond(
            &mut tcp,
            401,
            "application/json",
            &[("WWW-Authenticate", "Bearer")],
            br#"{"error":"a valid token is required"}"#,
        );
        return refusal_written(tcp, written);
    }
    if !authority::origin_allowed(
        req.header("origin"),
        req.header("host"),
        &server.allowed_origins,
    ) {
        let written = http::respond_error(&mut tcp, 403, "origin not allowed");
        return refusal_written(tcp, written);
    }
    if shared.draining.load(Ordering::Acquire) {
        let written = http::respond_error(&mut tcp, 503, "the server is shutting down");
        return refusal_written(tcp, written);
    }
    let Some(slot) = ConnectionSlot::take(shared) else {
        let written = http::respond_error(&mut tcp, 503, "too many connections");
        return refusal_written(tcp, written);
    };
    let outbox = match Outbox::bounded(server.outbox_frames, server.outbox_bytes) {
        Ok(outbox) => Arc::new(outbox),
        Err(e) => {
            if descriptors::is_exhaustion(&e) {
                shared.exhaustion.refused(&e);
            } else {
                log::warn!("cannot create a connection's outbox: {e}");
            }
            drop(slot);
            let written = http::respond_error(&mut tcp, 503, "the server is out of resources");
            return refusal_written(tcp, written);
        }
    };
    let ready = tcp.set_read_timeout(None).and_then(|()| {
        if server.send_buffer_bytes > 0 {
            socket2::SockRef::from(&tcp).set_send_buffer_size(server.send_buffer_bytes)?;
        }
        std::io::Write::write_all(&mut tcp, http::upgrade_response(&key).as_bytes())
    });
    if let Err(e) = ready {
        log::debug!("the handshake failed: {e}");
        return None;
    }
    let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
    let registration = Registration::new(shared, id, outbox.clone());
    if shared.stopping.load(Ordering::Acquire) {
        // Upgraded after shutdown closed the others: close this one too.
        let _ = outbox.push(Frame::Close(1001, "server shutting down"));
    }
    let limits = Limits {
        max_message_bytes: server.ws_max_message_bytes,
        max_message_chars: server.max_message_chars,
        outbox_frames: server.outbox_frames,
        max_chats_per_minute: server.max_chats_per_minute,
        ping_interval: (server.ping_interval_ms > 0)
            .then(|| Duration::from_millis(server.ping_interval_ms)),
        pong_timeout: Duration::from_millis(server.pong_timeout_ms),
    };
    ws::serve(tcp, req.leftover, &outbox, &shared.pipeline, limits);
    drop(registration);
    drop(slot);
    None
}

/// A WebSocket slot of `max_connections`, given back however the
/// connection ends.
struct ConnectionSlot<'a> {
    shared: &'a Shared,
}

impl<'a> ConnectionSlot<'a> {
    fn take(shared: &'a Shared) -> Option<ConnectionSlot<'a>> {
        let max = shared.config.server.max_connections;
        if shared.ws_connections.fetch_add(1, Ordering::AcqRel) >= max {
            shared.ws_connections.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ConnectionSlot { shared })
    }
}

impl Drop for ConnectionSlot<'_> {
    fn drop(&mut self) {
        self.shared.ws_connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An open WebSocket as the server knows it: its entry in the connection
/// map (so shutdown can close it) and the connections gauge. Dropping it,
/// also while unwinding from a panic, closes the outbox (producers stop
/// queueing for it) and removes both.
struct Registration<'a> {
    shared: &'a Shared,
    id: u64,
    outbox: Arc<Outbox>,
}

impl<'a> Registration<'a> {
    fn new(shared: &'a Shared, id: u64, outbox: Arc<Outbox>) -> Registration<'a> {
        shared.connections.lock().insert(id, outbox.clone());
        shared.metrics.connections.inc();
        Registration { shared, id, outbox }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.outbox.close();
        self.shared.connections.lock().remove(&self.id);
        self.shared.metrics.connections.dec();
    }
}
