//! Runtime configuration: defaults, TOML file, environment overrides and
//! command-line flags, merged into one validated [`Config`].
//!
//! Precedence, lowest to highest: built-in defaults, the TOML file given with
//! `--config`, environment variables named `CHORUS_<SECTION>_<KEY>`, and the
//! `--bind` / `--static-dir` flags.
//!
//! Threading: the configuration is loaded exactly once, on the main thread,
//! before any worker or connection thread starts. After that it is never
//! mutated; it is wrapped in an `Arc<Config>` and shared read-only with every
//! thread, so no locking is needed to read it. Nothing in this module keeps
//! global state, and loading never touches the process environment except in
//! [`Config::from_cli`], which only reads it.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::IntErrorKind;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::{Table, Value};

/// Prefix shared by every environment variable this module reads.
pub const ENV_PREFIX: &str = "CHORUS_";

/// Version of the crate, printed for `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

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
    /// Listen address; must parse as a [`SocketAddr`] (no host names).
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

/// Where a configuration value came from, so errors can point at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The TOML file at this path.
    File(PathBuf),
    /// The environment variable with this name.
    Env(String),
    /// The command-line flag with this name.
    Cli(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "config file {}", path.display()),
            Self::Env(var) => write!(f, "environment variable {var}"),
            Self::Cli(flag) => write!(f, "command-line flag {flag}"),
        }
    }
}

/// Renders an optional origin as a parenthesised suffix for error texts.
fn origin_suffix(origin: &Option<Origin>) -> String {
    origin
        .as_ref()
        .map_or_else(String::new, |origin| format!(" (from {origin})"))
}

/// Everything that can go wrong while building a [`Config`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {source}", .path.display())]
    FileUnreadable {
        /// File that was asked for.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML.
    #[error("syntax error in config file {} at {location}: {message}", .path.display())]
    Syntax {
        /// Offending file.
        path: PathBuf,
        /// `line L, column C` (1-based), or `unknown position`.
        location: String,
        /// Parser's description of the problem.
        message: String,
    },
    /// The config file contains a key this version does not know.
    #[error("unknown key \"{key}\" in config file {}", .path.display())]
    UnknownKey {
        /// Dotted key path, e.g. `workers.cache_worker`.
        key: String,
        /// Offending file.
        path: PathBuf,
    },
    /// A value has the wrong TOML type, or an environment value does not
    /// parse as the key's type.
    #[error("wrong type for \"{key}\" (from {origin}): expected {expected}, found {found}")]
    WrongType {
        /// Dotted key path.
        key: String,
        /// Where the value came from.
        origin: Origin,
        /// Type the key requires.
        expected: String,
        /// Type (file) or raw text (environment) that was given.
        found: String,
    },
    /// A value has the right type but is not acceptable.
    #[error("invalid value for \"{key}\"{}: {reason}", origin_suffix(.origin))]
    InvalidValue {
        /// Dotted key path.
        key: String,
        /// Where the value came from; `None` when [`Config::validate`] is
        /// called on a value that was not produced by loading.
        origin: Option<Origin>,
        /// What is wrong with it.
        reason: String,
    },
    /// A command-line flag this program does not know.
    #[error("unknown flag {flag} (see --help)")]
    UnknownFlag {
        /// The flag as given.
        flag: String,
    },
    /// A command-line flag that needs a value was given none.
    #[error("flag {flag} needs a value")]
    MissingValue {
        /// The flag as given.
        flag: String,
    },
    /// A command-line flag that takes no value was given one.
    #[error("flag {flag} takes no value")]
    UnexpectedValue {
        /// The flag as given.
        flag: String,
    },
    /// A positional command-line argument; none are accepted.
    #[error("unexpected argument \"{arg}\" (see --help)")]
    UnexpectedArgument {
        /// The argument as given.
        arg: String,
    },
    /// Converting between [`Config`] and TOML failed in a way no single key
    /// explains; indicates a bug in this module rather than bad input.
    #[error("internal configuration error: {message}")]
    Internal {
        /// Serde's description of the problem.
        message: String,
    },
}

/// Parsed command line, for [`CliAction::Run`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cli {
    /// `--config FILE`: TOML file to load over the defaults.
    pub config: Option<PathBuf>,
    /// `--bind ADDR`: listen address, overriding file and environment.
    pub bind: Option<String>,
    /// `--static-dir DIR`: static file directory, overriding file and environment.
    pub static_dir: Option<String>,
}

/// What `main` should do after parsing the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CliAction {
    /// Start the gateway with these options.
    Run(Cli),
    /// Print this usage text and exit successfully.
    Help(String),
    /// Print `chorus` and [`VERSION`] and exit successfully.
    Version,
}

/// Usage text printed for `--help`.
pub fn usage() -> String {
    format!(
        "chorus {VERSION}: realtime LLM chat gateway

usage: chorus [--config FILE] [--bind ADDR] [--static-dir DIR]

options:
  --config FILE      load settings from this TOML file
  --bind ADDR        listen address (ip:port); overrides file and environment
  --static-dir DIR   serve static files from DIR instead of the embedded ones
  -h, --help         print this help and exit
  -V, --version      print the version and exit

Flags accept both `--flag value` and `--flag=value`. Every setting can also
be given as an environment variable {ENV_PREFIX}<SECTION>_<KEY>, e.g.
{ENV_PREFIX}WORKERS_CACHE_WORKERS=8 or {ENV_PREFIX}LLM_SIMULATED_TOKENS=10; lists are
comma separated. Precedence: defaults < file < environment < flags.
"
    )
}

/// Parses command-line arguments, *excluding* the program name (pass
/// `std::env::args().skip(1)`).
///
/// Arguments are processed in order: `--help` or `--version` returns at once,
/// and a repeated flag keeps its last value.
pub fn parse_cli(args: impl Iterator<Item = String>) -> Result<CliAction, ConfigError> {
    let mut cli = Cli::default();
    let mut args = args;
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag.to_owned(), Some(value)),
            _ => (arg.clone(), None),
        };
        match flag.as_str() {
            "-h" | "--help" | "-V" | "--version" => {
                if inline.is_some() {
                    return Err(ConfigError::UnexpectedValue { flag });
                }
                return Ok(if flag == "-h" || flag == "--help" {
                    CliAction::Help(usage())
                } else {
                    CliAction::Version
                });
            }
            "--config" | "--bind" | "--static-dir" => {
                let value = match inline {
                    Some(value) => value.to_owned(),
                    None => args
                        .next()
                        .ok_or_else(|| ConfigError::MissingValue { flag: flag.clone() })?,
                };
                match flag.as_str() {
                    "--config" => cli.config = Some(PathBuf::from(value)),
                    "--bind" => cli.bind = Some(value),
                    _ => cli.static_dir = Some(value),
                }
            }
            _ if flag.starts_with('-') => return Err(ConfigError::UnknownFlag { flag: arg }),
            _ => return Err(ConfigError::UnexpectedArgument { arg }),
        }
    }
    Ok(CliAction::Run(cli))
}

/// TOML type of a leaf key, which decides how an environment value parses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Integer,
    Float,
    Boolean,
    String,
    /// Every array in the schema is a list of strings.
    StringList,
    Datetime,
}

impl Kind {
    fn of(value: &Value) -> Option<Self> {
        match value {
            Value::Integer(_) => Some(Self::Integer),
            Value::Float(_) => Some(Self::Float),
            Value::Boolean(_) => Some(Self::Boolean),
            Value::String(_) => Some(Self::String),
            Value::Array(_) => Some(Self::StringList),
            Value::Datetime(_) => Some(Self::Datetime),
            Value::Table(_) => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Integer => "integer",
            Self::Float => "float",
            Self::Boolean => "boolean (true, false, 1 or 0)",
            Self::String => "string",
            Self::StringList => "array of strings",
            Self::Datetime => "datetime",
        }
    }

    /// Whether a value from the file fits this kind; checked here rather than
    /// left to serde so the error can name the key.
    fn accepts(self, value: &Value) -> bool {
        match (self, value) {
            (Self::StringList, Value::Array(items)) => items.iter().all(Value::is_str),
            (Self::StringList, _) => false,
            _ => Kind::of(value) == Some(self),
        }
    }
}

/// One settable key of the schema, found by walking the serialised defaults.
#[derive(Debug, Clone)]
struct Leaf {
    segments: Vec<String>,
    key: String,
    env: String,
    kind: Kind,
    default: Value,
}

/// The defaults as a TOML table: the base layer, and the source of truth
/// for which keys exist and what type each has.
fn defaults_table() -> Result<Table, ConfigError> {
    Table::try_from(Config::default()).map_err(|err| ConfigError::Internal {
        message: err.to_string(),
    })
}

fn leaves(table: &Table) -> Vec<Leaf> {
    fn walk(table: &Table, prefix: &mut Vec<String>, out: &mut Vec<Leaf>) {
        for (name, value) in table {
            prefix.push(name.clone());
            match value {
                Value::Table(inner) => walk(inner, prefix, out),
                leaf => {
                    if let Some(kind) = Kind::of(leaf) {
                        out.push(Leaf {
                            key: prefix.join("."),
                            env: format!("{ENV_PREFIX}{}", prefix.join("_").to_uppercase()),
                            segments: prefix.clone(),
                            kind,
                            default: leaf.clone(),
                        });
                    }
                }
            }
            prefix.pop();
        }
    }
    let mut out = Vec::new();
    walk(table, &mut Vec::new(), &mut out);
    out
}

fn get_leaf<'a>(table: &'a Table, segments: &[String]) -> Option<&'a Value> {
    let (last, parents) = segments.split_last()?;
    let mut current = table;
    for name in parents {
        current = current.get(name)?.as_table()?;
    }
    current.get(last)
}

fn set_leaf(table: &mut Table, segments: &[String], value: Value) -> bool {
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut current = table;
    for name in parents {
        match current.get_mut(name).and_then(Value::as_table_mut) {
            Some(inner) => current = inner,
            None => return false,
        }
    }
    match current.get_mut(last) {
        Some(slot) => {
            *slot = value;
            true
        }
        None => false,
    }
}

fn join_key(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Keys holding a list of tables (`[[…]]`): file-only settings with no
/// default entries and no environment variable.
const TABLE_LISTS: &[&str] = &["llm.providers"];

/// Overlays `file` on `base`, refusing keys and types the defaults lack.
fn merge_file(
    base: &mut Table,
    file: Table,
    prefix: &str,
    path: &Path,
    origins: &mut HashMap<String, Origin>,
) -> Result<(), ConfigError> {
    for (name, value) in file {
        let key = join_key(prefix, &name);
        if TABLE_LISTS.contains(&key.as_str()) && value.is_array() {
            // Absent from the defaults (an empty list); serde checks its entries.
            base.insert(name, value);
            origins.insert(key, Origin::File(path.to_owned()));
            continue;
        }
        let Some(slot) = base.get_mut(&name) else {
            return Err(ConfigError::UnknownKey {
                key,
                path: path.to_owned(),
            });
        };
        match (slot, value) {
            (Value::Table(inner), Value::Table(value)) => {
                merge_file(inner, value, &key, path, origins)?;
            }
            (Value::Table(_), value) => {
                return Err(ConfigError::WrongType {
                    key,
                    origin: Origin::File(path.to_owned()),
                    expected: "table".to_owned(),
                    found: value.type_str().to_owned(),
                });
            }
            (slot, value) => {
                if let Some(kind) = Kind::of(slot) {
                    if !kind.accepts(&value) {
                        let found = match &value {
                            Value::Array(_) => "array with non-string items",
                            other => other.type_str(),
                        };
                        return Err(ConfigError::WrongType {
                            key,
                            origin: Origin::File(path.to_owned()),
                            expected: kind.name().to_owned(),
                            found: found.to_owned(),
                        });
                    }
                }
                *slot = value;
                origins.insert(key, Origin::File(path.to_owned()));
            }
        }
    }
    Ok(())
}

/// Parses the text of an environment variable or flag as `leaf`'s type.
fn parse_text(leaf: &Leaf, raw: &str, origin: &Origin) -> Result<Value, ConfigError> {
    let wrong_type = || ConfigError::WrongType {
        key: leaf.key.clone(),
        origin: origin.clone(),
        expected: leaf.kind.name().to_owned(),
        found: format!("{raw:?}"),
    };
    match leaf.kind {
        Kind::Integer => match raw.trim().parse::<i64>() {
            Ok(number) => Ok(Value::Integer(number)),
            Err(err)
                if matches!(
                    err.kind(),
                    IntErrorKind::PosOverflow | IntErrorKind::NegOverflow
                ) =>
            {
                Err(ConfigError::InvalidValue {
                    key: leaf.key.clone(),
                    origin: Some(origin.clone()),
                    reason: format!("{raw} is out of range"),
                })
            }
            Err(_) => Err(wrong_type()),
        },
        Kind::Float => raw
            .trim()
            .parse::<f64>()
            .map(Value::Float)
            .map_err(|_| wrong_type()),
        Kind::Boolean => match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "1" => Ok(Value::Boolean(true)),
            "false" | "0" => Ok(Value::Boolean(false)),
            _ => Err(wrong_type()),
        },
        Kind::String => Ok(Value::String(raw.to_owned())),
        // Items are trimmed and empty ones dropped: "a, b," means [a, b], and
        // an empty variable clears the list rather than yielding [""].
        Kind::StringList => Ok(Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(|item| Value::String(item.to_owned()))
                .collect(),
        )),
        Kind::Datetime => raw
            .trim()
            .parse::<toml::value::Datetime>()
            .map(Value::Datetime)
            .map_err(|_| wrong_type()),
    }
}

/// Finds which overridden key makes deserialisation fail, by applying each
/// one alone to the defaults; serde's own error does not carry the key path.
fn blame(
    defaults: &Table,
    merged: &Table,
    leaves: &[Leaf],
    origins: &HashMap<String, Origin>,
    whole: toml::de::Error,
) -> ConfigError {
    for leaf in leaves {
        let (Some(origin), Some(value)) =
            (origins.get(&leaf.key), get_leaf(merged, &leaf.segments))
        else {
            continue;
        };
        let mut probe = defaults.clone();
        if !set_leaf(&mut probe, &leaf.segments, value.clone()) {
            continue;
        }
        if let Err(err) = probe.try_into::<Config>() {
            return ConfigError::InvalidValue {
                key: leaf.key.clone(),
                origin: Some(origin.clone()),
                reason: err.message().to_owned(),
            };
        }
    }
    ConfigError::Internal {
        message: whole.message().to_owned(),
    }
}

/// 1-based `line L, column C` of a byte offset, for syntax errors.
fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(offset) = span.map(|span| span.start.min(text.len())) else {
        return "unknown position".to_owned();
    };
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map_or(1, |tail| tail.chars().count() + 1);
    format!("line {line}, column {column}")
}

fn read_file(path: &Path) -> Result<Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::FileUnreadable {
        path: path.to_owned(),
        source,
    })?;
    text.parse::<Table>().map_err(|err| ConfigError::Syntax {
        path: path.to_owned(),
        location: location(&text, err.span()),
        // Parser messages may span lines; keep the error a single log line.
        message: err.message().trim().replace('\n', "; "),
    })
}

/// A value set on the command line, applied after the environment.
struct FlagOverride<'a> {
    key: &'a str,
    flag: &'a str,
    value: &'a str,
}

impl Config {
    /// Builds the configuration from the defaults, the optional TOML `file`
    /// and the `CHORUS_*` entries of `env`, then validates it.
    ///
    /// Returns the configuration and the sorted names of `CHORUS_*` variables
    /// that match no key, which are ignored so that `main` can warn about them.
    pub fn load<I>(file: Option<&Path>, env: I) -> Result<(Config, Vec<String>), ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        Self::load_layers(file, env, &[])
    }

    /// Like [`Config::load`] for the file and flags in `cli`, with the
    /// environment taken from `env`; `--bind` and `--static-dir` override
    /// both the file and the environment.
    pub fn from_cli_with_env<I>(cli: &Cli, env: I) -> Result<(Config, Vec<String>), ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut flags = Vec::new();
        if let Some(bind) = &cli.bind {
            flags.push(FlagOverride {
                key: "server.bind",
                flag: "--bind",
                value: bind,
            });
        }
        if let Some(dir) = &cli.static_dir {
            flags.push(FlagOverride {
                key: "server.static_dir",
                flag: "--static-dir",
                value: dir,
            });
        }
        Self::load_layers(cli.config.as_deref(), env, &flags)
    }

    /// [`Config::from_cli_with_env`] with the process environment.
    pub fn from_cli(cli: &Cli) -> Result<(Config, Vec<String>), ConfigError> {
        // `std::env::vars` panics on non-UTF-8 entries. Unrelated variables
        // are none of our business, so they are skipped; ours are converted
        // lossily so they still get parsed (and rejected) or reported.
        let env = std::env::vars_os().filter_map(|(name, value)| {
            let name = name.into_string().ok()?;
            if !name.starts_with(ENV_PREFIX) {
                return None;
            }
            let value = value
                .into_string()
                .unwrap_or_else(|raw| raw.to_string_lossy().into_owned());
            Some((name, value))
        });
        Self::from_cli_with_env(cli, env)
    }

    fn load_layers<I>(
        file: Option<&Path>,
        env: I,
        flags: &[FlagOverride<'_>],
    ) -> Result<(Config, Vec<String>), ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let defaults = defaults_table()?;
        let leaves = leaves(&defaults);
        let mut merged = defaults.clone();
        let mut origins = HashMap::new();

        if let Some(path) = file {
            merge_file(&mut merged, read_file(path)?, "", path, &mut origins)?;
        }

        let by_env: HashMap<&str, &Leaf> = leaves
            .iter()
            .map(|leaf| (leaf.env.as_str(), leaf))
            .collect();
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(name, _)| name.starts_with(ENV_PREFIX))
            .collect();
        // Sorted so that errors and the unknown list do not depend on the
        // platform's environment order.
        env.sort();
        let mut unknown_env = Vec::new();
        for (name, raw) in env {
            let Some(leaf) = by_env.get(name.as_str()) else {
                unknown_env.push(name);
                continue;
            };
            let origin = Origin::Env(name);
            let value = parse_text(leaf, &raw, &origin)?;
            set_leaf(&mut merged, &leaf.segments, value);
            origins.insert(leaf.key.clone(), origin);
        }

        for flag in flags {
            let Some(leaf) = leaves.iter().find(|leaf| leaf.key == flag.key) else {
                return Err(ConfigError::Internal {
                    message: format!("flag {} targets unknown key {}", flag.flag, flag.key),
                });
            };
            let origin = Origin::Cli(flag.flag.to_owned());
            let value = parse_text(leaf, flag.value, &origin)?;
            set_leaf(&mut merged, &leaf.segments, value);
            origins.insert(leaf.key.clone(), origin);
        }

        let config: Config = match merged.clone().try_into() {
            Ok(config) => config,
            Err(err) => return Err(blame(&defaults, &merged, &leaves, &origins, err)),
        };
        config.validate().map_err(|err| match err {
            ConfigError::InvalidValue {
                key,
                origin: None,
                reason,
            } => ConfigError::InvalidValue {
                origin: origins.get(&key).cloned(),
                key,
                reason,
            },
            other => other,
        })?;
        Ok((config, unknown_env))
    }

    /// Checks constraints that the types alone cannot express. Errors carry
    /// no origin; [`Config::load`] fills it in.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Err(err) = self.server.bind.parse::<SocketAddr>() {
            return Err(invalid(
                "server.bind",
                format!(
                    "{:?} is not a socket address (ip:port): {err}",
                    self.server.bind
                ),
            ));
        }
        at_least(
            "server.connection_stack_kib",
            self.server.connection_stack_kib,
            32,
        )?;
        at_least("server.outbox_frames", self.server.outbox_frames, 16)?;
        at_least("server.pong_timeout_ms", self.server.pong_timeout_ms, 1)?;
        for host in &self.server.allowed_hosts {
            if host != "*" && crate::authority::Authority::parse(host).is_none() {
                return Err(invalid(
                    "server.allowed_hosts",
                    format!("{host:?} is not a host or host:port (or \"*\")"),
                ));
            }
        }
        at_least("server.outbox_bytes", self.server.outbox_bytes, 64 << 10)?;
        at_least(
            "server.http_max_body_bytes",
            self.server.http_max_body_bytes,
            1 << 10,
        )?;
        at_least(
            "history.max_answer_bytes",
            self.history.max_answer_bytes,
            4 << 10,
        )?;
        if self.history.max_answer_bytes > self.server.outbox_bytes / 2 {
            return Err(invalid(
                "history.max_answer_bytes",
                format!(
                    "{} is more than half of server.outbox_bytes ({}): a history answer must fit a connection's outbox",
                    self.history.max_answer_bytes, self.server.outbox_bytes
                ),
            ));
        }
        if self.llm.simulated.token_bytes > 1 << 20 {
            return Err(invalid(
                "llm.simulated.token_bytes",
                format!(
                    "{} is above the maximum of 1048576",
                    self.llm.simulated.token_bytes
                ),
            ));
        }
        let l = &self.llm;
        at_least("llm.connect_timeout_ms", l.connect_timeout_ms, 1)?;
        at_least("llm.read_timeout_ms", l.read_timeout_ms, 1)?;
        at_least("llm.retry_max_ms", l.retry_max_ms, l.retry_base_ms)?;
        for (i, p) in l.providers.iter().enumerate() {
            let base_url = if p.base_url.is_empty() {
                &l.base_url
            } else {
                &p.base_url
            };
            if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
                return Err(invalid(
                    &format!("llm.providers[{i}].base_url"),
                    format!("{base_url:?} is not an http:// or https:// URL"),
                ));
            }
        }
        if l.providers.is_empty()
            && !(l.base_url.starts_with("http://") || l.base_url.starts_with("https://"))
        {
            return Err(invalid(
                "llm.base_url",
                format!("{:?} is not an http:// or https:// URL", l.base_url),
            ));
        }
        if let Err(e) = crate::tools::Toolbox::new(&self.tools.builtins, &self.tools.direct) {
            return Err(invalid("tools.builtins", e.to_string()));
        }
        at_least("tools.max_rounds", self.tools.max_rounds, 1)?;
        at_least("tools.max_calls", self.tools.max_calls, 1)?;
        at_least("tools.max_argument_bytes", self.tools.max_argument_bytes, 1)?;
        let w = &self.workers;
        at_least("workers.cache_workers", w.cache_workers, 1)?;
        at_least(
            "workers.max_concurrent_leaders",
            w.max_concurrent_leaders,
            1,
        )?;
        at_least(
            "workers.max_concurrent_followers",
            w.max_concurrent_followers,
            1,
        )?;
        at_least(
            "workers.max_concurrent_llm_streams",
            w.max_concurrent_llm_streams,
            1,
        )?;
        at_least("workers.intake_queue", w.intake_queue, 1)?;
        at_least("workers.prepared_queue", w.prepared_queue, 1)?;
        at_least("workers.follow_queue", w.follow_queue, 1)?;
        at_least("workers.prepare_queue", w.prepare_queue, 1)?;
        at_least(
            "timeouts.janitor_interval_ms",
            self.timeouts.janitor_interval_ms,
            1,
        )?;
        at_least("cache.max_entries", self.cache.max_entries, 1)?;
        at_least("cache.redis_timeout_ms", self.cache.redis_timeout_ms, 1)?;
        at_least("cache.redis_pool_size", self.cache.redis_pool_size, 1)?;
        at_least("cluster.redis_timeout_ms", self.cluster.redis_timeout_ms, 1)?;
        if self.history.sqlite_path.is_empty() {
            return Err(invalid(
                "history.sqlite_path",
                "must not be empty".to_owned(),
            ));
        }
        at_least("history.read_pool_size", self.history.read_pool_size, 1)?;
        Ok(())
    }

    /// Every settable key as `(dotted key, environment variable, default as
    /// TOML)`, in file order, e.g. `("workers.cache_workers",
    /// "CHORUS_WORKERS_CACHE_WORKERS", "4")`.
    pub fn documented_keys() -> Vec<(String, String, String)> {
        // The defaults always serialise (a unit test pins this), so an empty
        // list here would only mean a bug, which that test would catch.
        let defaults = defaults_table().unwrap_or_default();
        leaves(&defaults)
            .into_iter()
            .map(|leaf| (leaf.key, leaf.env, leaf.default.to_string()))
            .collect()
    }
}

fn invalid(key: &str, reason: String) -> ConfigError {
    ConfigError::InvalidValue {
        key: key.to_owned(),
        origin: None,
        reason,
    }
}

fn at_least<T: PartialOrd + fmt::Display>(key: &str, value: T, min: T) -> Result<(), ConfigError> {
    if value < min {
        Err(invalid(
            key,
            format!("{value} is below the minimum of {min}"),
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn toml_file(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::Builder::new()
            .prefix("chorus-config-test-")
            .suffix(".toml")
            .tempfile()
            .expect("create temp file");
        file.write_all(text.as_bytes()).expect("write temp file");
        file
    }

    fn load_text(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let file = toml_file(text);
        Config::load(Some(file.path()), env(vars)).map(|(config, _)| config)
    }

    fn args(list: &[&str]) -> impl Iterator<Item = String> {
        list.iter()
            .map(|s| (*s).to_owned())
            .collect::<Vec<_>>()
            .into_iter()
    }

    /// The documented contract: key names, env names and defaults.
    const CONTRACT: &[(&str, &str)] = &[
        ("server.bind", "\"127.0.0.1:8080\""),
        ("server.max_connections", "10000"),
        ("server.ws_max_message_bytes", "65536"),
        ("server.max_message_chars", "16000"),
        ("server.allowed_origins", "[]"),
        ("server.allowed_hosts", "[]"),
        ("server.auth_tokens", "[]"),
        ("server.connection_stack_kib", "128"),
        ("server.outbox_frames", "4096"),
        ("server.outbox_bytes", "4194304"),
        ("server.http_max_body_bytes", "1048576"),
        ("server.send_buffer_bytes", "0"),
        ("server.max_chats_per_minute", "0"),
        ("server.ping_interval_ms", "30000"),
        ("server.pong_timeout_ms", "10000"),
        ("server.listen_backlog", "1024"),
        ("server.static_dir", "\"\""),
        ("workers.cache_workers", "4"),
        ("workers.max_concurrent_leaders", "16"),
        ("workers.max_concurrent_followers", "64"),
        ("workers.max_concurrent_llm_streams", "8"),
        ("workers.intake_queue", "1024"),
        ("workers.prepared_queue", "256"),
        ("workers.follow_queue", "1024"),
        ("workers.prepare_queue", "1024"),
        ("workers.fanout_threads", "0"),
        ("timeouts.queue_ms", "30000"),
        ("timeouts.prepare_ms", "30000"),
        ("timeouts.stream_idle_ms", "60000"),
        ("timeouts.request_ms", "300000"),
        ("timeouts.drain_ms", "10000"),
        ("timeouts.replay_window_ms", "60000"),
        ("timeouts.orphan_grace_ms", "5000"),
        ("timeouts.janitor_interval_ms", "50"),
        ("cache.backend", "\"memory\""),
        ("cache.redis_url", "\"redis://127.0.0.1:6379/\""),
        ("cache.ttl_s", "3600"),
        ("cache.complete_orphans", "false"),
        ("cache.max_entries", "10000"),
        ("cache.redis_timeout_ms", "250"),
        ("cache.redis_pool_size", "8"),
        ("history.sqlite_path", "\"data/chat.db\""),
        ("history.max_context_tokens", "2048"),
        ("history.read_pool_size", "8"),
        ("history.max_answer_bytes", "1048576"),
        ("llm.provider", "\"simulated\""),
        ("llm.base_url", "\"http://127.0.0.1:11434/v1\""),
        ("llm.model", "\"default\""),
        ("llm.api_key_env", "\"OPENAI_API_KEY\""),
        ("llm.system_prompt", "\"You are a helpful assistant.\""),
        ("llm.max_tokens", "1024"),
        ("llm.connect_timeout_ms", "5000"),
        ("llm.read_timeout_ms", "60000"),
        ("llm.max_retries", "2"),
        ("llm.retry_base_ms", "250"),
        ("llm.retry_max_ms", "8000"),
        ("llm.allowed_models", "[]"),
        ("llm.simulated.first_token_ms", "200"),
        ("llm.simulated.token_interval_ms", "20"),
        ("llm.simulated.tokens", "64"),
        ("llm.simulated.token_bytes", "0"),
        ("tools.enabled", "true"),
        (
            "tools.builtins",
            "[\"calculator\", \"clock\", \"search_history\"]",
        ),
        ("tools.direct", "[\"clock\"]"),
        ("tools.max_rounds", "4"),
        ("tools.max_calls", "8"),
        ("tools.max_argument_bytes", "16384"),
        ("cluster.enabled", "false"),
        ("cluster.redis_url", "\"redis://127.0.0.1:6379/\""),
        ("cluster.node_id", "\"\""),
        ("cluster.lease_ms", "5000"),
        ("cluster.redis_timeout_ms", "250"),
    ];

    #[test]
    fn documented_keys_match_the_contract_in_order() {
        let keys = Config::documented_keys();
        let got: Vec<(&str, &str)> = keys
            .iter()
            .map(|(key, _, default)| (key.as_str(), default.as_str()))
            .collect();
        assert_eq!(got, CONTRACT);
        for (key, var, _) in &keys {
            assert_eq!(
                *var,
                format!("CHORUS_{}", key.replace('.', "_").to_uppercase())
            );
        }
        let mut vars: Vec<&String> = keys.iter().map(|(_, var, _)| var).collect();
        vars.sort();
        vars.dedup();
        assert_eq!(vars.len(), keys.len(), "environment names must be unique");
    }

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

    #[test]
    fn file_overrides_defaults() {
        let c = load_text(
            r#"
            [server]
            bind = "0.0.0.0:9000"
            allowed_origins = ["https://a.example", "https://b.example"]

            [workers]
            cache_workers = 2

            [cache]
            backend = "redis"
            complete_orphans = true

            [llm]
            provider = "openai"

            [llm.simulated]
            tokens = 5
            "#,
            &[],
        )
        .expect("load");
        assert_eq!(c.server.bind, "0.0.0.0:9000");
        assert_eq!(
            c.server.allowed_origins,
            ["https://a.example", "https://b.example"]
        );
        assert_eq!(c.workers.cache_workers, 2);
        assert_eq!(c.cache.backend, CacheBackend::Redis);
        assert!(c.cache.complete_orphans);
        assert_eq!(c.llm.provider, LlmProvider::OpenAi);
        assert_eq!(c.llm.simulated.tokens, 5);
        assert_eq!(c.llm.simulated.first_token_ms, 200);
        assert_eq!(c.workers.intake_queue, 1024);
    }

    #[test]
    fn env_overrides_each_kind_and_beats_the_file() {
        let c = load_text(
            "[workers]\ncache_workers = 2\n[server]\nauth_tokens = [\"x\"]\n",
            &[
                ("CHORUS_WORKERS_CACHE_WORKERS", "8"),
                ("CHORUS_CACHE_COMPLETE_ORPHANS", "1"),
                ("CHORUS_CLUSTER_ENABLED", "true"),
                ("CHORUS_LLM_MODEL", "llama3"),
                ("CHORUS_SERVER_ALLOWED_ORIGINS", "a, b,"),
                ("CHORUS_SERVER_AUTH_TOKENS", ""),
                ("CHORUS_SERVER_LISTEN_BACKLOG", "-1"),
                ("CHORUS_LLM_SIMULATED_TOKENS", "10"),
                ("CHORUS_CACHE_BACKEND", "redis"),
                ("PATH", "/usr/bin"),
            ],
        )
        .expect("load");
        assert_eq!(c.workers.cache_workers, 8);
        assert!(c.cache.complete_orphans);
        assert!(c.cluster.enabled);
        assert_eq!(c.llm.model, "llama3");
        assert_eq!(c.server.allowed_origins, ["a", "b"]);
        assert!(c.server.auth_tokens.is_empty());
        assert_eq!(c.server.listen_backlog, -1);
        assert_eq!(c.llm.simulated.tokens, 10);
        assert_eq!(c.cache.backend, CacheBackend::Redis);
    }

    #[test]
    fn unknown_chorus_env_vars_are_reported_not_fatal() {
        let (c, unknown) = Config::load(
            None,
            env(&[
                ("CHORUS_WORKERS_CACHE_WORKER", "8"),
                ("CHORUS_LLM_SIMULATED", "x"),
                ("HOME", "/home/someone"),
            ]),
        )
        .expect("load");
        assert_eq!(c, Config::default());
        assert_eq!(
            unknown,
            ["CHORUS_LLM_SIMULATED", "CHORUS_WORKERS_CACHE_WORKER"]
        );
    }

    #[test]
    fn provider_lists_load_and_their_mistakes_are_named() {
        let c = load_text(
            "[llm]\nprovider = \"openai\"\n\n[[llm.providers]]\nname = \"a\"\nbase_url = \"http://x/v1\"\n\n[[llm.providers]]\nmodel = \"m\"\n",
            &[],
        )
        .expect("load");
        assert_eq!(c.llm.providers.len(), 2);
        assert_eq!(c.llm.providers[0].name, "a");
        assert_eq!(c.llm.providers[1].model, "m");
        assert_eq!(c.llm.providers[1].base_url, "");

        let err =
            load_text("[[llm.providers]]\nbase_url = \"ftp://x\"\n", &[]).expect_err("bad URL");
        assert!(
            err.to_string().contains("llm.providers[0].base_url"),
            "{err}"
        );
        let err = load_text("[[llm.providers]]\nbase_uri = \"http://x\"\n", &[])
            .expect_err("unknown field");
        assert!(err.to_string().contains("base_uri"), "{err}");
    }

    #[test]
    fn unknown_file_key_is_named() {
        let err = load_text("[workers]\ncache_worker = 3\n", &[]).expect_err("unknown key");
        assert!(
            matches!(&err, ConfigError::UnknownKey { key, .. } if key == "workers.cache_worker")
        );
        assert!(err
            .to_string()
            .contains("unknown key \"workers.cache_worker\""));

        let err = load_text("[metrics]\nport = 1\n", &[]).expect_err("unknown section");
        assert!(matches!(&err, ConfigError::UnknownKey { key, .. } if key == "metrics"));

        let err = load_text("[llm.simulated]\nspeed = 1\n", &[]).expect_err("unknown nested");
        assert!(err.to_string().contains("\"llm.simulated.speed\""));
    }

    #[test]
    fn wrong_type_in_file_is_named() {
        let err = load_text("[workers]\ncache_workers = \"8\"\n", &[]).expect_err("wrong type");
        assert!(
            matches!(&err, ConfigError::WrongType { key, expected, found, .. }
                if key == "workers.cache_workers" && expected == "integer" && found == "string")
        );
        assert!(err.to_string().contains("\"workers.cache_workers\""));

        let err = load_text("server = 1\n", &[]).expect_err("section as value");
        assert!(matches!(&err, ConfigError::WrongType { key, .. } if key == "server"));

        let err = load_text("[server]\nauth_tokens = [1]\n", &[]).expect_err("list of ints");
        assert!(matches!(&err, ConfigError::WrongType { key, .. } if key == "server.auth_tokens"));
    }

    #[test]
    fn wrong_type_in_env_names_key_and_variable() {
        let err = Config::load(None, env(&[("CHORUS_WORKERS_CACHE_WORKERS", "many")]))
            .expect_err("not an integer");
        let text = err.to_string();
        assert!(text.contains("\"workers.cache_workers\""), "{text}");
        assert!(text.contains("CHORUS_WORKERS_CACHE_WORKERS"), "{text}");
        assert!(text.contains("\"many\""), "{text}");

        let err =
            Config::load(None, env(&[("CHORUS_CLUSTER_ENABLED", "yes")])).expect_err("not a bool");
        assert!(matches!(&err, ConfigError::WrongType { key, .. } if key == "cluster.enabled"));
    }

    #[test]
    fn invalid_values_are_named_with_their_origin() {
        let err = load_text("[workers]\ncache_workers = 0\n", &[]).expect_err("zero workers");
        assert!(
            matches!(&err, ConfigError::InvalidValue { key, origin: Some(Origin::File(_)), .. }
            if key == "workers.cache_workers")
        );
        assert!(err.to_string().contains("\"workers.cache_workers\""));

        let err = load_text("[server]\nbind = \"nope\"\n", &[]).expect_err("bad bind");
        assert!(matches!(&err, ConfigError::InvalidValue { key, .. } if key == "server.bind"));
        assert!(err.to_string().contains("\"nope\""));

        let err = Config::load(None, env(&[("CHORUS_SERVER_BIND", "nope")])).expect_err("env bind");
        let text = err.to_string();
        assert!(
            text.contains("\"server.bind\"") && text.contains("CHORUS_SERVER_BIND"),
            "{text}"
        );

        // Range and enum errors surface from serde; they must still name the key.
        let err = load_text("[workers]\nintake_queue = -1\n", &[]).expect_err("negative");
        assert!(
            matches!(&err, ConfigError::InvalidValue { key, .. } if key == "workers.intake_queue")
        );
        let err = Config::load(None, env(&[("CHORUS_LLM_MAX_TOKENS", "5000000000")]))
            .expect_err("u32 overflow");
        assert!(
            matches!(&err, ConfigError::InvalidValue { key, origin: Some(Origin::Env(var)), .. }
            if key == "llm.max_tokens" && var == "CHORUS_LLM_MAX_TOKENS")
        );
        let err = load_text("[cache]\nbackend = \"mongo\"\n", &[]).expect_err("bad enum");
        assert!(matches!(&err, ConfigError::InvalidValue { key, .. } if key == "cache.backend"));
        assert!(err.to_string().contains("mongo"));
    }

    #[test]
    fn every_stated_minimum_is_enforced() {
        let cases = [
            (
                "CHORUS_SERVER_CONNECTION_STACK_KIB",
                "31",
                "server.connection_stack_kib",
            ),
            ("CHORUS_SERVER_OUTBOX_FRAMES", "15", "server.outbox_frames"),
            (
                "CHORUS_WORKERS_MAX_CONCURRENT_LEADERS",
                "0",
                "workers.max_concurrent_leaders",
            ),
            (
                "CHORUS_WORKERS_MAX_CONCURRENT_FOLLOWERS",
                "0",
                "workers.max_concurrent_followers",
            ),
            (
                "CHORUS_WORKERS_MAX_CONCURRENT_LLM_STREAMS",
                "0",
                "workers.max_concurrent_llm_streams",
            ),
            ("CHORUS_WORKERS_INTAKE_QUEUE", "0", "workers.intake_queue"),
            (
                "CHORUS_WORKERS_PREPARED_QUEUE",
                "0",
                "workers.prepared_queue",
            ),
            ("CHORUS_WORKERS_FOLLOW_QUEUE", "0", "workers.follow_queue"),
            ("CHORUS_WORKERS_PREPARE_QUEUE", "0", "workers.prepare_queue"),
            (
                "CHORUS_TIMEOUTS_JANITOR_INTERVAL_MS",
                "0",
                "timeouts.janitor_interval_ms",
            ),
            ("CHORUS_CACHE_MAX_ENTRIES", "0", "cache.max_entries"),
            ("CHORUS_HISTORY_SQLITE_PATH", "", "history.sqlite_path"),
            (
                "CHORUS_HISTORY_READ_POOL_SIZE",
                "0",
                "history.read_pool_size",
            ),
        ];
        for (var, value, expected) in cases {
            let err = Config::load(None, env(&[(var, value)])).expect_err(var);
            assert!(
                matches!(&err, ConfigError::InvalidValue { key, .. } if key == expected),
                "{var}: {err}"
            );
        }
        let (c, _) = Config::load(
            None,
            env(&[
                ("CHORUS_SERVER_CONNECTION_STACK_KIB", "32"),
                ("CHORUS_SERVER_OUTBOX_FRAMES", "16"),
            ]),
        )
        .expect("minimums themselves are accepted");
        assert_eq!(c.server.connection_stack_kib, 32);
    }

    #[test]
    fn bind_flag_wins_over_env_and_file_and_is_validated() {
        let file = toml_file("[server]\nbind = \"127.0.0.1:1\"\nstatic_dir = \"web\"\n");
        let cli = Cli {
            config: Some(file.path().to_owned()),
            bind: Some("0.0.0.0:3".to_owned()),
            static_dir: None,
        };
        let (c, _) = Config::from_cli_with_env(&cli, env(&[("CHORUS_SERVER_BIND", "127.0.0.1:2")]))
            .expect("load");
        assert_eq!(c.server.bind, "0.0.0.0:3");
        assert_eq!(c.server.static_dir, "web");

        let cli = Cli {
            bind: Some("localhost".to_owned()),
            static_dir: Some("dev/static".to_owned()),
            ..Cli::default()
        };
        let err = Config::from_cli_with_env(&cli, Vec::new()).expect_err("bad flag");
        assert!(
            matches!(&err, ConfigError::InvalidValue { key, origin: Some(Origin::Cli(flag)), .. }
                if key == "server.bind" && flag == "--bind")
        );
        let cli = Cli {
            static_dir: Some("dev/static".to_owned()),
            ..Cli::default()
        };
        let (c, _) = Config::from_cli_with_env(&cli, env(&[("CHORUS_SERVER_STATIC_DIR", "x")]))
            .expect("load");
        assert_eq!(c.server.static_dir, "dev/static");
    }

    #[test]
    fn cli_accepts_both_flag_forms() {
        let action = parse_cli(args(&[
            "--config",
            "a.toml",
            "--bind=0.0.0.0:1",
            "--static-dir",
            "web",
        ]))
        .expect("parse");
        assert_eq!(
            action,
            CliAction::Run(Cli {
                config: Some(PathBuf::from("a.toml")),
                bind: Some("0.0.0.0:1".to_owned()),
                static_dir: Some("web".to_owned()),
            })
        );
        let action = parse_cli(args(&[
            "--config=b.toml",
            "--bind",
            "[::1]:2",
            "--static-dir=",
        ]))
        .expect("parse");
        assert_eq!(
            action,
            CliAction::Run(Cli {
                config: Some(PathBuf::from("b.toml")),
                bind: Some("[::1]:2".to_owned()),
                static_dir: Some(String::new()),
            })
        );
        assert_eq!(
            parse_cli(args(&[])).expect("empty"),
            CliAction::Run(Cli::default())
        );
    }

    #[test]
    fn cli_help_version_and_errors() {
        assert!(
            matches!(parse_cli(args(&["-h"])), Ok(CliAction::Help(text)) if text.contains("--config FILE"))
        );
        assert!(matches!(
            parse_cli(args(&["--help"])),
            Ok(CliAction::Help(_))
        ));
        assert_eq!(parse_cli(args(&["-V"])).expect("v"), CliAction::Version);
        assert_eq!(
            parse_cli(args(&["--version"])).expect("v"),
            CliAction::Version
        );

        let err = parse_cli(args(&["--verbose"])).expect_err("unknown flag");
        assert!(matches!(&err, ConfigError::UnknownFlag { flag } if flag == "--verbose"));
        assert!(err.to_string().contains("--verbose"));
        let err = parse_cli(args(&["--port=80"])).expect_err("unknown flag with value");
        assert!(matches!(&err, ConfigError::UnknownFlag { flag } if flag == "--port=80"));
        assert!(matches!(
            parse_cli(args(&["--bind"])),
            Err(ConfigError::MissingValue { flag }) if flag == "--bind"
        ));
        assert!(matches!(
            parse_cli(args(&["--help=yes"])),
            Err(ConfigError::UnexpectedValue { .. })
        ));
        assert!(matches!(
            parse_cli(args(&["serve"])),
            Err(ConfigError::UnexpectedArgument { arg }) if arg == "serve"
        ));
    }

    #[test]
    fn unreadable_and_malformed_files_are_reported() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("missing.toml");
        let err = Config::load(Some(&missing), Vec::new()).expect_err("missing file");
        assert!(matches!(&err, ConfigError::FileUnreadable { .. }));
        assert!(err.to_string().contains("missing.toml"));

        let err = load_text("[server]\nbind = \n", &[]).expect_err("syntax");
        assert!(
            matches!(&err, ConfigError::Syntax { location, .. } if location.starts_with("line 2,")),
            "{err}"
        );
    }
}
