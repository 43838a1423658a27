//! Cancellation and resume across connections.

use crate::common::{eventually, Client, Server};
use serde_json::json;

/// Slow enough that cancels and reconnects land mid-stream.
const SLOW: &str = r#"
[llm.simulated]
first_token_ms = 50
token_interval_ms = 40
tokens = 40
"#;

/// Starts one leader and `n` followers of the same question on separate connections.
fn crowd(server: &Server, n: usize, question: &str) -> Vec<(Client, String, String)> {
    let mut clients = Vec::new();
    for _ in 0..=n {
        let mut c = server.client();
        let (request, conversation) = c.ask(None, question);
        clients.push((c, request, conversation));
    }
    for (c, request, _) in clients.iter_mut() {
        c.recv_matching(|v| v["request"] == request.as_str() && v["type"] == "start");
    }
    clients
}

#[test]
fn a_follower_that_cancels_is_detached_and_the_rest_complete() {
    let server = Server::start(SLOW);
    let mut clients = crowd(&server, 2, "shared question");
    let (follower, request, _) = &mut clients[2];
    follower.recv_matching(|v| v["request"] == request.as_str() && v["type"] == "token");
    follower.send(json!({"type": "cancel", "request": request}));
    let cancelled = follower.answer(request);
    assert_eq!(cancelled.end["type"], "done");
    assert_eq!(cancelled.finish(), "cancelled");
    assert_eq!(cancelled.end["role"], "follower");
    for (c, request, _) in clients.iter_mut().take(2) {
        let a = c.answer(request);
        assert_eq!(a.finish(), "stop");
        a.assert_contiguous();
        assert_eq!(a.seqs.len(), 40);
    }
    let stats = server.stats();
    assert_eq!(stats["upstream"]["calls"], 1);
    assert_eq!(stats["upstream"]["aborted"], 0);
}

#[test]
fn a_leader_that_cancels_leaves_the_generation_to_its_followers() {
    let server = Server::start(SLOW);
    let mut clients = crowd(&server, 2, "leader leaves");
    let (leader, request, leader_conversation) = &mut clients[0];
    let leader_conversation = leader_conversation.clone();
    let start = leader.recv_matching(|v| v["request"] == request.as_str() && v["type"] == "token");
    assert_eq!(start["seq"], 0);
    leader.send(json!({"type": "cancel", "request": request}));
    let cancelled = leader.answer(request);
    assert_eq!(cancelled.finish(), "cancelled");
    assert_eq!(cancelled.end["role"], "leader");
    for (c, request, _) in clients.iter_mut().skip(1) {
        let a = c.answer(request);
        assert_eq!(a.finish(), "stop", "{:?}", a.end);
        assert_eq!(a.end["role"], "follower");
        a.assert_contiguous();
        assert_eq!(a.seqs.len(), 40);
    }
    // The leader's partial answer is in its own history.
    assert_eq!(server.stats()["upstream"]["aborted"], 0);
    let mut probe = server.client();
    probe.send(json!({"type": "history", "conversation": leader_conversation}));
    let h = probe.recv_matching(|v| v["type"] == "history");
    let messages = h["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{h}");
    // The first token was read above, before the cancel.
    let partial = format!("{}{}", start["text"].as_str().unwrap(), cancelled.text);
    assert_eq!(messages[1]["content"], partial.as_str());
    // Marked as cut short; the question and a follower's complete answer
    // carry no mark.
    assert_eq!(messages[1]["partial"], true, "{h}");
    assert!(messages[0].get("partial").is_none(), "{h}");
    let (follower, _, follower_conversation) = &mut clients[1];
    follower.send(json!({"type": "history", "conversation": follower_conversation}));
    let h = follower.recv_matching(|v| v["type"] == "history");
    assert_eq!(h["messages"][1]["role"], "assistant", "{h}");
    assert!(h["messages"][1].get("partial").is_none(), "{h}");
}

#[test]
fn when_everyone_cancels_the_generation_is_aborted() {
    let server = Server::start(SLOW);
    let mut clients = crowd(&server, 1, "nobody wants this");
    for (c, request, _) in clients.iter_mut() {
        c.recv_matching(|v| v["request"] == request.as_str() && v["type"] == "token");
        c.send(json!({"type": "cancel", "request": request}));
    }
    let mut partials = Vec::new();
    for (c, request, _) in clients.iter_mut() {
        let a = c.answer(request);
        assert_eq!(a.finish(), "cancelled");
        assert!(a.seqs.len() < 40);
        partials.push(a);
    }
    eventually("the upstream call is aborted", || {
        server.stats()["upstream"]["aborted"] == 1
    });
    // Nothing incomplete was cached: the same question is generated again.
    let mut c = server.client();
    let again = c.ask_and_wait(None, "nobody wants this");
    assert_eq!(again.role.as_deref(), Some("leader"));
    assert_eq!(server.stats()["upstream"]["calls"], 2);
    // `done` counts the tokens the client was sent: the one read before
    // cancelling plus those that were already on their way.
    for p in &partials {
        assert_eq!(p.end["tokens"].as_u64().unwrap(), 1 + p.seqs.len() as u64);
    }
}

#[test]
fn cancel_of_an_unknown_request_is_not_found_and_the_connection_works() {
    let server = Server::start(SLOW);
    let mut c = server.client();
    let e = c.expect_error(json!({"type": "cancel", "request": "r-nope"}));
    assert_eq!(e["code"], "not_found");
    assert_eq!(e["request"], "r-nope");
    let e = c.expect_error(json!({"type": "resume", "request": "r-nope", "from": 0}));
    assert_eq!(e["code"], "not_found");
    let (request, _) = c.ask(None, "still works");
    c.send(json!({"type": "cancel", "request": request}));
    let end = c.answer(&request).end;
    // Cancelled before it had a role: `error` `cancelled`; after: `done` `cancelled`.
    assert!(
        end["finish"] == "cancelled" || end["code"] == "cancelled",
        "{end}"
    );
}

#[test]
fn resume_after_reconnect_continues_with_no_gap() {
    let server = Server::start(SLOW);
    let mut first = server.client();
    let (request, _) = first.ask(None, "resume me");
    let mut seen = Vec::new();
    let mut text = String::new();
    while seen.len() < 5 {
        let v = first.recv_matching(|v| v["request"] == request.as_str() && v["type"] == "token");
        seen.push(v["seq"].as_u64().unwrap());
        text.push_str(v["text"].as_str().unwrap());
    }
    // The connection drops mid-stream; the resume comes after the server
    // has seen it go (a resume of a detached request, not a second
    // attachment racing the first).
    drop(first);
    eventually("the server notices the dropped connection", || {
        server.stats()["connections"] == 0
    });
    let mut second = server.client();
    second.send(json!({"type": "resume", "request": request, "from": 5}));
    let rest = second.answer(&request);
    assert!(rest.is_done(), "{:?}", rest.end);
    assert_eq!(rest.finish(), "stop");
    let expected: Vec<u64> = (5..40).collect();
    assert_eq!(
        rest.seqs, expected,
        "resume must continue at `from` with no gap"
    );
    text.push_str(&rest.text);
    // The stitched text equals what a fresh follower replay gets.
    let mut third = server.client();
    third.send(json!({"type": "resume", "request": request, "from": 0}));
    let replay = third.answer(&request);
    assert_eq!(replay.text, text);
    replay.assert_contiguous();
}

#[test]
fn resume_within_the_replay_window_replays_and_ends() {
    let server = Server::start(
        r#"
[llm.simulated]
first_token_ms = 5
token_interval_ms = 1
tokens = 10
"#,
    );
    let mut c = server.client();
    let original = c.ask_and_wait(None, "replay me");
    let mut other = Client::connect(server.addr);
    other.send(json!({"type": "resume", "request": original.request, "from": 3}));
    let replay = other.answer(&original.request);
    assert_eq!(replay.finish(), "stop");
    assert_eq!(replay.seqs, (3..10).collect::<Vec<u64>>());
    // A cached answer can be resumed as well.
    let hit = c.ask_and_wait(None, "replay me");
    assert_eq!(hit.role.as_deref(), Some("cache"));
    other.send(json!({"type": "resume", "request": hit.request, "from": 8}));
    let replay = other.answer(&hit.request);
    assert_eq!(replay.seqs, vec![8, 9]);
    assert_eq!(replay.end["role"], "cache");
}

#[test]
fn a_generation_nobody_comes_back_to_is_aborted_after_the_grace() {
    let server = Server::start(
        r#"
[timeouts]
orphan_grace_ms = 200
[llm.simulated]
first_token_ms = 10
token_interval_ms = 50
tokens = 200
"#,
    );
    let mut c = server.client();
    let (request, _) = c.ask(None, "then I leave");
    c.recv_matching(|v| v["request"] == request.as_str() && v["type"] == "token");
    drop(c);
    eventually("the orphaned generation is aborted", || {
        server.stats()["upstream"]["aborted"] == 1
    });
    // Within the replay window the request can still be read back: it ended cancelled.
    let mut c = server.client();
    c.send(json!({"type": "resume", "request": request, "from": 0}));
    let a = c.answer(&request);
    assert_eq!(a.finish(), "cancelled");
    assert!(a.seqs.len() < 200);
}

#[test]
fn resuming_a_cancelled_follower_replays_what_it_was_sent_and_nothing_after() {
    let server = Server::start(SLOW);
    let mut clients = crowd(&server, 1, "keep going without me");
    let (follower, request, _) = &mut clients[1];
    for _ in 0..3 {
        follower.recv_matching(|v| v["request"] == request.as_str() && v["type"] == "token");
    }
    follower.send(json!({"type": "cancel", "request": request}));
    let cancelled = follower.answer(request);
    let sent = cancelled.end["tokens"].as_u64().unwrap();
    assert!((3..40).contains(&sent), "{}", cancelled.end);
    // The generation goes on for the leader; a resume of the cancelled
    // request must not go live with it.
    let mut other = server.client();
    other.send(json!({"type": "resume", "request": request, "from": 0}));
    let replay = other.answer(request);
    assert_eq!(replay.finish(), "cancelled");
    assert_eq!(replay.seqs, (0..sent).collect::<Vec<u64>>());
    let (leader, leader_request, _) = &mut clients[0];
    assert_eq!(leader.answer(leader_request).finish(), "stop");
    other.send(json!({"type": "history", "conversation": "none-such"}));
    let next = other.recv();
    assert_eq!(
        next["type"], "error",
        "a stray frame arrived after done: {next}"
    );
    assert_eq!(next["code"], "not_found");
}

#[test]
fn resuming_a_cached_answer_sends_one_start() {
    let server = Server::start(
        r#"
[llm.simulated]
first_token_ms = 5
token_interval_ms = 1
tokens = 6
"#,
    );
    let mut c = server.client();
    c.ask_and_wait(None, "cache me");
    let hit = c.ask_and_wait(None, "cache me");
    assert_eq!(hit.role.as_deref(), Some("cache"));
    let mut other = server.client();
    other.send(json!({"type": "resume", "request": hit.request, "from": 2}));
    let mut starts = 0;
    let mut seqs = Vec::new();
    loop {
        let v = other.recv();
        match v["type"].as_str().unwrap() {
            "start" => starts += 1,
            "token" => seqs.push(v["seq"].as_u64().unwrap()),
            "done" => break,
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert_eq!(starts, 1);
    assert_eq!(seqs, vec![2, 3, 4, 5]);
}
