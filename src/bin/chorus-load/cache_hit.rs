//! Server CPU per cached answer, over WebSockets or the HTTP API.

use std::time::Instant;

use serde_json::{json, Value};

use crate::client::{chat, Client, Next, Reactor};
use crate::http_client::{chat_request, failure, HttpConn, HttpEvent, HttpReactor, Step};
use crate::measure::{cpu_by_thread, cpu_seconds, stats, summary};
use crate::{ms, Args, Transport};

/// The question every connection asks.
const QUESTION: &str = "What does a cache fast lane do?";

/// Server CPU per cached answer: warm one answer, then many connections ask
/// it again (over WebSockets each time in a new conversation; over HTTP a
/// request keyed like such a chat), so every ask is a cache hit. All
/// connections are driven by one reactor thread, so the client costs the
/// shared cores as little as it can.
pub fn cache_hit(args: &Args) -> Result<Value, String> {
    let pid = args.pid.ok_or("cache-hit needs --pid")?;
    let connections = if args.connections == 0 {
        8
    } else {
        args.connections
    };
    let per_connection = args.requests.div_ceil(connections);
    let request = chat_request(
        args.addr,
        QUESTION,
        &args.system_prompt,
        args.max_tokens,
        false,
    );
    // Warm the answer over the transport measured, then ask it once over
    // the other: both transports key it alike, so that is a hit too.
    let mut ws = Client::connect(args.addr)?;
    let mut http = HttpConn::connect(args.addr)?;
    let other_role = match args.transport {
        Transport::Ws => {
            chat(&mut ws, "warm", QUESTION)?;
            http.ask(&request)?.head.role
        }
        Transport::Http => {
            if http.ask(&request)?.tokens == 0 {
                return Err("the warm-up answer has no tokens".into());
            }
            chat(&mut ws, "warm", QUESTION)?.role
        }
    };
    drop((ws, http));
    let run = match args.transport {
        Transport::Ws => over_ws(args, pid, connections, per_connection)?,
        Transport::Http => over_http(args, pid, connections, per_connection, request)?,
    };
    let hits = run.hits;
    let by_thread: serde_json::Map<String, Value> = run
        .threads
        .into_iter()
        .map(|(role, seconds)| {
            let before = run.before.threads.get(&role).copied().unwrap_or(0.0);
            (role, json!((seconds - before) * 1e6 / hits.max(1) as f64))
        })
        .filter(|(_, us)| us.as_f64().unwrap_or(0.0) > 0.0)
        .collect();
    let after = stats(args.addr)?;
    let commits = run.before.commits.zip(after["history"]["commits"].as_f64());
    Ok(json!({
        "scenario": "cache-hit",
        "transport": args.transport.as_str(),
        "connections": connections,
        "hits": hits,
        "answers": run.answers,
        "server_cpu_us_per_hit": run.cpu * 1e6 / hits.max(1) as f64,
        "server_cpu_us_per_hit_by_thread": by_thread,
        // The HTTP API stores no history: no commits, no figure.
        "hits_per_history_commit": commits
            .filter(|(before, after)| after > before)
            .map(|(before, after)| hits as f64 / (after - before)),
        "hits_per_second": hits as f64 / run.wall,
        // On the same two cores as the server: what it takes from them.
        "client_cpu_us_per_hit": run.client_cpu * 1e6 / hits.max(1) as f64,
        "client_latency_to_first_token_ms": summary(run.latencies),
        "upstream_calls": after["upstream"]["calls"],
        "same_question_over_the_other_transport": other_role,
    }))
}

/// Counters read when the measured asks begin.
struct Before {
    commits: Option<f64>,
    cpu: f64,
    threads: std::collections::BTreeMap<String, f64>,
    /// The load generator's own CPU seconds.
    client_cpu: f64,
    at: Instant,
}

impl Before {
    fn take(args: &Args, pid: u32) -> Result<Before, String> {
        // The warm-up chats' history writes settle first, so that their
        // commits (and CPU) are not counted with the measured asks.
        let mut history = stats(args.addr)?["history"].take();
        for _ in 0..200 {
            if history["pending_writes"].as_u64().unwrap_or(0) == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            history = stats(args.addr)?["history"].take();
        }
        Ok(Before {
            commits: history["commits"].as_f64(),
            cpu: cpu_seconds(pid)?,
            threads: cpu_by_thread(pid)?,
            client_cpu: cpu_seconds(std::process::id())?,
            at: Instant::now(),
        })
    }
}

/// What the measured asks gave.
struct Run {
    before: Before,
    /// Answers served from the cache.
    hits: usize,
    /// Answers in all.
    answers: usize,
    /// Server CPU seconds over the asks.
    cpu: f64,
    /// The load generator's CPU seconds over the asks.
    client_cpu: f64,
    /// Seconds the asks took.
    wall: f64,
    /// CPU seconds by thread role after the asks, read while the
    /// connections (and so their server threads) are still open.
    threads: std::collections::BTreeMap<String, f64>,
    latencies: Vec<f64>,
}

impl Run {
    /// What the asks since `before` cost server `pid` and this process,
    /// read while the connections are still open.
    fn measured(
        before: Before,
        pid: u32,
        hits: usize,
        answers: usize,
        latencies: Vec<f64>,
    ) -> Result<Run, String> {
        let wall = before.at.elapsed().as_secs_f64();
        let cpu = cpu_seconds(pid)? - before.cpu;
        let client_cpu = cpu_seconds(std::process::id())? - before.client_cpu;
        Ok(Run {
            before,
            hits,
            answers,
            cpu,
            client_cpu,
            wall,
            threads: cpu_by_thread(pid)?,
            latencies,
        })
    }
}

/// One connection's ask in progress.
struct Asking {
    asked: usize,
    sent: Instant,
    first_token: Option<Instant>,
    role_cache: bool,
}

impl Asking {
    fn first(asked: usize) -> Asking {
        Asking {
            asked,
            sent: Instant::now(),
            first_token: None,
            role_cache: false,
        }
    }
}

fn over_ws(
    args: &Args,
    pid: u32,
    connections: usize,
    per_connection: usize,
) -> Result<Run, String> {
    let clients = (0..connections)
        .map(|_| Client::connect(args.addr))
        .collect::<Result<Vec<_>, _>>()?;
    let mut reactor = Reactor::new(clients)?;
    let chat_frame = |n: usize| json!({"type": "chat", "id": format!("h{n}"), "message": QUESTION});
    let before = Before::take(args, pid)?;
    let mut state: Vec<Asking> = (0..connections)
        .map(|i| -> Result<Asking, String> {
            reactor.send(i, &chat_frame(0))?;
            Ok(Asking::first(1))
        })
        .collect::<Result<_, _>>()?;
    let mut latencies = Vec::with_capacity(per_connection * connections);
    let (mut hits, mut answers) = (0, 0);
    reactor.run(|i, arrival, frame| {
        let s = &mut state[i];
        let Some(v) = frame else {
            s.first_token.get_or_insert(arrival.read);
            return Ok(Next::Read);
        };
        match v["type"].as_str() {
            Some("start") => s.role_cache = v["role"] == "cache",
            Some("done") => {
                hits += usize::from(s.role_cache);
                answers += 1;
                latencies.push(ms(s.first_token.unwrap_or(s.sent) - s.sent));
                if s.asked == per_connection {
                    return Ok(Next::Finished);
                }
                *s = Asking::first(s.asked + 1);
                return Ok(Next::Send(chat_frame(s.asked - 1)));
            }
            Some("error") => return Err(format!("chat failed: {v}")),
            _ => {}
        }
        Ok(Next::Read)
    })?;
    Run::measured(before, pid, hits, answers, latencies)
}

fn over_http(
    args: &Args,
    pid: u32,
    connections: usize,
    per_connection: usize,
    request: Vec<u8>,
) -> Result<Run, String> {
    let mut reactor = HttpReactor::connect((0..connections).map(|_| args.addr), request)?;
    let before = Before::take(args, pid)?;
    let mut state: Vec<Asking> = (0..connections)
        .map(|i| -> Result<Asking, String> {
            reactor.ask(i)?;
            Ok(Asking::first(1))
        })
        .collect::<Result<_, _>>()?;
    let mut status = vec![0u16; connections];
    let mut done = vec![false; connections];
    let mut latencies = Vec::with_capacity(per_connection * connections);
    let (mut hits, mut answers) = (0, 0);
    reactor.run(|i, arrival, event| {
        let s = &mut state[i];
        match event {
            HttpEvent::Head(head) => {
                status[i] = head.status;
                s.role_cache = head.role == "cache";
            }
            HttpEvent::Token(_) => {
                s.first_token.get_or_insert(arrival.read);
            }
            HttpEvent::Data(_) if event.is_error() => {
                return Err(format!("request failed: {}", failure(status[i], event)));
            }
            HttpEvent::Body(_) => {
                return Err(format!("request failed: {}", failure(status[i], event)));
            }
            HttpEvent::Done => done[i] = true,
            HttpEvent::Data(_) => {}
            HttpEvent::End => {
                if status[i] != 200 {
                    return Err(format!("request failed: HTTP {}", status[i]));
                }
                if !std::mem::take(&mut done[i]) {
                    return Err(format!("connection {i}: a stream ended without [DONE]"));
                }
                hits += usize::from(s.role_cache);
                answers += 1;
                latencies.push(ms(s.first_token.unwrap_or(s.sent) - s.sent));
                if s.asked == per_connection {
                    return Ok(Step::Finished);
                }
                *s = Asking::first(s.asked + 1);
                return Ok(Step::Ask);
            }
        }
        Ok(Step::Read)
    })?;
    Run::measured(before, pid, hits, answers, latencies)
}
