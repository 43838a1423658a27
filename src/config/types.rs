//! The configuration types and their built-in defaults: one struct per
//! `[section]` of the file, nested exactly like the TOML. Serde derives both
//! directions, and the serialised defaults double as the schema the loader
//! checks keys and types against, so a field added here is at once a file
//! key, an environment variable and a documented key.

use serde::{Deserialize, Serialize};

/// The complete, validated gateway configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Listener, WebSocket and per-connection limits.
    pub server: ServerConfig,
    /// Sizes of the thread pools and their queues.
    pub workers: WorkersConfig,
    /// Timeouts and periodic intervals, in milliseconds.
    pub timeouts: TimeoutsConfig,
    /// Response cache.
    pub cache: CacheConfig,
    /// Persistent chat history.
    pub history: HistoryConfig,
    /// Upstream language model.
    pub llm: LlmConfig,
    /// Tools the model may call while it answers.
    pub tools: ToolsConfig,
    /// Multi-node coordination.
    pub cluster: ClusterConfig,
}

/// `[tools]`: the tools each streamed upstream call offers the model.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ToolsConfig {
    /// Offer the tools in every streamed call (except an answer's last).
    pub enabled: bool,
    /// The built-in tools offered: `calculator`, `clock`, `search_history`.
    pub builtins: Vec<String>,
    /// Tools whose output is the answer itself (no further round).
    pub direct: Vec<String>,
    /// Most upstream calls for one answer; the last is made without tools.
    pub max_rounds: usize,
    /// Most tool calls run in one round; further ones get an error result.
    pub max_calls: usize,
    /// Longest arguments of one tool call, in bytes; longer ones get an
    /// error result.
    pub max_argument_bytes: usize,
}

impl Default for ToolsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            builtins: vec![
                "calculator".to_owned(),
                "clock".to_owned(),
                "search_history".to_owned(),
            ],
            direct: vec!["clock".to_owned()],
            max_rounds: 4,
            max_calls: 8,
            max_argument_bytes: 16 * 1024,
        }
    }
}

/// `[server]`: listener, WebSocket and per-connection limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address; must parse as a [`SocketAddr`](std::net::SocketAddr)
    /// (no host names).
    pub bind: String,
    /// Maximum number of simultaneously open client connections.
    pub max_connections: usize,
    /// Largest accepted WebSocket message, in bytes.
    pub ws_max_message_bytes: usize,
    /// Largest accepted chat message, in characters.
    pub max_message_chars: usize,
    /// Accepted `Origin` header values; empty means Origin must match Host.
    pub allowed_origins: Vec<String>,
    /// `Host` header values answered (`host` or `host:port`, `"*"` for
    /// any); empty means the loopback names and the bound address. Other
    /// hosts get `421` on every path (DNS rebinding defence).
    pub allowed_hosts: Vec<String>,
    /// Accepted bearer tokens; empty disables authentication.
    pub auth_tokens: Vec<String>,
    /// Stack size of each connection thread, in KiB (at least 32).
    pub connection_stack_kib: usize,
    /// Bound of each connection's outbound queue, in frames (at least 16).
    pub outbox_frames: usize,
    /// Bound of each connection's outbound queue, in bytes (at least 64 KiB):
    /// everything waiting for one connection counts; past it its token
    /// streams are cut off with `slow_consumer`.
    pub outbox_bytes: usize,
    /// Largest request body of the HTTP API, in bytes (at least 1 KiB);
    /// a bigger one is refused with `413`.
    pub http_max_body_bytes: usize,
    /// Kernel send buffer of each WebSocket, in bytes; 0 keeps the OS
    /// default. A small value bounds what a client that stops reading can
    /// make the kernel hold before it is cut off as a slow consumer.
    pub send_buffer_bytes: usize,
    /// Chats one connection may send per minute (a token bucket that holds
    /// a minute's worth); more get `rate_limited`. 0 means no limit.
    pub max_chats_per_minute: u32,
    /// Period of the server's pings on every WebSocket, in ms; 0 sends none.
    pub ping_interval_ms: u64,
    /// How long a pinged connection may stay silent (no pong, no frame)
    /// before it is closed as dead, in ms (at least 1).
    pub pong_timeout_ms: u64,
    /// Backlog passed to `listen(2)`.
    pub listen_backlog: i32,
    /// Directory to serve static files from; empty serves the embedded files.
    pub static_dir: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:8080".to_owned(),
            max_connections: 10_000,
            ws_max_message_bytes: 65_536,
            max_message_chars: 16_000,
            allowed_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            auth_tokens: Vec::new(),
            connection_stack_kib: 128,
            outbox_frames: 4096,
            outbox_bytes: 4 << 20,
            http_max_body_bytes: 1 << 20,
            send_buffer_bytes: 0,
            max_chats_per_minute: 0,
            ping_interval_ms: 30_000,
            pong_timeout_ms: 10_000,
            listen_backlog: 1024,
            static_dir: String::new(),
        }
    }
}

/// `[workers]`: pool sizes and queue bounds; every value is at least 1.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkersConfig {
    /// Threads answering requests from the cache.
    pub cache_workers: usize,
    /// Generations that may run as singleflight leaders at once.
    pub max_concurrent_leaders: usize,
    /// Requests that may wait on a leader's generation at once.
    pub max_concurrent_followers: usize,
    /// Upstream LLM streams that may be open at once.
    pub max_concurrent_llm_streams: usize,
    /// Bound of the queue of incoming requests.
    pub intake_queue: usize,
    /// Bound of the queue of prepared (context-loaded) requests.
    pub prepared_queue: usize,
    /// Bound of the follower pool's queue.
    pub follow_queue: usize,
    /// Bound of the preparation pool's queue.
    pub prepare_queue: usize,
    /// Threads that hand a token to a big audience (rayon); 0 means one
    /// per CPU core.
    pub fanout_threads: usize,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        Self {
            cache_workers: 4,
            max_concurrent_leaders: 16,
            max_concurrent_followers: 64,
            max_concurrent_llm_streams: 8,
            intake_queue: 1024,
            prepared_queue: 256,
            follow_queue: 1024,
            prepare_queue: 1024,
            fanout_threads: 0,
        }
    }
}

/// `[timeouts]`: all values in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// Longest time a request may wait in a queue.
    pub queue_ms: u64,
    /// Longest time preparing a request (history, context) may take.
    pub prepare_ms: u64,
    /// Longest silence tolerated on an upstream token stream.
    pub stream_idle_ms: u64,
    /// Longest total time for one request.
    pub request_ms: u64,
    /// Grace period for in-flight work at shutdown.
    pub drain_ms: u64,
    /// How long finished output stays available for replay to reconnecting clients.
    pub replay_window_ms: u64,
    /// How long a generation with no attached client survives before it is
    /// aborted, so a reconnecting client can resume it.
    pub orphan_grace_ms: u64,
    /// Period of the janitor that expires timed-out work (at least 1).
    pub janitor_interval_ms: u64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            queue_ms: 30_000,
            prepare_ms: 30_000,
            stream_idle_ms: 60_000,
            request_ms: 300_000,
            drain_ms: 10_000,
            replay_window_ms: 60_000,
            orphan_grace_ms: 5000,
            janitor_interval_ms: 50,
        }
    }
}

/// Storage used by the response cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheBackend {
    /// In-process, bounded by `cache.max_entries`.
    #[default]
    Memory,
    /// Shared Redis server at `cache.redis_url`.
    Redis,
}

/// `[cache]`: response cache.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Where cached responses live.
    pub backend: CacheBackend,
    /// Redis server used by the `redis` backend.
    pub redis_url: String,
    /// Lifetime of a cache entry, in seconds.
    pub ttl_s: u64,
    /// Whether a generation whose clients all left is still finished and cached.
    pub complete_orphans: bool,
    /// Entry bound of the memory backend (at least 1).
    pub max_entries: usize,
    /// Longest wait for a Redis connection or command, in milliseconds;
    /// past it the lookup is a miss.
    pub redis_timeout_ms: u64,
    /// Connections in the Redis pool.
    pub redis_pool_size: u32,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            backend: CacheBackend::Memory,
            redis_url: "redis://127.0.0.1:6379/".to_owned(),
            ttl_s: 3600,
            complete_orphans: false,
            max_entries: 10_000,
            redis_timeout_ms: 250,
            redis_pool_size: 8,
        }
    }
}

/// `[history]`: persistent chat history.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    /// SQLite database file; must not be empty.
    pub sqlite_path: String,
    /// Token budget of the history sent to the model with each request.
    pub max_context_tokens: usize,
    /// Size of the read-connection pool (at least 1).
    pub read_pool_size: u32,
    /// Largest `history` answer, in bytes (at least 4 KiB, at most half of
    /// `server.outbox_bytes`); older messages are paged with `before`.
    pub max_answer_bytes: usize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            sqlite_path: "data/chat.db".to_owned(),
            max_context_tokens: 2048,
            read_pool_size: 8,
            max_answer_bytes: 1 << 20,
        }
    }
}

/// Which language model backend generates the answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LlmProvider {
    /// Built-in fake model, paced by `[llm.simulated]`.
    #[default]
    Simulated,
    /// Any OpenAI-compatible chat completions endpoint.
    OpenAi,
}

/// `[llm]`: upstream language model.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LlmConfig {
    /// Backend that generates answers.
    pub provider: LlmProvider,
    /// Base URL of the OpenAI-compatible API.
    pub base_url: String,
    /// Model name sent upstream.
    pub model: String,
    /// Name of the environment variable holding the API key; the key itself
    /// is never part of the configuration so it cannot leak into dumps.
    pub api_key_env: String,
    /// System prompt prepended to every conversation.
    pub system_prompt: String,
    /// `max_tokens` used when the client gives none.
    pub max_tokens: u32,
    /// How long connecting to an upstream may take, in milliseconds.
    pub connect_timeout_ms: u64,
    /// How long one read from an upstream may wait for data, in
    /// milliseconds (the response head, then every piece of the stream).
    pub read_timeout_ms: u64,
    /// Retries of one upstream after a connect error, 429 or 5xx, only
    /// before its first token; 0 disables them.
    pub max_retries: u32,
    /// First retry delay in milliseconds; it doubles per retry, with jitter.
    pub retry_base_ms: u64,
    /// Longest retry delay, and the longest `Retry-After` honoured (a
    /// longer one moves on to the next provider instead).
    pub retry_max_ms: u64,
    /// Models a client may name in `options.model`, besides the configured
    /// ones (`model` and each provider's); `["*"]` allows any. The
    /// operator's key pays for whatever a client names, so the default
    /// (empty) allows the configured models only.
    pub allowed_models: Vec<String>,
    /// Pacing of the simulated provider.
    pub simulated: SimulatedConfig,
    /// `[[llm.providers]]`: upstream endpoints tried in order, each after
    /// the previous failed before its first token. Empty: one endpoint from
    /// `base_url`, `model` and `api_key_env`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<ProviderConfig>,
}

/// One `[[llm.providers]]` entry; empty fields take the `[llm]` value.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderConfig {
    /// Name in logs and `/api/stats`; default: the base URL's host and port.
    pub name: String,
    /// Base URL of the OpenAI-compatible API.
    pub base_url: String,
    /// Model name sent to this endpoint.
    pub model: String,
    /// Environment variable holding this endpoint's API key.
    pub api_key_env: String,
}

impl LlmConfig {
    /// Whether a client may ask for `model`: a configured model, one of
    /// `allowed_models`, or anything when that list holds `"*"`.
    pub fn model_allowed(&self, model: &str) -> bool {
        model == self.model
            || self.providers.iter().any(|p| p.model == model)
            || self.allowed_models.iter().any(|m| m == "*" || m == model)
    }
}

impl Default for LlmConfig {
    fn default() -> Self {
        Self {
            provider: LlmProvider::Simulated,
            base_url: "http://127.0.0.1:11434/v1".to_owned(),
            model: "default".to_owned(),
            api_key_env: "OPENAI_API_KEY".to_owned(),
            system_prompt: "You are a helpful assistant.".to_owned(),
            max_tokens: 1024,
            connect_timeout_ms: 5000,
            read_timeout_ms: 60000,
            max_retries: 2,
            retry_base_ms: 250,
            retry_max_ms: 8000,
            allowed_models: Vec::new(),
            simulated: SimulatedConfig::default(),
            providers: Vec::new(),
        }
    }
}

/// `[llm.simulated]`: pacing of the simulated provider.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimulatedConfig {
    /// Delay before the first token, in milliseconds.
    pub first_token_ms: u64,
    /// Delay between tokens, in milliseconds.
    pub token_interval_ms: u64,
    /// Number of tokens in each simulated answer.
    pub tokens: u32,
    /// Pads every generated token to this many bytes (at most 1 MiB);
    /// 0 keeps the natural words. For load and memory tests.
    pub token_bytes: usize,
}

impl Default for SimulatedConfig {
    fn default() -> Self {
        Self {
            first_token_ms: 200,
            token_interval_ms: 20,
            tokens: 64,
            token_bytes: 0,
        }
    }
}

/// `[cluster]`: multi-node coordination.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Whether nodes coordinate through Redis.
    pub enabled: bool,
    /// Redis server used for coordination.
    pub redis_url: String,
    /// Identity of this node; empty means a random id is chosen at start.
    pub node_id: String,
    /// Lifetime of a generation lease, in milliseconds.
    pub lease_ms: u64,
    /// Longest wait for the cluster's Redis (connect, checkout, each
    /// command), in milliseconds; past it Redis counts as down.
    pub redis_timeout_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            redis_url: "redis://127.0.0.1:6379/".to_owned(),
            node_id: String::new(),
            lease_ms: 5000,
            redis_timeout_ms: 250,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_have_the_documented_values() {
        let c = Config::default();
        assert_eq!(c.server.bind, "127.0.0.1:8080");
        assert_eq!(c.server.max_connections, 10_000);
        assert!(c.server.allowed_origins.is_empty());
        assert_eq!(c.server.listen_backlog, 1024);
        assert_eq!(c.workers.prepare_queue, 1024);
        assert_eq!(c.timeouts.orphan_grace_ms, 5000);
        assert_eq!(c.cache.backend, CacheBackend::Memory);
        assert!(!c.cache.complete_orphans);
        assert_eq!(c.history.read_pool_size, 8);
        assert_eq!(c.llm.provider, LlmProvider::Simulated);
        assert_eq!(c.llm.simulated.tokens, 64);
        assert_eq!(c.cluster.node_id, "");
        c.validate().expect("defaults are valid");
        let (loaded, unknown) = Config::load(None, Vec::new()).expect("load defaults");
        assert_eq!(loaded, c);
        assert!(unknown.is_empty());
    }

    #[test]
    fn serialised_defaults_round_trip_through_toml_text() {
        let text = toml::to_string(&Config::default()).expect("serialise");
        let back: Config = toml::from_str(&text).expect("deserialise");
        assert_eq!(back, Config::default());
    }
}
