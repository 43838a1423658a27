//! One `chaos` client connection and the checks made on every frame it
//! reads: `seq` contiguous from where the attachment began, no frame after
//! a request's end on that connection, exactly one end per attachment,
//! `done.tokens` equal to the tokens received, and identical complete
//! answers to one message.
//!
//! Threads: a [`Conn`] belongs to the one client thread that made it; the
//! [`Tally`] it writes to is that thread's own; only [`Answers`] is shared
//! by every client thread (behind a mutex, touched once per complete
//! answer).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

/// Violation examples kept per kind, per client and in the summary: a
/// flood of one kind must not hide the only example of another.
const MAX_EXAMPLES: usize = 5;

/// Resumes after `slow_consumer` of one request before the client calls it
/// a hang: each resume must make progress, so a handful is plenty.
const MAX_CUT_OFFS: u32 = 50;

/// The first complete answer seen for each message asked in a new
/// conversation: every later complete answer to it must be the same text.
#[derive(Default)]
pub struct Answers(Mutex<HashMap<String, String>>);

impl Answers {
    /// Records `text` as a complete answer to `message`; false when an
    /// earlier complete answer to it differs.
    fn agrees(&self, message: &str, text: &str) -> bool {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(message.to_owned())
            .or_insert_with(|| text.to_owned())
            == text
    }

    pub fn messages(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// What one client saw; merged into the run's summary at the end.
#[derive(Default)]
pub struct Tally {
    pub actions: BTreeMap<&'static str, u64>,
    /// `done:<finish>` or `error:<code>`, per attachment end.
    pub ends: BTreeMap<String, u64>,
    pub roles: BTreeMap<String, u64>,
    /// Chats refused before `accepted`, by code.
    pub refusals: BTreeMap<String, u64>,
    pub chats: u64,
    pub accepted: u64,
    pub tokens: u64,
    pub resumes: u64,
    pub cross_node_resumes: u64,
    pub compared_answers: u64,
    pub violations: BTreeMap<&'static str, u64>,
    /// The first few violations of each kind, described.
    pub examples: BTreeMap<&'static str, Vec<String>>,
}

impl Tally {
    pub fn violation(&mut self, kind: &'static str, detail: String) {
        *self.violations.entry(kind).or_insert(0) += 1;
        let examples = self.examples.entry(kind).or_default();
        if examples.len() < MAX_EXAMPLES {
            examples.push(detail);
        }
    }

    pub fn merge(&mut self, other: Tally) {
        fn add<K: Ord>(into: &mut BTreeMap<K, u64>, from: BTreeMap<K, u64>) {
            for (k, n) in from {
                *into.entry(k).or_insert(0) += n;
            }
        }
        add(&mut self.actions, other.actions);
        add(&mut self.ends, other.ends);
        add(&mut self.roles, other.roles);
        add(&mut self.refusals, other.refusals);
        add(&mut self.violations, other.violations);
        self.chats += other.chats;
        self.accepted += other.accepted;
        self.tokens += other.tokens;
        self.resumes += other.resumes;
        self.cross_node_resumes += other.cross_node_resumes;
        self.compared_answers += other.compared_answers;
        for (kind, examples) in other.examples {
            let kept = self.examples.entry(kind).or_default();
            let room = MAX_EXAMPLES.saturating_sub(kept.len());
            kept.extend(examples.into_iter().take(room));
        }
    }
}

/// One attachment of a request to this connection, as received so far.
#[derive(Clone)]
pub struct Track {
    /// The message of a chat that opened a new conversation, whose complete
    /// answer must equal every other complete answer to it.
    pub message: Option<String>,
    /// The `seq` the next token must carry.
    pub next_seq: u64,
    /// The answer from `seq` 0 when `complete_text`, else from a resume's `from`.
    pub text: String,
    pub complete_text: bool,
    pub deadline: Instant,
}

/// How an attachment ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Ending {
    Done(String),
    Error(String),
}

/// The outcome of a chat frame: `accepted` (request, conversation) or the
/// code it was refused with.
type ChatOutcome = Result<(String, String), String>;

pub struct Conn {
    ws: WebSocket<TcpStream>,
    pub node: usize,
    pub live: HashMap<String, Track>,
    /// Requests whose attachment here has ended, with the track they ended
    /// with: a later frame for one of them is a violation.
    pub ended: HashMap<String, (Track, Ending)>,
    /// Chats sent and not yet answered with `accepted` or `error`, by `id`,
    /// with the message to compare answers under.
    pending: HashMap<String, (Option<String>, Instant)>,
    outcomes: HashMap<String, ChatOutcome>,
    /// `error` frames about no request and no pending chat (answers to
    /// malformed frames), and `not_found`s of requests expected unknown.
    pub stray_errors: VecDeque<Value>,
    pub expect_unknown: HashSet<String>,
    deadline: Duration,
}

/// Why a wait gave up: the connection failed, or something did not come in time.
#[derive(Debug)]
pub enum Stop {
    Broken(String),
    Hang(String),
}

impl Conn {
    pub fn connect(addr: SocketAddr, node: usize, deadline: Duration) -> Result<Conn, String> {
        let tcp = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        tcp.set_read_timeout(Some(deadline))
            .map_err(|e| e.to_string())?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let (ws, _) = tungstenite::client::client(format!("ws://{addr}/ws"), tcp)
            .map_err(|e| format!("handshake with {addr}: {e}"))?;
        Ok(Conn {
            ws,
            node,
            live: HashMap::new(),
            ended: HashMap::new(),
            pending: HashMap::new(),
            outcomes: HashMap::new(),
            stray_errors: VecDeque::new(),
            expect_unknown: HashSet::new(),
            deadline,
        })
    }

    pub fn send(&mut self, v: &Value) -> Result<(), Stop> {
        self.send_raw(Message::text(v.to_string()))
    }

    pub fn send_raw(&mut self, m: Message) -> Result<(), Stop> {
        self.ws
            .send(m)
            .map_err(|e| Stop::Broken(format!("send: {e}")))
    }

    /// Sends a chat; its outcome is collected by [`Conn::outcome`].
    pub fn send_chat(
        &mut self,
        id: &str,
        conversation: Option<&str>,
        message: &str,
        fresh: bool,
        tally: &mut Tally,
    ) -> Result<(), Stop> {
        let mut frame = json!({"type": "chat", "id": id, "message": message});
        if let Some(c) = conversation {
            frame["conversation"] = json!(c);
        }
        if fresh {
            frame["options"] = json!({"fresh": true});
        }
        let compare = conversation.is_none().then(|| message.to_owned());
        self.pending
            .insert(id.to_owned(), (compare, Instant::now() + self.deadline));
        tally.chats += 1;
        self.send(&frame)
    }

    /// Waits for the `accepted` or refusing `error` of chat `id`.
    pub fn outcome(&mut self, id: &str, tally: &mut Tally) -> Result<ChatOutcome, Stop> {
        let until = Instant::now() + self.deadline;
        loop {
            if let Some(o) = self.outcomes.remove(id) {
                return Ok(o);
            }
            if !self.pump(until, tally)? {
                return Err(Stop::Hang(format!("no answer to chat {id}")));
            }
        }
    }

    /// Starts tracking a resumed attachment of `request` from `from`, with
    /// `before` the track of the attachment it continues (for the text
    /// before `from`).
    pub fn attach(&mut self, request: &str, from: u64, before: Option<&Track>) {
        let (message, text, complete_text) = match before {
            Some(t) if from == 0 => (t.message.clone(), String::new(), true),
            Some(t) if from == t.next_seq => (t.message.clone(), t.text.clone(), t.complete_text),
            Some(_) | None => (None, String::new(), from == 0),
        };
        self.ended.remove(request);
        self.live.insert(
            request.to_owned(),
            Track {
                message,
                next_seq: from,
                text,
                complete_text,
                deadline: Instant::now() + self.deadline,
            },
        );
    }

    /// Sends `resume` of `request` from `from`, continuing `before`.
    pub fn resume(&mut self, request: &str, from: u64, before: Option<&Track>) -> Result<(), Stop> {
        self.attach(request, from, before);
        self.send(&json!({"type": "resume", "request": request, "from": from}))
    }

    /// Reads until `request` has ended here (resuming it on this connection
    /// after a `slow_consumer`), or its deadline passes.
    pub fn wait_end(
        &mut self,
        request: &str,
        answers: &Answers,
        tally: &mut Tally,
    ) -> Result<Ending, Stop> {
        let mut cut_off = 0;
        loop {
            if let Some((track, ending)) = self.ended.get(request) {
                if ending == &Ending::Error("slow_consumer".into()) {
                    cut_off += 1;
                    if cut_off > MAX_CUT_OFFS {
                        return Err(Stop::Hang(format!(
                            "{request} cut off as a slow consumer {MAX_CUT_OFFS} times"
                        )));
                    }
                    let track = track.clone();
                    tally.resumes += 1;
                    self.resume(request, track.next_seq, Some(&track))?;
                    continue;
                }
                return Ok(ending.clone());
            }
            let Some(until) = self.live.get(request).map(|t| t.deadline) else {
                return Err(Stop::Hang(format!("{request} is not attached here")));
            };
            if !self.pump_checked(until, answers, tally)? {
                let seq = self.live.get(request).map_or(0, |t| t.next_seq);
                return Err(Stop::Hang(format!(
                    "{request} did not end within the deadline (at seq {seq}, node {})",
                    self.node
                )));
            }
        }
    }

    /// Reads until `request` has received `tokens` tokens or ended here.
    pub fn read_tokens(
        &mut self,
        request: &str,
        tokens: u64,
        answers: &Answers,
        tally: &mut Tally,
    ) -> Result<(), Stop> {
        loop {
            let Some(track) = self.live.get(request) else {
                return Ok(());
            };
            if track.next_seq >= tokens {
                return Ok(());
            }
            let until = track.deadline;
            if !self.pump_checked(until, answers, tally)? {
                return Err(Stop::Hang(format!(
                    "{request} stalled before {tokens} tokens"
                )));
            }
        }
    }

    /// Waits for an `error` about no request (the answer to a malformed
    /// frame), or the `not_found` of a request in `expect_unknown`.
    pub fn stray_error(&mut self, tally: &mut Tally) -> Result<Value, Stop> {
        let until = Instant::now() + self.deadline;
        loop {
            if let Some(v) = self.stray_errors.pop_front() {
                return Ok(v);
            }
            if !self.pump(until, tally)? {
                return Err(Stop::Hang("no answer to a malformed frame".into()));
            }
        }
    }

    /// Closes the socket with no WebSocket close frame, as a client that
    /// vanishes does.
    pub fn abort(self) {
        let _ = self.ws.get_ref().shutdown(Shutdown::Both);
    }

    /// A normal WebSocket close.
    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let until = Instant::now() + Duration::from_secs(1);
        let _ = self
            .ws
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)));
        while Instant::now() < until {
            match self.ws.read() {
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
    }

    fn pump_checked(
        &mut self,
        until: Instant,
        answers: &Answers,
        tally: &mut Tally,
    ) -> Result<bool, Stop> {
        let got = self.read_one(until)?;
        match got {
            Some(v) => {
                self.handle(v, Some(answers), tally);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn pump(&mut self, until: Instant, tally: &mut Tally) -> Result<bool, Stop> {
        match self.read_one(until)? {
            Some(v) => {
                self.handle(v, None, tally);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The next frame, or `None` when `until` passes first.
    fn read_one(&mut self, until: Instant) -> Result<Option<Value>, Stop> {
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let _ = self
                .ws
                .get_ref()
                .set_read_timeout(Some(left.max(Duration::from_millis(1))));
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    return serde_json::from_str(t.as_str())
                        .map(Some)
                        .map_err(|e| Stop::Broken(format!("server sent bad JSON: {e}")));
                }
                Ok(Message::Close(f)) => {
                    return Err(Stop::Broken(format!("server closed the connection: {f:?}")))
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(Stop::Broken(format!("read: {e}"))),
            }
        }
    }

    /// Applies one server frame to the tracks, recording what breaks a promise.
    pub fn handle(&mut self, v: Value, answers: Option<&Answers>, tally: &mut Tally) {
        let kind = v["type"].as_str().unwrap_or("").to_owned();
        let request = v["request"].as_str().map(str::to_owned);
        match (kind.as_str(), request) {
            ("accepted", Some(request)) => {
                let id = v["id"].as_str().unwrap_or("").to_owned();
                let Some((message, deadline)) = self.pending.remove(&id) else {
                    tally.violation("accepted_unknown_id", v.to_string());
                    return;
                };
                tally.accepted += 1;
                let conversation = v["conversation"].as_str().unwrap_or("").to_owned();
                self.outcomes
                    .insert(id, Ok((request.clone(), conversation)));
                self.live.insert(
                    request,
                    Track {
                        message,
                        next_seq: 0,
                        text: String::new(),
                        complete_text: true,
                        deadline,
                    },
                );
            }
            ("error", None) => {
                let id = v["id"].as_str().unwrap_or("");
                if self.pending.remove(id).is_some() {
                    let code = v["code"].as_str().unwrap_or("?").to_owned();
                    *tally.refusals.entry(code.clone()).or_insert(0) += 1;
                    self.outcomes.insert(id.to_owned(), Err(code));
                } else {
                    self.stray_errors.push_back(v);
                }
            }
            ("error", Some(r)) if self.expect_unknown.remove(&r) => {
                self.stray_errors.push_back(v);
            }
            (_, Some(r)) if self.ended.contains_key(&r) && !self.live.contains_key(&r) => {
                let what = if matches!(kind.as_str(), "done" | "error") {
                    "second_end"
                } else {
                    "frame_after_end"
                };
                tally.violation(what, format!("node {}: {v}", self.node));
            }
            (_, Some(r)) if !self.live.contains_key(&r) => {
                tally.violation(
                    "frame_for_unknown_request",
                    format!("node {}: {v}", self.node),
                );
            }
            ("token", Some(r)) => {
                let Some(track) = self.live.get_mut(&r) else {
                    return;
                };
                let seq = v["seq"].as_u64().unwrap_or(u64::MAX);
                if seq != track.next_seq {
                    let kind = if seq < track.next_seq {
                        "seq_duplicate"
                    } else {
                        "seq_gap"
                    };
                    tally.violation(
                        kind,
                        format!(
                            "{r} on node {}: expected seq {}, got {seq}",
                            self.node, track.next_seq
                        ),
                    );
                    // Carry on from what came, so one fault counts once.
                    track.complete_text = false;
                }
                track.next_seq = seq.saturating_add(1);
                track.text.push_str(v["text"].as_str().unwrap_or(""));
                tally.tokens += 1;
            }
            ("start", Some(_)) => {
                let role = v["role"].as_str().unwrap_or("?").to_owned();
                *tally.roles.entry(role).or_insert(0) += 1;
            }
            ("done" | "error", Some(r)) => {
                let Some(track) = self.live.remove(&r) else {
                    return;
                };
                let ending = if kind == "done" {
                    let finish = v["finish"].as_str().unwrap_or("?").to_owned();
                    if v["tokens"].as_u64() != Some(track.next_seq) {
                        tally.violation(
                            "done_tokens_mismatch",
                            format!(
                                "{r} on node {}: received up to seq {}, done says {}",
                                self.node, track.next_seq, v["tokens"]
                            ),
                        );
                    }
                    if finish == "stop" && track.complete_text {
                        if let (Some(message), Some(answers)) = (&track.message, answers) {
                            tally.compared_answers += 1;
                            if !answers.agrees(message, &track.text) {
                                tally.violation(
                                    "answers_differ",
                                    format!("{r}: {message:?} answered {:?}", track.text),
                                );
                            }
                        }
                    }
                    Ending::Done(finish)
                } else {
                    Ending::Error(v["code"].as_str().unwrap_or("?").to_owned())
                };
                let key = match &ending {
                    Ending::Done(f) => format!("done:{f}"),
                    Ending::Error(c) => format!("error:{c}"),
                };
                *tally.ends.entry(key).or_insert(0) += 1;
                self.ended.insert(r, (track, ending));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `frames` to the checks of a connection to a loopback
    /// WebSocket server that sends nothing itself.
    fn check(frames: &[Value]) -> Tally {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            let _ws = tungstenite::accept(tcp).unwrap();
            std::thread::sleep(Duration::from_millis(200));
        });
        let mut conn = Conn::connect(addr, 0, Duration::from_secs(5)).unwrap();
        let answers = Answers::default();
        let mut tally = Tally::default();
        conn.pending.insert(
            "c1".into(),
            (Some("q".into()), Instant::now() + Duration::from_secs(5)),
        );
        conn.pending.insert(
            "c2".into(),
            (Some("q".into()), Instant::now() + Duration::from_secs(5)),
        );
        for f in frames {
            conn.handle(f.clone(), Some(&answers), &mut tally);
        }
        conn.close();
        server.join().unwrap();
        tally
    }

    fn token(r: &str, seq: u64, text: &str) -> Value {
        json!({"type": "token", "request": r, "seq": seq, "text": text})
    }

    fn accepted(id: &str, r: &str) -> Value {
        json!({"type": "accepted", "id": id, "request": r, "conversation": "k"})
    }

    fn done(r: &str, tokens: u64) -> Value {
        json!({"type": "done", "request": r, "finish": "stop", "tokens": tokens})
    }

    #[test]
    fn a_clean_stream_has_no_violation() {
        let t = check(&[
            accepted("c1", "r1"),
            token("r1", 0, "a"),
            token("r1", 1, "b"),
            done("r1", 2),
        ]);
        assert!(t.violations.is_empty(), "{:?}", t.examples);
        assert_eq!(t.compared_answers, 1);
    }

    #[test]
    fn gaps_duplicates_and_second_ends_are_caught() {
        let t = check(&[
            accepted("c1", "r1"),
            token("r1", 0, "a"),
            token("r1", 2, "c"),
            token("r1", 2, "c"),
            done("r1", 3),
            done("r1", 3),
            token("r1", 3, "d"),
        ]);
        for kind in ["seq_gap", "seq_duplicate", "second_end", "frame_after_end"] {
            assert_eq!(
                t.violations.get(kind),
                Some(&1),
                "{kind}: {:?}",
                t.violations
            );
        }
    }

    #[test]
    fn differing_answers_and_wrong_token_counts_are_caught() {
        let t = check(&[
            accepted("c1", "r1"),
            accepted("c2", "r2"),
            token("r1", 0, "a"),
            token("r2", 0, "b"),
            done("r1", 1),
            done("r2", 5),
            token("r9", 0, "x"),
        ]);
        for kind in [
            "answers_differ",
            "done_tokens_mismatch",
            "frame_for_unknown_request",
        ] {
            assert_eq!(
                t.violations.get(kind),
                Some(&1),
                "{kind}: {:?}",
                t.violations
            );
        }
    }
}
