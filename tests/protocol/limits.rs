//! Bounded queues, timeouts and slow consumers.

use std::net::TcpStream;

use crate::common::{Client, Server};
use serde_json::json;
use socket2::{Domain, Socket, Type};

/// One slot in every stage, so a few distinct chats fill the pipeline.
const TINY: &str = r#"
[workers]
cache_workers = 1
max_concurrent_leaders = 1
max_concurrent_llm_streams = 1
prepare_queue = 1
prepared_queue = 1
[llm.simulated]
first_token_ms = 10
token_interval_ms = 20
tokens = 100
"#;

#[test]
fn a_full_queue_answers_overloaded_at_once_and_loses_nothing() {
    let server = Server::start(TINY);
    let mut c = server.client();
    // One streams, one waits for the streaming slot, the third finds the
    // prepared queue full.
    let (streaming, _) = c.ask(None, "first");
    c.recv_matching(|v| v["request"] == streaming.as_str() && v["type"] == "token");
    let (waiting, _) = c.ask(None, "second");
    c.recv_matching(|v| v["request"] == waiting.as_str() && v["state"] == "waiting_stream");
    let (third, conversation) = c.ask(None, "third");
    let refused = c.answer(&third);
    assert_eq!(refused.end["type"], "error");
    assert_eq!(refused.code(), "overloaded", "{:?}", refused.end);
    assert_eq!(server.stats()["requests"]["overloaded"], 1);
    // The running requests are unaffected.
    for r in [&streaming, &waiting] {
        c.send(json!({"type": "cancel", "request": r}));
        assert_eq!(c.answer(r).finish(), "cancelled");
    }
    // The refused conversation is free again and its history holds only the user message.
    c.send(json!({"type": "history", "conversation": conversation}));
    let h = c.recv_matching(|v| v["type"] == "history");
    let messages = h["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1, "{h}");
    assert_eq!(messages[0]["content"], "third");
}

#[test]
fn a_request_waiting_too_long_gets_queue_timeout() {
    let server = Server::start(&format!("{TINY}\n[timeouts]\nqueue_ms = 300\n"));
    let mut c = server.client();
    let (streaming, _) = c.ask(None, "hog the stream");
    c.recv_matching(|v| v["request"] == streaming.as_str() && v["type"] == "token");
    let (waiting, _) = c.ask(None, "wait for it");
    let a = c.answer(&waiting);
    assert_eq!(a.code(), "queue_timeout", "{:?}", a.end);
    assert_eq!(server.stats()["requests"]["timed_out"], 1);
    c.send(json!({"type": "cancel", "request": streaming}));
    assert_eq!(c.answer(&streaming).finish(), "cancelled");
}

#[test]
fn a_request_running_too_long_gets_processing_timeout_and_the_upstream_is_aborted() {
    let server = Server::start(
        r#"
[timeouts]
request_ms = 300
[llm.simulated]
first_token_ms = 10
token_interval_ms = 20
tokens = 1000
"#,
    );
    let mut c = server.client();
    let mut follower = server.client();
    let (request, _) = c.ask(None, "endless");
    let (follower_request, _) = follower.ask(None, "endless");
    let a = c.answer(&request);
    assert_eq!(a.code(), "processing_timeout", "{:?}", a.end);
    assert!(!a.seqs.is_empty());
    let f = follower.answer(&follower_request);
    assert_eq!(
        f.code(),
        "processing_timeout",
        "every attached client is told"
    );
    let stats = server.stats();
    assert_eq!(stats["upstream"]["aborted"], 1, "{stats}");
    assert_eq!(
        stats["cache"]["entries"], 0,
        "a timed-out answer is not cached"
    );
}

#[test]
fn a_client_that_does_not_read_is_cut_off_without_slowing_the_others() {
    let server = Server::start(
        r#"
[server]
outbox_frames = 64
send_buffer_bytes = 4096
[llm]
max_tokens = 10000
[llm.simulated]
first_token_ms = 200
token_interval_ms = 1
tokens = 4000
"#,
    );
    // The slow client's socket has a tiny receive buffer and is never read.
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let tcp: TcpStream = socket.into();
    let mut slow = Client::over(tcp, server.addr);
    let (slow_request, _) = slow.ask(None, "flood me");
    let mut fast = server.client();
    let (fast_request, _) = fast.ask(None, "flood me");
    let a = fast.answer(&fast_request);
    assert!(a.is_done(), "{:?}", a.end);
    a.assert_contiguous();
    assert_eq!(a.seqs.len(), 4000);
    // Now read the slow socket: some tokens, then slow_consumer, never done.
    let b = slow.answer(&slow_request);
    assert_eq!(b.code(), "slow_consumer", "{:?}", b.end);
    assert!(b.seqs.len() < 4000);
    b.assert_contiguous();
    // It may resume where it was cut off and get the rest.
    let from = b.seqs.len() as u64;
    slow.send(json!({"type": "resume", "request": slow_request, "from": from}));
    let rest = slow.answer(&slow_request);
    assert!(rest.is_done(), "{:?}", rest.end);
    assert_eq!(rest.seqs.first().copied(), Some(from));
    assert_eq!(b.text.len() + rest.text.len(), a.text.len());
}

#[test]
fn a_stream_with_no_token_for_stream_idle_ms_gets_processing_timeout() {
    let server = Server::start(
        r#"
[timeouts]
stream_idle_ms = 200
[llm.simulated]
first_token_ms = 10
token_interval_ms = 5000
tokens = 10
"#,
    );
    let mut c = server.client();
    let (request, _) = c.ask(None, "then silence");
    let a = c.answer(&request);
    assert_eq!(a.code(), "processing_timeout", "{:?}", a.end);
    assert_eq!(a.seqs, vec![0], "the first token came, then nothing");
    assert_eq!(server.stats()["upstream"]["aborted"], 1);
}
