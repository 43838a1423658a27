//! `chorus-load`: the project's own load generator. It drives a running
//! chorus over real WebSocket connections on loopback and prints what it
//! measured. Every scenario is bounded in connections and time and stops by
//! itself.
//!
//! ```text
//! chorus-load cache-hit   --addr 127.0.0.1:8080 --pid PID [--connections 8] [--requests 2000]
//!                         [--transport ws|http]
//! chorus-load ttft        --addr 127.0.0.1:8080 [--connections 200] [--rounds 5] [--first-token-ms 200]
//! chorus-load fanout      --addr 127.0.0.1:8080[,127.0.0.1:8081…] [--pid PID] [--connections 2000] [--redis URL] [--message TEXT]
//!                         [--transport ws|http]
//! chorus-load idle-rss    --addr 127.0.0.1:8080 --pid PID [--connections 2000]
//! chorus-load stream-cost --addr 127.0.0.1:8080 --pid PID --upstream 127.0.0.1:PORT [--upstream-pid PID]
//!                         [--connections 200] [--rounds 5] [--first-token-ms 200]
//! chorus-load relay-floor --upstream 127.0.0.1:PORT [--connections 200] [--rounds 4]
//! chorus-load chaos       --addr 127.0.0.1:8080[,127.0.0.1:8081…] [--pid PID[,PID…]] [--clients 50]
//!                         [--seconds 10] [--deadline-ms 30000] [--gentle-cancels]
//! chorus-load upstream    [--bind 127.0.0.1:0] [--tokens 64] [--interval-ms 20] [--first-token-ms 200]
//!                         [--completion-ms MS] [--no-tools-support] [--seconds 3600]
//! ```
//!
//! `--pid` is the server's process id, for CPU time and RSS from `/proc`
//! (Linux only). `upstream` is not a scenario but the other end of one: an
//! OpenAI-compatible model server on loopback for `stream-cost` (see its
//! module). `relay-floor` runs no chorus: it relays `stream-cost`'s load
//! with the least a relay must do, for the floor under its figure (see its
//! module). `chaos` checks the protocol's promises under misbehaving
//! clients and exits non-zero, with its summary, when one is broken (see
//! its module). `scripts/bench.sh` starts a server with the configuration each
//! scenario needs and runs them.
//!
//! `--transport http` runs `cache-hit` and `fanout` over the
//! OpenAI-compatible HTTP API instead of WebSockets (`POST
//! /v1/chat/completions`, `"stream": true`, kept-alive connections; see
//! `http_client`). Each question is then sent as a system message
//! (`--system-prompt`, default the server's default `llm.system_prompt`;
//! none when empty) and the user's message, with `max_tokens`
//! (`--max-tokens`, default the server's default `llm.max_tokens`): the
//! request the server keys like a WebSocket chat of the same question in a
//! new conversation. The output has the same shape either way, with a
//! `"transport"` field.

mod cache_hit;
mod chaos;
mod chaos_conn;
mod client;
mod fanout;
mod http_client;
mod idle_rss;
mod measure;
mod relay_floor;
mod stream_cost;
mod ttft;
mod upstream;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

const CLIENT_STACK: usize = 128 * 1024;

/// How `cache-hit` and `fanout` talk to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// The WebSocket protocol (`/ws`).
    Ws,
    /// The OpenAI-compatible HTTP API, streamed answers (SSE).
    Http,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Http => "http",
        }
    }
}

struct Args {
    scenario: String,
    addr: SocketAddr,
    /// Further nodes of a cluster (`--addr A,B,…`): connections are spread
    /// over `addr` and these, round robin.
    more_addrs: Vec<SocketAddr>,
    /// A Redis whose command count is read before and after (cluster runs).
    redis: Option<String>,
    pid: Option<u32>,
    /// Further process ids, one per further address (`--pid A,B,…`).
    more_pids: Vec<u32>,
    /// Connections, or clients (`--clients`) for `chaos`.
    connections: usize,
    requests: usize,
    rounds: usize,
    first_token_ms: f64,
    /// `stream-cost`: the `upstream` chorus streams from, for its `/stats`.
    upstream: Option<SocketAddr>,
    /// `stream-cost`: the upstream's process id, for its CPU time.
    upstream_pid: Option<u32>,
    /// `upstream`: where to listen.
    bind: SocketAddr,
    /// `upstream`: content tokens per answer.
    tokens: usize,
    /// `upstream`: time between content tokens.
    interval_ms: f64,
    /// `upstream`: time until a non-streamed answer; `None` is the time a
    /// stream takes to its last token.
    completion_ms: Option<f64>,
    /// `upstream`: whether a request with `tools` is served or refused.
    tools_support: bool,
    /// `upstream`: how long it runs.
    seconds: f64,
    /// `--seconds` when given (`chaos` has a default of its own).
    seconds_given: Option<f64>,
    /// `chaos`: how long a chat, resume or malformed frame may wait for
    /// its answer and end.
    deadline_ms: u64,
    /// `chaos`: cancel only shared chats, never at once (see its module).
    gentle_cancels: bool,
    /// `fanout`: the question every connection asks.
    message: String,
    /// `cache-hit` and `fanout`: WebSocket or HTTP.
    transport: Transport,
    /// HTTP: the system message sent before the question (the server's
    /// `llm.system_prompt`, for requests keyed like WebSocket chats).
    system_prompt: String,
    /// HTTP: the `max_tokens` sent (the server's `llm.max_tokens`).
    max_tokens: u32,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let scenario = args.next().ok_or(
        "missing scenario: cache-hit | ttft | fanout | idle-rss | stream-cost | chaos | upstream",
    )?;
    let mut parsed = Args {
        scenario,
        addr: "127.0.0.1:8080".parse().map_err(|e| format!("{e}"))?,
        more_addrs: Vec::new(),
        redis: None,
        pid: None,
        more_pids: Vec::new(),
        connections: 0,
        requests: 2000,
        rounds: 5,
        first_token_ms: 200.0,
        upstream: None,
        upstream_pid: None,
        bind: "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
        tokens: 64,
        interval_ms: 20.0,
        completion_ms: None,
        tools_support: true,
        seconds: 3600.0,
        seconds_given: None,
        deadline_ms: 30_000,
        gentle_cancels: false,
        message: "One question for everyone".to_owned(),
        transport: Transport::Ws,
        // chorus's defaults (src/config/types.rs): an HTTP request with these is
        // keyed like a WebSocket chat.
        system_prompt: "You are a helpful assistant.".to_owned(),
        max_tokens: 1024,
    };
    while let Some(flag) = args.next() {
        if flag == "--no-tools-support" {
            parsed.tools_support = false;
            continue;
        }
        if flag == "--gentle-cancels" {
            parsed.gentle_cancels = true;
            continue;
        }
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--addr" => {
                let mut addrs = value.split(',').map(|a| a.trim().parse::<SocketAddr>());
                parsed.addr = addrs
                    .next()
                    .ok_or("--addr needs an address")?
                    .map_err(|e| bad(&e))?;
                parsed.more_addrs = addrs.collect::<Result<_, _>>().map_err(|e| bad(&e))?;
            }
            "--redis" => parsed.redis = Some(value),
            "--pid" => {
                let mut pids = value.split(',').map(|p| p.trim().parse::<u32>());
                parsed.pid = pids.next().transpose().map_err(|e| bad(&e))?;
                parsed.more_pids = pids.collect::<Result<_, _>>().map_err(|e| bad(&e))?;
            }
            "--connections" | "--clients" => {
                parsed.connections = value.parse().map_err(|e| bad(&e))?
            }
            "--deadline-ms" => parsed.deadline_ms = value.parse().map_err(|e| bad(&e))?,
            "--requests" => parsed.requests = value.parse().map_err(|e| bad(&e))?,
            "--rounds" => parsed.rounds = value.parse().map_err(|e| bad(&e))?,
            "--first-token-ms" => parsed.first_token_ms = value.parse().map_err(|e| bad(&e))?,
            "--upstream" => parsed.upstream = Some(value.parse().map_err(|e| bad(&e))?),
            "--upstream-pid" => parsed.upstream_pid = Some(value.parse().map_err(|e| bad(&e))?),
            "--bind" => parsed.bind = value.parse().map_err(|e| bad(&e))?,
            "--tokens" => parsed.tokens = value.parse().map_err(|e| bad(&e))?,
            "--interval-ms" => parsed.interval_ms = value.parse().map_err(|e| bad(&e))?,
            "--completion-ms" => parsed.completion_ms = Some(value.parse().map_err(|e| bad(&e))?),
            "--seconds" => {
                parsed.seconds = value.parse().map_err(|e| bad(&e))?;
                parsed.seconds_given = Some(parsed.seconds);
            }
            "--message" => parsed.message = value,
            "--transport" => {
                parsed.transport = match value.as_str() {
                    "ws" => Transport::Ws,
                    "http" => Transport::Http,
                    _ => return Err(format!("--transport {value}: ws or http")),
                }
            }
            "--system-prompt" => parsed.system_prompt = value,
            "--max-tokens" => parsed.max_tokens = value.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    let times = [
        parsed.first_token_ms,
        parsed.interval_ms,
        parsed.completion_ms.unwrap_or(0.0),
        parsed.seconds,
    ];
    if times.iter().any(|t| !t.is_finite() || *t < 0.0) {
        return Err("times must be finite and not negative".into());
    }
    if parsed.transport == Transport::Http
        && !matches!(parsed.scenario.as_str(), "cache-hit" | "fanout")
    {
        return Err(format!(
            "--transport http is for cache-hit and fanout, not {}",
            parsed.scenario
        ));
    }
    Ok(parsed)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("chorus-load: {e}");
            return ExitCode::from(2);
        }
    };
    raise_open_file_limit();
    let result = match args.scenario.as_str() {
        "cache-hit" => cache_hit::cache_hit(&args),
        "ttft" => ttft::ttft(&args),
        "fanout" => fanout::fanout(&args),
        "idle-rss" => idle_rss::idle_rss(&args),
        "stream-cost" => stream_cost::stream_cost(&args),
        "relay-floor" => relay_floor::relay_floor(&args),
        "chaos" => chaos::chaos(&args),
        "upstream" => upstream::upstream(&args),
        other => Err(format!("unknown scenario {other}")),
    };
    match result {
        Ok(summary) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&summary).unwrap_or_default()
            );
            // A scenario that checks promises says whether they held.
            if summary["passed"] == false {
                eprintln!("chorus-load: {} failed", args.scenario);
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("chorus-load: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft open-file limit to the hard one: 2,000 connections
/// need more descriptors (two per WebSocket here, its socket and the
/// reactor's clone) than the usual soft limit of 1,024. The server does
/// the same for itself.
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            eprintln!("chorus-load: cannot raise the open-file limit: {e}");
        }
    }
}

fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    std::thread::Builder::new()
        .stack_size(CLIENT_STACK)
        .spawn(f)
        .unwrap_or_else(|e| panic!("cannot start a client thread: {e}"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
