//! Memory a client can make the server hold: every connection's output is
//! bounded in bytes, and `history` answers are bounded and paged.
//!
//! A test binary of its own: `an_idle_history_gives_its_sqlite_caches_back`
//! reads SQLite's memory counter, which is process-wide, so no test that
//! opens SQLite in this process may run beside it.

mod common;

use std::net::TcpStream;

use common::{eventually, Client, Server};
use socket2::{Domain, Socket, Type};

/// A client whose socket takes almost nothing unless it reads.
fn tiny_window_client(server: &Server) -> Client {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let tcp: TcpStream = socket.into();
    Client::over(tcp, server.addr)
}

/// 4,000 tokens of 4 KiB: 16 MiB of tokens, far fewer frames than
/// `outbox_frames`, so only a byte bound can cut the reader that never reads.
#[test]
fn a_client_that_never_reads_big_tokens_is_cut_off_by_bytes_and_the_reader_gets_everything() {
    let server = Server::start(common::BIG_TOKENS);
    let mut idle = tiny_window_client(&server);
    let (idle_request, _) = idle.ask(None, "big tokens please");
    let mut reader = server.client();
    let (read_request, _) = reader.ask(None, "big tokens please");
    let a = reader.answer(&read_request);
    assert!(a.is_done(), "{:?}", a.end);
    assert_eq!(a.role.as_deref(), Some("follower"), "same generation");
    a.assert_contiguous();
    assert_eq!(a.seqs.len(), 4000);
    assert_eq!(a.text.len(), 4000 * 4096);
    // Only now does the idle client read: what was buffered for it, then
    // slow_consumer instead of the other 15 MiB.
    let b = idle.answer(&idle_request);
    assert_eq!(b.code(), "slow_consumer", "{:?}", b.end);
    assert!(b.seqs.len() < 4000, "{} tokens", b.seqs.len());
    b.assert_contiguous();
}

/// Twelve answers of 32 KiB (384 KiB of history) read through `history`
/// answers of at most 100,000 bytes: newest first, paged back with `before`
/// until `more` is false, losing and repeating nothing.
#[test]
fn a_history_answer_is_bounded_in_bytes_and_pages_back_with_before() {
    const BOUND: usize = 100_000;
    let server = Server::start(&format!(
        r#"
[history]
max_answer_bytes = {BOUND}
[llm.simulated]
first_token_ms = 1
token_interval_ms = 0
tokens = 8
token_bytes = 4096
"#
    ));
    let mut c = server.client();
    let (first, conversation) = c.ask(None, "question 0");
    let mut expected = vec!["question 0".to_owned(), c.answer(&first).text];
    for i in 1..12 {
        let (request, _) = c.ask(Some(&conversation), &format!("question {i}"));
        let a = c.answer(&request);
        assert!(a.is_done(), "{:?}", a.end);
        expected.push(format!("question {i}"));
        expected.push(a.text);
    }
    let mut pages = Vec::new();
    let mut before: Option<u64> = None;
    loop {
        let mut ask =
            serde_json::json!({"type": "history", "conversation": conversation, "limit": 1000});
        if let Some(b) = before {
            ask["before"] = b.into();
        }
        c.send(ask);
        let page = c.recv_matching(|v| v["type"] == "history");
        let size = page.to_string().len();
        assert!(size <= BOUND, "a history answer of {size} bytes");
        let messages = page["messages"].as_array().unwrap().clone();
        assert!(!messages.is_empty(), "{page}");
        pages.push(messages);
        if page["more"] != true {
            assert!(page.get("before").is_none_or(|b| b.is_null()), "{page}");
            break;
        }
        before = Some(page["before"].as_u64().expect("a cursor with more"));
        assert!(pages.len() < 50, "paging does not end");
    }
    assert!(pages.len() >= 4, "384 KiB in pages of at most 100 kB");
    // Pages come newest first; each page is oldest first.
    let all: Vec<String> = pages
        .iter()
        .rev()
        .flatten()
        .map(|m| m["content"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(all, expected);
}

/// Resident memory of the server process, in bytes.
fn rss_bytes(server: &Server) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// A cached answer of 4 MiB asked by eight clients that never read: a hit
/// must not queue its own copy of the answer for each of them (32 MiB).
#[test]
fn cache_hits_for_clients_that_never_read_do_not_each_copy_the_answer() {
    let server = Server::start(
        r#"
[llm]
max_tokens = 10000
[llm.simulated]
first_token_ms = 1
token_interval_ms = 0
tokens = 1000
token_bytes = 4096
"#,
    );
    let mut reader = server.client();
    let first = reader.ask_and_wait(None, "a big cached answer");
    assert!(first.is_done(), "{:?}", first.end);
    // The cache write follows the `done`.
    eventually("the answer cached", || {
        server.stats()["cache"]["entries"] == 1
    });
    const IDLE: u64 = 8;
    let mut idle: Vec<Client> = (0..IDLE).map(|_| tiny_window_client(&server)).collect();
    let before = rss_bytes(&server);
    for c in &mut idle {
        c.send(serde_json::json!({"type": "chat", "id": "c", "message": "a big cached answer"}));
    }
    common::eventually("every hit served", || {
        server.stats()["requests"]["cache"].as_u64() == Some(IDLE)
    });
    let grown = rss_bytes(&server).saturating_sub(before);
    assert!(
        grown < 12 << 20,
        "{IDLE} hits of a 4 MiB answer for clients that do not read grew the server by {} MiB",
        grown >> 20
    );
    // A client that reads still gets the whole answer from the cache.
    let hit = reader.ask_and_wait(None, "a big cached answer");
    assert!(hit.is_done(), "{:?}", hit.end);
    assert_eq!(hit.role.as_deref(), Some("cache"));
    hit.assert_contiguous();
    assert_eq!(hit.text, first.text);
}

/// What SQLite holds in this process (page caches, lookaside, statements).
fn sqlite_memory_used() -> i64 {
    // SAFETY: a read of SQLite's global memory counter; no arguments, no
    // state of ours involved.
    unsafe { rusqlite::ffi::sqlite3_memory_used() }
}

/// The history's connections keep the pages they read and wrote (up to
/// their cache size each) for as long as they live: after a burst that is
/// memory only the next burst would reuse. The pooled readers give it back
/// when asked (the janitor asks when nothing runs any more), the writer by
/// itself once it has had nothing to write for `WRITER_IDLE`.
#[test]
fn an_idle_history_gives_its_sqlite_caches_back() {
    use chorus::history::{History, Role, WRITER_IDLE};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let history = History::open(&dir.path().join("chat.db"), 4).unwrap();
    // 8 MB of messages in 40 conversations, so that the caches fill.
    let text: Arc<str> = "x".repeat(4000).into();
    for c in 0..40 {
        let messages = (0..50)
            .map(|i| {
                (
                    if i % 2 == 0 {
                        Role::User
                    } else {
                        Role::Assistant
                    },
                    text.clone(),
                )
            })
            .collect();
        history.write_all(&format!("conversation {c}"), messages, |r| r.unwrap());
    }
    history.sync().unwrap();
    // Four readers at once, so each pooled connection reads (and caches).
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for c in 0..40 {
                    let read = history.recent(&format!("conversation {c}"), 50).unwrap();
                    assert_eq!(read.unwrap().len(), 50);
                }
            });
        }
    });
    let after_reads = sqlite_memory_used();
    history.release_memory();
    let after_release = sqlite_memory_used();
    assert!(
        after_release < after_reads - (2 << 20),
        "readers kept their caches: {after_reads} -> {after_release} bytes"
    );
    // The writer's cache goes once it has been idle long enough.
    std::thread::sleep(WRITER_IDLE + std::time::Duration::from_secs(1));
    let after_idle = sqlite_memory_used();
    assert!(
        after_idle < after_release - (1 << 20),
        "the writer kept its cache: {after_release} -> {after_idle} bytes"
    );
    // And it still works, caches and all.
    history.write("conversation 0", Some((Role::User, "more".into())), |r| {
        r.unwrap()
    });
    history.sync().unwrap();
    assert_eq!(
        history.recent("conversation 0", 1).unwrap().unwrap()[0].content,
        "more"
    );
}
