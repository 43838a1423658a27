//! Shared fixtures for the integration tests: start the real `chorus` binary
//! on a free loopback port with its own SQLite file, and talk to it over
//! real sockets with a real WebSocket client.
#![allow(dead_code)]

pub mod browser;
pub mod http1;
pub mod openai_api;
pub mod python;
pub mod redis_server;
pub mod tool_rounds;
pub mod upstream;
pub mod upstream_probe;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

/// How long any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// A running chorus process, stopped (by its PID) when dropped.
pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

/// Settings every test starts from: fast simulated model, small pools.
pub const FAST: &str = r#"
[llm.simulated]
first_token_ms = 20
token_interval_ms = 2
tokens = 12
"#;

impl Server {
    /// Starts chorus with `config` (TOML) in a fresh temporary directory.
    pub fn start(config: &str) -> Server {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().to_path_buf();
        let mut server = Server::start_in(&dir, config);
        server._temp = Some(temp);
        server
    }

    /// Like [`Server::start`], with extra environment variables.
    pub fn start_env(config: &str, env: &[(&str, &str)]) -> Server {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().to_path_buf();
        let mut server = Server::start_with_env(&dir, config, env);
        server._temp = Some(temp);
        server
    }

    /// Starts chorus with `config` using `dir` for its database and logs.
    pub fn start_in(dir: &Path, config: &str) -> Server {
        Server::start_with_env(dir, config, &[])
    }

    /// Like [`Server::start`], in a process whose open-file limit (soft
    /// and hard) is `nofile`: the server raises its soft limit to the hard
    /// one at start, so only a low hard limit makes it run out of
    /// descriptors.
    pub fn start_nofile(config: &str, nofile: u64) -> Server {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().to_path_buf();
        let mut server = Server::spawn(&dir, config, &[], Some(nofile));
        server._temp = Some(temp);
        server
    }

    /// Like [`Server::start_in`], with extra environment variables.
    pub fn start_with_env(dir: &Path, config: &str, env: &[(&str, &str)]) -> Server {
        Server::spawn(dir, config, env, None)
    }

    fn spawn(dir: &Path, config: &str, env: &[(&str, &str)], nofile: Option<u64>) -> Server {
        let db = dir.join("chat.db");
        let config_path = dir.join("chorus.toml");
        let full = format!(
            "{config}\n[history]\nsqlite_path = {:?}\n",
            db.to_string_lossy()
        );
        // `[history]` may already be in `config`; merge by letting the test's own table win.
        let full = if config.contains("[history]") {
            config.replace(
                "[history]",
                &format!("[history]\nsqlite_path = {:?}", db.to_string_lossy()),
            )
        } else {
            full
        };
        std::fs::write(&config_path, full).expect("write config");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("server.log"))
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chorus"));
        cmd.arg("--config")
            .arg(&config_path)
            .arg("--bind")
            .arg("127.0.0.1:0")
            .env("RUST_LOG", "chorus=debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some(limit) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is a single system call, safe between fork
            // and exec; nothing is allocated or locked here.
            unsafe {
                cmd.pre_exec(move || {
                    let limit = rustix::process::Rlimit {
                        current: Some(limit),
                        maximum: Some(limit),
                    };
                    rustix::process::setrlimit(rustix::process::Resource::Nofile, limit)
                        .map_err(std::io::Error::from)
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn chorus");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(rest) = line.strip_prefix("chorus listening on http://") {
                        break rest.trim().parse().expect("address");
                    }
                }
                _ => {
                    let status = child.wait().ok();
                    let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
                    panic!("chorus did not start ({status:?}); log:\n{log}");
                }
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child: Some(child),
            addr,
            dir: dir.to_path_buf(),
            _temp: None,
        }
    }

    /// A new WebSocket client connected to `/ws`.
    pub fn client(&self) -> Client {
        Client::connect(self.addr)
    }

    /// `GET path` over a fresh connection: (status, headers, body).
    pub fn get(&self, path: &str) -> (u16, String, String) {
        raw_http(
            self.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.addr),
        )
    }

    /// `/api/stats` as JSON.
    pub fn stats(&self) -> Value {
        let (status, _, body) = self.get("/api/stats");
        assert_eq!(status, 200);
        serde_json::from_str(&body).expect("stats JSON")
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&child),
            rustix::process::Signal::TERM,
        )
        .expect("signal");
        wait_with_timeout(&mut child, WAIT).expect("chorus did not exit after SIGTERM")
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The server's threads now (from /proc).
    pub fn threads(&self) -> usize {
        let pid = self.child.as_ref().expect("running").id();
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Kills the process at once (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// One raw HTTP exchange: (status, head, body).
pub fn raw_http(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let mut tcp = TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    tcp.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).expect("read response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

/// A blocking WebSocket client that keeps frames it was not asked for yet.
pub struct Client {
    pub ws: WebSocket<TcpStream>,
    buffered: VecDeque<Value>,
    next_id: u64,
}

/// 4,000 tokens of 4 KiB each (16 MiB) in one burst, with a 2 MiB outbox
/// byte bound: far fewer frames than `outbox_frames`, so only the byte
/// bound can cut off a client that does not read.
pub const BIG_TOKENS: &str = r#"
[server]
outbox_bytes = 2097152
send_buffer_bytes = 65536
[llm]
max_tokens = 10000
[llm.simulated]
first_token_ms = 300
token_interval_ms = 0
tokens = 4000
token_bytes = 4096
"#;

/// Everything one request produced on one connection.
#[derive(Debug, Clone)]
pub struct Answer {
    pub request: String,
    pub role: Option<String>,
    pub seqs: Vec<u64>,
    pub text: String,
    /// The final `done` or `error` frame.
    pub end: Value,
}

impl Answer {
    pub fn is_done(&self) -> bool {
        self.end["type"] == "done"
    }
    pub fn finish(&self) -> &str {
        self.end["finish"].as_str().unwrap_or("")
    }
    pub fn code(&self) -> &str {
        self.end["code"].as_str().unwrap_or("")
    }
    /// Cancelled: a `done` with that finish, or the `cancelled` error (a
    /// cancel that wins before the generation ends its requests).
    pub fn is_cancelled(&self) -> bool {
        self.finish() == "cancelled" || self.code() == "cancelled"
    }
    /// Asserts `seq` runs 0, 1, 2, … with no gap or duplicate.
    pub fn assert_contiguous(&self) {
        let expected: Vec<u64> = (0..self.seqs.len() as u64).collect();
        assert_eq!(self.seqs, expected, "seq must start at 0 and have no gaps");
    }
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let tcp = TcpStream::connect(addr).expect("connect");
        Client::over(tcp, addr)
    }

    /// Handshake over an already connected socket (to set socket options first).
    pub fn over(tcp: TcpStream, addr: SocketAddr) -> Client {
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        let (ws, _) =
            tungstenite::client::client(format!("ws://{addr}/ws"), tcp).expect("handshake");
        Client {
            ws,
            buffered: VecDeque::new(),
            next_id: 0,
        }
    }

    pub fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).expect("send");
    }

    pub fn send_raw(&mut self, m: Message) {
        self.ws.send(m).expect("send");
    }

    /// The next frame from the socket (not the buffer); panics on timeout.
    fn read_frame(&mut self) -> Value {
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    return serde_json::from_str(t.as_str()).expect("server sent JSON")
                }
                Ok(Message::Close(frame)) => {
                    return json!({"type": "close", "code": frame.map(|f| u16::from(f.code))})
                }
                Ok(_) => {}
                Err(e) => panic!("reading from chorus failed: {e}"),
            }
        }
    }

    /// The next frame, buffered first.
    pub fn recv(&mut self) -> Value {
        self.buffered
            .pop_front()
            .unwrap_or_else(|| self.read_frame())
    }

    /// The first frame matching `pred`, keeping the others for later.
    pub fn recv_matching(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.buffered.iter().position(&pred) {
            return self.buffered.remove(i).expect("present");
        }
        loop {
            let v = self.read_frame();
            if pred(&v) {
                return v;
            }
            self.buffered.push_back(v);
        }
    }

    /// Waits for the first frame matching `pred` and leaves it (and the
    /// frames before it) to be received later: a test waits for a frame
    /// without taking it from the answer it collects afterwards.
    pub fn peek_matching(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(v) = self.buffered.iter().find(|v| pred(v)) {
            return v.clone();
        }
        loop {
            let v = self.read_frame();
            self.buffered.push_back(v.clone());
            if pred(&v) {
                return v;
            }
        }
    }

    /// Sends a chat; returns the `accepted` frame, or the `error` frame
    /// when it was refused.
    pub fn chat(&mut self, conversation: Option<&str>, message: &str, options: Value) -> Value {
        self.next_id += 1;
        let id = format!("c{}", self.next_id);
        let mut frame = json!({"type": "chat", "id": id, "message": message, "options": options});
        if let Some(c) = conversation {
            frame["conversation"] = json!(c);
        }
        self.send(frame);
        self.recv_matching(|v| {
            v["id"] == id.as_str() && (v["type"] == "accepted" || v["type"] == "error")
        })
    }

    /// Sends a chat that must be accepted; returns (request, conversation).
    pub fn ask(&mut self, conversation: Option<&str>, message: &str) -> (String, String) {
        let v = self.chat(conversation, message, json!({}));
        assert_eq!(v["type"], "accepted", "chat refused: {v}");
        (
            v["request"].as_str().unwrap().to_owned(),
            v["conversation"].as_str().unwrap().to_owned(),
        )
    }

    /// Collects the frames of `request` until its `done` or `error`.
    pub fn answer(&mut self, request: &str) -> Answer {
        let mut answer = Answer {
            request: request.to_owned(),
            role: None,
            seqs: Vec::new(),
            text: String::new(),
            end: Value::Null,
        };
        loop {
            let v = self.recv_matching(|v| v["request"] == request);
            match v["type"].as_str() {
                Some("token") => {
                    answer.seqs.push(v["seq"].as_u64().unwrap());
                    answer.text.push_str(v["text"].as_str().unwrap());
                }
                Some("start") => answer.role = v["role"].as_str().map(str::to_owned),
                Some("done") | Some("error") => {
                    answer.end = v;
                    return answer;
                }
                _ => {}
            }
        }
    }

    /// Asks and waits for the whole answer.
    pub fn ask_and_wait(&mut self, conversation: Option<&str>, message: &str) -> Answer {
        let (request, _) = self.ask(conversation, message);
        self.answer(&request)
    }

    /// Sends a frame and returns the next `error` frame.
    pub fn expect_error(&mut self, v: Value) -> Value {
        self.send(v);
        self.recv_matching(|v| v["type"] == "error")
    }
}

/// Polls `f` until it returns true or [`WAIT`] passes.
#[track_caller]
pub fn eventually(what: &str, f: impl FnMut() -> bool) {
    eventually_within(what, WAIT, f);
}

/// Polls `f` until it returns true, failing when it is still false at
/// `limit` from now; returns how long it took. The last look starts at
/// `limit` or later, so this is never stricter than sleeping `limit` and
/// looking once.
#[track_caller]
pub fn eventually_within(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    match poll_within(limit, || if f() { Ok(()) } else { Err(()) }) {
        Ok(took) => took,
        Err(()) => panic!("timed out after {limit:?} waiting for: {what}"),
    }
}

/// Polls `f` until it returns `Ok`, for `limit` (the last look starting at
/// `limit` or later): how long that took, or what `f` found at its last
/// look.
pub fn poll_within<E>(
    limit: Duration,
    mut f: impl FnMut() -> Result<(), E>,
) -> Result<Duration, E> {
    let started = Instant::now();
    loop {
        let last = started.elapsed() >= limit;
        match f() {
            Ok(()) => return Ok(started.elapsed()),
            Err(e) if last => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}
