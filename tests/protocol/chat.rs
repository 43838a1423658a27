//! Chats end to end: streaming, singleflight, cache, history isolation.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use crate::common::{eventually, Client, Server, FAST};
use serde_json::json;

#[test]
fn a_chat_streams_tokens_from_seq_zero_and_ends_with_one_done() {
    let server = Server::start(FAST);
    let mut c = server.client();
    let accepted = c.chat(None, "Hello there", json!({}));
    assert_eq!(accepted["type"], "accepted");
    assert_eq!(accepted["id"], "c1");
    let request = accepted["request"].as_str().unwrap().to_owned();
    let conversation = accepted["conversation"].as_str().unwrap().to_owned();
    // Request and conversation ids are long random strings.
    assert!(
        request.len() >= 32 && conversation.len() >= 32,
        "{accepted}"
    );
    let answer = c.answer(&request);
    assert!(answer.is_done(), "{:?}", answer.end);
    assert_eq!(answer.finish(), "stop");
    assert_eq!(answer.role.as_deref(), Some("leader"));
    answer.assert_contiguous();
    assert_eq!(answer.seqs.len(), 12);
    assert_eq!(answer.end["tokens"], 12);
    assert_eq!(answer.end["role"], "leader");
    for key in ["queue_ms", "prepare_ms", "ttft_ms", "total_ms"] {
        assert!(
            answer.end["timings"][key].is_number(),
            "missing {key}: {}",
            answer.end
        );
    }
    assert!(!answer.text.is_empty());
    // Nothing else arrives for that request after its done.
    c.send(json!({"type": "history", "conversation": conversation}));
    let history = c.recv();
    assert_eq!(history["type"], "history", "got {history} after done");
    let messages = history["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["role"], "user");
    assert_eq!(messages[0]["content"], "Hello there");
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(messages[1]["content"], answer.text.as_str());
    assert!(messages[0]["at"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn max_tokens_ends_with_length() {
    let server = Server::start(FAST);
    let mut c = server.client();
    let v = c.chat(None, "count", json!({"max_tokens": 3}));
    let answer = c.answer(v["request"].as_str().unwrap());
    assert_eq!(answer.finish(), "length");
    assert_eq!(answer.seqs.len(), 3);
}

#[test]
fn a_hundred_identical_concurrent_chats_make_one_upstream_call() {
    let server = Server::start(
        r#"
[llm.simulated]
first_token_ms = 300
token_interval_ms = 5
tokens = 20
"#,
    );
    const N: usize = 100;
    let barrier = Arc::new(Barrier::new(N));
    let addr = server.addr;
    let handles: Vec<_> = (0..N)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                barrier.wait();
                c.ask_and_wait(None, "What is singleflight?")
            })
        })
        .collect();
    let answers: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let stats = server.stats();
    assert_eq!(stats["upstream"]["calls"], 1, "{stats}");
    let first = &answers[0].text;
    let mut roles = std::collections::HashMap::new();
    for a in &answers {
        assert!(a.is_done(), "{:?}", a.end);
        a.assert_contiguous();
        assert_eq!(&a.text, first, "every client gets the same text");
        *roles.entry(a.role.clone().unwrap()).or_insert(0) += 1;
    }
    assert_eq!(roles.get("leader"), Some(&1), "{roles:?}");
    assert_eq!(roles.get("follower"), Some(&(N - 1)), "{roles:?}");
}

#[test]
fn different_histories_are_never_shared() {
    let server = Server::start(FAST);
    let mut c = server.client();
    let first_a = c.ask_and_wait(Some("conv-a"), "I like tea");
    let first_b = c.ask_and_wait(Some("conv-b"), "I like coffee");
    assert_ne!(first_a.text, first_b.text);
    let calls_before = server.stats()["upstream"]["calls"].as_u64().unwrap();
    let (ra, _) = c.ask(Some("conv-a"), "What do I like?");
    let (rb, _) = c.ask(Some("conv-b"), "What do I like?");
    let a = c.answer(&ra);
    let b = c.answer(&rb);
    assert_eq!(a.role.as_deref(), Some("leader"));
    assert_eq!(b.role.as_deref(), Some("leader"));
    assert_ne!(a.text, b.text, "answers to different histories must differ");
    let calls_after = server.stats()["upstream"]["calls"].as_u64().unwrap();
    assert_eq!(calls_after - calls_before, 2);
}

#[test]
fn the_first_message_of_new_conversations_is_shared_and_cached() {
    let server = Server::start(FAST);
    let mut c = server.client();
    let (first_request, first_conversation) = c.ask(None, "  Tell me a story ");
    let first = c.answer(&first_request);
    assert_eq!(first.role.as_deref(), Some("leader"));
    // Stored as the key sees it: trimmed.
    c.send(json!({"type": "history", "conversation": first_conversation}));
    let h = c.recv_matching(|v| v["type"] == "history");
    assert_eq!(h["messages"][0]["content"], "Tell me a story");
    let second = c.ask_and_wait(None, "Tell me a story");
    assert_eq!(second.role.as_deref(), Some("cache"));
    assert_eq!(second.text, first.text);
    assert_eq!(
        second.seqs, first.seqs,
        "cached answers keep their token boundaries"
    );
    second.assert_contiguous();
    let stats = server.stats();
    assert_eq!(stats["cache"]["hits"], 1);
    assert_eq!(stats["upstream"]["calls"], 1);
    // A fresh request neither reads the cache nor joins anyone.
    let v = c.chat(None, "Tell me a story", json!({"fresh": true}));
    let fresh = c.answer(v["request"].as_str().unwrap());
    assert_eq!(fresh.role.as_deref(), Some("leader"));
    assert_eq!(server.stats()["upstream"]["calls"], 2);
}

#[test]
fn a_cache_hit_is_served_while_every_streaming_slot_is_busy() {
    let server = Server::start(
        r#"
[workers]
max_concurrent_llm_streams = 1
[llm.simulated]
first_token_ms = 5
token_interval_ms = 10
tokens = 200
"#,
    );
    let mut c = server.client();
    let warm = c.ask_and_wait(None, "cached question");
    assert_eq!(warm.role.as_deref(), Some("leader"));
    // Occupy the only streaming slot with a long answer.
    let long = c.chat(None, "a long one", json!({}));
    let long_request = long["request"].as_str().unwrap().to_owned();
    c.recv_matching(|v| v["request"] == long_request.as_str() && v["type"] == "token");
    let stats = server.stats();
    assert_eq!(stats["stages"]["stream"]["busy"], 1, "{stats}");
    let mut other = server.client();
    let hit = other.ask_and_wait(None, "cached question");
    assert_eq!(hit.role.as_deref(), Some("cache"));
    assert_eq!(hit.text, warm.text);
    // The long stream was still running while the hit was served.
    let stats = server.stats();
    assert_eq!(stats["stages"]["stream"]["busy"], 1, "{stats}");
    c.send(json!({"type": "cancel", "request": long_request}));
    let end = c.answer(&long_request);
    assert_eq!(end.finish(), "cancelled");
}

#[test]
fn a_conversation_with_a_request_in_flight_is_busy() {
    let server = Server::start(
        r#"
[llm.simulated]
first_token_ms = 300
token_interval_ms = 5
tokens = 5
"#,
    );
    let mut c = server.client();
    let (first, conversation) = c.ask(None, "one");
    let busy = c.chat(Some(&conversation), "two", json!({}));
    assert_eq!(busy["type"], "error");
    assert_eq!(busy["code"], "conversation_busy");
    assert!(c.answer(&first).is_done());
    // Right after `done` the conversation is free again.
    let next = c.ask_and_wait(Some(&conversation), "two");
    assert!(next.is_done());
    c.send(json!({"type": "history", "conversation": conversation}));
    let h = c.recv_matching(|v| v["type"] == "history");
    assert_eq!(h["messages"].as_array().unwrap().len(), 4, "{h}");
}

#[test]
fn stats_and_metrics_count_what_happened() {
    let server = Server::start(FAST);
    let mut c = server.client();
    c.ask_and_wait(None, "q");
    c.ask_and_wait(None, "q");
    let stats = server.stats();
    assert_eq!(stats["connections"], 1);
    assert_eq!(stats["requests"]["accepted"], 2);
    assert_eq!(stats["requests"]["leader"], 1);
    assert_eq!(stats["requests"]["cache"], 1);
    assert_eq!(stats["requests"]["done"], 2);
    assert_eq!(stats["cache"]["entries"], 1);
    assert!(stats["cluster"].is_null(), "no [cluster]: {stats}");
    assert_eq!(stats["stages"]["stream"]["workers"], 8);
    assert_eq!(stats["stages"]["prepare"]["workers"], 16);
    assert_eq!(stats["stages"]["follow"]["workers"], 64);
    assert_eq!(stats["stages"]["cache"]["workers"], 4);
    assert!(stats["ttft_ms"]["p50"].as_f64().unwrap() > 0.0);
    assert!(stats["history"]["pending_writes"].is_u64(), "{stats}");
    let (status, head, body) = server.get("/metrics");
    assert_eq!(status, 200);
    assert!(head.contains("text/plain; version=0.0.4"));
    for line in [
        "chorus_connections 1",
        "chorus_upstream_calls_total 1",
        "chorus_cache_hits_total 1",
        "chorus_requests_total{role=\"cache\"} 1",
        "chorus_queue_depth{stage=\"intake\"} 0",
        "chorus_pool_workers{stage=\"stream\"} 8",
        "chorus_ttft_seconds_count 2",
    ] {
        assert!(body.contains(line), "missing {line} in\n{body}");
    }
    drop(c);
    eventually("the connection gauge drops", || {
        server.stats()["connections"] == 0
    });
}

#[test]
fn a_leader_reports_each_stage_before_its_first_token() {
    let server = Server::start(FAST);
    let mut c = server.client();
    let accepted = c.chat(None, "show me the stages", json!({}));
    let request = accepted["request"].as_str().unwrap().to_owned();
    let mut seen = Vec::new();
    loop {
        let v = c.recv_matching(|v| v["request"] == request.as_str());
        match v["type"].as_str().unwrap() {
            "state" => seen.push(v["state"].as_str().unwrap().to_owned()),
            "start" => seen.push(format!("start:{}", v["role"].as_str().unwrap())),
            "token" => break,
            other => panic!("unexpected {other} before the first token: {v}"),
        }
    }
    // The intake position first, then the generation's stages in order.
    assert_eq!(
        seen,
        [
            "queued",
            "start:leader",
            "queued",
            "preparing",
            "waiting_stream",
            "streaming"
        ],
        "{seen:?}"
    );
    assert!(c.answer(&request).is_done());
}

/// `accepted` rides along with a request's next frame instead of being
/// written on its own; it must still come at once for leaders and followers
/// whose first token is seconds away.
#[test]
fn accepted_comes_at_once_even_when_the_first_token_is_far_away() {
    let server = Server::start(
        r#"
[llm.simulated]
first_token_ms = 3000
token_interval_ms = 2
tokens = 4
"#,
    );
    let (mut leader, mut follower) = (server.client(), server.client());
    for c in [&mut leader, &mut follower] {
        let sent = std::time::Instant::now();
        let accepted = c.chat(None, "a slow question", json!({}));
        assert_eq!(accepted["type"], "accepted", "{accepted}");
        let waited = sent.elapsed();
        assert!(
            waited < Duration::from_millis(1000),
            "accepted took {waited:?} with the first token 3 s away"
        );
    }
    let request = |c: &mut Client| {
        c.recv_matching(|v| v["type"] == "start")["request"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (l, f) = (request(&mut leader), request(&mut follower));
    assert!(leader.answer(&l).is_done());
    assert!(follower.answer(&f).is_done());
}
