//! What the tests of tool rounds (`tests/upstream/tool_rounds.rs`,
//! `tests/upstream/tool_calls_hostile.rs`, and the tool chats of
//! `tests/upstream/upstream_connections.rs`) share: a chorus whose only
//! provider is a fake OpenAI upstream, the scripted rounds it streams, a
//! request's frames collected and taken apart, and assertions on what
//! chorus sent upstream in each round.

use std::time::Duration;

use serde_json::{json, Value};

use super::upstream::{Recorded, Reply, Script, ScriptedCall, Upstream};
use super::{Answer, Client, Server};

/// The calculator arguments most tests use, and their result.
pub const CALC_ARGS: &str = r#"{"expression":"2+3*4"}"#;
pub const CALC_RESULT: &str = "14";

/// Long enough for a request nobody should make to have arrived.
pub const QUIET: Duration = Duration::from_millis(400);

/// A chorus whose only upstream is `upstream`, with fast retries and
/// default tool settings; `extra` adds tables (e.g. `[tools]` keys).
pub fn chorus(upstream: &Upstream, extra: &str) -> Server {
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

pub fn calculator(index: u64, id: &str, arguments: &str) -> ScriptedCall {
    ScriptedCall::new(index, id, "calculator", arguments)
}

pub fn expression(expr: &str) -> String {
    json!({ "expression": expr }).to_string()
}

/// A round that only calls the calculator with [`CALC_ARGS`] (call `id`),
/// its arguments streamed `chunk` bytes at a time; finish `tool_calls`.
pub fn calculator_round(id: &str, chunk: usize) -> Reply {
    Script::new()
        .call(&calculator(0, id, CALC_ARGS), chunk)
        .reply("tool_calls")
}

/// A final round: these content tokens, finish `stop`.
pub fn answer_round(tokens: &[&str]) -> Reply {
    Script::new().contents(tokens).reply("stop")
}

/// Sends `message` in a new conversation; returns the request id.
pub fn ask(c: &mut Client, message: &str) -> String {
    c.ask(None, message).0
}

/// Every frame of `request` up to its `done` or `error`, in order.
pub fn frames_of(c: &mut Client, request: &str) -> Vec<Value> {
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
pub fn answer_of(request: &str, frames: &[Value]) -> Answer {
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
pub fn assert_done(answer: &Answer) {
    assert!(answer.is_done(), "{}", answer.end);
    answer.assert_contiguous();
    assert_eq!(
        answer.end["tokens"],
        json!(answer.seqs.len()),
        "done.tokens counts every token of every round"
    );
}

/// The `tool` frames of one phase, in order.
pub fn tool_frames<'a>(frames: &'a [Value], phase: &str) -> Vec<&'a Value> {
    frames
        .iter()
        .filter(|f| f["type"] == "tool" && f["phase"] == phase)
        .collect()
}

/// The `text` of each frame.
pub fn texts(frames: &[&Value]) -> Vec<String> {
    frames
        .iter()
        .map(|f| f["text"].as_str().expect("a text").to_owned())
        .collect()
}

pub fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// The token texts, in order.
pub fn token_texts(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .filter(|f| f["type"] == "token")
        .map(|f| f["text"].as_str().expect("a text").to_owned())
        .collect()
}

pub fn position(frames: &[Value], what: impl Fn(&Value) -> bool) -> usize {
    frames.iter().position(what).expect("such a frame")
}

pub fn rposition(frames: &[Value], what: impl Fn(&Value) -> bool) -> usize {
    frames.iter().rposition(what).expect("such a frame")
}

pub fn messages(request: &Recorded) -> &[Value] {
    request.body["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages: {}", request.body))
}

/// Asserts `body` is a streamed round that offers the three built-in tools
/// as OpenAI functions, and lets the model choose.
pub fn assert_offers_tools(body: &Value) {
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
pub fn assert_offers_no_tools(body: &Value) {
    assert_eq!(body["stream"], true, "{body}");
    assert!(body.get("tools").is_none(), "tools offered: {body}");
    assert!(
        body.get("tool_choice").is_none(),
        "tool_choice sent: {body}"
    );
}

/// The assistant message a round with these calls is sent back as.
pub fn assert_assistant_calls(message: &Value, content: Value, calls: &[(&str, &str, &str)]) {
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

pub fn assert_tool_message(message: &Value, id: &str, content: &str) {
    assert_eq!(message["role"], "tool", "{message}");
    assert_eq!(message["tool_call_id"], id, "{message}");
    assert_eq!(message["content"], content, "{message}");
}

/// Asserts the next round starts with the previous round's prompt and
/// then adds exactly `added` messages; returns those.
pub fn added_messages<'a>(before: &Recorded, after: &'a Recorded, added: usize) -> &'a [Value] {
    let (old, new) = (messages(before), messages(after));
    assert_eq!(new.len(), old.len() + added, "{new:#?}");
    assert_eq!(&new[..old.len()], old, "the earlier prompt must be kept");
    &new[old.len()..]
}
