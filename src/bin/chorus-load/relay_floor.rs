//! `chorus-load relay-floor`: what relaying a streamed answer costs at the
//! least on this machine, as the floor under `stream-cost`'s figure.
//!
//! One thread (`floor-relay`) does what any gateway must do for each
//! token of `stream-cost`'s load and nothing more: it waits on every
//! upstream socket at once (`epoll`), reads each token the moment it
//! arrives (one `recvfrom`, which on loopback also sends the upstream its
//! ACK), cuts the content out of the event stream, and writes one
//! WebSocket-sized text frame to that stream's client (one `sendto`, which
//! on loopback also delivers it into the client's socket and wakes the
//! client). No history, no cache, no broadcast, no JSON parser, no other
//! thread. Its clients are plain TCP sockets on loopback read by a second
//! thread (`floor-client`) with `epoll`, as the load generator's clients
//! are; the upstream is `chorus-load upstream`, as for `stream-cost`.
//!
//! Every connection asks one question per round on a kept-alive
//! connection; round 0 is a warm-up. The output is the relay thread's CPU
//! per answer and per token over the measured rounds (its `schedstat`),
//! to set next to chorus's `chorus-upstream` thread and whole-server
//! figures for the same load.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{epoll, Timespec};
use rustix::fd::AsFd;
use serde_json::{json, Value};

use crate::measure::get_json;
use crate::Args;

/// Longest a round may take before the run gives up.
const ROUND_LIMIT: Duration = Duration::from_secs(60);

/// One upstream stream and where its tokens go.
struct Stream {
    upstream: TcpStream,
    client: TcpStream,
    /// Bytes read and not yet decoded.
    input: Vec<u8>,
    /// The response head has been read.
    head_done: bool,
    /// Event-stream bytes not yet cut into events.
    events: Vec<u8>,
    seq: u64,
    done: bool,
}

impl Stream {
    /// Decodes what `input` holds: the head, then chunks, then events;
    /// writes a frame per content token. Returns the tokens written.
    fn decode(&mut self, frame: &mut Vec<u8>) -> Result<u64, String> {
        let mut written = 0;
        if !self.head_done {
            let Some(end) = find(&self.input, b"\r\n\r\n") else {
                return Ok(0);
            };
            if !self.input.starts_with(b"HTTP/1.1 200") {
                return Err(String::from_utf8_lossy(&self.input[..end]).into_owned());
            }
            self.input.drain(..end + 4);
            self.head_done = true;
        }
        let mut at = 0;
        while let Some(line) = find(&self.input[at..], b"\r\n") {
            let size = std::str::from_utf8(&self.input[at..at + line])
                .ok()
                .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                .ok_or("bad chunk size")?;
            let start = at + line + 2;
            if self.input.len() < start + size + 2 {
                break;
            }
            self.events
                .extend_from_slice(&self.input[start..start + size]);
            at = start + size + 2;
            if size == 0 {
                self.done = true;
            }
        }
        self.input.drain(..at);
        while let Some(end) = find(&self.events, b"\n\n") {
            let event = &self.events[..end];
            if let Some(text) = content(event) {
                frame.clear();
                let json = format!(
                    "{{\"type\":\"token\",\"id\":\"r-floor\",\"seq\":{},\"text\":\"{}\"}}",
                    self.seq, text
                );
                frame.push(0x81);
                frame.push(json.len() as u8);
                frame.extend_from_slice(json.as_bytes());
                self.client.write_all(frame).map_err(|e| e.to_string())?;
                self.seq += 1;
                written += 1;
            }
            self.events.drain(..end + 2);
        }
        Ok(written)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The non-empty `content` of a chunk event (the upstream's tokens need
/// no unescaping).
fn content(event: &[u8]) -> Option<&str> {
    const KEY: &[u8] = b"\"content\":\"";
    let at = find(event, KEY)? + KEY.len();
    let len = event[at..].iter().position(|&b| b == b'"')?;
    let text = std::str::from_utf8(&event[at..at + len]).ok()?;
    (!text.is_empty() && text.len() < 64).then_some(text)
}

/// CPU seconds of the calling thread so far (its `schedstat`).
fn thread_cpu() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |ns| ns / 1e9)
}

fn request(upstream: SocketAddr, question: &str) -> Vec<u8> {
    let body = json!({
        "model": "floor",
        "stream": true,
        "messages": [{"role": "user", "content": question}],
    })
    .to_string();
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {upstream}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Runs one round on every stream; returns the tokens relayed.
fn round(
    streams: &mut [Stream],
    epoll_fd: &rustix::fd::OwnedFd,
    upstream: SocketAddr,
    round: usize,
) -> Result<u64, String> {
    for (i, s) in streams.iter_mut().enumerate() {
        s.head_done = false;
        s.done = false;
        s.seq = 0;
        s.upstream
            .write_all(&request(upstream, &format!("floor question {round} {i}")))
            .map_err(|e| e.to_string())?;
    }
    let mut open = streams.len();
    let mut tokens = 0;
    let mut buf = vec![0u8; 16 * 1024];
    let mut frame = Vec::with_capacity(256);
    let mut events = Vec::with_capacity(256);
    let started = Instant::now();
    let wait = Timespec::try_from(Duration::from_millis(100)).map_err(|e| e.to_string())?;
    while open > 0 {
        if started.elapsed() > ROUND_LIMIT {
            return Err(format!("round {round}: {open} streams did not end"));
        }
        events.clear();
        match epoll::wait(
            epoll_fd,
            rustix::buffer::spare_capacity(&mut events),
            Some(&wait),
        ) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.to_string()),
        }
        for event in &events {
            let s = &mut streams[event.data.u64() as usize];
            loop {
                match s.upstream.read(&mut buf) {
                    Ok(0) => return Err("the upstream closed a connection".into()),
                    Ok(n) => {
                        s.input.extend_from_slice(&buf[..n]);
                        if n < buf.len() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
            let was_done = s.done;
            tokens += s.decode(&mut frame)?;
            if s.done && !was_done {
                open -= 1;
            }
        }
    }
    Ok(tokens)
}

pub fn relay_floor(args: &Args) -> Result<Value, String> {
    let upstream = args.upstream.ok_or("relay-floor needs --upstream")?;
    let n = if args.connections == 0 {
        200
    } else {
        args.connections
    };
    let rounds = args.rounds.max(2);
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let listen_addr = listener.local_addr().map_err(|e| e.to_string())?;
    let epoll_fd = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(|e| e.to_string())?;
    let mut streams = Vec::with_capacity(n);
    let mut readers = Vec::with_capacity(n);
    for i in 0..n {
        let up = TcpStream::connect(upstream).map_err(|e| e.to_string())?;
        up.set_nodelay(true).map_err(|e| e.to_string())?;
        up.set_nonblocking(true).map_err(|e| e.to_string())?;
        epoll::add(
            &epoll_fd,
            up.as_fd(),
            epoll::EventData::new_u64(i as u64),
            epoll::EventFlags::IN,
        )
        .map_err(|e| e.to_string())?;
        let reader = TcpStream::connect(listen_addr).map_err(|e| e.to_string())?;
        let (client, _) = listener.accept().map_err(|e| e.to_string())?;
        client.set_nodelay(true).map_err(|e| e.to_string())?;
        reader.set_nonblocking(true).map_err(|e| e.to_string())?;
        readers.push(reader);
        streams.push(Stream {
            upstream: up,
            client,
            input: Vec::new(),
            head_done: false,
            events: Vec::new(),
            seq: 0,
            done: false,
        });
    }

    // The clients: one thread reading every socket as it becomes readable.
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let client_thread = {
        let (received, stop) = (received.clone(), stop.clone());
        std::thread::Builder::new()
            .name("floor-client".into())
            .spawn(move || -> Result<f64, String> {
                let ep = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(|e| e.to_string())?;
                for (i, r) in readers.iter().enumerate() {
                    epoll::add(
                        &ep,
                        r.as_fd(),
                        epoll::EventData::new_u64(i as u64),
                        epoll::EventFlags::IN,
                    )
                    .map_err(|e| e.to_string())?;
                }
                let mut buf = vec![0u8; 16 * 1024];
                let mut events = Vec::with_capacity(256);
                let wait =
                    Timespec::try_from(Duration::from_millis(100)).map_err(|e| e.to_string())?;
                let cpu_start = thread_cpu();
                while !stop.load(Ordering::Acquire) {
                    events.clear();
                    let _ = epoll::wait(
                        &ep,
                        rustix::buffer::spare_capacity(&mut events),
                        Some(&wait),
                    );
                    for event in &events {
                        let mut r = &readers[event.data.u64() as usize];
                        while let Ok(got) = r.read(&mut buf) {
                            if got == 0 {
                                break;
                            }
                            // A frame's first byte is 0x81: count frames.
                            let frames = buf[..got].iter().filter(|&&b| b == 0x81).count();
                            received.fetch_add(frames as u64, Ordering::AcqRel);
                            if got < buf.len() {
                                break;
                            }
                        }
                    }
                }
                Ok(thread_cpu() - cpu_start)
            })
            .map_err(|e| e.to_string())?
    };

    let relay = std::thread::Builder::new()
        .name("floor-relay".into())
        .spawn(move || -> Result<(u64, u64, f64, f64), String> {
            let warm_up = round(&mut streams, &epoll_fd, upstream, 0)?;
            let (cpu_start, at) = (thread_cpu(), Instant::now());
            let mut tokens = 0;
            for r in 1..rounds {
                tokens += round(&mut streams, &epoll_fd, upstream, r)?;
            }
            let cpu = thread_cpu() - cpu_start;
            Ok((warm_up, tokens, cpu, at.elapsed().as_secs_f64()))
        })
        .map_err(|e| e.to_string())?;
    let relayed = relay.join().map_err(|_| "the relay thread panicked")?;
    // Every frame written reaches its client before the count is read.
    let deadline = Instant::now() + Duration::from_secs(10);
    let written = relayed.as_ref().map_or(0, |r| r.0 + r.1);
    while Instant::now() < deadline && received.load(Ordering::Acquire) < written {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Release);
    let client_cpu = client_thread
        .join()
        .map_err(|_| "the client thread panicked")??;
    let (_, tokens, relay_cpu, wall) = relayed?;
    let received = received.load(Ordering::Acquire);
    if received != written {
        return Err(format!("{written} frames written, {received} received"));
    }
    let answers = (n * (rounds - 1)) as f64;
    Ok(json!({
        "scenario": "relay-floor",
        "connections": n,
        "rounds": rounds - 1,
        "warmup_rounds": 1,
        "answers": answers,
        "tokens": tokens,
        "tokens_per_answer": tokens as f64 / answers,
        "frames_received (warm-up included)": received,
        "relay_cpu_us_per_answer": relay_cpu * 1e6 / answers,
        "relay_cpu_us_per_token": relay_cpu * 1e6 / tokens.max(1) as f64,
        "client_cpu_us_per_frame (warm-up included)": client_cpu * 1e6 / received.max(1) as f64,
        "wall_s": wall,
        "upstream_stats": get_json(upstream, "/stats")?,
    }))
}
