//! The server: wires the pipeline (history, cache, upstream providers,
//! pools) to the accept side (`net`) on one listening port, and
//! shuts it all down in order.
//!
//! Threads:
//! - [`Server::start`] runs on the caller's thread and starts every other
//!   thread: the history writer, the pipeline's pools and janitor, and the
//!   accept thread, which starts a thread per connection (`net`);
//! - the thread that calls [`Server::shutdown`] (main, on the stop signal)
//!   drains: new chats get `shutting_down`, `/healthz` says
//!   `draining`, running streams get up to `drain_ms` to finish, then every
//!   remaining request ends with `shutting_down`, every WebSocket is closed
//!   with 1001 and the history is flushed to SQLite.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[cfg(test)]
mod tests;

use crate::cache::{Cache, MemoryCache, RedisCache};
use crate::config::{CacheBackend, Config, LlmProvider};
use crate::history::History;
use crate::llm::{Endpoint, OpenAi, Provider, RetryPolicy, Simulated};
use crate::metrics::Metrics;
use crate::net::{self, descriptors, AcceptThread, Shared};
use crate::pipeline::Pipeline;
use crate::protocol::{ErrorCode, Failure};

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

/// A running server.
pub struct Server {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    /// `None` once shutdown stopped it.
    accept: Option<AcceptThread>,
}

impl Server {
    /// Binds the port, opens the history, starts the pipeline and the
    /// accept thread. Returns once the port is bound (so `local_addr` is
    /// final, also with port 0). A start that fails stops every thread it
    /// had started before it returns the error.
    pub fn start(config: Config) -> Result<Server, ServerError> {
        descriptors::raise_limit(config.server.max_connections);
        // Before any thread: a taken port or a bad address then costs nothing
        // to undo.
        let listener =
            net::bind(&config.server.bind, config.server.listen_backlog).map_err(|source| {
                ServerError::Bind {
                    addr: config.server.bind.clone(),
                    source,
                }
            })?;
        let local_addr = listener.local_addr()?;
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new());
        let history = History::open(
            &PathBuf::from(&config.history.sqlite_path),
            config.history.read_pool_size,
        )?;
        let pipeline = match start_pipeline(&config, &history, &metrics) {
            Ok(pipeline) => pipeline,
            Err(e) => {
                history.shutdown();
                return Err(e);
            }
        };
        let shared = Arc::new(Shared::new(config, pipeline, history, metrics, local_addr));
        let mut accept = match AcceptThread::start(listener, &shared) {
            Ok(accept) => accept,
            Err(e) => {
                shared.pipeline.shutdown();
                shared.history.shutdown();
                return Err(e.into());
            }
        };
        // The fan-out pool is the process's and can never be stopped, so it
        // is built once nothing can fail any more; the accept thread waits
        // for it, so no token is handed out before it exists.
        start_fanout_pool(shared.config.workers.fanout_threads);
        accept.open();
        Ok(Server {
            shared,
            local_addr,
            accept: Some(accept),
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The orderly shutdown described in the module docs.
    pub fn shutdown(&mut self) {
        let shared = &self.shared;
        if !shared.begin_drain() {
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
        if let Some(accept) = self.accept.take() {
            accept.stop();
        }
        shared.close_websockets(Duration::from_secs(3));
        shared.history.shutdown();
        log::info!("stopped");
    }
}

/// Builds the cache and the upstream provider and starts the pipeline on
/// them.
fn start_pipeline(
    config: &Arc<Config>,
    history: &History,
    metrics: &Arc<Metrics>,
) -> Result<Pipeline, ServerError> {
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
    Ok(Pipeline::start(
        config.clone(),
        history.clone(),
        cache,
        provider,
        metrics.clone(),
    )?)
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
/// same process shares the first one's, and nothing stops it.
fn start_fanout_pool(threads: usize) {
    let built = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("chorus-fanout-{i}"))
        .build_global();
    if let Err(e) = built {
        log::debug!("the fan-out pool already exists: {e}");
    }
}
