//! One generation fanned out to many connections.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::client::{Client, Next, Observed, Reactor};
use crate::http_client::{chat_request, failure, HttpEvent, HttpReactor, Step};
use crate::measure::{cpu_by_thread, cpu_seconds, redis_commands, stats, summary};
use crate::{Args, Transport};

/// What the connections saw, and the counters around it.
struct Seen {
    /// Each connection's tokens.
    observed: Vec<Observed>,
    /// When the servers had given every request its role (real-time
    /// clock, seconds), if they did within [`JOIN_WAIT`].
    joined: Option<f64>,
    /// Taken once every connection was open, just before the questions
    /// went out.
    before: Counters,
    /// The same at the end, read while the connections (and so their
    /// server threads) are still open.
    after: Counters,
    /// Connection attempts refused and tried again (HTTP).
    refused: usize,
}

fn observing() -> Observed {
    Observed {
        sent: Instant::now(),
        first_token: None,
        token_times: Vec::with_capacity(64),
        kernel_times: Vec::with_capacity(64),
        end: Value::Null,
        role: String::new(),
    }
}

struct Counters {
    /// The server's CPU seconds.
    cpu: Option<f64>,
    /// The server's CPU seconds by thread role.
    threads: Option<BTreeMap<String, f64>>,
    redis: Option<u64>,
    /// The load generator's own CPU seconds.
    client_cpu: f64,
}

/// How long [`all_joined`] waits; the fan-out configuration's first token
/// comes 3 s after the questions.
const JOIN_WAIT: Duration = Duration::from_millis(2500);

/// Requests the servers have given a role (leader, follower or cache; a
/// follower is counted when it joins the generation).
fn roles_counted(nodes: &[SocketAddr]) -> Result<u64, String> {
    nodes
        .iter()
        .map(|n| {
            let requests = stats(*n)?["requests"].take();
            Ok(["leader", "follower", "cache"]
                .iter()
                .map(|role| requests[role].as_u64().unwrap_or(0))
                .sum::<u64>())
        })
        .sum()
}

/// Waits (at most [`JOIN_WAIT`]) until the servers have given all of the
/// `connections` requests sent since `before` a role; when they have, the
/// real-time clock then, in seconds (the clock of kernel receive times).
fn all_joined(
    nodes: &[SocketAddr],
    before: u64,
    connections: usize,
) -> Result<Option<f64>, String> {
    let deadline = Instant::now() + JOIN_WAIT;
    while Instant::now() < deadline {
        if roles_counted(nodes)? >= before + connections as u64 {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_err(|e| e.to_string())?;
            return Ok(Some(now.as_secs_f64()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(None)
}

fn counters(args: &Args) -> Result<Counters, String> {
    Ok(Counters {
        cpu: args.pid.map(cpu_seconds).transpose()?,
        threads: args.pid.map(cpu_by_thread).transpose()?,
        redis: args.redis.as_deref().map(redis_commands).transpose()?,
        client_cpu: cpu_seconds(std::process::id())?,
    })
}

fn over_ws(args: &Args, connections: usize, nodes: &[SocketAddr]) -> Result<Seen, String> {
    let node = |i: usize| nodes[i % nodes.len()];
    let clients: Vec<Client> = (0..connections)
        .map(|i| Client::connect(node(i)))
        .collect::<Result<_, _>>()?;
    let mut reactor = Reactor::new(clients)?;
    let roles_before = roles_counted(nodes)?;
    let before = counters(args)?;
    let mut observed = Vec::with_capacity(connections);
    for i in 0..connections {
        let id = format!("f{i}");
        reactor.send(
            i,
            &json!({"type": "chat", "id": id, "message": args.message}),
        )?;
        observed.push(observing());
    }
    let joined = all_joined(nodes, roles_before, connections)?;
    reactor.run(|i, arrival, frame| {
        let o = &mut observed[i];
        let Some(v) = frame else {
            o.first_token.get_or_insert(arrival.read);
            o.token_times.push(arrival.read);
            o.kernel_times.push(arrival.kernel);
            return Ok(Next::Read);
        };
        match v["type"].as_str() {
            Some("start") => {
                o.role = v["role"].as_str().unwrap_or("").to_owned();
            }
            Some("done") => {
                o.end = v;
                return Ok(Next::Finished);
            }
            Some("error") => return Err(format!("chat failed: {v}")),
            _ => {}
        }
        Ok(Next::Read)
    })?;
    Ok(Seen {
        observed,
        joined,
        before,
        after: counters(args)?,
        refused: 0,
    })
}

/// The same over the HTTP API: every connection POSTs the same streamed
/// request (keyed like a WebSocket chat of the question), the first to
/// arrive leads, the others follow.
fn over_http(args: &Args, connections: usize, nodes: &[SocketAddr]) -> Result<Seen, String> {
    let node = |i: usize| nodes[i % nodes.len()];
    // Every node is reached at its own address; the Host header names the
    // first, which a server on loopback accepts for any of them.
    let request = chat_request(
        args.addr,
        &args.message,
        &args.system_prompt,
        args.max_tokens,
        false,
    );
    let mut reactor = HttpReactor::connect((0..connections).map(node), request)?;
    let roles_before = roles_counted(nodes)?;
    let before = counters(args)?;
    let mut observed = Vec::with_capacity(connections);
    let mut status = vec![0u16; connections];
    for i in 0..connections {
        reactor.ask(i)?;
        observed.push(observing());
    }
    let joined = all_joined(nodes, roles_before, connections)?;
    reactor.run(|i, arrival, event| {
        let o = &mut observed[i];
        match event {
            HttpEvent::Head(head) => {
                status[i] = head.status;
                o.role.clone_from(&head.role);
            }
            HttpEvent::Token(seq) => {
                if *seq != o.kernel_times.len() as u64 {
                    return Err(format!(
                        "connection {i}: token {seq} after {} tokens",
                        o.kernel_times.len()
                    ));
                }
                o.first_token.get_or_insert(arrival.read);
                o.token_times.push(arrival.read);
                o.kernel_times.push(arrival.kernel);
            }
            HttpEvent::Data(_) if event.is_error() => {
                return Err(format!("request failed: {}", failure(status[i], event)));
            }
            HttpEvent::Body(_) => {
                return Err(format!("request failed: {}", failure(status[i], event)));
            }
            HttpEvent::Data(_) => {}
            HttpEvent::Done => o.end = json!("[DONE]"),
            HttpEvent::End => {
                if o.end.is_null() {
                    return Err(format!("connection {i}: a stream ended without [DONE]"));
                }
                return Ok(Step::Finished);
            }
        }
        Ok(Step::Read)
    })?;
    Ok(Seen {
        observed,
        joined,
        before,
        after: counters(args)?,
        refused: reactor.refused(),
    })
}

/// One generation to many subscribers: every connection asks the same
/// question at once (one leads, the others follow), and the lag of every
/// token at every connection is measured behind the first receiver of
/// each token the others are.
pub fn fanout(args: &Args) -> Result<Value, String> {
    let connections = if args.connections == 0 {
        2000
    } else {
        args.connections
    };
    let nodes: Vec<SocketAddr> = std::iter::once(args.addr)
        .chain(args.more_addrs.iter().copied())
        .collect();
    let Seen {
        observed,
        joined,
        before,
        after,
        refused,
    } = match args.transport {
        Transport::Ws => over_ws(args, connections, &nodes)?,
        Transport::Http => over_http(args, connections, &nodes)?,
    };
    let server_cpu = before.cpu.zip(after.cpu).map(|(b, a)| a - b);
    let client_cpu = after.client_cpu - before.client_cpu;
    let tokens = observed
        .iter()
        .map(|o| o.token_times.len())
        .min()
        .unwrap_or(0);
    // Lag of every token at every connection behind its earliest arrival
    // anywhere, measured on the kernel's receive clock and on the reactor's
    // read clock.
    let kernel_lags = lags(&observed, tokens, |o, seq| o.kernel_times[seq]);
    let origin = Instant::now();
    let read_lags = lags(&observed, tokens, |o, seq| {
        -(origin
            .saturating_duration_since(o.token_times[seq])
            .as_secs_f64())
    });
    let roles = observed
        .iter()
        .fold(std::collections::BTreeMap::new(), |mut m, o| {
            *m.entry(o.role.clone()).or_insert(0usize) += 1;
            m
        });
    let upstream_calls: u64 = nodes
        .iter()
        .map(|n| stats(*n).map(|s| s["upstream"]["calls"].as_u64().unwrap_or(0)))
        .sum::<Result<u64, String>>()?;
    let redis_delta = before.redis.zip(after.redis).map(|(b, a)| a - b);
    // Every request had joined the generation before its first token
    // reached anyone: each was fanned out to, none caught up by replay.
    let first_token = observed
        .iter()
        .filter_map(|o| o.kernel_times.first().copied())
        .fold(f64::INFINITY, f64::min);
    let joined_before_first_token = joined.map(|at| at < first_token);
    let delivered = (connections * tokens.max(1)) as f64;
    let by_thread: Option<serde_json::Map<String, Value>> =
        before.threads.zip(after.threads).map(|(before, after)| {
            after
                .into_iter()
                .map(|(role, seconds)| {
                    let spent = seconds - before.get(&role).copied().unwrap_or(0.0);
                    (role, json!(spent * 1e6 / delivered))
                })
                .filter(|(_, us)| us.as_f64().unwrap_or(0.0) > 0.0)
                .collect()
        });
    Ok(json!({
        "scenario": "fanout",
        "transport": args.transport.as_str(),
        "nodes": nodes.len(),
        "connections": connections,
        "tokens": tokens,
        "roles": roles,
        "all_joined_before_the_first_token": joined_before_first_token,
        "connects_refused_and_retried": refused,
        "upstream_calls (all nodes)": upstream_calls,
        "redis_commands": redis_delta,
        "redis_commands_per_generated_token": redis_delta.map(|d| d as f64 / tokens.max(1) as f64),
        "lag_behind_first_receiver_ms, kernel receive time (every token, every connection)": summary(kernel_lags.0),
        "worst_kernel_lag_per_connection_ms": summary(kernel_lags.1),
        "lag_behind_first_receiver_ms, client read time (every token, every connection)": summary(read_lags.0),
        "worst_read_lag_per_connection_ms": summary(read_lags.1),
        "server_cpu_us_per_delivered_token": server_cpu
            .map(|cpu| cpu * 1e6 / (connections * tokens.max(1)) as f64),
        "server_cpu_us_per_delivered_token_by_thread": by_thread,
        // On the same two cores as the server: what it takes from them.
        "client_cpu_us_per_delivered_token": client_cpu * 1e6 / (connections * tokens.max(1)) as f64,
    }))
}

/// Every lag (ms) of a token behind its earliest arrival at any connection,
/// and each connection's worst, with arrival times in seconds from `time`.
fn lags(
    observed: &[Observed],
    tokens: usize,
    time: impl Fn(&Observed, usize) -> f64,
) -> (Vec<f64>, Vec<f64>) {
    let first: Vec<f64> = (0..tokens)
        .map(|seq| {
            observed
                .iter()
                .map(|o| time(o, seq))
                .fold(f64::INFINITY, f64::min)
        })
        .collect();
    let mut all = Vec::with_capacity(observed.len() * tokens);
    let mut worst = Vec::with_capacity(observed.len());
    for o in observed {
        let mut w = 0.0f64;
        for (seq, earliest) in first.iter().enumerate() {
            let lag = (time(o, seq) - earliest) * 1000.0;
            w = w.max(lag);
            all.push(lag);
        }
        worst.push(w);
    }
    (all, worst)
}
