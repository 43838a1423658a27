//! The OpenAI-compatible HTTP API (`/v1/...`, docs/protocol.md) end to end:
//! the real chorus binary, in front of the loopback OpenAI-compatible
//! upstream of `common::upstream`, driven by the official OpenAI Python SDK
//! (the scripts of `tests/openai_sdk/`, run by `common::python`) and, for
//! the exact bytes on the wire, by a plain HTTP/1.1 client on a TcpStream
//! (`common::http1`).
//!
//! The SDK tests check what a client author relies on: answers equal to
//! what the upstream generated, one upstream call for identical concurrent
//! streams, the cache on a repeat and `Cache-Control: no-cache`, each
//! refusal raised as the SDK's own exception class, a client leaving
//! mid-stream aborting the upstream call, resuming a stream without a gap
//! or a duplicate, and keep-alive. The scripts report what they saw; the
//! assertions, and the counts taken on the server's side (the upstream's
//! requests, `/api/stats`), are here.
//!
//! The raw tests check the event-stream bytes (`id:` equal to `seq`,
//! `data: [DONE]`, chunked encoding, the error event after the stream
//! began) and every refusal of the contract (400 naming the field, 401,
//! 404, 405, 413).

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::http1::{Conn, Event, Response};
use common::python::{self, Script};
use common::upstream::{Reply, Upstream};
use common::{eventually, Server, WAIT};
use serde_json::{json, Value};

/// The model chorus is configured with, which clients ask for.
const MODEL: &str = "test-model";
/// What the SDK sends as its key to a chorus without `auth_tokens`.
const ANY_KEY: &str = "sk-unused";
/// The one token of a chorus with `auth_tokens`.
const TOKEN: &str = "sk-chorus-test-3b1f";

/// A chorus whose provider is `upstream`, with default settings otherwise;
/// `extra` adds whole tables.
fn chorus(upstream: &Upstream, extra: &str) -> Server {
    Server::start(&format!(
        "[llm]\nprovider = \"openai\"\nbase_url = \"{}\"\nmodel = \"{MODEL}\"\n{extra}",
        upstream.base_url()
    ))
}

/// What the SDK takes as its base URL.
fn base_url(server: &Server) -> String {
    format!("http://{}/v1", server.addr)
}

fn strings(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| (*w).to_owned()).collect()
}

/// An upstream answer of `words`, `delay` before each, with usage
/// `prompt` + `words.len()` tokens.
fn answer(words: &[&str], delay: Duration, prompt: u64) -> Reply {
    Reply::Stream {
        tokens: strings(words),
        delay,
        finish: "stop",
        usage: Some((prompt, words.len() as u64)),
    }
}

/// The usage object an OpenAI client reads for `prompt` + `completion`.
fn usage(prompt: u64, completion: u64) -> (u64, u64, u64) {
    (prompt, completion, prompt + completion)
}

fn usage_of(report: &Value) -> (u64, u64, u64) {
    let u = &report["usage"];
    let field = |name: &str| {
        u[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no usage.{name} in {report}"))
    };
    (
        field("prompt_tokens"),
        field("completion_tokens"),
        field("total_tokens"),
    )
}

/// `chat.py` with the synchronous or asyncio client: one report per step.
fn chat_steps(server: &Server, client: &str, steps: Value) -> Vec<Value> {
    let params = json!({"client": client, "model": MODEL, "steps": steps});
    let out = python::run("chat.py", &base_url(server), ANY_KEY, &params);
    out["steps"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| panic!("chat.py reported no steps: {out}"))
}

/// `errors.py` with `cases`: one report per case.
fn error_cases(server: &Server, key: &str, question: &str, cases: &[&str]) -> Value {
    let params = json!({
        "model": MODEL,
        "question": question,
        "cases": cases,
        "oversize_bytes": 2 << 20,
    });
    python::run("errors.py", &base_url(server), key, &params)
}

/// The request id of a report, checked to look like one.
fn request_of(report: &Value) -> String {
    let request = report["chorus_request"]
        .as_str()
        .unwrap_or_else(|| panic!("no X-Chorus-Request header: {report}"));
    assert!(
        request.starts_with("r-") && request.len() > 2,
        "X-Chorus-Request is not a request id: {request}"
    );
    request.to_owned()
}

/// Asserts that every completion id in `report` is `chatcmpl-<request>`.
fn assert_completion_id(report: &Value) {
    let request = request_of(report);
    assert_eq!(
        report["ids"],
        json!([format!("chatcmpl-{request}")]),
        "the completion id must be chatcmpl-<X-Chorus-Request>: {report}"
    );
}

/// `upstream.calls` of `/api/stats`.
fn upstream_calls(server: &Server) -> u64 {
    server.stats()["upstream"]["calls"]
        .as_u64()
        .expect("upstream.calls in /api/stats")
}

/// Asserts that an SDK case raised `class` with `status`.
fn assert_raised(reports: &Value, case: &str, class: &str, status: u64) {
    let report = &reports[case];
    assert_eq!(
        report["raised"], class,
        "{case}: expected the SDK to raise {class}: {report}"
    );
    assert_eq!(report["status"], status, "{case}: {report}");
}

/// Whether `text` has `word` standing alone: not inside a longer name.
fn has_word(text: &str, word: &str) -> bool {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(word).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        !before.is_some_and(is_name) && !after.is_some_and(is_name)
    })
}

/// Asserts an OpenAI error object (`{"message","type","code"}`) with
/// `code`, whose message (or `param`, where given) names `field`.
fn assert_names_field(error: &Value, code: &str, field: &str) {
    assert_eq!(error["code"], code, "{error}");
    assert!(error["type"].is_string(), "no error type: {error}");
    let message = error["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message: {error}"));
    let param = error["param"].as_str().unwrap_or("");
    assert!(
        has_word(message, field) || has_word(param, field),
        "the error does not name the field `{field}`: {error}"
    );
}

// ---------------------------------------------------------------------
// Through the official OpenAI Python SDK.
// ---------------------------------------------------------------------

#[test]
fn sdk_plain_chat_is_what_the_upstream_generated_and_goes_upstream_as_given() {
    let upstream = Upstream::start();
    upstream.push(answer(
        &["The", " answer", " is", " 42."],
        Duration::ZERO,
        17,
    ));
    let server = chorus(&upstream, "");
    let question = "What is the answer?";
    let steps = chat_steps(&server, "sync", json!([{"question": question}]));
    let step = &steps[0];

    assert_eq!(step["status"], 200, "{step}");
    assert_eq!(step["object"], "chat.completion", "{step}");
    assert_eq!(step["choices"], 1, "{step}");
    assert_eq!(step["role"], "assistant", "{step}");
    assert_eq!(step["text"], "The answer is 42.", "{step}");
    assert_eq!(step["finish_reason"], "stop", "{step}");
    assert_eq!(step["chorus_role"], "leader", "{step}");
    assert_completion_id(step);
    assert_eq!(
        usage_of(step),
        usage(17, 4),
        "usage as the upstream reported it"
    );

    let sent = upstream.requests();
    assert_eq!(sent.len(), 1, "one upstream call");
    let body = &sent[0].body;
    assert_eq!(body["model"], MODEL);
    assert_eq!(
        body["messages"],
        json!([{"role": "user", "content": question}]),
        "the messages go upstream as given: no system prompt, no history"
    );
    for option in [
        "tools",
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "seed",
        "user",
    ] {
        assert!(
            body.get(option).is_none(),
            "chorus added `{option}`, which the client did not send: {body}"
        );
    }
    assert_eq!(upstream_calls(&server), 1);
}

#[test]
fn sdk_streamed_chat_has_one_chunk_per_token_one_completion_id_and_usage() {
    let upstream = Upstream::start();
    let words = ["Stream", "ing", " one", " token", " at", " a", " time"];
    upstream.push(answer(&words, Duration::from_millis(5), 11));
    let server = chorus(&upstream, "");
    let steps = chat_steps(
        &server,
        "sync",
        json!([{"question": "Stream please", "stream": true, "include_usage": true}]),
    );
    let step = &steps[0];

    assert_eq!(step["status"], 200, "{step}");
    assert!(
        step["content_type"]
            .as_str()
            .is_some_and(|t| t.starts_with("text/event-stream")),
        "{step}"
    );
    assert_eq!(step["object"], "chat.completion.chunk", "{step}");
    assert_eq!(
        step["deltas"],
        json!(words),
        "one chunk per token, in order"
    );
    assert_eq!(step["text"], words.concat());
    assert_eq!(step["finish_reason"], "stop", "{step}");
    assert_eq!(step["chorus_role"], "leader", "{step}");
    assert_completion_id(step);
    assert_eq!(usage_of(step), usage(11, 7), "the usage chunk");
    assert_eq!(upstream.requests().len(), 1);
}

#[test]
fn sdk_async_client_lists_the_model_and_gets_plain_and_streamed_answers() {
    let upstream = Upstream::start();
    upstream.push(answer(&["Async", " plain"], Duration::ZERO, 5));
    upstream.push(answer(&["Async", " streamed"], Duration::from_millis(5), 6));
    let server = chorus(&upstream, "");
    let steps = chat_steps(
        &server,
        "async",
        json!([
            {"models": true},
            {"question": "First"},
            {"question": "Second", "stream": true, "include_usage": true},
        ]),
    );

    let models = steps[0]["models"].as_array().expect("model ids");
    assert!(
        models.contains(&json!(MODEL)),
        "/v1/models must list the configured model: {}",
        steps[0]
    );
    let plain = &steps[1];
    assert_eq!(plain["text"], "Async plain", "{plain}");
    assert_eq!(plain["finish_reason"], "stop", "{plain}");
    assert_completion_id(plain);
    assert_eq!(usage_of(plain), usage(5, 2));
    let streamed = &steps[2];
    assert_eq!(
        streamed["deltas"],
        json!(["Async", " streamed"]),
        "{streamed}"
    );
    assert_eq!(streamed["finish_reason"], "stop", "{streamed}");
    assert_completion_id(streamed);
    assert_eq!(usage_of(streamed), usage(6, 2));
    assert_eq!(upstream.requests().len(), 2);
}

#[test]
fn sdk_twenty_identical_concurrent_streams_are_one_upstream_call() {
    const STREAMS: usize = 20;
    let upstream = Upstream::start();
    let words = ["Shared", " by", " all", " twenty"];
    upstream.push(answer(&words, Duration::from_millis(5), 9));
    // The upstream answers only once every stream has joined, so none can
    // come late and find the answer cached instead.
    upstream.hold();
    let server = chorus(&upstream, "");
    let params = json!({"model": MODEL, "question": "Same for everyone", "count": STREAMS});
    let mut script = Script::spawn("identical_streams.py", &base_url(&server), ANY_KEY, &params);
    let deadline = Instant::now() + WAIT;
    loop {
        let stats = server.stats();
        let followers = stats["requests"]["follower"].as_u64().unwrap_or(0);
        if upstream.requests().len() == 1 && followers == STREAMS as u64 - 1 {
            break;
        }
        if script.exited() || Instant::now() >= deadline {
            upstream.release();
            let out = script.finish();
            panic!(
                "the streams did not all join one upstream call: {} upstream requests, \
                 stats {stats}; the script reported {out}",
                upstream.requests().len()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    upstream.release();
    let out = script.finish();

    let answers = out["answers"].as_array().expect("answers");
    assert_eq!(answers.len(), STREAMS, "{out}");
    let mut roles = Vec::new();
    let mut requests = BTreeSet::new();
    for a in answers {
        assert_eq!(a["status"], 200, "{a}");
        assert_eq!(
            a["text"],
            words.concat(),
            "every stream gets the whole answer"
        );
        assert_eq!(a["finish_reason"], "stop", "{a}");
        assert_completion_id(a);
        requests.insert(request_of(a));
        roles.push(a["chorus_role"].as_str().unwrap_or("none").to_owned());
    }
    assert_eq!(requests.len(), STREAMS, "each HTTP request has its own id");
    let leaders = roles.iter().filter(|r| *r == "leader").count();
    let followers = roles.iter().filter(|r| *r == "follower").count();
    assert_eq!((leaders, followers), (1, STREAMS - 1), "roles: {roles:?}");
    assert_eq!(upstream.requests().len(), 1, "exactly one upstream call");
    assert_eq!(upstream_calls(&server), 1);
}

#[test]
fn sdk_a_repeated_question_comes_from_the_cache_without_an_upstream_call() {
    let upstream = Upstream::start();
    upstream.push(answer(&["Cached", " once"], Duration::ZERO, 8));
    let server = chorus(&upstream, "");
    let question = "Ask me twice";
    let steps = chat_steps(
        &server,
        "sync",
        json!([
            {"question": question},
            {"question": question},
            {"question": question, "stream": true, "include_usage": true},
        ]),
    );

    assert_eq!(steps[0]["chorus_role"], "leader", "{}", steps[0]);
    for repeat in &steps[1..] {
        assert_eq!(repeat["status"], 200, "{repeat}");
        assert_eq!(
            repeat["chorus_role"], "cache",
            "a repeat after the answer completed: {repeat}"
        );
        assert_eq!(repeat["text"], "Cached once", "{repeat}");
        assert_eq!(repeat["finish_reason"], "stop", "{repeat}");
        assert_eq!(
            usage_of(repeat),
            usage(8, 2),
            "usage is the generation's, whatever the role"
        );
        assert_completion_id(repeat);
    }
    let ids: BTreeSet<String> = steps.iter().map(request_of).collect();
    assert_eq!(ids.len(), 3, "each request has its own id");
    assert_eq!(upstream.requests().len(), 1, "no new upstream call");
    let stats = server.stats();
    assert_eq!(stats["upstream"]["calls"], 1);
    assert_eq!(stats["requests"]["cache"], 2, "{stats}");
}

#[test]
fn sdk_no_cache_header_makes_a_new_upstream_call() {
    let upstream = Upstream::start();
    upstream.push(answer(&["First", " take"], Duration::ZERO, 4));
    upstream.push(answer(&["Second", " take"], Duration::ZERO, 4));
    let server = chorus(&upstream, "");
    let question = "Roll again";
    let steps = chat_steps(
        &server,
        "sync",
        json!([
            {"question": question},
            {"question": question, "no_cache": true},
            {"question": question, "stream": true, "no_cache": true},
            {"question": question},
        ]),
    );

    assert_eq!(steps[0]["text"], "First take", "{}", steps[0]);
    assert_eq!(steps[1]["chorus_role"], "leader", "fresh: {}", steps[1]);
    assert_eq!(steps[1]["text"], "Second take", "fresh: {}", steps[1]);
    assert_eq!(steps[2]["chorus_role"], "leader", "fresh: {}", steps[2]);
    assert_eq!(
        steps[2]["text"], "Hello from upstream",
        "fresh: {}",
        steps[2]
    );
    assert_eq!(
        upstream.requests().len(),
        3,
        "each no-cache request is a new upstream call"
    );
    // Without the header the cache answers again, with whichever complete
    // answer it kept.
    let last = &steps[3];
    assert_eq!(last["chorus_role"], "cache", "{last}");
    let kept = ["First take", "Second take", "Hello from upstream"];
    assert!(
        kept.iter().any(|t| last["text"] == *t),
        "the cache answered with something no generation produced: {last}"
    );
    assert_eq!(upstream_calls(&server), 3);
}

#[test]
fn sdk_refusals_raise_the_sdk_exception_classes() {
    let upstream = Upstream::start();
    let server = chorus(&upstream, "");
    let reports = error_cases(
        &server,
        ANY_KEY,
        "Refuse me",
        &[
            "n",
            "tools",
            "image",
            "oversize",
            "unknown_endpoint",
            "stream_unknown",
            "raw_stream_unknown",
        ],
    );

    // The SDK hands over the body's `error` object as `body`.
    assert_raised(&reports, "n", "BadRequestError", 400);
    assert_names_field(&reports["n"]["body"], "bad_request", "n");
    assert_raised(&reports, "tools", "BadRequestError", 400);
    assert_names_field(&reports["tools"]["body"], "bad_request", "tools");
    assert_raised(&reports, "image", "BadRequestError", 400);
    assert_names_field(&reports["image"]["body"], "bad_request", "content");
    // The SDK has no class of its own for 413: its base status error.
    assert_raised(&reports, "oversize", "APIStatusError", 413);
    assert_eq!(
        reports["oversize"]["body"]["code"], "too_large",
        "{reports}"
    );
    assert_raised(&reports, "unknown_endpoint", "NotFoundError", 404);
    assert_raised(&reports, "stream_unknown", "NotFoundError", 404);
    assert_eq!(reports["stream_unknown"]["body"]["code"], "not_found");
    let raw = &reports["raw_stream_unknown"];
    assert_eq!(raw["status"], 404, "{raw}");
    assert_eq!(raw["body"]["error"]["code"], "not_found", "{raw}");
    assert!(
        upstream.requests().is_empty(),
        "a refused request must not reach the upstream"
    );
}

#[test]
fn sdk_wrong_key_raises_authentication_error_and_the_right_one_works() {
    let upstream = Upstream::start();
    upstream.push(answer(&["Let", " in"], Duration::ZERO, 3));
    let server = chorus(
        &upstream,
        &format!("[server]\nauth_tokens = [\"{TOKEN}\"]\n"),
    );
    let reports = error_cases(&server, "sk-wrong", "Let me in", &["chat", "stream"]);
    assert_raised(&reports, "chat", "AuthenticationError", 401);
    assert_raised(&reports, "stream", "AuthenticationError", 401);
    assert!(upstream.requests().is_empty());

    let params = json!({"client": "sync", "model": MODEL, "steps": [{"question": "Let me in"}]});
    let out = python::run("chat.py", &base_url(&server), TOKEN, &params);
    assert_eq!(out["steps"][0]["text"], "Let in", "{out}");
}

/// A chorus with one slot in every stage whose prepared queue is full: one
/// WebSocket chat streams (its upstream call stalls until the test ends),
/// one waits for the streaming slot. Returns the server, the upstream and
/// the WebSocket client that holds them.
fn overloaded_chorus() -> (Server, Upstream, common::Client) {
    let upstream = Upstream::start();
    upstream.push(Reply::StallAfter {
        tokens: strings(&["busy"]),
    });
    let server = chorus(
        &upstream,
        r#"
[workers]
cache_workers = 1
max_concurrent_leaders = 1
max_concurrent_llm_streams = 1
prepare_queue = 1
prepared_queue = 1
[tools]
enabled = false
"#,
    );
    let mut ws = server.client();
    let (streaming, _) = ws.ask(None, "first");
    ws.recv_matching(|v| v["request"] == streaming.as_str() && v["type"] == "token");
    let (waiting, _) = ws.ask(None, "second");
    ws.recv_matching(|v| v["request"] == waiting.as_str() && v["state"] == "waiting_stream");
    (server, upstream, ws)
}

/// Asserts that `case` was refused with 429 `overloaded` and a
/// `Retry-After` in seconds or as a date.
fn assert_overloaded(reports: &Value, case: &str) {
    assert_raised(reports, case, "RateLimitError", 429);
    let report = &reports[case];
    assert_eq!(report["body"]["code"], "overloaded", "{report}");
    let retry_after = report["retry_after"]
        .as_str()
        .unwrap_or_else(|| panic!("429 without Retry-After: {report}"));
    assert!(
        retry_after.trim().parse::<u64>().is_ok() || retry_after.contains("GMT"),
        "Retry-After is neither seconds nor a date: {retry_after:?}"
    );
}

#[test]
fn sdk_overload_raises_rate_limit_error_with_retry_after() {
    let (server, upstream, _ws) = overloaded_chorus();
    let reports = error_cases(&server, ANY_KEY, "third", &["chat"]);
    assert_overloaded(&reports, "chat");
    assert_eq!(server.stats()["requests"]["overloaded"], 1);
    assert_eq!(
        upstream.requests().len(),
        1,
        "only the first chat went upstream"
    );
}

/// A streamed chat refused for a full queue has produced nothing yet: the
/// contract's `429` with `Retry-After` (which the SDK raises as
/// `RateLimitError`, and retries after the delay when retries are on)
/// rather than a `200` whose only event is the error.
#[test]
fn sdk_overload_of_a_streamed_chat_raises_rate_limit_error_too() {
    let (server, upstream, _ws) = overloaded_chorus();
    let reports = error_cases(&server, ANY_KEY, "third", &["stream"]);
    assert_eq!(reports["stream"]["text"], "", "{reports}");
    assert_overloaded(&reports, "stream");
    assert_eq!(server.stats()["requests"]["overloaded"], 1);
    assert_eq!(
        upstream.requests().len(),
        1,
        "only the first chat went upstream"
    );
}

#[test]
fn sdk_client_leaving_mid_stream_aborts_the_upstream_call() {
    let upstream = Upstream::start();
    // A steady stream that would run for 10 s: the client leaves after two
    // tokens, and chorus may notice at once or at its next write.
    let words: Vec<String> = (0..200).map(|i| format!(" t{i}")).collect();
    upstream.push(Reply::Stream {
        tokens: words,
        delay: Duration::from_millis(50),
        finish: "stop",
        usage: None,
    });
    let server = chorus(&upstream, "");
    let params = json!({"model": MODEL, "question": "Tell me a long story", "read": 2});
    let out = python::run("disconnect.py", &base_url(&server), ANY_KEY, &params);
    assert_eq!(out["status"], 200, "{out}");
    assert_eq!(out["text"], " t0 t1", "{out}");
    request_of(&out);

    // Nobody else is attached: after the orphan grace (default 5 s) chorus
    // aborts the call, and the upstream sees its connection closed long
    // before its stream would have ended.
    assert!(
        upstream.wait_disconnects(1, WAIT),
        "the upstream call was not aborted after the client left; log:\n{}",
        server.log()
    );
    eventually("/api/stats counts the aborted upstream call", || {
        server.stats()["upstream"]["aborted"] == 1
    });
    assert_eq!(upstream.requests().len(), 1);
}

#[test]
fn sdk_resuming_a_stream_with_last_event_id_loses_and_repeats_nothing() {
    let upstream = Upstream::start();
    let words: Vec<String> = (0..12).map(|i| format!(" w{i}")).collect();
    let refs: Vec<&str> = words.iter().map(String::as_str).collect();
    // Slow enough that the reconnect finds the generation still running:
    // part of what follows is replayed, the rest comes live.
    upstream.push(answer(&refs, Duration::from_millis(100), 7));
    let server = chorus(&upstream, "");
    let params = json!({"model": MODEL, "question": "Count for me", "read": 3});
    let out = python::run("resume.py", &base_url(&server), ANY_KEY, &params);

    let request = request_of(&out["first"]);
    assert_eq!(out["last_event_id"], "2", "ids start at 0: {out}");
    let resumed = &out["resumed"];
    assert_eq!(resumed["status"], 200, "{out}");
    assert!(
        resumed["content_type"]
            .as_str()
            .is_some_and(|t| t.starts_with("text/event-stream")),
        "{resumed}"
    );
    let before = out["before"].as_array().expect("events before");
    let after = out["after"].as_array().expect("events after");
    let tokens: Vec<&Value> = before
        .iter()
        .chain(after)
        .filter(|e| !e["id"].is_null())
        .collect();
    let ids: Vec<String> = tokens
        .iter()
        .map(|e| e["id"].as_str().unwrap_or("?").to_owned())
        .collect();
    let expected: Vec<String> = (0..words.len()).map(|i| i.to_string()).collect();
    assert_eq!(ids, expected, "ids before and after the reconnect: {out}");
    let text: String = tokens
        .iter()
        .map(|e| e["content"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(text, words.concat(), "the answer, whole and once");
    for event in before
        .iter()
        .chain(after)
        .filter(|e| e.get("chunk_id").is_some())
    {
        assert_eq!(event["chunk_id"], format!("chatcmpl-{request}"), "{event}");
    }
    assert!(
        after.iter().all(|e| e.get("error").is_none()),
        "error after the reconnect: {out}"
    );
    assert!(
        after.iter().any(|e| e["finish_reason"] == "stop"),
        "no finish_reason after the reconnect: {out}"
    );
    assert_eq!(after.last(), Some(&json!({"done": true})), "{out}");
    assert_eq!(upstream.requests().len(), 1);
    assert_eq!(upstream.disconnects(), 0, "the generation ran to its end");
}

#[test]
fn sdk_requests_reuse_one_keep_alive_connection() {
    let upstream = Upstream::start();
    let server = chorus(&upstream, "");
    // The synchronous client reuses a connection after a whole body; the
    // asyncio client also after a stream (it reads on to the last chunk
    // after `[DONE]`, which the synchronous one does not wait for).
    let sync = chat_steps(
        &server,
        "sync",
        json!([
            {"question": "k1"}, {"question": "k2"}, {"question": "k3"}, {"question": "k4"},
        ]),
    );
    let asyncio = chat_steps(
        &server,
        "async",
        json!([
            {"question": "k5", "stream": true},
            {"question": "k6", "stream": true},
            {"question": "k7"},
            {"question": "k8", "stream": true},
            {"question": "k9"},
        ]),
    );
    for (client, steps) in [("sync", &sync), ("async", &asyncio)] {
        let ports: BTreeSet<u64> = steps
            .iter()
            .map(|s| {
                assert_eq!(s["status"], 200, "{s}");
                assert_eq!(s["text"], "Hello from upstream", "{s}");
                s["port"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("no client port: {s}"))
            })
            .collect();
        assert_eq!(
            ports.len(),
            1,
            "{client}: {} requests in a row should share one connection, used {ports:?}",
            steps.len()
        );
    }
    assert_eq!(upstream.requests().len(), 9);
}

#[test]
fn sdk_an_error_after_the_stream_began_raises_api_error_after_the_tokens() {
    let upstream = Upstream::start();
    upstream.push(Reply::ResetAfter {
        tokens: strings(&["half", " an"]),
        delay: Duration::from_millis(20),
    });
    let server = chorus(&upstream, "");
    let reports = error_cases(&server, ANY_KEY, "Break off", &["broken_stream"]);
    let report = &reports["broken_stream"];
    // An error event in a stream is the SDK's APIError, not a status error.
    assert_eq!(report["raised"], "APIError", "{report}");
    assert_eq!(report["status"], Value::Null, "{report}");
    assert_eq!(
        report["text"], "half an",
        "the tokens before the error: {report}"
    );
    assert_eq!(report["body"]["code"], "upstream_error", "{report}");
}

// ---------------------------------------------------------------------
// The bytes on the wire, with a plain HTTP/1.1 client.
// ---------------------------------------------------------------------

/// A chat completion request body.
fn chat_body(question: &str, stream: bool) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": question}], "stream": stream})
}

/// The events of a stream that carry an `id:` (the tokens) and the others.
fn split_tokens(events: &[Event]) -> (Vec<&Event>, Vec<&Event>) {
    events.iter().partition(|e| e.id.is_some())
}

/// The `finish_reason` of an event's chunk, if it has one.
fn finish_of(event: &Event) -> Option<String> {
    if event.data == "[DONE]" {
        return None;
    }
    event.json()["choices"][0]["finish_reason"]
        .as_str()
        .map(str::to_owned)
}

/// Asserts a 200 event stream with chorus's headers; returns the request.
fn assert_stream_head(response: &Response) -> String {
    assert_eq!(
        response.status,
        200,
        "{}\n{}",
        response.head,
        response.text()
    );
    assert!(
        response
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/event-stream")),
        "{}",
        response.head
    );
    let request = response
        .header("x-chorus-request")
        .unwrap_or_else(|| panic!("no X-Chorus-Request: {}", response.head));
    assert!(request.starts_with("r-"), "{}", response.head);
    request.to_owned()
}

/// Asserts an OpenAI error body with `status` and, if given, `code`.
fn assert_error(response: &Response, status: u16, code: Option<&str>) -> Value {
    assert_eq!(
        response.status,
        status,
        "{}\n{}",
        response.head,
        response.text()
    );
    let body = response.json();
    let error = &body["error"];
    assert!(error["message"].is_string(), "no error.message: {body}");
    assert!(error["type"].is_string(), "no error.type: {body}");
    if let Some(code) = code {
        assert_eq!(error["code"], code, "{body}");
    }
    error.clone()
}

#[test]
fn raw_stream_is_chunked_sse_with_ids_equal_to_seq_and_ends_with_done() {
    let upstream = Upstream::start();
    let words = ["a", "b", "c", "d", "e"];
    upstream.push(answer(&words, Duration::from_millis(2), 3));
    let server = chorus(&upstream, "");
    let mut conn = Conn::connect(server.addr);
    let mut body = chat_body("Spell it", true);
    body["stream_options"] = json!({"include_usage": true});
    let response = conn.post_json("/v1/chat/completions", &[], &body);

    let request = assert_stream_head(&response);
    assert_eq!(
        response.header("x-chorus-role"),
        Some("leader"),
        "{}",
        response.head
    );
    assert!(
        response.chunked,
        "streamed responses use chunked encoding: {}",
        response.head
    );
    assert!(
        response.header("content-length").is_none(),
        "{}",
        response.head
    );
    let events = response.events();
    let (tokens, others) = split_tokens(&events);

    let ids: Vec<&str> = tokens.iter().filter_map(|e| e.id.as_deref()).collect();
    assert_eq!(ids, ["0", "1", "2", "3", "4"], "id: is the token's seq");
    for (event, word) in tokens.iter().zip(words) {
        let chunk = event.json();
        assert_eq!(chunk["object"], "chat.completion.chunk", "{chunk}");
        assert_eq!(chunk["id"], format!("chatcmpl-{request}"), "{chunk}");
        assert_eq!(chunk["choices"][0]["delta"]["content"], word, "{chunk}");
    }
    // Events without an id carry no text: the opening role chunk, the
    // finish, the usage and the terminator.
    let last = events.last().expect("events");
    assert_eq!(last.data, "[DONE]", "the stream ends with data: [DONE]");
    assert_eq!(
        events.iter().filter(|e| e.data == "[DONE]").count(),
        1,
        "one [DONE]"
    );
    let chunks: Vec<Value> = others
        .iter()
        .filter(|e| e.data != "[DONE]")
        .map(|e| e.json())
        .collect();
    for chunk in &chunks {
        let content = chunk["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap_or("");
        assert!(content.is_empty(), "text in an event without id: {chunk}");
    }
    let finish_at = events
        .iter()
        .position(|e| e.id.is_none() && finish_of(e).as_deref() == Some("stop"))
        .unwrap_or_else(|| panic!("no finish_reason stop: {events:?}"));
    let last_token_at = events.iter().rposition(|e| e.id.is_some()).unwrap_or(0);
    assert!(
        finish_at > last_token_at,
        "the finish comes after the tokens"
    );
    let usage_chunk = chunks
        .iter()
        .find(|c| c["usage"].is_object())
        .unwrap_or_else(|| panic!("no usage chunk: {events:?}"));
    assert_eq!(usage_chunk["choices"], json!([]), "{usage_chunk}");
    assert_eq!(
        usage_chunk["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}),
        "{usage_chunk}"
    );

    // The connection is kept for the next request.
    let models = conn.get("/v1/models", &[]);
    assert_eq!(models.status, 200, "{}", models.head);
}

#[test]
fn raw_an_error_after_the_stream_began_is_a_last_data_event_without_done() {
    let upstream = Upstream::start();
    upstream.push(Reply::ResetAfter {
        tokens: strings(&["half", " an"]),
        delay: Duration::from_millis(20),
    });
    let server = chorus(&upstream, "");
    let mut conn = Conn::connect(server.addr);
    let response = conn.post_json("/v1/chat/completions", &[], &chat_body("Break", true));

    assert_stream_head(&response);
    assert!(response.chunked, "{}", response.head);
    let events = response.events();
    let (tokens, _) = split_tokens(&events);
    let ids: Vec<&str> = tokens.iter().filter_map(|e| e.id.as_deref()).collect();
    assert_eq!(ids, ["0", "1"], "{events:?}");
    let last = events.last().expect("events").json();
    let error = &last["error"];
    assert_eq!(error["code"], "upstream_error", "the last event: {last}");
    assert!(error["message"].is_string(), "{last}");
    assert!(error["type"].is_string(), "{last}");
    assert!(
        events.iter().all(|e| e.data != "[DONE]"),
        "no [DONE] after an error: {events:?}"
    );
}

#[test]
fn raw_refusals_are_400_naming_the_field_and_n_1_is_fine() {
    let upstream = Upstream::start();
    let server = chorus(&upstream, "");
    let user = |content: Value| json!([{"role": "user", "content": content}]);
    let tool =
        json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    let image = json!([
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
    ]);
    let cases = [
        (
            "n",
            json!({"model": MODEL, "messages": user(json!("Hi")), "n": 2}),
        ),
        (
            "n",
            json!({"model": MODEL, "messages": user(json!("Hi")), "n": 0}),
        ),
        ("content", json!({"model": MODEL, "messages": user(image)})),
        (
            "tools",
            json!({"model": MODEL, "messages": user(json!("Hi")), "tools": tool}),
        ),
    ];
    for (field, body) in &cases {
        let response = Conn::connect(server.addr).post_json("/v1/chat/completions", &[], body);
        let error = assert_error(&response, 400, Some("bad_request"));
        assert_names_field(&error, "bad_request", field);
    }
    assert!(
        upstream.requests().is_empty(),
        "a refusal reached the upstream"
    );

    // Text parts and `n: 1` are fine, and unknown fields are ignored.
    let parts = json!([{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]);
    let body = json!({"model": MODEL, "messages": user(parts), "n": 1, "logprobs": false, "x_unknown": {"a": 1}});
    let response = Conn::connect(server.addr).post_json("/v1/chat/completions", &[], &body);
    assert_eq!(
        response.status,
        200,
        "{}\n{}",
        response.head,
        response.text()
    );
    let completion = response.json();
    assert_eq!(completion["object"], "chat.completion", "{completion}");
    assert_eq!(
        completion["choices"][0]["message"]["content"],
        "Hello from upstream"
    );
    assert_eq!(upstream.requests().len(), 1);
}

#[test]
fn raw_a_body_over_one_mib_is_413_and_one_under_it_is_served() {
    let upstream = Upstream::start();
    let server = chorus(&upstream, "");

    // Just under the default limit (1 MiB), the bulk in an unknown field.
    let mut body = chat_body("Small question", false);
    body["padding"] = json!("p".repeat((1 << 20) - 1024));
    let mut conn = Conn::connect(server.addr);
    let response = conn.post_json("/v1/chat/completions", &[], &body);
    assert_eq!(
        response.status,
        200,
        "{}\n{}",
        response.head,
        response.text()
    );

    // Over it: the client may still be sending when the answer comes.
    let mut body = chat_body("Big question", false);
    body["padding"] = json!("p".repeat(2 << 20));
    let bytes = common::http1::request_bytes(
        server.addr,
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        Some(body.to_string().as_bytes()),
    );
    let mut conn = Conn::connect(server.addr);
    let mut writer = conn.tcp.try_clone().expect("clone the socket");
    let sender = std::thread::spawn(move || {
        use std::io::Write;
        // The server may stop reading once it has refused: not an error.
        let _ = writer.write_all(&bytes);
    });
    let response = conn.read_response();
    assert_error(&response, 413, Some("too_large"));
    drop(conn);
    let _ = sender.join();
    assert_eq!(
        upstream.requests().len(),
        1,
        "only the small body went upstream"
    );
}

#[test]
fn raw_unknown_paths_are_404_and_wrong_methods_405() {
    let upstream = Upstream::start();
    let server = chorus(&upstream, "");
    // A connection per request: these check the answers, not keep-alive.
    let conn = || Conn::connect(server.addr);

    for path in ["/v1/nope", "/v1/embeddings", "/v1/chat"] {
        let response = conn().post_json(path, &[], &chat_body("Hi", false));
        assert_eq!(response.status, 404, "POST {path}: {}", response.head);
    }
    let response = conn().get("/v1/chorus/streams/r-unknown", &[]);
    assert_error(&response, 404, Some("not_found"));

    let wrong = [
        ("GET", "/v1/chat/completions", "POST"),
        ("DELETE", "/v1/chat/completions", "POST"),
        ("POST", "/v1/models", "GET"),
    ];
    for (method, path, allowed) in wrong {
        let body = chat_body("Hi", false).to_string();
        let with_body = (method != "GET").then_some(body.as_bytes());
        let response = conn().request(method, path, &[], with_body);
        assert_eq!(response.status, 405, "{method} {path}: {}", response.head);
        assert!(
            response
                .header("allow")
                .is_some_and(|a| a.contains(allowed)),
            "{method} {path}: a 405 says what is allowed: {}",
            response.head
        );
    }
    assert!(upstream.requests().is_empty());
}

#[test]
fn raw_auth_tokens_guard_every_v1_path_and_nothing_else() {
    let upstream = Upstream::start();
    let server = chorus(
        &upstream,
        &format!("[server]\nauth_tokens = [\"{TOKEN}\"]\n"),
    );
    let conn = || Conn::connect(server.addr);
    let right = format!("Bearer {TOKEN}");
    let wrong = "Bearer sk-wrong".to_owned();
    let refused: [(&str, &str, Option<&str>); 6] = [
        ("POST", "/v1/chat/completions", None),
        ("POST", "/v1/chat/completions", Some(&wrong)),
        ("GET", "/v1/models", None),
        ("GET", "/v1/models", Some(&wrong)),
        ("GET", "/v1/chorus/streams/r-unknown", None),
        ("GET", "/v1/nope", None),
    ];
    for (method, path, auth) in refused {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let response = if method == "POST" {
            conn().post_json(path, &headers, &chat_body("Hi", false))
        } else {
            conn().get(path, &headers)
        };
        assert_error(&response, 401, None);
    }
    assert!(upstream.requests().is_empty());

    let headers = [("Authorization", right.as_str())];
    let response = conn().get("/v1/models", &headers);
    assert_eq!(response.status, 200, "{}", response.head);
    let response = conn().post_json("/v1/chat/completions", &headers, &chat_body("Hi", false));
    assert_eq!(
        response.status,
        200,
        "{}\n{}",
        response.head,
        response.text()
    );
    // The page and the operators' endpoints stay open.
    for path in ["/healthz", "/api/stats", "/metrics", "/"] {
        let (status, head, _) = server.get(path);
        assert_eq!(status, 200, "{path} needs no token: {head}");
    }
}

#[test]
fn raw_streams_endpoint_replays_a_finished_request_from_a_given_token() {
    let upstream = Upstream::start();
    let words = ["r0", "r1", "r2", "r3", "r4", "r5"];
    upstream.push(answer(&words, Duration::ZERO, 2));
    let server = chorus(&upstream, "");
    let mut conn = Conn::connect(server.addr);
    let first = conn.post_json("/v1/chat/completions", &[], &chat_body("Replay", true));
    let request = assert_stream_head(&first);
    assert_eq!(split_tokens(&first.events()).0.len(), words.len());

    let path = format!("/v1/chorus/streams/{request}");
    let replays = [
        (format!("{path}?from=2"), None, 2),
        (path.clone(), Some("3"), 4),
        (path.clone(), Some("5"), 6),
    ];
    for (target, last_event_id, from) in replays {
        let headers: Vec<(&str, &str)> = last_event_id
            .map(|id| ("Last-Event-ID", id))
            .into_iter()
            .collect();
        let response = Conn::connect(server.addr).get(&target, &headers);
        assert_stream_head(&response);
        let events = response.events();
        let (tokens, _) = split_tokens(&events);
        let ids: Vec<String> = tokens.iter().filter_map(|e| e.id.clone()).collect();
        let expected: Vec<String> = (from..words.len()).map(|i| i.to_string()).collect();
        assert_eq!(ids, expected, "{target} {last_event_id:?}");
        for event in &tokens {
            let seq: usize = event
                .id
                .as_deref()
                .unwrap_or("")
                .parse()
                .expect("numeric id");
            let chunk = event.json();
            assert_eq!(
                chunk["choices"][0]["delta"]["content"], words[seq],
                "{chunk}"
            );
            assert_eq!(chunk["id"], format!("chatcmpl-{request}"), "{chunk}");
        }
        assert!(
            events
                .iter()
                .any(|e| finish_of(e).as_deref() == Some("stop")),
            "{target}: no finish: {events:?}"
        );
        assert_eq!(
            events.last().map(|e| e.data.as_str()),
            Some("[DONE]"),
            "{target}"
        );
    }
    assert_eq!(upstream.requests().len(), 1, "a replay is no new call");
}

#[test]
fn raw_models_lists_the_configured_model() {
    let upstream = Upstream::start();
    let server = chorus(&upstream, "");
    let response = Conn::connect(server.addr).get("/v1/models", &[]);
    assert_eq!(response.status, 200, "{}", response.head);
    assert!(
        response
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{}",
        response.head
    );
    let list = response.json();
    assert_eq!(list["object"], "list", "{list}");
    let entry = list["data"]
        .as_array()
        .and_then(|d| d.iter().find(|m| m["id"] == MODEL))
        .unwrap_or_else(|| panic!("{MODEL} is not listed: {list}"));
    assert_eq!(
        entry,
        &json!({"id": MODEL, "object": "model", "created": 0, "owned_by": "chorus"})
    );
}
