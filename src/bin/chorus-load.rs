//! `chorus-load`: the project's own load generator. It drives a running
//! chorus over real WebSocket connections on loopback and prints what it
//! measured. Every scenario is bounded in connections and time and stops by
//! itself.
//!
//! ```text
//! chorus-load cache-hit  --addr 127.0.0.1:8080 --pid PID [--connections 8] [--requests 2000]
//! chorus-load ttft       --addr 127.0.0.1:8080 [--connections 200] [--rounds 5] [--first-token-ms 200]
//! chorus-load fanout     --addr 127.0.0.1:8080[,127.0.0.1:8081…] [--pid PID] [--connections 2000] [--redis URL]
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
    /// Further nodes of a cluster (`--addr A,B,…`): connections are spread
    /// over `addr` and these, round robin.
    more_addrs: Vec<SocketAddr>,
    /// A Redis whose command count is read before and after (cluster runs).
    redis: Option<String>,
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
        more_addrs: Vec::new(),
        redis: None,
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
            "--addr" => {
                let mut addrs = value.split(',').map(|a| a.trim().parse::<SocketAddr>());
                parsed.addr = addrs
                    .next()
                    .ok_or("--addr needs an address")?
                    .map_err(|e| bad(&e))?;
                parsed.more_addrs = addrs.collect::<Result<_, _>>().map_err(|e| bad(&e))?;
            }
            "--redis" => parsed.redis = Some(value),
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
    /// Kernel receive times of the tokens (reactor clients only).
    kernel_times: Vec<f64>,
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
        kernel_times: Vec::new(),
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

/// What a [`Reactor`] does with a connection after one of its frames.
enum Next {
    Read,
    Send(Value),
    Finished,
}

/// When a frame reached the client.
#[derive(Clone, Copy)]
struct Arrival {
    /// When the reactor read it.
    read: Instant,
    /// When the kernel put its bytes on the client's socket (`SO_TIMESTAMPNS`,
    /// seconds of the real-time clock): the moment a client on another
    /// machine would have had it, free of this client's own scheduling.
    kernel: f64,
}

struct ReactorConn {
    /// For sending (tungstenite masks client frames).
    ws: WebSocket<TcpStream>,
    /// The same socket, read here directly, with receive timestamps.
    reader: TcpStream,
    /// Bytes read and not yet parsed into frames.
    buf: Vec<u8>,
}

/// Many connections on one thread: non-blocking sockets and one epoll set.
/// A thread per connection would charge the server for waking thousands of
/// client threads (on loopback the sender's system call runs the receiver's
/// wake-up), which no real, remote client costs it.
struct Reactor {
    epoll: rustix::fd::OwnedFd,
    conns: Vec<ReactorConn>,
}

impl Reactor {
    fn new(clients: Vec<Client>) -> Result<Reactor, String> {
        use rustix::event::epoll;
        use std::os::fd::AsRawFd;
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(|e| e.to_string())?;
        let mut conns = Vec::with_capacity(clients.len());
        for (i, c) in clients.into_iter().enumerate() {
            let reader = c.ws.get_ref().try_clone().map_err(|e| e.to_string())?;
            reader.set_nonblocking(true).map_err(|e| e.to_string())?;
            let on: libc::c_int = 1;
            // SAFETY: a valid socket, option and option length.
            let rc = unsafe {
                libc::setsockopt(
                    reader.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_TIMESTAMPNS,
                    (&on as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(format!(
                    "SO_TIMESTAMPNS: {}",
                    std::io::Error::last_os_error()
                ));
            }
            epoll::add(
                &epoll,
                &reader,
                epoll::EventData::new_u64(i as u64),
                epoll::EventFlags::IN,
            )
            .map_err(|e| e.to_string())?;
            conns.push(ReactorConn {
                ws: c.ws,
                reader,
                buf: Vec::new(),
            });
        }
        Ok(Reactor { epoll, conns })
    }

    fn send(&mut self, i: usize, v: &Value) -> Result<(), String> {
        // The socket is shared with the non-blocking reader, so this may
        // find it full: the bytes then wait in tungstenite's buffer.
        match self.conns[i].ws.send(Message::text(v.to_string())) {
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            r => r.map_err(|e| format!("send: {e}")),
        }
    }

    /// Reads every connection until `on_frame` has said `Finished` for each.
    /// `on_frame` gets the connection's index, when its frame arrived, and
    /// the frame: `None` for a token frame (not parsed, to keep the client
    /// cheap), the parsed JSON otherwise.
    fn run(
        &mut self,
        mut on_frame: impl FnMut(usize, Arrival, Option<Value>) -> Result<Next, String>,
    ) -> Result<(), String> {
        use rustix::event::epoll;
        let mut open = self.conns.len();
        let mut finished = vec![false; open];
        let mut events = Vec::with_capacity(1024);
        let mut scratch = vec![0u8; 64 * 1024];
        let timeout = rustix::event::Timespec {
            tv_sec: READ_TIMEOUT.as_secs() as i64,
            tv_nsec: 0,
        };
        while open > 0 {
            events.clear();
            epoll::wait(
                &self.epoll,
                rustix::buffer::spare_capacity(&mut events),
                Some(&timeout),
            )
            .map_err(|e| e.to_string())?;
            if events.is_empty() {
                return Err(format!("no frame for {READ_TIMEOUT:?}"));
            }
            for event in &events {
                let i = event.data.u64() as usize;
                while !finished[i] {
                    let conn = &mut self.conns[i];
                    let (n, kernel) = match recv_stamped(&conn.reader, &mut scratch) {
                        Ok((0, _)) => return Err("server closed the connection".into()),
                        Ok(got) => got,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(format!("read: {e}")),
                    };
                    let arrival = Arrival {
                        read: Instant::now(),
                        kernel,
                    };
                    conn.buf.extend_from_slice(&scratch[..n]);
                    let mut parsed = 0;
                    let mut frames = Vec::new();
                    while let Some((opcode, payload, used)) = server_frame(&conn.buf[parsed..]) {
                        if opcode == 0x8 {
                            return Err("server closed the connection".into());
                        }
                        if opcode == 0x1 {
                            frames.push(if payload.starts_with(br#"{"type":"token""#) {
                                None
                            } else {
                                Some(
                                    serde_json::from_slice::<Value>(payload)
                                        .map_err(|e| format!("bad JSON: {e}"))?,
                                )
                            });
                        }
                        parsed += used;
                    }
                    conn.buf.drain(..parsed);
                    for frame in frames {
                        match on_frame(i, arrival, frame)? {
                            Next::Read => {}
                            Next::Send(v) => self.send(i, &v)?,
                            Next::Finished => {
                                finished[i] = true;
                                open -= 1;
                                break;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Reads what `socket` holds, with the kernel's receive time of the bytes.
fn recv_stamped(socket: &TcpStream, buf: &mut [u8]) -> std::io::Result<(usize, f64)> {
    use std::os::fd::AsRawFd;
    // u64s keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; every pointer in it refers to a live
    // buffer of the stated length, and the cmsg walk stays inside `control`.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        let n = libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut stamp = f64::NAN;
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS
            {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                stamp = ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9;
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        Ok((n as usize, stamp))
    }
}

/// One complete unmasked server frame at the start of `buf`: its opcode,
/// payload and encoded length. Server frames are never fragmented.
fn server_frame(buf: &[u8]) -> Option<(u8, &[u8], usize)> {
    let opcode = buf.first()? & 0x0f;
    let (len, header) = match buf.get(1)? & 0x7f {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let payload = buf.get(header..header + len)?;
    Some((opcode, payload, header + len))
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

/// CPU seconds of the server's threads by role: thread
/// names without their number (`chorus-conn`, `chorus-cache`, …), from
/// /proc/PID/task. Threads that ended in between are missing from it.
fn cpu_by_thread(pid: u32) -> Result<std::collections::BTreeMap<String, f64>, String> {
    let mut by_role = std::collections::BTreeMap::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| e.to_string())?;
    for task in tasks.flatten() {
        // schedstat's first field is the time on a CPU in nanoseconds, far
        // finer than stat's clock ticks, which a short-lived share of many
        // threads would round away.
        let (Ok(name), Ok(schedstat)) = (
            std::fs::read_to_string(task.path().join("comm")),
            std::fs::read_to_string(task.path().join("schedstat")),
        ) else {
            continue;
        };
        let role = name
            .trim()
            .trim_end_matches(|c: char| c.is_ascii_digit() || c == '-');
        let nanos: f64 = schedstat
            .split_whitespace()
            .next()
            .and_then(|f| f.parse().ok())
            .unwrap_or(0.0);
        *by_role.entry(role.to_owned()).or_insert(0.0) += nanos / 1e9;
    }
    Ok(by_role)
}

/// Commands a Redis has processed so far (`INFO stats`).
fn redis_commands(url: &str) -> Result<u64, String> {
    let mut conn = redis::Client::open(url)
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
        .map_err(|e| format!("redis: {e}"))?;
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query(&mut conn)
        .map_err(|e| format!("redis INFO: {e}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| "redis INFO has no total_commands_processed".into())
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
/// All connections are driven by one [`Reactor`] thread, so the client costs
/// the shared cores as little as it can.
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
    let nodes: Vec<SocketAddr> = std::iter::once(args.addr)
        .chain(args.more_addrs.iter().copied())
        .collect();
    let clients: Vec<Client> = (0..connections)
        .map(|i| Client::connect(nodes[i % nodes.len()]))
        .collect::<Result<_, _>>()?;
    let mut reactor = Reactor::new(clients)?;
    let cpu_before = args.pid.map(cpu_seconds).transpose()?;
    let redis_before = args.redis.as_deref().map(redis_commands).transpose()?;
    let mut observed = Vec::with_capacity(connections);
    for i in 0..connections {
        let id = format!("f{i}");
        reactor.send(
            i,
            &json!({"type": "chat", "id": id, "message": "One question for everyone"}),
        )?;
        observed.push(Observed {
            sent: Instant::now(),
            first_token: None,
            token_times: Vec::with_capacity(64),
            kernel_times: Vec::with_capacity(64),
            end: Value::Null,
            role: String::new(),
        });
    }
    reactor.run(|i, arrival, frame| {
        let o = &mut observed[i];
        let Some(v) = frame else {
            o.first_token.get_or_insert(arrival.read);
            o.token_times.push(arrival.read);
            o.kernel_times.push(arrival.kernel);
            return Ok(Next::Read);
        };
        match v["type"].as_str() {
            Some("start") => o.role = v["role"].as_str().unwrap_or("").to_owned(),
            Some("done") => {
                o.end = v;
                return Ok(Next::Finished);
            }
            Some("error") => return Err(format!("chat failed: {v}")),
            _ => {}
        }
        Ok(Next::Read)
    })?;
    let server_cpu = match (args.pid, cpu_before) {
        (Some(pid), Some(before)) => Some(cpu_seconds(pid)? - before),
        _ => None,
    };
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
    let redis_delta = match (args.redis.as_deref(), redis_before) {
        (Some(url), Some(before)) => Some(redis_commands(url)? - before),
        _ => None,
    };
    Ok(json!({
        "scenario": "fanout",
        "nodes": nodes.len(),
        "connections": connections,
        "tokens": tokens,
        "roles": roles,
        "upstream_calls (all nodes)": upstream_calls,
        "redis_commands": redis_delta,
        "redis_commands_per_generated_token": redis_delta.map(|d| d as f64 / tokens.max(1) as f64),
        "lag_behind_first_receiver_ms, kernel receive time (every token, every connection)": summary(kernel_lags.0),
        "worst_kernel_lag_per_connection_ms": summary(kernel_lags.1),
        "lag_behind_first_receiver_ms, client read time (every token, every connection)": summary(read_lags.0),
        "worst_read_lag_per_connection_ms": summary(read_lags.1),
        "server_cpu_us_per_delivered_token": server_cpu
            .map(|cpu| cpu * 1e6 / (connections * tokens.max(1)) as f64),
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
