//! Server CPU per cached answer.

use std::time::Instant;

use serde_json::{json, Value};

use crate::client::{chat, Client, Next, Reactor};
use crate::measure::{cpu_by_thread, cpu_seconds, stats, summary};
use crate::{ms, Args};

/// Server CPU per cached answer: warm one answer, then many connections ask
/// it again (each time in a new conversation, so every ask is a cache hit).
/// All connections are driven by one [`Reactor`] thread, so the client costs
/// the shared cores as little as it can.
pub fn cache_hit(args: &Args) -> Result<Value, String> {
    let pid = args.pid.ok_or("cache-hit needs --pid")?;
    let connections = if args.connections == 0 {
        8
    } else {
        args.connections
    };
    let question = "What does a cache fast lane do?";
    let mut warm = Client::connect(args.addr)?;
    chat(&mut warm, "warm", question)?;
    let per_connection = args.requests.div_ceil(connections);
    let clients = (0..connections)
        .map(|_| Client::connect(args.addr))
        .collect::<Result<Vec<_>, _>>()?;
    let mut reactor = Reactor::new(clients)?;
    struct Asking {
        asked: usize,
        sent: Instant,
        first_token: Option<Instant>,
        role_cache: bool,
    }
    let chat_frame = |n: usize| json!({"type": "chat", "id": format!("h{n}"), "message": question});
    let commits_before = stats(args.addr)?["history"]["commits"].as_f64();
    let cpu_before = cpu_seconds(pid)?;
    let threads_before = cpu_by_thread(pid)?;
    let started = Instant::now();
    let mut state: Vec<Asking> = (0..connections)
        .map(|i| -> Result<Asking, String> {
            reactor.send(i, &chat_frame(0))?;
            Ok(Asking {
                asked: 1,
                sent: Instant::now(),
                first_token: None,
                role_cache: false,
            })
        })
        .collect::<Result<_, _>>()?;
    let mut latencies = Vec::with_capacity(per_connection * connections);
    let mut hits = 0;
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
                latencies.push(ms(s.first_token.unwrap_or(s.sent) - s.sent));
                if s.asked == per_connection {
                    return Ok(Next::Finished);
                }
                *s = Asking {
                    asked: s.asked + 1,
                    sent: Instant::now(),
                    first_token: None,
                    role_cache: false,
                };
                return Ok(Next::Send(chat_frame(s.asked - 1)));
            }
            Some("error") => return Err(format!("chat failed: {v}")),
            _ => {}
        }
        Ok(Next::Read)
    })?;
    let wall = started.elapsed();
    let cpu = cpu_seconds(pid)? - cpu_before;
    let by_thread: serde_json::Map<String, Value> = cpu_by_thread(pid)?
        .into_iter()
        .map(|(role, seconds)| {
            let spent = seconds - threads_before.get(&role).copied().unwrap_or(0.0);
            (role, json!(spent * 1e6 / hits.max(1) as f64))
        })
        .filter(|(_, us)| us.as_f64().unwrap_or(0.0) > 0.0)
        .collect();
    let tokens = stats(args.addr)?;
    Ok(json!({
        "scenario": "cache-hit",
        "connections": connections,
        "hits": hits,
        "server_cpu_us_per_hit": cpu * 1e6 / hits.max(1) as f64,
        "server_cpu_us_per_hit_by_thread": by_thread,
        "hits_per_history_commit": commits_before
            .zip(tokens["history"]["commits"].as_f64())
            .map(|(before, after)| hits as f64 / (after - before).max(1.0)),
        "hits_per_second": hits as f64 / wall.as_secs_f64(),
        "client_latency_to_first_token_ms": summary(latencies),
        "upstream_calls": tokens["upstream"]["calls"],
    }))
}
