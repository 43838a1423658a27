//! `chorus-load`: the project's own load generator. It drives a running
//! chorus over real WebSocket connections on loopback and prints what it
//! measured. Every scenario is bounded in connections and time and stops by
//! itself.
//!
//! ```text
//! chorus-load cache-hit  --addr 127.0.0.1:8080 --pid PID [--connections 8] [--requests 2000]
//! chorus-load ttft       --addr 127.0.0.1:8080 [--connections 200] [--rounds 5] [--first-token-ms 200]
//! chorus-load fanout     --addr 127.0.0.1:8080 [--pid PID] [--connections 2000]
//! chorus-load idle-rss   --addr 127.0.0.1:8080 --pid PID [--connections 2000]
//! ```
//!
//! `--pid` is the server's process id, for CPU time and RSS from `/proc`
//! (Linux only). `scripts/bench.sh` starts a server with the configuration
//! each scenario needs and runs them all.

use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

const CLIENT_STACK: usize = 128 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(60);

struct Args {
    scenario: String,
    addr: SocketAddr,
    pid: Option<u32>,
    connections: usize,
    requests: usize,
    rounds: usize,
    first_token_ms: f64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let scenario = args
        .next()
        .ok_or("missing scenario: cache-hit | ttft | fanout | idle-rss")?;
    let mut parsed = Args {
        scenario,
        addr: "127.0.0.1:8080".parse().map_err(|e| format!("{e}"))?,
        pid: None,
        connections: 0,
        requests: 2000,
        rounds: 5,
        first_token_ms: 200.0,
    };
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--addr" => parsed.addr = value.parse().map_err(|e| bad(&e))?,
            "--pid" => parsed.pid = Some(value.parse().map_err(|e| bad(&e))?),
            "--connections" => parsed.connections = value.parse().map_err(|e| bad(&e))?,
            "--requests" => parsed.requests = value.parse().map_err(|e| bad(&e))?,
            "--rounds" => parsed.rounds = value.parse().map_err(|e| bad(&e))?,
            "--first-token-ms" => parsed.first_token_ms = value.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown flag {flag}")),
        }
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
    let result = match args.scenario.as_str() {
        "cache-hit" => cache_hit(&args),
        "ttft" => ttft(&args),
        "fanout" => fanout(&args),
        "idle-rss" => idle_rss(&args),
        other => Err(format!("unknown scenario {other}")),
    };
    match result {
        Ok(summary) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&summary).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("chorus-load: {e}");
            ExitCode::FAILURE
        }
    }
}

// -- a minimal client --------------------------------------------------------

struct Client {
    ws: WebSocket<TcpStream>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Result<Client, String> {
        let tcp = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
        tcp.set_read_timeout(Some(READ_TIMEOUT))
            .map_err(|e| e.to_string())?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let (ws, _) = tungstenite::client::client(format!("ws://{addr}/ws"), tcp)
            .map_err(|e| format!("handshake: {e}"))?;
        Ok(Client { ws })
    }

    fn send(&mut self, v: &Value) -> Result<(), String> {
        self.ws
            .send(Message::text(v.to_string()))
            .map_err(|e| format!("send: {e}"))
    }

    /// The next frame; token frames (the bulk) come back as `None` without
    /// being parsed, so the load generator spends little CPU of its own on
    /// the cores it shares with the server.
    fn recv(&mut self) -> Result<Option<Value>, String> {
        loop {
            match self.ws.read().map_err(|e| format!("read: {e}"))? {
                Message::Text(t) if t.as_str().starts_with(r#"{"type":"token""#) => {
                    return Ok(None)
                }
                Message::Text(t) => {
                    return serde_json::from_str(t.as_str())
                        .map(Some)
                        .map_err(|e| format!("bad JSON: {e}"))
                }
                Message::Close(_) => return Err("server closed the connection".into()),
                _ => {}
            }
        }
    }
}

/// What one chat looked like from the client.
struct Observed {
    sent: Instant,
    first_token: Option<Instant>,
    token_times: Vec<Instant>,
    end: Value,
    role: String,
}

/// Sends a chat and reads until its end, timing each token.
fn chat(c: &mut Client, id: &str, message: &str) -> Result<Observed, String> {
    let sent = Instant::now();
    c.send(&json!({"type": "chat", "id": id, "message": message}))?;
    let mut observed = Observed {
        sent,
        first_token: None,
        token_times: Vec::new(),
        end: Value::Null,
        role: String::new(),
    };
    loop {
        let Some(v) = c.recv()? else {
            let now = Instant::now();
            observed.first_token.get_or_insert(now);
            observed.token_times.push(now);
            continue;
        };
        match v["type"].as_str() {
            Some("start") => observed.role = v["role"].as_str().unwrap_or("").to_owned(),
            Some("done") => {
                observed.end = v;
                return Ok(observed);
            }
            Some("error") if v["id"] == id || v["request"].is_string() => {
                return Err(format!("chat failed: {v}"))
            }
            _ => {}
        }
    }
}

fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    std::thread::Builder::new()
        .stack_size(CLIENT_STACK)
        .spawn(f)
        .unwrap_or_else(|e| panic!("cannot start a client thread: {e}"))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn summary(mut samples: Vec<f64>) -> Value {
    samples.sort_by(f64::total_cmp);
    json!({
        "n": samples.len(),
        "p50": percentile(&samples, 0.5),
        "p90": percentile(&samples, 0.9),
        "p99": percentile(&samples, 0.99),
        "max": samples.last().copied().unwrap_or(f64::NAN),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Server CPU time (user + system) in seconds, from /proc/PID/stat.
fn cpu_seconds(pid: u32) -> Result<f64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or("odd /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the full line: 12 and 13 here.
    let hz = rustix::param::clock_ticks_per_second() as f64;
    Ok((ticks(11) + ticks(12)) / hz)
}

/// Resident set size in KiB, from /proc/PID/status.
fn rss_kib(pid: u32) -> Result<f64, String> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "no VmRSS".into())
}

fn stats(addr: SocketAddr) -> Result<Value, String> {
    use std::io::{Read, Write};
    let mut tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.write_all(format!("GET /api/stats HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut body = String::new();
    tcp.read_to_string(&mut body).map_err(|e| e.to_string())?;
    let json = body.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(json).map_err(|e| e.to_string())
}

// -- scenarios ---------------------------------------------------------------

/// Server CPU per cached answer: warm one answer, then many connections ask
/// it again (each time in a new conversation, so every ask is a cache hit).
fn cache_hit(args: &Args) -> Result<Value, String> {
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
    let barrier = Arc::new(Barrier::new(connections + 1));
    let handles: Vec<_> = (0..connections)
        .map(|_| {
            let (barrier, addr) = (barrier.clone(), args.addr);
            spawn(move || -> Result<(Vec<f64>, usize), String> {
                let mut c = Client::connect(addr)?;
                barrier.wait();
                let mut latencies = Vec::with_capacity(per_connection);
                let mut hits = 0;
                for i in 0..per_connection {
                    let o = chat(&mut c, &format!("h{i}"), question)?;
                    if o.role == "cache" {
                        hits += 1;
                    }
                    latencies.push(ms(o.first_token.unwrap_or(o.sent) - o.sent));
                }
                Ok((latencies, hits))
            })
        })
        .collect();
    barrier.wait();
    let cpu_before = cpu_seconds(pid)?;
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut hits = 0;
    for h in handles {
        let (l, n) = h.join().map_err(|_| "client thread panicked")??;
        latencies.extend(l);
        hits += n;
    }
    let wall = started.elapsed();
    let cpu = cpu_seconds(pid)? - cpu_before;
    let tokens = stats(args.addr)?;
    Ok(json!({
        "scenario": "cache-hit",
        "connections": connections,
        "hits": hits,
        "server_cpu_us_per_hit": cpu * 1e6 / hits.max(1) as f64,
        "hits_per_second": hits as f64 / wall.as_secs_f64(),
        "client_latency_to_first_token_ms": summary(latencies),
        "upstream_calls": tokens["upstream"]["calls"],
    }))
}

/// Time to first token with many concurrent streams, minus the simulated
/// model's own first-token delay: what the server adds.
fn ttft(args: &Args) -> Result<Value, String> {
    let connections = if args.connections == 0 {
        200
    } else {
        args.connections
    };
    let mut client_overhead = Vec::new();
    let mut server_overhead = Vec::new();
    let clients: Vec<Client> = (0..connections)
        .map(|_| Client::connect(args.addr))
        .collect::<Result<_, _>>()?;
    let mut clients: Vec<Option<Client>> = clients.into_iter().map(Some).collect();
    for round in 0..args.rounds {
        let barrier = Arc::new(Barrier::new(connections));
        let handles: Vec<_> = clients
            .iter_mut()
            .enumerate()
            .map(|(i, slot)| {
                let mut c = slot.take().ok_or("client lost")?;
                let barrier = barrier.clone();
                Ok(spawn(move || -> Result<(Client, Observed), String> {
                    barrier.wait();
                    // Distinct questions: every one is a leader with its own stream.
                    let o = chat(
                        &mut c,
                        &format!("t{round}-{i}"),
                        &format!("round {round} question {i}"),
                    )?;
                    Ok((c, o))
                }))
            })
            .collect::<Result<_, String>>()?;
        for (slot, h) in clients.iter_mut().zip(handles) {
            let (c, o) = h.join().map_err(|_| "client thread panicked")??;
            *slot = Some(c);
            if let Some(first) = o.first_token {
                client_overhead.push(ms(first - o.sent) - args.first_token_ms);
            }
            if let Some(t) = o.end["timings"]["ttft_ms"].as_f64() {
                server_overhead.push(t - args.first_token_ms);
            }
        }
    }
    let s = stats(args.addr)?;
    Ok(json!({
        "scenario": "ttft",
        "concurrent_streams": connections,
        "rounds": args.rounds,
        "simulated_first_token_ms": args.first_token_ms,
        "server_added_ms (done.timings.ttft_ms - first_token_ms)": summary(server_overhead),
        "client_seen_added_ms (send to first token - first_token_ms)": summary(client_overhead),
        "upstream_calls": s["upstream"]["calls"],
    }))
}

/// One generation fanned out to many connections: how far behind the first
/// receiver of each token the others are.
fn fanout(args: &Args) -> Result<Value, String> {
    let connections = if args.connections == 0 {
        2000
    } else {
        args.connections
    };
    let clients: Vec<Client> = (0..connections)
        .map(|_| Client::connect(args.addr))
        .collect::<Result<_, _>>()?;
    let barrier = Arc::new(Barrier::new(connections));
    let cpu_before = args.pid.map(cpu_seconds).transpose()?;
    let handles: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let barrier = barrier.clone();
            spawn(move || -> Result<Observed, String> {
                barrier.wait();
                chat(&mut c, &format!("f{i}"), "One question for everyone")
            })
        })
        .collect();
    let mut observed = Vec::with_capacity(connections);
    for h in handles {
        observed.push(h.join().map_err(|_| "client thread panicked")??);
    }
    let server_cpu = match (args.pid, cpu_before) {
        (Some(pid), Some(before)) => Some(cpu_seconds(pid)? - before),
        _ => None,
    };
    let tokens = observed
        .iter()
        .map(|o| o.token_times.len())
        .min()
        .unwrap_or(0);
    // For each token, the earliest arrival over all connections.
    let first: Vec<Instant> = (0..tokens)
        .map(|seq| {
            observed
                .iter()
                .map(|o| o.token_times[seq])
                .min()
                .unwrap_or_else(Instant::now)
        })
        .collect();
    let mut worst_lag_per_connection = Vec::with_capacity(connections);
    let mut all_lags = Vec::with_capacity(connections * tokens);
    for o in &observed {
        let mut worst = 0.0f64;
        for (arrived, earliest) in o.token_times.iter().zip(&first) {
            let lag = ms(*arrived - *earliest);
            worst = worst.max(lag);
            all_lags.push(lag);
        }
        worst_lag_per_connection.push(worst);
    }
    let roles = observed
        .iter()
        .fold(std::collections::BTreeMap::new(), |mut m, o| {
            *m.entry(o.role.clone()).or_insert(0usize) += 1;
            m
        });
    let s = stats(args.addr)?;
    Ok(json!({
        "scenario": "fanout",
        "connections": connections,
        "tokens": tokens,
        "roles": roles,
        "upstream_calls": s["upstream"]["calls"],
        "lag_behind_first_receiver_ms (every token, every connection)": summary(all_lags),
        "worst_lag_per_connection_ms": summary(worst_lag_per_connection),
        "server_cpu_us_per_delivered_token": server_cpu
            .map(|cpu| cpu * 1e6 / (connections * tokens.max(1)) as f64),
    }))
}

/// Resident memory per idle WebSocket connection.
fn idle_rss(args: &Args) -> Result<Value, String> {
    let pid = args.pid.ok_or("idle-rss needs --pid")?;
    let connections = if args.connections == 0 {
        2000
    } else {
        args.connections
    };
    // One connection first, so one-time allocations are not counted per connection.
    let warm = Client::connect(args.addr)?;
    std::thread::sleep(Duration::from_millis(500));
    let before = rss_kib(pid)?;
    let clients: Vec<Client> = (0..connections)
        .map(|_| Client::connect(args.addr))
        .collect::<Result<_, _>>()?;
    std::thread::sleep(Duration::from_secs(1));
    let after = rss_kib(pid)?;
    let s = stats(args.addr)?;
    drop(clients);
    drop(warm);
    Ok(json!({
        "scenario": "idle-rss",
        "connections": connections,
        "server_connections_seen": s["connections"],
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_idle_connection": (after - before) / connections as f64,
    }))
}
