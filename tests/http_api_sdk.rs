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
//! The exact bytes on the wire are checked in
//! `tests/upstream/http_api_raw.rs`.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::openai_api::{answer, assert_names_field, chorus, strings, MODEL, TOKEN};
use common::python::{self, Script};
use common::upstream::{Reply, Upstream};
use common::{eventually, Server, WAIT};
use serde_json::{json, Value};

/// What the SDK sends as its key to a chorus without `auth_tokens`.
const ANY_KEY: &str = "sk-unused";

/// What the SDK takes as its base URL.
fn base_url(server: &Server) -> String {
    format!("http://{}/v1", server.addr)
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
