//! chorus's connections to an OpenAI-compatible upstream, end to end: the
//! real chorus binary against the loopback server of `common::upstream`
//! in its different connection modes.
//!
//! What it proves: each streaming worker keeps its connection to an
//! endpoint open from one call to the next (HTTP keep-alive); a kept
//! connection that the upstream closed (as llama.cpp's `llama-server` does
//! right after a streamed answer) is replaced by a new one at once, even in
//! the second round of a tool chat, when tool frames already reached the
//! client and no retry is allowed; the rounds after the first go to the
//! endpoint that served the first, not back to one that failed; and
//! neither such a reconnect nor a call the client cancelled counts as a
//! failure of the endpoint.

use std::time::Duration;

use crate::common::tool_rounds::{answer_round, calculator_round, CALC_RESULT};
use crate::common::upstream::{Connections, Recorded, Reply, Upstream};
use crate::common::{Answer, Server, WAIT};
use serde_json::{json, Value};

/// The calculator call of round 1, and what round 2 answers after it.
const ROUND_TWO: [&str; 3] = ["It", " is", " 14."];

/// Chats per test that repeats one.
const CHATS: usize = 5;
/// Chats against an upstream whose close races with chorus's next call, so
/// the race gets many chances to go the bad way (each takes milliseconds).
const RACING_CHATS: usize = 50;

/// `[llm]` with `llm` among its keys, no retries (a reconnect must not
/// need one) and one streaming worker, so every call after the first is
/// made on a kept connection; `extra` adds tables after it.
fn config(llm: &str, extra: &str) -> String {
    format!(
        r#"
[llm]
provider = "openai"
model = "test-model"
{llm}
max_retries = 0
retry_base_ms = 10
retry_max_ms = 100
read_timeout_ms = 5000

[workers]
max_concurrent_llm_streams = 1
{extra}
"#
    )
}

/// A chorus whose only upstream is `upstream`; `extra` as for [`config`].
fn chorus(upstream: &Upstream, extra: &str) -> Server {
    let base_url = format!("base_url = \"{}\"", upstream.base_url());
    Server::start(&config(&base_url, extra))
}

/// `/api/stats` `upstream.providers`.
fn provider_stats(server: &Server) -> Vec<Value> {
    server.stats()["upstream"]["providers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Asserts `answer` ended `done` (finish `stop`) with the text of round 2.
fn assert_round_two(answer: &Answer) {
    assert!(answer.is_done(), "{}", answer.end);
    assert_eq!(answer.finish(), "stop", "{}", answer.end);
    assert_eq!(answer.text, ROUND_TWO.concat());
    answer.assert_contiguous();
}

/// Asserts `round_two` is the request that followed `round_one` in the
/// same chat: the same prompt plus the assistant's call and its result.
fn assert_follows(round_one: &Recorded, round_two: &Recorded, call_id: &str) {
    let first = round_one.body["messages"].as_array().expect("messages");
    let second = round_two.body["messages"].as_array().expect("messages");
    assert_eq!(second.len(), first.len() + 2, "{second:#?}");
    assert_eq!(&second[..first.len()], &first[..]);
    let call = &second[first.len()];
    assert_eq!(call["role"], "assistant", "{call}");
    assert_eq!(call["tool_calls"][0]["id"], call_id, "{call}");
    let result = &second[first.len() + 1];
    assert_eq!(result["role"], "tool", "{result}");
    assert_eq!(result["tool_call_id"], call_id, "{result}");
    assert_eq!(result["content"], CALC_RESULT, "{result}");
}

/// Runs `chats` two-round tool chats against `upstream`, one after the
/// other in new conversations; each must end `done` with round 2's text,
/// after exactly one request per round.
fn tool_chats_survive(upstream: &Upstream, chats: usize) -> Server {
    let server = chorus(upstream, "");
    let mut c = server.client();
    for i in 0..chats {
        let call_id = format!("call_{i}");
        upstream.push(calculator_round(&call_id, 4));
        upstream.push(answer_round(&ROUND_TWO));
        // A different question each time: no cache hit, no follower.
        let (request, _) = c.ask(None, &format!("Chat {i}: what is 2+3*4?"));
        let answer = c.answer(&request);
        assert!(answer.is_done(), "chat {i}: {}", answer.end);
        assert_round_two(&answer);

        let requests = upstream.requests();
        assert_eq!(requests.len(), 2 * (i + 1), "one request per round");
        assert_follows(&requests[2 * i], &requests[2 * i + 1], &call_id);
    }
    server
}

#[test]
fn a_tool_round_survives_an_upstream_that_closes_kept_connections() {
    // As llama-server does it: chunked, no `Connection: close`, and the
    // socket closed right after the last chunk. Round 2 starts within a
    // millisecond of round 1's end; whether the close has arrived by then
    // is a race, run many times here.
    let upstream = Upstream::start_with(Connections::CloseAfterResponse);
    let server = tool_chats_survive(&upstream, RACING_CHATS);
    let stats = provider_stats(&server);
    assert_eq!(stats[0]["failures"], 0, "{stats:?}");
    assert_eq!(stats[0]["retries"], 0, "{stats:?}");
}

#[test]
fn a_tool_round_survives_a_kept_connection_closed_as_its_request_arrives() {
    // The close of a kept connection at the worst moment, every time: when
    // the next request is already on its way over it. Every call after the
    // first is sent on a dead connection (a reset) and then again on a new
    // one, which the upstream alone answers.
    let upstream = Upstream::start_with(Connections::CloseOnNextRequest);
    let server = tool_chats_survive(&upstream, CHATS);
    assert_eq!(
        upstream.connections(),
        2 * CHATS,
        "one new connection per call"
    );
    let stats = provider_stats(&server);
    assert_eq!(
        stats[0]["calls"],
        2 * CHATS,
        "a request that never reached the upstream is no call"
    );
    assert_eq!(stats[0]["failures"], 0, "a reconnect is no failure");
    assert_eq!(stats[0]["retries"], 0, "a reconnect is no retry");
}

#[test]
fn connections_are_kept_between_calls() {
    let upstream = Upstream::start_with(Connections::KeepAlive);
    let server = chorus(&upstream, "[tools]\nenabled = false\n");
    let mut c = server.client();
    for i in 0..CHATS {
        let word = format!("answer{i}");
        upstream.push(Reply::Stream {
            tokens: vec![word.clone()],
            delay: Duration::ZERO,
            finish: "stop",
            usage: Some((5, 1)),
        });
        let answer = c.ask_and_wait(None, &format!("Question number {i}"));
        assert!(answer.is_done(), "{}", answer.end);
        assert_eq!(answer.text, word);
    }
    assert_eq!(upstream.requests().len(), CHATS);
    assert_eq!(
        upstream.connections(),
        1,
        "one streaming worker, one connection for every call"
    );
    let stats = provider_stats(&server);
    assert_eq!(stats[0]["calls"], CHATS, "{stats:?}");
    assert_eq!(stats[0]["failures"], 0, "{stats:?}");
}

#[test]
fn later_rounds_stay_on_the_endpoint_that_answered_the_first() {
    // A port that was free a moment ago: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_url = format!("http://{}/v1", closed.local_addr().expect("address"));
    drop(closed);
    let live = Upstream::start();
    live.push(calculator_round("call_1", 4));
    live.push(answer_round(&ROUND_TWO));
    let providers = format!(
        r#"
[[llm.providers]]
name = "dead"
base_url = "{dead_url}"

[[llm.providers]]
name = "live"
base_url = "{}"
"#,
        live.base_url()
    );
    let server = Server::start(&config("", &providers));
    let mut c = server.client();
    let (request, _) = c.ask(None, "What is 2+3*4?");
    let answer = c.answer(&request);
    assert_round_two(&answer);

    let requests = live.requests();
    assert_eq!(requests.len(), 2, "both rounds went to the live endpoint");
    assert_follows(&requests[0], &requests[1], "call_1");
    let stats = provider_stats(&server);
    assert_eq!(stats[0]["name"], "dead");
    assert_eq!(
        (stats[0]["calls"].clone(), stats[0]["failures"].clone()),
        (json!(1), json!(1)),
        "only round 1 tried the dead endpoint: {stats:?}"
    );
    assert_eq!(stats[1]["name"], "live");
    assert_eq!(
        (stats[1]["calls"].clone(), stats[1]["failures"].clone()),
        (json!(2), json!(0)),
        "{stats:?}"
    );
}

#[test]
fn a_cancelled_call_is_not_counted_as_a_failure() {
    let upstream = Upstream::start();
    upstream.push(Reply::Stream {
        tokens: (0..50).map(|i| format!(" w{i}")).collect(),
        delay: Duration::from_millis(100),
        finish: "stop",
        usage: None,
    });
    let server = chorus(&upstream, "[tools]\nenabled = false\n");
    let mut c = server.client();
    let (request, _) = c.ask(None, "A long story, please");
    let first = c.recv_matching(|v| v["type"] == "token" && v["request"] == request.as_str());
    assert_eq!(first["text"], " w0");
    c.send(json!({"type": "cancel", "request": request}));
    let answer = c.answer(&request);
    // A leader that has started answering is `done` with finish `cancelled`.
    assert!(answer.is_done(), "{}", answer.end);
    assert_eq!(answer.finish(), "cancelled", "{}", answer.end);
    assert!(
        upstream.wait_disconnects(1, WAIT),
        "the upstream never saw the call aborted"
    );

    assert_eq!(server.stats()["upstream"]["aborted"], 1);

    // The one streaming worker takes the next chat only once it is done
    // with the cancelled call, counters included.
    upstream.push(Reply::Stream {
        tokens: vec!["next".into()],
        delay: Duration::ZERO,
        finish: "stop",
        usage: None,
    });
    let next = c.ask_and_wait(None, "Something short instead");
    assert!(next.is_done(), "{}", next.end);
    assert_eq!(next.text, "next");
    let stats = provider_stats(&server);
    assert_eq!(stats[0]["calls"], 2, "{stats:?}");
    assert_eq!(stats[0]["failures"], 0, "an abort is no failure: {stats:?}");
    assert_eq!(stats[0]["retries"], 0, "nor a reason to call again");
    assert_eq!(upstream.requests().len(), 2);
}
