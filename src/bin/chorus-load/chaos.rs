//! `chaos`: many clients misbehaving at once against one node or several,
//! with the protocol's promises checked on every frame (see `chaos_conn`)
//! and the server's resources checked afterwards.
//!
//! Each client is one thread with one connection at a time. Until
//! `--seconds` have passed it repeats an action drawn at random:
//!
//! - `normal`: a chat read to its end (one in ten `fresh`; three in ten in
//!   the client's own conversation instead of a new one);
//! - `cancel`: a chat (one in three `fresh`, so it leads alone) cancelled
//!   after a random number of tokens (none to a dozen, none one time in
//!   three; with `--gentle-cancels`, never `fresh` and never at once);
//! - `close_resume`: a chat whose socket is shut after a few tokens with no
//!   close frame, then resumed on a new connection to the next node of
//!   `--addr` (the same node when there is one) from the next `seq`, or one
//!   time in four from 0;
//! - `slow_reader`: a chat whose client sleeps up to half a second before
//!   reading (a `slow_consumer` end is resumed on the same connection);
//! - `malformed`: a frame the server must answer with `bad_request` (or
//!   `not_found` for a cancel or resume of an unknown request) while the
//!   connection stays open;
//! - `busy_second`: two chats sent at once into one conversation: the
//!   second is refused with `conversation_busy`, or accepted if the first
//!   has already ended.
//!
//! New conversations ask one of six questions, renamed every two seconds,
//! so identical chats meet: the first asker leads, those who ask while it
//! runs follow, the later ones hit the cache. Every complete answer to one
//! question must be the same text (so the server should run a
//! deterministic model, like the simulated one).
//!
//! Nothing may hang: every chat, resume and malformed frame must be
//! answered, and every attachment ended, within `--deadline-ms` (default
//! 30000). Afterwards each node must come back, within 30 s, to what it had
//! before the run: threads (`/proc/PID/task`) and descriptors
//! (`/proc/PID/fd`) when `--pid` names the nodes' processes, and in
//! `/api/stats` the connections, the busy workers and queue depths of every
//! stage, requests and upstream calls in flight, and pending history
//! writes. Any violation makes the run exit non-zero, with the summary.
//!
//! Threads: one per client, and the calling thread, which takes the
//! baselines, joins the clients and waits for the nodes to settle.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::Message;

use crate::chaos_conn::{Answers, Conn, Ending, Stop, Tally};
use crate::measure::{rss_kib, stats};
use crate::Args;

/// The questions of new conversations (no tool keywords in them).
const QUESTIONS: [&str; 6] = [
    "Tell me about gateways",
    "How do bounded queues help",
    "Describe the answer cache",
    "Why share one generation",
    "Explain backpressure briefly",
    "What is a replay window",
];

/// How often the questions are renamed, so leaders keep coming.
const ROUND: Duration = Duration::from_secs(2);

/// How long the nodes get to come back to their baseline after the run.
const SETTLE: Duration = Duration::from_secs(30);

/// What every client thread shares.
struct Run {
    nodes: Vec<SocketAddr>,
    started: Instant,
    until: Instant,
    deadline: Duration,
    /// Part of every question, so that a run does not start out with the
    /// cache of an earlier run against the same server.
    tag: u64,
    answers: Answers,
    /// `--gentle-cancels`: cancel no `fresh` chat, and none at once.
    gentle_cancels: bool,
}

pub fn chaos(args: &Args) -> Result<Value, String> {
    let clients = if args.connections == 0 {
        50
    } else {
        args.connections
    };
    let seconds = args.seconds_given.unwrap_or(10.0);
    let nodes: Vec<SocketAddr> = std::iter::once(args.addr)
        .chain(args.more_addrs.iter().copied())
        .collect();
    let pids: Vec<u32> = args
        .pid
        .into_iter()
        .chain(args.more_pids.iter().copied())
        .collect();
    if !pids.is_empty() && pids.len() != nodes.len() {
        return Err("--pid needs one process id per address of --addr".into());
    }
    let tag = getrandom::u64().map_err(|e| format!("getrandom: {e}"))?;
    warm_up(&nodes, tag)?;
    let before = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| Reading::take(*n, pids.get(i).copied()))
        .collect::<Result<Vec<_>, _>>()?;

    let started = Instant::now();
    let run = Arc::new(Run {
        nodes: nodes.clone(),
        started,
        until: started + Duration::from_secs_f64(seconds),
        deadline: Duration::from_millis(args.deadline_ms),
        tag,
        answers: Answers::default(),
        gentle_cancels: args.gentle_cancels,
    });
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let run = run.clone();
            crate::spawn(move || Client::new(run, i).run())
        })
        .collect();
    let mut tally = Tally::default();
    for t in threads {
        match t.join() {
            Ok(t) => tally.merge(t),
            Err(_) => tally.violation("client_panicked", "a client thread panicked".into()),
        }
    }
    let wall = started.elapsed();

    // Back to the baseline, each node within SETTLE.
    let mut baseline = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let settle_from = Instant::now();
        let (after, left) = loop {
            let after = Reading::take(*node, pids.get(i).copied())?;
            let left = after.above(&before[i]);
            if left.is_empty() || settle_from.elapsed() > SETTLE {
                break (after, left);
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        for what in &left {
            tally.violation("not_back_to_baseline", format!("node {node}: {what}"));
        }
        baseline.push(json!({
            "node": node.to_string(),
            "before": before[i].to_json(),
            "after": after.to_json(),
            "settled_within_s": left.is_empty().then(|| settle_from.elapsed().as_secs_f64()),
        }));
    }

    let violations: u64 = tally.violations.values().sum();
    Ok(json!({
        "scenario": "chaos",
        "nodes": nodes.len(),
        "clients": clients,
        "seconds": seconds,
        "wall_s": wall.as_secs_f64(),
        "deadline_ms": args.deadline_ms,
        "gentle_cancels": args.gentle_cancels,
        "actions": tally.actions,
        "chats": tally.chats,
        "accepted": tally.accepted,
        "refused_before_accepted": tally.refusals,
        "roles (start frames)": tally.roles,
        "ends (per attachment)": tally.ends,
        "tokens": tally.tokens,
        "resumes": tally.resumes,
        "cross_node_resumes": tally.cross_node_resumes,
        "questions_asked": run.answers.messages(),
        "complete_answers_compared": tally.compared_answers,
        "baseline": baseline,
        "violations": tally.violations,
        "violation_count": violations,
        "violation_examples": tally.examples,
        "passed": violations == 0,
    }))
}

/// One chat on each node, so that what the server starts lazily on its
/// first chat is part of the baseline; then waits for those connections to
/// be gone.
fn warm_up(nodes: &[SocketAddr], tag: u64) -> Result<(), String> {
    for node in nodes {
        let mut c = crate::client::Client::connect(*node)?;
        crate::client::chat(&mut c, "warm", &format!("warm-up {tag:016x}"))?;
    }
    let until = Instant::now() + SETTLE;
    for node in nodes {
        while stats(*node)?["connections"].as_u64() != Some(0) {
            if Instant::now() > until {
                return Err(format!("{node} still has connections before the run"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// A node's resources at one moment.
struct Reading {
    stats: Value,
    threads: Option<usize>,
    /// Open descriptors, and how many of them are TCP connections the node
    /// opened itself (Redis, upstream): pools that keep idle connections
    /// up to their size, so they are reported but not held to the baseline.
    fds: Option<usize>,
    outbound: Option<usize>,
    rss_kib: Option<f64>,
}

impl Reading {
    fn take(node: SocketAddr, pid: Option<u32>) -> Result<Reading, String> {
        let (fds, outbound) = match pid {
            Some(pid) => {
                let (fds, outbound) = descriptors(pid, node.port())?;
                (Some(fds), Some(outbound))
            }
            None => (None, None),
        };
        Ok(Reading {
            stats: stats(node)?,
            threads: pid
                .map(|pid| {
                    std::fs::read_dir(format!("/proc/{pid}/task"))
                        .map(|d| d.count())
                        .map_err(|e| format!("/proc/{pid}/task: {e}"))
                })
                .transpose()?,
            fds,
            outbound,
            rss_kib: pid.map(rss_kib).transpose()?,
        })
    }

    /// The gauges that must not stay above their baseline: `/api/stats`
    /// paths (and per stage `busy` and `queue`).
    fn gauges(&self) -> Vec<(String, Option<u64>)> {
        let s = &self.stats;
        let mut gauges = vec![
            ("connections".into(), s["connections"].as_u64()),
            (
                "requests.in_flight".into(),
                s["requests"]["in_flight"].as_u64(),
            ),
            (
                "upstream.in_flight".into(),
                s["upstream"]["in_flight"].as_u64(),
            ),
            (
                "history.pending_writes".into(),
                s["history"]["pending_writes"].as_u64(),
            ),
        ];
        if let Some(stages) = s["stages"].as_object() {
            for (name, stage) in stages {
                for field in ["busy", "queue"] {
                    gauges.push((format!("stages.{name}.{field}"), stage[field].as_u64()));
                }
            }
        }
        gauges.push((
            "threads (/proc/PID/task)".into(),
            self.threads.map(|n| n as u64),
        ));
        gauges.push((
            "descriptors other than outbound connections (/proc/PID/fd)".into(),
            self.fds
                .zip(self.outbound)
                .map(|(f, o)| (f - o.min(f)) as u64),
        ));
        gauges
    }

    /// What is above `baseline` now, described.
    fn above(&self, baseline: &Reading) -> Vec<String> {
        let before = baseline.gauges();
        self.gauges()
            .into_iter()
            .zip(before)
            .filter_map(|((name, now), (_, then))| match (now, then) {
                (Some(now), Some(then)) if now > then => Some(format!("{name} {now} > {then}")),
                _ => None,
            })
            .collect()
    }

    fn to_json(&self) -> Value {
        let mut m: serde_json::Map<String, Value> = self
            .gauges()
            .into_iter()
            .map(|(name, v)| (name, json!(v)))
            .collect();
        m.insert("descriptors".into(), json!(self.fds));
        m.insert("outbound_connections".into(), json!(self.outbound));
        m.insert("rss_kib".into(), json!(self.rss_kib));
        Value::Object(m)
    }
}

/// Open descriptors of process `pid`, and how many of them are TCP
/// sockets whose local port is not `port` (connections it opened).
fn descriptors(pid: u32, port: u16) -> Result<(usize, usize), String> {
    let mut sockets = Vec::new();
    let mut fds = 0;
    let dir =
        std::fs::read_dir(format!("/proc/{pid}/fd")).map_err(|e| format!("/proc/{pid}/fd: {e}"))?;
    for fd in dir.flatten() {
        fds += 1;
        if let Ok(link) = std::fs::read_link(fd.path()) {
            let link = link.to_string_lossy().into_owned();
            if let Some(inode) = link
                .strip_prefix("socket:[")
                .and_then(|l| l.strip_suffix(']'))
            {
                sockets.push(inode.to_owned());
            }
        }
    }
    let mut local_ports = std::collections::HashMap::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(inode)) = (fields.get(1), fields.get(9)) else {
                continue;
            };
            let local_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if let Some(p) = local_port {
                local_ports.insert((*inode).to_owned(), p);
            }
        }
    }
    let outbound = sockets
        .iter()
        .filter(|inode| local_ports.get(*inode).is_some_and(|p| *p != port))
        .count();
    Ok((fds, outbound))
}

/// The actions a client draws from, with their weights.
#[derive(Clone, Copy)]
enum Action {
    Normal,
    Cancel,
    CloseResume,
    SlowReader,
    Malformed,
    BusySecond,
}

const ACTIONS: [(Action, u64, &str); 6] = [
    (Action::Normal, 30, "normal"),
    (Action::Cancel, 15, "cancel"),
    (Action::CloseResume, 20, "close_resume"),
    (Action::SlowReader, 10, "slow_reader"),
    (Action::Malformed, 10, "malformed"),
    (Action::BusySecond, 15, "busy_second"),
];

/// A small xorshift generator: each client its own, seeded from the OS.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }

    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

/// One client thread's state.
struct Client {
    run: Arc<Run>,
    index: usize,
    rng: Rng,
    tally: Tally,
    node: usize,
    /// The client's own conversation, for chats that continue one.
    conversation: Option<String>,
    chats: u64,
}

impl Client {
    fn new(run: Arc<Run>, index: usize) -> Client {
        let seed = getrandom::u64().unwrap_or(0x9e37_79b9_7f4a_7c15) | 1;
        let node = index % run.nodes.len();
        Client {
            run,
            index,
            rng: Rng(seed),
            tally: Tally::default(),
            node,
            conversation: None,
            chats: 0,
        }
    }

    fn run(mut self) -> Tally {
        let mut conn: Option<Conn> = None;
        while Instant::now() < self.run.until {
            let mut c = match conn.take() {
                Some(c) => c,
                None => {
                    match Conn::connect(self.run.nodes[self.node], self.node, self.run.deadline) {
                        Ok(c) => c,
                        Err(e) => {
                            self.tally.violation("connect_failed", e);
                            std::thread::sleep(Duration::from_millis(100));
                            continue;
                        }
                    }
                }
            };
            let total: u64 = ACTIONS.iter().map(|a| a.1).sum();
            let mut draw = self.rng.below(total);
            let (action, _, name) = ACTIONS
                .iter()
                .copied()
                .find(|a| {
                    let hit = draw < a.1;
                    draw = draw.saturating_sub(a.1);
                    hit
                })
                .unwrap_or(ACTIONS[0]);
            *self.tally.actions.entry(name).or_insert(0) += 1;
            match self.act(action, &mut c) {
                Ok(()) => conn = Some(c),
                Err(stop) => {
                    let (kind, what) = match stop {
                        Stop::Broken(e) => ("connection_broken", e),
                        Stop::Hang(e) => ("hang", e),
                    };
                    self.tally
                        .violation(kind, format!("client {} ({name}): {what}", self.index));
                    // Its requests may still be running: start afresh.
                    self.conversation = None;
                    c.abort();
                }
            }
        }
        if let Some(c) = conn {
            c.close();
        }
        self.tally
    }

    fn next_id(&mut self) -> String {
        self.chats += 1;
        format!("k{}-{}", self.index, self.chats)
    }

    fn question(&mut self) -> String {
        let round = self.run.started.elapsed().as_millis() / ROUND.as_millis();
        let q = QUESTIONS[self.rng.below(QUESTIONS.len() as u64) as usize];
        format!("{q} (round {round}, run {:016x})", self.run.tag)
    }

    /// Sends a chat and waits for its outcome: the request id when accepted.
    fn chat(
        &mut self,
        conn: &mut Conn,
        conversation: Option<String>,
        fresh: bool,
    ) -> Result<Option<String>, Stop> {
        let id = self.next_id();
        let message = self.question();
        conn.send_chat(
            &id,
            conversation.as_deref(),
            &message,
            fresh,
            &mut self.tally,
        )?;
        Ok(match conn.outcome(&id, &mut self.tally)? {
            Ok((request, conversation)) => {
                self.conversation = Some(conversation);
                Some(request)
            }
            Err(_) => None,
        })
    }

    fn act(&mut self, action: Action, conn: &mut Conn) -> Result<(), Stop> {
        let run = self.run.clone();
        match action {
            Action::Normal => {
                let own = self.conversation.clone().filter(|_| self.rng.below(10) < 3);
                let fresh = own.is_none() && self.rng.one_in(10);
                if let Some(r) = self.chat(conn, own, fresh)? {
                    conn.wait_end(&r, &run.answers, &mut self.tally)?;
                }
            }
            Action::Cancel => {
                // A `fresh` chat leads a generation of its own, so the
                // cancel aborts it (often while it is still being led)
                // instead of landing on a cache hit that has already ended.
                let sharp = !run.gentle_cancels;
                let fresh = sharp && self.rng.one_in(3);
                if let Some(r) = self.chat(conn, None, fresh)? {
                    let after = if sharp && self.rng.one_in(3) {
                        0
                    } else {
                        self.rng.below(13)
                    };
                    conn.read_tokens(&r, after, &run.answers, &mut self.tally)?;
                    conn.send(&json!({"type": "cancel", "request": r}))?;
                    conn.wait_end(&r, &run.answers, &mut self.tally)?;
                }
            }
            Action::CloseResume => {
                if let Some(r) = self.chat(conn, None, false)? {
                    let after = self.rng.below(13);
                    conn.read_tokens(&r, after, &run.answers, &mut self.tally)?;
                    let track = conn
                        .live
                        .get(&r)
                        .or_else(|| conn.ended.get(&r).map(|e| &e.0))
                        .cloned();
                    let to = (self.node + 1) % run.nodes.len();
                    let fresh_conn =
                        Conn::connect(run.nodes[to], to, run.deadline).map_err(Stop::Broken)?;
                    std::mem::replace(conn, fresh_conn).abort();
                    self.node = to;
                    self.tally.resumes += 1;
                    if run.nodes.len() > 1 {
                        self.tally.cross_node_resumes += 1;
                    }
                    let from = match &track {
                        Some(t) if !self.rng.one_in(4) => t.next_seq,
                        _ => 0,
                    };
                    conn.resume(&r, from, track.as_ref())?;
                    if conn.wait_end(&r, &run.answers, &mut self.tally)?
                        == Ending::Error("not_found".into())
                    {
                        self.tally.violation(
                            "resume_not_found",
                            format!("{r} resumed from {from} on node {to}"),
                        );
                    }
                }
            }
            Action::SlowReader => {
                let id = self.next_id();
                let message = self.question();
                conn.send_chat(&id, None, &message, false, &mut self.tally)?;
                std::thread::sleep(Duration::from_millis(50 + self.rng.below(450)));
                if let Ok((r, conversation)) = conn.outcome(&id, &mut self.tally)? {
                    self.conversation = Some(conversation);
                    conn.wait_end(&r, &run.answers, &mut self.tally)?;
                }
            }
            Action::Malformed => self.malformed(conn)?,
            Action::BusySecond => {
                let conversation = match self.conversation.clone() {
                    Some(c) => c,
                    None => {
                        // A conversation of its own first.
                        if let Some(r) = self.chat(conn, None, false)? {
                            conn.wait_end(&r, &run.answers, &mut self.tally)?;
                        }
                        match self.conversation.clone() {
                            Some(c) => c,
                            None => return Ok(()),
                        }
                    }
                };
                let (first, second) = (self.next_id(), self.next_id());
                for id in [&first, &second] {
                    let message = self.question();
                    conn.send_chat(id, Some(&conversation), &message, false, &mut self.tally)?;
                }
                for id in [&first, &second] {
                    if let Ok((r, _)) = conn.outcome(id, &mut self.tally)? {
                        conn.wait_end(&r, &run.answers, &mut self.tally)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// One malformed frame; the answer must be the documented error and
    /// the connection must stay usable (the next action uses it).
    fn malformed(&mut self, conn: &mut Conn) -> Result<(), Stop> {
        let unknown = format!(
            "r-{:016x}{:016x}",
            self.rng.below(u64::MAX),
            self.rng.below(u64::MAX)
        );
        let (frame, expected) = match self.rng.below(8) {
            0 => (Message::text("this is not JSON"), "bad_request"),
            1 => (Message::text(r#"{"type":"launch"}"#), "bad_request"),
            2 => (
                Message::text(r#"{"type":"chat","id":"bad-1"}"#),
                "bad_request",
            ),
            3 => (Message::binary(vec![0u8, 159, 146, 150]), "bad_request"),
            4 => (Message::text("[1,2,3]"), "bad_request"),
            5 => (
                Message::text(r#"{"type":"chat","id":"bad-2","message":""}"#),
                "bad_request",
            ),
            6 => {
                conn.expect_unknown.insert(unknown.clone());
                let v = json!({"type": "cancel", "request": unknown});
                (Message::text(v.to_string()), "not_found")
            }
            _ => {
                conn.expect_unknown.insert(unknown.clone());
                let v = json!({"type": "resume", "request": unknown, "from": 0});
                (Message::text(v.to_string()), "not_found")
            }
        };
        let sent = format!("{frame:?}");
        conn.send_raw(frame)?;
        let answer = conn.stray_error(&mut self.tally)?;
        if answer["code"] != expected {
            self.tally.violation(
                "malformed_wrong_answer",
                format!("{sent} answered {answer}, expected {expected}"),
            );
        }
        Ok(())
    }
}
