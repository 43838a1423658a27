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
//! calls become `error:` results and never fail the request; an upstream
//! that rejects `tools` is asked without them from then on; and a failure
//! is retried only while nothing has reached a client.

mod common;

use std::time::Duration;

use common::upstream::{Recorded, Reply, Script, ScriptedCall, Upstream};
use common::{Answer, Client, Server};
use serde_json::{json, Value};

/// The calculator arguments most tests use, and their result.
const CALC_ARGS: &str = r#"{"expression":"2+3*4"}"#;
const CALC_RESULT: &str = "14";

/// Long enough for a request nobody should make to have arrived.
const QUIET: Duration = Duration::from_millis(400);

/// A chorus whose only upstream is `upstream`, with fast retries and
/// default tool settings; `extra` adds tables (e.g. `[tools]` keys).
fn chorus(upstream: &Upstream, extra: &str) -> Server {
    let config = format!(
        r#"
[llm]
provider = "openai"
model = "test-model"
base_url = "{}"
max_retries = 2
retry_base_ms = 20
retry_max_ms = 200
read_timeout_ms = 5000
{extra}
"#,
        upstream.base_url()
    );
    Server::start(&config)
}

fn calculator(index: u64, id: &str, arguments: &str) -> ScriptedCall {
    ScriptedCall::new(index, id, "calculator", arguments)
}

fn expression(expr: &str) -> String {
    json!({ "expression": expr }).to_string()
}

/// A final round: these content tokens, finish `stop`.
fn answer_round(tokens: &[&str]) -> Reply {
    Script::new().contents(tokens).reply("stop")
}

/// Sends `message` in a new conversation; returns the request id.
fn ask(c: &mut Client, message: &str) -> String {
    c.ask(None, message).0
}

/// Every frame of `request` up to its `done` or `error`, in order.
fn frames_of(c: &mut Client, request: &str) -> Vec<Value> {
    let mut frames = Vec::new();
    loop {
        let v = c.recv_matching(|v| v["request"] == request);
        let end = v["type"] == "done" || v["type"] == "error";
        frames.push(v);
        if end {
            return frames;
        }
    }
}

/// What `frames` add up to, in the shape the other tests use.
fn answer_of(request: &str, frames: &[Value]) -> Answer {
    let mut answer = Answer {
        request: request.to_owned(),
        role: None,
        seqs: Vec::new(),
        text: String::new(),
        end: frames.last().cloned().unwrap_or(Value::Null),
    };
    for f in frames {
        match f["type"].as_str() {
            Some("start") => answer.role = f["role"].as_str().map(str::to_owned),
            Some("token") => {
                answer.seqs.push(f["seq"].as_u64().expect("a seq"));
                answer.text.push_str(f["text"].as_str().expect("a text"));
            }
            _ => {}
        }
    }
    answer
}

/// Asserts the request ended with `done` and its tokens are one
/// contiguous run that `done.tokens` counts.
fn assert_done(answer: &Answer) {
    assert!(answer.is_done(), "{}", answer.end);
    answer.assert_contiguous();
    assert_eq!(
        answer.end["tokens"],
        json!(answer.seqs.len()),
        "done.tokens counts every token of every round"
    );
}

/// The `tool` frames of one phase, in order.
fn tool_frames<'a>(frames: &'a [Value], phase: &str) -> Vec<&'a Value> {
    frames
        .iter()
        .filter(|f| f["type"] == "tool" && f["phase"] == phase)
        .collect()
}

/// The `text` of each frame.
fn texts(frames: &[&Value]) -> Vec<String> {
    frames
        .iter()
        .map(|f| f["text"].as_str().expect("a text").to_owned())
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// The token texts, in order.
fn token_texts(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .filter(|f| f["type"] == "token")
        .map(|f| f["text"].as_str().expect("a text").to_owned())
        .collect()
}

fn position(frames: &[Value], what: impl Fn(&Value) -> bool) -> usize {
    frames.iter().position(what).expect("such a frame")
}

fn rposition(frames: &[Value], what: impl Fn(&Value) -> bool) -> usize {
    frames.iter().rposition(what).expect("such a frame")
}

fn messages(request: &Recorded) -> &[Value] {
    request.body["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages: {}", request.body))
}

/// Asserts `body` is a streamed round that offers the three built-in tools
/// as OpenAI functions, and lets the model choose.
fn assert_offers_tools(body: &Value) {
    assert_eq!(body["stream"], true, "{body}");
    assert_eq!(body["tool_choice"], "auto", "{body}");
    let tools = body["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("no tools offered: {body}"));
    let names: Vec<&str> = tools
        .iter()
        .map(|t| {
            assert_eq!(t["type"], "function", "{t}");
            let f = &t["function"];
            assert!(
                f["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{t}"
            );
            assert_eq!(f["parameters"]["type"], "object", "{t}");
            f["name"].as_str().expect("a function name")
        })
        .collect();
    assert_eq!(names, ["calculator", "clock", "search_history"]);
}

/// Asserts `body` is a streamed round with no `tools` and no `tool_choice`.
fn assert_offers_no_tools(body: &Value) {
    assert_eq!(body["stream"], true, "{body}");
    assert!(body.get("tools").is_none(), "tools offered: {body}");
    assert!(
        body.get("tool_choice").is_none(),
        "tool_choice sent: {body}"
    );
}

/// The assistant message a round with these calls is sent back as.
fn assert_assistant_calls(message: &Value, content: Value, calls: &[(&str, &str, &str)]) {
    assert_eq!(message["role"], "assistant", "{message}");
    assert_eq!(message["content"], content, "{message}");
    let expected: Vec<Value> = calls
        .iter()
        .map(|(id, name, arguments)| {
            json!({"id": id, "type": "function",
                   "function": {"name": name, "arguments": arguments}})
        })
        .collect();
    assert_eq!(message["tool_calls"], json!(expected), "{message}");
}

fn assert_tool_message(message: &Value, id: &str, content: &str) {
    assert_eq!(message["role"], "tool", "{message}");
    assert_eq!(message["tool_call_id"], id, "{message}");
    assert_eq!(message["content"], content, "{message}");
}

/// Asserts the next round starts with the previous round's prompt and
/// then adds exactly `added` messages; returns those.
fn added_messages<'a>(before: &Recorded, after: &'a Recorded, added: usize) -> &'a [Value] {
    let (old, new) = (messages(before), messages(after));
    assert_eq!(new.len(), old.len() + added, "{new:#?}");
    assert_eq!(&new[..old.len()], old, "the earlier prompt must be kept");
    &new[old.len()..]
}

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
    upstream.push(
        Script::new()
            .call(&calculator(0, "call_1", CALC_ARGS), 1)
            .reply("tool_calls"),
    );
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

/// What a call's result must be.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    /// This exact text.
    Is(&'static str),
    /// Text starting with `error:`.
    Error,
}

/// Streams `round` (finish `tool_calls`) to a chorus configured with
/// `extra`, then a final round, and checks that each call got the result
/// `expected` (by call id, in call order): as `tool` result frames, and as
/// `tool` messages in the next request. The request must end with `done`.
/// Returns the texts of the error results.
fn hostile_round(extra: &str, round: Script, expected: &[(&str, Outcome)]) -> Vec<String> {
    let upstream = Upstream::start();
    upstream.push(round.reply("tool_calls"));
    upstream.push(answer_round(&["Sorry", " about", " that."]));
    let server = chorus(&upstream, extra);
    let mut c = server.client();
    let request = ask(&mut c, "Try something odd");
    let frames = frames_of(&mut c, &request);
    let answer = answer_of(&request, &frames);
    assert_done(&answer);
    assert_eq!(answer.text, "Sorry about that.");

    // One result per call; the refused ones are errors, the others ran.
    let results = texts(&tool_frames(&frames, "result"));
    assert_eq!(results.len(), expected.len(), "{frames:#?}");
    let (errors, values): (Vec<String>, Vec<String>) =
        results.into_iter().partition(|t| t.starts_with("error:"));
    let expected_values: Vec<String> = expected
        .iter()
        .filter_map(|(_, o)| match o {
            Outcome::Is(text) => Some((*text).to_owned()),
            Outcome::Error => None,
        })
        .collect();
    assert_eq!(errors.len(), expected.len() - expected_values.len());
    assert_eq!(sorted(values), sorted(expected_values), "{frames:#?}");

    let requests = upstream.requests();
    assert_eq!(requests.len(), 2, "the request goes on to the next round");
    let added = added_messages(&requests[0], &requests[1], 1 + expected.len());
    assert_eq!(added[0]["role"], "assistant", "{:#?}", added[0]);
    let ids: Vec<&str> = added[0]["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("no tool_calls: {}", added[0]))
        .iter()
        .map(|c| c["id"].as_str().expect("a call id"))
        .collect();
    let expected_ids: Vec<&str> = expected.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, expected_ids);
    for ((id, outcome), message) in expected.iter().zip(&added[1..]) {
        assert_eq!(message["role"], "tool", "{message}");
        assert_eq!(message["tool_call_id"], *id, "{message}");
        let content = message["content"].as_str().expect("a content");
        match outcome {
            Outcome::Is(text) => assert_eq!(content, *text, "{message}"),
            Outcome::Error => assert!(content.starts_with("error:"), "{message}"),
        }
    }
    errors
}

#[test]
fn a_call_to_an_unknown_tool_gets_an_error_result() {
    let round = Script::new().call(
        &ScriptedCall::new(0, "call_1", "teleport", r#"{"to":"mars"}"#),
        4,
    );
    hostile_round("", round, &[("call_1", Outcome::Error)]);
}

#[test]
fn arguments_that_are_not_json_get_an_error_result() {
    let round = Script::new().call(&calculator(0, "call_1", "not json"), 2);
    hostile_round("", round, &[("call_1", Outcome::Error)]);
}

#[test]
fn arguments_over_max_argument_bytes_get_an_error_result() {
    let long = expression(&format!("{}1", "1+".repeat(40)));
    assert!(long.len() > 64);
    let round = Script::new().calls(
        &[
            calculator(0, "call_long", &long),
            calculator(1, "call_short", CALC_ARGS),
        ],
        8,
    );
    hostile_round(
        "[tools]\nmax_argument_bytes = 64\n",
        round,
        &[
            ("call_long", Outcome::Error),
            ("call_short", Outcome::Is(CALC_RESULT)),
        ],
    );
}

#[test]
fn calls_beyond_max_calls_get_an_error_result_naming_the_limit() {
    let round = Script::new().calls(
        &[
            calculator(0, "call_1", &expression("3*3")),
            calculator(1, "call_2", &expression("4*4")),
            calculator(2, "call_3", &expression("5*5")),
        ],
        64,
    );
    let errors = hostile_round(
        "[tools]\nmax_calls = 2\n",
        round,
        &[
            ("call_1", Outcome::Is("9")),
            ("call_2", Outcome::Is("16")),
            ("call_3", Outcome::Error),
        ],
    );
    assert!(
        errors[0].contains('2'),
        "the limit is not named: {errors:?}"
    );
}

#[test]
fn a_call_whose_index_jumps_gets_an_error_result() {
    let round = Script::new()
        .call(&calculator(0, "call_1", CALC_ARGS), 4)
        .call(&calculator(5, "call_2", &expression("1+1")), 4);
    hostile_round(
        "",
        round,
        &[
            ("call_1", Outcome::Is(CALC_RESULT)),
            ("call_2", Outcome::Error),
        ],
    );
}

#[test]
fn a_second_call_at_a_used_index_gets_an_error_result() {
    let round = Script::new()
        .call(&calculator(0, "call_1", CALC_ARGS), 4)
        .call_head(0, "call_2", "calculator", &expression("1+1"));
    hostile_round(
        "",
        round,
        &[
            ("call_1", Outcome::Is(CALC_RESULT)),
            ("call_2", Outcome::Error),
        ],
    );
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
    upstream.push(
        Script::new()
            .call(&calculator(0, "call_1", CALC_ARGS), 6)
            .reply("tool_calls"),
    );
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
    upstream.push(
        Script::new()
            .call(&calculator(0, "call_1", CALC_ARGS), 4)
            .reply("tool_calls"),
    );
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
