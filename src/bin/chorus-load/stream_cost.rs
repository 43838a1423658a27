//! What one streamed chat costs with a real HTTP upstream (`chorus-load
//! upstream`): upstream requests per chat, time to first token, and server
//! CPU per answer and per token.
//!
//! Every connection sends one chat per round, each with a question of its
//! own (distinct across connections, rounds and runs), so every chat is a
//! leader with its own upstream stream: no cache hit, no follower. Round 0
//! is a warm-up and not counted when there is more than one round.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::client::{Client, Next, Reactor};
use crate::measure::{cpu_by_thread, cpu_seconds, get_json, stats, summary};
use crate::Args;

/// One chat as the client saw it; times in seconds of the real-time clock,
/// the clock of the kernel's receive timestamps.
struct Chat {
    sent: f64,
    first_token: Option<f64>,
    end: Option<f64>,
    tokens: usize,
    role: String,
    error: Option<String>,
}

/// Counters read before and after the measured rounds.
struct Readings {
    at: Instant,
    cpu: f64,
    threads: BTreeMap<String, f64>,
    upstream: Value,
    /// The upstream's threads' CPU time (schedstat: exact at any count).
    upstream_cpu: Option<f64>,
    server: Value,
}

impl Readings {
    fn take(args: &Args, pid: u32, upstream: SocketAddr) -> Result<Readings, String> {
        Ok(Readings {
            at: Instant::now(),
            cpu: cpu_seconds(pid)?,
            threads: cpu_by_thread(pid)?,
            upstream: get_json(upstream, "/stats")?,
            upstream_cpu: args
                .upstream_pid
                .map(|pid| cpu_by_thread(pid).map(|threads| threads.values().sum()))
                .transpose()?,
            server: stats(args.addr)?,
        })
    }
}

pub fn stream_cost(args: &Args) -> Result<Value, String> {
    let pid = args.pid.ok_or("stream-cost needs --pid")?;
    let upstream = args.upstream.ok_or("stream-cost needs --upstream")?;
    let connections = if args.connections == 0 {
        200
    } else {
        args.connections
    };
    let rounds = args.rounds.max(1);
    let warmup = usize::from(rounds > 1);
    // Part of every question, so that no run asks what an earlier run (of
    // the same server and cache) asked.
    let run = getrandom::u64().map_err(|e| format!("getrandom: {e}"))?;
    let clients = (0..connections)
        .map(|_| Client::connect(args.addr))
        .collect::<Result<Vec<_>, _>>()?;
    let mut reactor = Reactor::new(clients)?;
    let mut before = None;
    let mut measured = Vec::with_capacity(connections * (rounds - warmup));
    for round in 0..rounds {
        if round == warmup {
            before = Some(Readings::take(args, pid, upstream)?);
        }
        let chats = run_round(&mut reactor, connections, round, run)?;
        if round >= warmup {
            measured.extend(chats);
        }
    }
    let after = Readings::take(args, pid, upstream)?;
    let before = before.ok_or("no measured round")?;

    let ms = |from: f64, to: Option<f64>| to.map(|t| (t - from) * 1000.0);
    let ttft: Vec<f64> = measured
        .iter()
        .filter_map(|c| ms(c.sent, c.first_token))
        .collect();
    let added = ttft.iter().map(|t| t - args.first_token_ms).collect();
    let total = measured
        .iter()
        .filter(|c| c.error.is_none())
        .filter_map(|c| ms(c.sent, c.end))
        .collect();
    let chats = measured.len();
    let answers = measured.iter().filter(|c| c.error.is_none()).count();
    let tokens: usize = measured.iter().map(|c| c.tokens).sum();
    let mut roles = BTreeMap::new();
    let mut error_codes = BTreeMap::new();
    for c in &measured {
        *roles.entry(c.role.clone()).or_insert(0usize) += 1;
        if let Some(code) = &c.error {
            *error_codes.entry(code.clone()).or_insert(0usize) += 1;
        }
    }

    let per_chat = |key: &str, counts_before: &Value, counts_after: &Value| {
        let delta = counts_after[key].as_f64().unwrap_or(f64::NAN)
            - counts_before[key].as_f64().unwrap_or(f64::NAN);
        delta / chats.max(1) as f64
    };
    let provider_calls = |s: &Value| -> f64 {
        s["upstream"]["providers"].as_array().map_or(f64::NAN, |p| {
            p.iter().filter_map(|e| e["calls"].as_f64()).sum()
        })
    };
    let cpu = after.cpu - before.cpu;
    let threads_cpu: f64 = after
        .threads
        .iter()
        .map(|(role, seconds)| seconds - before.threads.get(role).copied().unwrap_or(0.0))
        .sum();
    let per_answer = |seconds: f64| seconds * 1e6 / answers.max(1) as f64;
    let by_thread: serde_json::Map<String, Value> = after
        .threads
        .iter()
        .map(|(role, seconds)| {
            let spent = seconds - before.threads.get(role).copied().unwrap_or(0.0);
            (role.clone(), json!(per_answer(spent)))
        })
        .filter(|(_, us)| us.as_f64().unwrap_or(0.0) > 0.0)
        .collect();
    Ok(json!({
        "scenario": "stream-cost",
        "connections": connections,
        "rounds": rounds - warmup,
        "warmup_rounds": warmup,
        "chats": chats,
        "answers": answers,
        "tokens": tokens,
        "roles": roles,
        "upstream_first_token_ms": args.first_token_ms,
        "ttft_ms (send to first token frame, kernel receive time)": summary(ttft),
        "ttft_added_ms (ttft - upstream first_token_ms)": summary(added),
        "total_ms (send to done)": summary(total),
        "upstream_requests_per_chat": per_chat("requests", &before.upstream, &after.upstream),
        "upstream_requests_with_tools_per_chat":
            per_chat("requests_with_tools", &before.upstream, &after.upstream),
        // Less the connection that read the second /stats.
        "upstream_connections_per_chat":
            per_chat("connections", &before.upstream, &after.upstream) - 1.0 / chats.max(1) as f64,
        "chorus_upstream_calls_per_chat (its /api/stats upstream.calls)": per_chat(
            "calls",
            &before.server["upstream"],
            &after.server["upstream"]
        ),
        "chorus_provider_calls_per_chat (its /api/stats upstream.providers[].calls)":
            (provider_calls(&after.server) - provider_calls(&before.server)) / chats.max(1) as f64,
        "server_cpu_us_per_answer": per_answer(cpu),
        "server_cpu_us_per_token": cpu * 1e6 / tokens.max(1) as f64,
        // The same from the threads' schedstat: nanoseconds instead of the
        // clock ticks of /proc/PID/stat (10 ms), so it holds for a few
        // answers too, but without threads that ended in between.
        "server_cpu_us_per_answer (threads' schedstat)": per_answer(threads_cpu),
        "server_cpu_us_per_answer_by_thread": by_thread,
        "upstream_cpu_us_per_answer": after.upstream_cpu.zip(before.upstream_cpu)
            .map(|(a, b)| per_answer(a - b)),
        "wall_s": after.at.duration_since(before.at).as_secs_f64(),
        "errors": chats - answers,
        "error_codes": error_codes,
    }))
}

/// One chat on every connection at once; returns when each has ended.
fn run_round(
    reactor: &mut Reactor,
    connections: usize,
    round: usize,
    run: u64,
) -> Result<Vec<Chat>, String> {
    let mut chats = Vec::with_capacity(connections);
    for i in 0..connections {
        let frame = json!({
            "type": "chat",
            "id": format!("s{round}-{i}"),
            "message": format!("question r{round} c{i} {run:016x}"),
        });
        let sent = realtime();
        reactor.send(i, &frame)?;
        chats.push(Chat {
            sent,
            first_token: None,
            end: None,
            tokens: 0,
            role: String::new(),
            error: None,
        });
    }
    reactor.run(|i, arrival, frame| {
        let c = &mut chats[i];
        let at = if arrival.kernel.is_finite() {
            arrival.kernel
        } else {
            realtime()
        };
        let Some(v) = frame else {
            c.first_token.get_or_insert(at);
            c.tokens += 1;
            return Ok(Next::Read);
        };
        match v["type"].as_str() {
            Some("start") => c.role = v["role"].as_str().unwrap_or("").to_owned(),
            Some("done") => {
                c.end = Some(at);
                return Ok(Next::Finished);
            }
            // An error ends the chat in place of its `done`.
            Some("error") => {
                c.error = Some(v["code"].as_str().unwrap_or("?").to_owned());
                c.end = Some(at);
                return Ok(Next::Finished);
            }
            _ => {}
        }
        Ok(Next::Read)
    })?;
    Ok(chats)
}

/// Now on the real-time clock, in seconds.
fn realtime() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
