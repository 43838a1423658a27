//! Tool calls in the answer's own stream, end to end: the real chorus
//! binary with `provider = "openai"` against a real HTTP server on
//! loopback that streams scripted tool-call deltas (`common::upstream`).
//!
//! What it proves, from both ends of chorus: each round is one streamed
//! request that offers the tools (except the last allowed round, which
//! offers none); tool calls streamed in pieces, in parallel or interleaved
//! with content are assembled by `index`, shown to every attached client
//! as `tool` frames, run, and sent back in the next request as the
//! assistant's `tool_calls` message and one `tool` message per call;
//! content from every round is one answer with one contiguous `seq`, which
//! followers share and the cache keeps (unless the clock was used); hostile
//! calls become `error:` results and never fail the request (those cases
//! are in `tool_calls_hostile.rs`); an upstream that rejects `tools` is
//! asked without them from then on; and a failure is retried only while
//! nothing has reached a client.

use std::time::Duration;

use crate::common::tool_rounds::{
    added_messages, answer_of, answer_round, ask, assert_assistant_calls, assert_done,
    assert_offers_no_tools, assert_offers_tools, assert_tool_message, calculator, calculator_round,
    chorus, expression, frames_of, messages, position, rposition, sorted, texts, token_texts,
    tool_frames, CALC_ARGS, CALC_RESULT, QUIET,
};
use crate::common::upstream::{Reply, Script, ScriptedCall, Upstream};
use crate::common::{Answer, Client};
use serde_json::{json, Value};

#[test]
fn a_plain_answer_is_one_streamed_request_that_offers_every_tool() {
    let upstream = Upstream::start();
    upstream.push(answer_round(&["Hel", "lo", " there"]));
    let server = chorus(&upstream, "");
    let mut c = server.client();
    let request = ask(&mut c, "Say hello");
    let frames = frames_of(&mut c, &request);
    let answer = answer_of(&request, &frames);
    assert_done(&answer);
    assert_eq!(answer.finish(), "stop");
    assert_eq!(answer.role.as_deref(), Some("leader"));
    assert_eq!(token_texts(&frames), ["Hel", "lo", " there"]);
    assert!(frames.iter().all(|f| f["type"] != "tool"), "{frames:#?}");

    let requests = upstream.requests();
    assert_eq!(requests.len(), 1, "no separate tool-selection call");
    assert_eq!(requests[0].path, "/v1/chat/completions");
    assert_offers_tools(&requests[0].body);
    let sent = messages(&requests[0]);
    assert_eq!(sent.last().unwrap()["role"], "user");
    assert_eq!(sent.last().unwrap()["content"], "Say hello");
}

#[test]
fn a_calculator_call_streamed_byte_by_byte_is_run_and_sent_back_as_a_tool_message() {
    let upstream = Upstream::start();
    upstream.push(calculator_round("call_1", 1));
    upstream.push(answer_round(&["It", " is", " 14."]));
    let server = chorus(&upstream, "");
    let mut c = server.client();
    let request = ask(&mut c, "What is 2+3*4?");
    let frames = frames_of(&mut c, &request);
    let answer = answer_of(&request, &frames);
    assert_done(&answer);
    assert_eq!(answer.text, "It is 14.");

    let calls = tool_frames(&frames, "call");
    assert_eq!(calls.len(), 1, "{frames:#?}");
    assert_eq!(calls[0]["name"], "calculator");
    assert_eq!(calls[0]["text"], CALC_ARGS, "the arguments as assembled");
    let parsed: Value = serde_json::from_str(calls[0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(parsed, json!({"expression": "2+3*4"}));
    let results = tool_frames(&frames, "result");
    assert_eq!(texts(&results), [CALC_RESULT]);
    assert_eq!(results[0]["name"], "calculator");
    let call_at = position(&frames, |f| f["type"] == "tool" && f["phase"] == "call");
    let result_at = position(&frames, |f| f["type"] == "tool" && f["phase"] == "result");
    let first_token = position(&frames, |f| f["type"] == "token");
    assert!(
        call_at < result_at && result_at < first_token,
        "{frames:#?}"
    );

    let requests = upstream.requests();
    assert_eq!(requests.len(), 2);
    assert_offers_tools(&requests[0].body);
    assert_offers_tools(&requests[1].body);
    let added = added_messages(&requests[0], &requests[1], 2);
    assert_assistant_calls(
        &added[0],
        Value::Null,
        &[("call_1", "calculator", CALC_ARGS)],
    );
    assert_tool_message(&added[1], "call_1", CALC_RESULT);
}

#[test]
fn parallel_calls_with_interleaved_pieces_all_run_and_return_in_call_order() {
    let upstream = Upstream::start();
    let second = expression("1+2+3");
    upstream.push(
        Script::new()
            .calls(
                &[
                    calculator(0, "call_a", CALC_ARGS),
                    calculator(1, "call_b", &second),
                ],
                3,
            )
            .reply("tool_calls"),
    );
    upstream.push(answer_round(&["14", " and", " 6."]));
    let server = chorus(&upstream, "");
    let mut c = server.client();
    let request = ask(&mut c, "What are 2+3*4 and 1+2+3?");
    let frames = frames_of(&mut c, &request);
    let answer = answer_of(&request, &frames);
    assert_done(&answer);
    assert_eq!(answer.text, "14 and 6.");

    let calls = tool_frames(&frames, "call");
    assert_eq!(texts(&calls), [CALC_ARGS, second.as_str()], "{frames:#?}");
    // The tools run at the same time: results may come in either order.
    let results = tool_frames(&frames, "result");
    assert_eq!(sorted(texts(&results)), ["14", "6"], "{frames:#?}");

    let requests = upstream.requests();
    assert_eq!(requests.len(), 2);
    let added = added_messages(&requests[0], &requests[1], 3);
    assert_assistant_calls(
        &added[0],
        Value::Null,
        &[
            ("call_a", "calculator", CALC_ARGS),
            ("call_b", "calculator", &second),
        ],
    );
    assert_tool_message(&added[1], "call_a", "14");
    assert_tool_message(&added[2], "call_b", "6");
}

#[test]
fn content_before_a_call_and_after_it_is_one_answer_with_the_tool_frames_between() {
    let upstream = Upstream::start();
    upstream.push(
        Script::new()
            .contents(&["Let", " me", " check."])
            .call(&calculator(0, "call_1", CALC_ARGS), 4)
            .reply("tool_calls"),
    );
    upstream.push(answer_round(&[" It", " is", " 14."]));
    let server = chorus(&upstream, "");
    let mut c = server.client();
    let (request, conversation) = c.ask(None, "What is 2+3*4?");
    let frames = frames_of(&mut c, &request);
    let answer = answer_of(&request, &frames);
    assert_done(&answer);
    assert_eq!(
        token_texts(&frames),
        ["Let", " me", " check.", " It", " is", " 14."]
    );
    assert_eq!(answer.text, "Let me check. It is 14.");

    // Round 1's tokens, then the tool frames, then round 2's tokens.
    let tokens: Vec<usize> = (0..frames.len())
        .filter(|&i| frames[i]["type"] == "token")
        .collect();
    let first_tool = position(&frames, |f| f["type"] == "tool");
    let last_tool = rposition(&frames, |f| f["type"] == "tool");
    assert!(tokens[2] < first_tool, "{frames:#?}");
    assert!(last_tool < tokens[3], "{frames:#?}");
    assert_eq!(texts(&tool_frames(&frames, "result")), [CALC_RESULT]);

    let requests = upstream.requests();
    assert_eq!(requests.len(), 2);
    let added = added_messages(&requests[0], &requests[1], 2);
    assert_assistant_calls(
        &added[0],
        json!("Let me check."),
        &[("call_1", "calculator", CALC_ARGS)],
    );
    assert_tool_message(&added[1], "call_1", CALC_RESULT);

    // The whole answer is what the history keeps.
    c.send(json!({"type": "history", "conversation": conversation}));
    let history = c.recv_matching(|v| v["type"] == "history");
    let stored = history["messages"].as_array().unwrap();
    assert_eq!(stored.len(), 2, "{history}");
    assert_eq!(stored[1]["role"], "assistant");
    assert_eq!(stored[1]["content"], "Let me check. It is 14.");
}

#[test]
fn content_streamed_after_the_calls_in_the_same_message_is_kept_in_order() {
    let upstream = Upstream::start();
    upstream.push(
        Script::new()
            .call(&calculator(0, "call_1", CALC_ARGS), 5)
            .contents(&["Checking", "..."])
            .reply("tool_calls"),
    );
    upstream.push(answer_round(&[" Done:", " 14."]));
    let server = chorus(&upstream, "");
    let mut c = server.client();
    let request = ask(&mut c, "Work out 2+3*4");
    let frames = frames_of(&mut c, &request);
    let answer = answer_of(&request, &frames);
    assert_done(&answer);
    assert_eq!(token_texts(&frames), ["Checking", "...", " Done:", " 14."]);
    assert_eq!(answer.text, "Checking... Done: 14.");
    let result_at = position(&frames, |f| f["type"] == "tool" && f["phase"] == "result");
    let round_two = position(&frames, |f| f["type"] == "token" && f["text"] == " Done:");
    assert!(result_at < round_two, "{frames:#?}");
    assert_eq!(texts(&tool_frames(&frames, "call")), [CALC_ARGS]);

    let requests = upstream.requests();
    assert_eq!(requests.len(), 2, "the call still gets its next round");
    let added = added_messages(&requests[0], &requests[1], 2);
    assert_assistant_calls(
        &added[0],
        json!("Checking..."),
        &[("call_1", "calculator", CALC_ARGS)],
    );
    assert_tool_message(&added[1], "call_1", CALC_RESULT);
}

#[test]
fn the_last_allowed_round_offers_no_tools_and_the_request_still_ends() {
    let upstream = Upstream::start();
    for round in 1..=2 {
        upstream.push(
            Script::new()
                .call(&calculator(0, &format!("call_r{round}"), CALC_ARGS), 7)
                .reply("tool_calls"),
        );
    }
    // A model that calls a tool even when none is offered.
    upstream.push(
        Script::new()
            .content("Enough.")
            .call(&calculator(0, "call_r3", CALC_ARGS), 7)
            .reply("tool_calls"),
    );
    // What a fourth round would get, so that one would be counted, not hang.
    upstream.push(
        Script::new()
            .call(&calculator(0, "call_r4", CALC_ARGS), 7)
            .reply("tool_calls"),
    );
    let server = chorus(&upstream, "[tools]\nmax_rounds = 3\n");
    let mut c = server.client();
    let request = ask(&mut c, "Keep calculating 2+3*4");
    let frames = frames_of(&mut c, &request);
    let answer = answer_of(&request, &frames);
    assert_done(&answer);
    assert_eq!(answer.text, "Enough.");
    let results = texts(&tool_frames(&frames, "result"));
    assert!(results.len() >= 2, "{frames:#?}");
    assert_eq!(results[..2], [CALC_RESULT, CALC_RESULT]);

    assert!(
        !upstream.wait_requests(4, QUIET),
        "more rounds than tools.max_rounds"
    );
    let requests = upstream.requests();
    assert_eq!(requests.len(), 3);
    assert_offers_tools(&requests[0].body);
    assert_offers_tools(&requests[1].body);
    assert_offers_no_tools(&requests[2].body);
    let added = added_messages(&requests[0], &requests[2], 4);
    assert_assistant_calls(
        &added[0],
        Value::Null,
        &[("call_r1", "calculator", CALC_ARGS)],
    );
    assert_tool_message(&added[1], "call_r1", CALC_RESULT);
    assert_assistant_calls(
        &added[2],
        Value::Null,
        &[("call_r2", "calculator", CALC_ARGS)],
    );
    assert_tool_message(&added[3], "call_r2", CALC_RESULT);
}

#[test]
fn followers_of_a_tool_answer_see_the_same_tool_frames_and_tokens() {
    let upstream = Upstream::start();
    // The call takes 500 ms to arrive, long enough for everyone to join.
    upstream.push(
        Script::new()
            .call(&calculator(0, "call_1", CALC_ARGS), CALC_ARGS.len())
            .reply_with_delay("tool_calls", Duration::from_millis(250)),
    );
    upstream.push(
        Script::new()
            .contents(&["All", " of", " you:", " 14."])
            .reply_with_delay("stop", Duration::from_millis(30)),
    );
    let server = chorus(&upstream, "");
    let mut clients: Vec<Client> = (0..5).map(|_| server.client()).collect();
    for c in &mut clients {
        c.send(json!({"type": "chat", "id": "same", "message": "What is 2+3*4?"}));
    }
    let requests: Vec<String> = clients
        .iter_mut()
        .map(|c| {
            let v = c.recv_matching(|v| v["id"] == "same");
            assert_eq!(v["type"], "accepted", "{v}");
            v["request"].as_str().unwrap().to_owned()
        })
        .collect();
    let seen: Vec<Vec<Value>> = clients
        .iter_mut()
        .zip(&requests)
        .map(|(c, r)| frames_of(c, r))
        .collect();

    let answers: Vec<Answer> = requests
        .iter()
        .zip(&seen)
        .map(|(r, frames)| answer_of(r, frames))
        .collect();
    let mut roles: Vec<&str> = answers
        .iter()
        .map(|a| a.role.as_deref().unwrap_or("none"))
        .collect();
    roles.sort();
    assert_eq!(
        roles,
        ["follower", "follower", "follower", "follower", "leader"]
    );
    let leader = answers
        .iter()
        .position(|a| a.role.as_deref() == Some("leader"))
        .unwrap();
    let tools_of = |frames: &[Value], phase: &str| -> Vec<(String, String)> {
        tool_frames(frames, phase)
            .iter()
            .map(|f| {
                (
                    f["name"].as_str().unwrap().to_owned(),
                    f["text"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let leader_frames = &seen[leader];
    assert_eq!(
        tools_of(leader_frames, "call"),
        [("calculator".to_owned(), CALC_ARGS.to_owned())]
    );
    assert_eq!(
        tools_of(leader_frames, "result"),
        [("calculator".to_owned(), CALC_RESULT.to_owned())]
    );
    for (answer, frames) in answers.iter().zip(&seen) {
        assert_done(answer);
        assert_eq!(answer.text, "All of you: 14.");
        assert_eq!(token_texts(frames), token_texts(leader_frames));
        assert_eq!(tools_of(frames, "call"), tools_of(leader_frames, "call"));
        assert_eq!(
            tools_of(frames, "result"),
            tools_of(leader_frames, "result")
        );
    }
    assert_eq!(
        upstream.requests().len(),
        2,
        "one request per round for all"
    );
}

#[test]
fn a_tool_answer_is_cached_and_served_to_the_next_new_conversation() {
    let upstream = Upstream::start();
    upstream.push(calculator_round("call_1", 6));
    upstream.push(answer_round(&["It", " is", " 14."]));
    let server = chorus(&upstream, "");
    let mut c = server.client();
    let request = ask(&mut c, "What is 2+3*4?");
    let frames = frames_of(&mut c, &request);
    let first = answer_of(&request, &frames);
    assert_done(&first);
    assert_eq!(first.role.as_deref(), Some("leader"));
    assert_eq!(first.text, "It is 14.");
    // It really was a tool answer: the result went out and back upstream.
    assert_eq!(texts(&tool_frames(&frames, "result")), [CALC_RESULT]);
    let requests = upstream.requests();
    assert_eq!(requests.len(), 2);
    let added = added_messages(&requests[0], &requests[1], 2);
    assert_tool_message(&added[1], "call_1", CALC_RESULT);

    let second = server.client().ask_and_wait(None, "What is 2+3*4?");
    assert_done(&second);
    assert_eq!(second.role.as_deref(), Some("cache"));
    assert_eq!(second.text, first.text);
    assert_eq!(upstream.requests().len(), 2, "a cache hit calls nobody");
    assert_eq!(server.stats()["cache"]["hits"], 1);
}

#[test]
fn a_direct_clock_call_is_the_answer_in_one_request_and_never_cached() {
    let upstream = Upstream::start();
    let clock_round = || {
        Script::new()
            .call(&ScriptedCall::new(0, "call_1", "clock", "{}"), 1)
            .reply("tool_calls")
    };
    upstream.push(clock_round());
    let server = chorus(&upstream, "");
    let mut c = server.client();
    let request = ask(&mut c, "What time is it?");
    let frames = frames_of(&mut c, &request);
    let answer = answer_of(&request, &frames);
    assert_done(&answer);
    assert_eq!(answer.finish(), "stop");
    let calls = tool_frames(&frames, "call");
    assert_eq!(calls.len(), 1, "{frames:#?}");
    assert_eq!(calls[0]["name"], "clock");
    let results = texts(&tool_frames(&frames, "result"));
    assert_eq!(results.len(), 1, "{frames:#?}");
    assert!(results[0].contains("UTC"), "{results:?}");
    // Direct: the tool's output is the answer, with no further round.
    assert_eq!(answer.text, results[0]);
    assert_eq!(upstream.requests().len(), 1);

    upstream.push(clock_round());
    let again = c.ask_and_wait(None, "What time is it?");
    assert_done(&again);
    assert_eq!(again.role.as_deref(), Some("leader"), "time moves on");
    assert!(again.text.contains("UTC"), "{}", again.text);
    assert_eq!(upstream.requests().len(), 2);
    assert_eq!(server.stats()["cache"]["hits"], 0);
}

#[test]
fn an_upstream_that_rejects_tools_is_asked_without_them_from_then_on() {
    let upstream = Upstream::start();
    // What llama.cpp's server answers when started without --jinja.
    upstream.push(Reply::Json {
        status: 500,
        body: json!({"error": {"code": 500, "message": "tools param requires --jinja flag",
                               "type": "server_error"}}),
    });
    upstream.push(answer_round(&["No", " tools", " here."]));
    let server = chorus(&upstream, "");
    let mut c = server.client();
    let request = ask(&mut c, "Hello there");
    let frames = frames_of(&mut c, &request);
    let answer = answer_of(&request, &frames);
    assert_done(&answer);
    assert_eq!(answer.text, "No tools here.");
    assert!(frames.iter().all(|f| f["type"] != "tool"), "{frames:#?}");
    let requests = upstream.requests();
    assert_eq!(
        requests.len(),
        2,
        "the rejected request and one without tools"
    );
    assert_offers_tools(&requests[0].body);
    assert_offers_no_tools(&requests[1].body);
    assert_eq!(messages(&requests[1]), messages(&requests[0]));

    upstream.push(answer_round(&["Still", " none."]));
    let second = c.ask_and_wait(None, "Another question");
    assert_done(&second);
    assert_eq!(second.text, "Still none.");
    let requests = upstream.requests();
    assert_eq!(requests.len(), 3, "no new attempt with tools");
    assert_offers_no_tools(&requests[2].body);
    assert_eq!(
        messages(&requests[2]).last().unwrap()["content"],
        "Another question"
    );
}

#[test]
fn a_503_before_anything_reached_a_client_is_retried() {
    let upstream = Upstream::start();
    upstream.push(Reply::Error {
        status: 503,
        message: "warming up".into(),
        retry_after: None,
    });
    upstream.push(calculator_round("call_1", 4));
    upstream.push(answer_round(&["It", " is", " 14."]));
    let server = chorus(&upstream, "");
    let mut c = server.client();
    let request = ask(&mut c, "What is 2+3*4?");
    let frames = frames_of(&mut c, &request);
    let answer = answer_of(&request, &frames);
    assert_done(&answer);
    assert_eq!(answer.text, "It is 14.");
    assert_eq!(texts(&tool_frames(&frames, "call")), [CALC_ARGS]);
    assert_eq!(texts(&tool_frames(&frames, "result")), [CALC_RESULT]);

    let requests = upstream.requests();
    assert_eq!(requests.len(), 3, "the 503, its retry, the second round");
    assert_eq!(requests[1].body, requests[0].body, "the same round again");
    assert_offers_tools(&requests[1].body);
    let added = added_messages(&requests[1], &requests[2], 2);
    assert_tool_message(&added[1], "call_1", CALC_RESULT);
}

#[test]
fn a_failure_after_tool_frames_went_out_is_not_retried_and_keeps_the_partial_answer() {
    let upstream = Upstream::start();
    upstream.push(
        Script::new()
            .content("Let me check.")
            .call(&calculator(0, "call_1", CALC_ARGS), 4)
            .reply("tool_calls"),
    );
    upstream.push(Reply::Error {
        status: 503,
        message: "overloaded, try later".into(),
        retry_after: None,
    });
    // What a retry would get: it must not be asked for.
    upstream.push(answer_round(&["Too", " late."]));
    let server = chorus(&upstream, "");
    let mut c = server.client();
    let (request, conversation) = c.ask(None, "What is 2+3*4?");
    let frames = frames_of(&mut c, &request);
    let answer = answer_of(&request, &frames);
    assert_eq!(answer.end["type"], "error", "{}", answer.end);
    assert_eq!(answer.code(), "upstream_error", "{}", answer.end);
    assert_eq!(answer.text, "Let me check.");
    answer.assert_contiguous();
    assert_eq!(texts(&tool_frames(&frames, "result")), [CALC_RESULT]);

    assert!(
        !upstream.wait_requests(3, QUIET),
        "a round after tool frames went out was retried"
    );
    assert_eq!(upstream.requests().len(), 2);

    c.send(json!({"type": "history", "conversation": conversation}));
    let history = c.recv_matching(|v| v["type"] == "history");
    let stored = history["messages"].as_array().unwrap();
    assert_eq!(stored.len(), 2, "{history}");
    assert_eq!(stored[1]["role"], "assistant");
    assert_eq!(stored[1]["content"], "Let me check.");
}
