//! `kill -9` of the server mid-stream, under load, and a restart on the same
//! SQLite file: the file passes `PRAGMA integrity_check`, every
//! conversation's head (length and digest chain) matches its messages, every
//! accepted chat's user message is stored, every stored answer is complete
//! or marked partial (the load cancels one chat in four, and those answers
//! must be marked), and after the restart no conversation is left busy.

mod common;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chorus::history::{chain_digest, Head, Role};
use common::{eventually, Server, WAIT};
use serde_json::{json, Value};
use tungstenite::Message;

/// Answers of `TOKENS` words, about a second long, so a kill lands mid-stream.
const TOKENS: usize = 40;
const CONFIG: &str = r#"
[llm.simulated]
first_token_ms = 20
token_interval_ms = 25
tokens = 40
"#;
const CLIENTS: usize = 8;

/// One chat as its client saw it.
#[derive(Debug, Clone)]
struct Chat {
    message: String,
    /// The conversation from `accepted`; `None` when it was never accepted.
    conversation: Option<String>,
    /// The whole answer, when the client got its `done` with `stop`.
    complete: Option<String>,
    /// The client cancelled it and got `done` `cancelled`.
    cancelled: bool,
}

/// What the clients tell the test about the load.
#[derive(Default)]
struct Load {
    /// Chats that have received a token and not yet their end.
    streaming: AtomicUsize,
    /// Chats sent and not yet streaming or ended.
    waiting: AtomicUsize,
    /// Chats that ended `cancelled`.
    cancelled: AtomicUsize,
    /// Set: send no new chat.
    stop: AtomicBool,
}

/// Chats one after another, a new conversation every third, every fourth
/// cancelled after five tokens, until the connection fails (the server is
/// killed) or `stop` is set.
fn client(addr: SocketAddr, index: usize, load: Arc<Load>) -> Vec<Chat> {
    let Load {
        streaming,
        waiting,
        cancelled,
        stop,
    } = &*load;
    let tcp = TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let Ok((mut ws, _)) = tungstenite::client::client(format!("ws://{addr}/ws"), tcp) else {
        return Vec::new();
    };
    let mut chats = Vec::new();
    let mut conversation: Option<String> = None;
    for n in 0.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if n % 3 == 0 {
            conversation = None;
        }
        let message = format!("crash test, client {index}, chat {n}");
        let mut frame = json!({"type": "chat", "id": format!("c{n}"), "message": message});
        if let Some(c) = &conversation {
            frame["conversation"] = json!(c);
        }
        waiting.fetch_add(1, Ordering::SeqCst);
        if ws.send(Message::text(frame.to_string())).is_err() {
            break;
        }
        chats.push(Chat {
            message,
            conversation: None,
            complete: None,
            cancelled: false,
        });
        let chat = chats.last_mut().expect("just pushed");
        let mut text = String::new();
        let mut counted = false;
        let mut tokens = 0;
        let mut request = String::new();
        let ended = loop {
            let v: Value = match ws.read() {
                Ok(Message::Text(t)) => serde_json::from_str(t.as_str()).expect("JSON"),
                Ok(_) => continue,
                Err(_) => break false,
            };
            match v["type"].as_str() {
                Some("accepted") => {
                    let c = v["conversation"].as_str().expect("conversation").to_owned();
                    chat.conversation = Some(c.clone());
                    conversation = Some(c);
                    request = v["request"].as_str().expect("request").to_owned();
                }
                Some("token") => {
                    if !counted {
                        counted = true;
                        streaming.fetch_add(1, Ordering::SeqCst);
                        waiting.fetch_sub(1, Ordering::SeqCst);
                    }
                    text.push_str(v["text"].as_str().expect("text"));
                    tokens += 1;
                    if n % 4 == 3 && tokens == 5 {
                        let cancel = json!({"type": "cancel", "request": request});
                        if ws.send(Message::text(cancel.to_string())).is_err() {
                            break false;
                        }
                    }
                }
                Some("done") => {
                    if v["finish"] == "stop" {
                        chat.complete = Some(std::mem::take(&mut text));
                    }
                    if v["finish"] == "cancelled" {
                        chat.cancelled = true;
                        cancelled.fetch_add(1, Ordering::SeqCst);
                    }
                    break true;
                }
                Some("error") => panic!("client {index}: chat {n} failed: {v}"),
                _ => {}
            }
        };
        if counted {
            streaming.fetch_sub(1, Ordering::SeqCst);
        } else {
            waiting.fetch_sub(1, Ordering::SeqCst);
        }
        if !ended {
            break;
        }
    }
    chats
}

/// A stored conversation: its head and its messages in order.
#[derive(Default, Debug)]
struct Stored {
    len: u64,
    digest: Vec<u8>,
    /// Index, role, content and the partial mark.
    messages: Vec<(u64, String, String, bool)>,
}

/// Reads the killed server's file as it was left, after checking its
/// integrity.
fn read_database(path: &Path) -> BTreeMap<String, Stored> {
    let db = rusqlite::Connection::open(path).expect("open the database");
    let check: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    assert_eq!(check, "ok", "integrity_check after kill -9");
    let mut stored: BTreeMap<String, Stored> = BTreeMap::new();
    let mut heads = db
        .prepare("SELECT id, len, digest FROM conversations")
        .unwrap();
    for row in heads
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })
        .unwrap()
    {
        let (id, len, digest) = row.unwrap();
        let s = stored.entry(id).or_default();
        s.len = u64::try_from(len).expect("length");
        s.digest = digest;
    }
    let mut messages = db
        .prepare(
            "SELECT conversation, idx, role, content, partial FROM messages \
             ORDER BY conversation, idx",
        )
        .unwrap();
    for row in messages
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, bool>(4)?,
            ))
        })
        .unwrap()
    {
        let (conversation, idx, role, content, partial) = row.unwrap();
        stored.entry(conversation).or_default().messages.push((
            u64::try_from(idx).expect("index"),
            role,
            content,
            partial,
        ));
    }
    stored
}

/// A complete simulated answer: `TOKENS` words, the last ending a sentence.
fn is_complete(answer: &str) -> bool {
    answer.split(' ').count() == TOKENS && answer.ends_with('.')
}

#[test]
fn kill_9_mid_stream_leaves_a_sound_history_and_no_busy_conversation() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut server = Server::start_in(dir.path(), CONFIG);
    let load = Arc::new(Load::default());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (addr, load) = (server.addr, load.clone());
            std::thread::spawn(move || client(addr, i, load))
        })
        .collect();
    // Under way: answers stored, and most clients in the middle of one.
    eventually("answers stored and clients mid-stream", || {
        server.stats()["history"]["commits"].as_u64() >= Some(10)
            && load.cancelled.load(Ordering::SeqCst) >= 2
            && load.streaming.load(Ordering::SeqCst) >= CLIENTS / 2
    });
    // No new chats, and none just accepted when the kill comes: a chat
    // accepted a moment before a crash can lose its user message, which
    // `a_chat_accepted_just_before_kill_9_keeps_its_user_message` shows
    // on its own. Here the kill lands mid-stream.
    load.stop.store(true, Ordering::SeqCst);
    eventually(
        "every chat streaming or ended, every write committed",
        || {
            load.waiting.load(Ordering::SeqCst) == 0
                && server.stats()["history"]["pending_writes"].as_u64() == Some(0)
        },
    );
    assert!(
        load.streaming.load(Ordering::SeqCst) > 0,
        "nothing left mid-stream to kill"
    );
    server.kill();
    let killed_at = Instant::now();
    let chats: Vec<Chat> = clients
        .into_iter()
        .flat_map(|c| c.join().expect("client thread"))
        .collect();
    assert!(killed_at.elapsed() < WAIT, "clients noticed the kill late");

    let stored = read_database(&dir.path().join("chat.db"));
    let mut problems = Vec::new();
    for (id, s) in &stored {
        // The head matches the messages: contiguous indexes, the length,
        // and the digest chained over them.
        let indexes: Vec<u64> = s.messages.iter().map(|m| m.0).collect();
        if indexes != (0..s.messages.len() as u64).collect::<Vec<_>>()
            || s.len != indexes.len() as u64
        {
            problems.push(format!("{id}: head len {} and indexes {indexes:?}", s.len));
        }
        let digest = s
            .messages
            .iter()
            .fold(Head::EMPTY.digest, |d, (_, role, content, _)| {
                let role = if role == "user" {
                    Role::User
                } else {
                    Role::Assistant
                };
                chain_digest(&d, role, content)
            });
        if digest.as_slice() != s.digest.as_slice() {
            problems.push(format!("{id}: head digest does not match its messages"));
        }
        for (idx, role, content, partial) in &s.messages {
            if role == "assistant" && !partial && !is_complete(content) {
                problems.push(format!(
                    "{id}[{idx}]: a partial answer stored unmarked: {content:?}"
                ));
            }
        }
    }
    let accepted: Vec<&Chat> = chats.iter().filter(|c| c.conversation.is_some()).collect();
    let mut partials_seen = 0;
    for chat in &accepted {
        let conversation = chat.conversation.as_deref().expect("accepted");
        let Some(s) = stored.get(conversation) else {
            problems.push(format!(
                "{conversation}: accepted chat {:?} but no conversation stored",
                chat.message
            ));
            continue;
        };
        let at = s
            .messages
            .iter()
            .position(|m| m.1 == "user" && m.2 == chat.message);
        match (at, &chat.complete) {
            (None, _) => problems.push(format!(
                "{conversation}: accepted chat {:?} not stored",
                chat.message
            )),
            // An answer the client saw complete is stored as it was sent,
            // or (killed before its commit) not at all.
            (Some(at), Some(answer)) => match s.messages.get(at + 1) {
                Some((_, role, content, partial))
                    if role == "assistant" && (content != answer || *partial) =>
                {
                    problems.push(format!(
                        "{conversation}: the stored answer to {:?} differs from the one sent \
                         or is marked partial",
                        chat.message
                    ))
                }
                _ => {}
            },
            // A cancelled answer, once stored, is marked partial.
            (Some(at), None) if chat.cancelled => {
                if let Some((_, role, content, partial)) = s.messages.get(at + 1) {
                    if role == "assistant" && !partial {
                        problems.push(format!(
                            "{conversation}: the cancelled answer to {:?} is stored unmarked: \
                             {content:?}",
                            chat.message
                        ));
                    }
                    partials_seen += usize::from(*partial);
                }
            }
            (Some(_), None) => {}
        }
    }
    assert!(
        partials_seen > 0,
        "no cancelled answer was stored: {chats:?}"
    );
    assert!(
        problems.is_empty(),
        "after kill -9:\n{}",
        problems.join("\n")
    );
    assert!(accepted.len() >= CLIENTS, "too little load: {chats:?}");

    // Restarted on the same file, every conversation takes a new chat.
    let server = Server::start_in(dir.path(), CONFIG);
    let mut c = server.client();
    let conversations: Vec<&String> = stored.keys().collect();
    assert!(!conversations.is_empty());
    let requests: Vec<String> = conversations
        .iter()
        .map(|conversation| {
            let v = c.chat(Some(conversation), "after the crash", json!({}));
            assert_eq!(v["type"], "accepted", "{conversation} after restart: {v}");
            v["request"].as_str().expect("request").to_owned()
        })
        .collect();
    for request in &requests {
        let answer = c.answer(request);
        assert!(answer.is_done(), "{request}: {}", answer.end);
        answer.assert_contiguous();
    }
    eventually("nothing left running", || {
        server.stats()["requests"]["in_flight"].as_u64() == Some(0)
    });
}

/// `accepted` promises the user message is stored ("each conversation
/// stores its user message when the request is accepted"), so a kill -9
/// right after `accepted` must not lose it. A write lock held on the file
/// (as a backup or a second process may hold one) keeps the message from
/// being committed for as long as it is held: `accepted` must wait for it.
/// When it comes, the server is killed at once. (Before `accepted` waited
/// for the commit, it came while the lock was held and the kill lost the
/// message every time.)
#[test]
fn a_chat_accepted_just_before_kill_9_keeps_its_user_message() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("chat.db");
    let mut server = Server::start_in(dir.path(), CONFIG);
    let mut c = server.client();
    let (request, conversation) = c.ask(None, "before the lock");
    assert!(c.answer(&request).is_done());
    eventually("the first answer committed", || {
        server.stats()["history"]["pending_writes"].as_u64() == Some(0)
    });
    // Hold the write lock: the history writer waits for it.
    let lock = rusqlite::Connection::open(&db).expect("open the database");
    lock.execute_batch("BEGIN IMMEDIATE").expect("write lock");
    c.send(
        json!({"type": "chat", "id": "last", "conversation": conversation,
                  "message": "accepted, then the crash"}),
    );
    // The answer to the chat within `wait`, if any.
    let mut answer_within = |wait: Duration| {
        c.ws.get_mut().set_read_timeout(Some(wait)).unwrap();
        loop {
            match c.ws.read() {
                Ok(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(t.as_str()).expect("JSON");
                    if v["id"] == "last" {
                        return Some(v);
                    }
                }
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    };
    let while_locked = answer_within(Duration::from_secs(2));
    if while_locked.is_none() {
        // Nothing was promised while the message could not be stored.
        lock.execute_batch("ROLLBACK").expect("release the lock");
        let v = answer_within(Duration::from_secs(10)).expect("an answer once the lock is gone");
        assert_eq!(v["type"], "accepted", "{v}");
    }
    server.kill();
    if while_locked.is_some() {
        lock.execute_batch("ROLLBACK").expect("release the lock");
    }
    drop(lock);

    let stored = read_database(&db);
    let messages = &stored
        .get(&conversation)
        .expect("conversation stored")
        .messages;
    assert!(
        messages
            .iter()
            .any(|(_, role, content, _)| role == "user" && content == "accepted, then the crash"),
        "the accepted chat's user message is lost ({while_locked:?} while locked): {messages:?}"
    );
}
