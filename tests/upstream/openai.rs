//! The OpenAI-compatible provider end to end: the real chorus binary
//! streaming from a real HTTP server on loopback that speaks OpenAI's
//! streaming format (`common::upstream`).

use std::time::{Duration, Instant};

use crate::common;
use crate::common::upstream::{Reply, Upstream};
use crate::common::{eventually, Client, Server};
use serde_json::{json, Value};

const KEY_ENV: &str = "CHORUS_TEST_UPSTREAM_KEY";
const KEY: &str = "sk-test-9f8e7d6c5b4a";

fn tokens(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| (*w).to_owned()).collect()
}

fn stream(words: &[&str]) -> Reply {
    Reply::Stream {
        tokens: tokens(words),
        delay: Duration::ZERO,
        finish: "stop",
        usage: Some((21, words.len() as u64)),
    }
}

/// A chorus whose providers are `upstreams`, in order, with fast retries
/// and tools off (each test scripts every upstream call; tool rounds have
/// tests of their own in `tool_rounds.rs`).
fn chorus(upstreams: &[&Upstream], extra: &str) -> Server {
    let mut config = format!(
        r#"
[llm]
provider = "openai"
model = "test-model"
api_key_env = "{KEY_ENV}"
max_retries = 2
retry_base_ms = 20
retry_max_ms = 2000
read_timeout_ms = 5000
{extra}
[tools]
enabled = false
"#
    );
    for (i, u) in upstreams.iter().enumerate() {
        config.push_str(&format!(
            "\n[[llm.providers]]\nname = \"up{i}\"\nbase_url = \"{}\"\n",
            u.base_url()
        ));
    }
    Server::start_env(&config, &[(KEY_ENV, KEY)])
}

fn provider_stats(server: &Server) -> Vec<Value> {
    server.stats()["upstream"]["providers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn tokens_stream_as_they_arrive_and_usage_is_counted() {
    let upstream = Upstream::start();
    upstream.push(Reply::Stream {
        tokens: tokens(&["Hel", "lo", " wor", "ld"]),
        delay: Duration::from_millis(150),
        finish: "stop",
        usage: Some((21, 4)),
    });
    let server = chorus(&[&upstream], "");
    let mut c = server.client();
    let (request, _) = c.ask(None, "Say hello");
    // The first token arrives long before the last one is produced.
    let started = Instant::now();
    let first = c.recv_matching(|v| v["type"] == "token");
    assert_eq!(first["text"], "Hel");
    let first_at = started.elapsed();
    let answer = c.answer(&request);
    assert!(answer.is_done(), "{}", answer.end);
    assert_eq!(answer.finish(), "stop");
    assert_eq!(format!("Hel{}", answer.text), "Hello world");
    assert!(
        started.elapsed() > first_at + Duration::from_millis(300),
        "tokens were not streamed one by one"
    );

    let sent = &upstream.requests()[0];
    assert_eq!(sent.method, "POST");
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(sent.body["model"], "test-model");
    assert_eq!(sent.body["stream"], true);
    let messages = sent.body["messages"].as_array().unwrap();
    assert_eq!(messages.first().unwrap()["role"], "system");
    assert_eq!(messages.last().unwrap()["content"], "Say hello");
    let auth = sent
        .headers
        .iter()
        .find(|(name, _)| name == "authorization")
        .map(|(_, v)| v.as_str());
    assert_eq!(auth, Some(format!("Bearer {KEY}").as_str()));

    let stats = provider_stats(&server);
    assert_eq!(stats[0]["name"], "up0");
    assert_eq!(stats[0]["calls"], 1);
    assert_eq!(stats[0]["failures"], 0);
    assert_eq!(stats[0]["prompt_tokens"], 21);
    assert_eq!(stats[0]["completion_tokens"], 4);
    // The key is nowhere a client or an operator can read.
    assert!(!server.stats().to_string().contains(KEY));
    assert!(!server.get("/metrics").2.contains(KEY));
    assert!(!server.log().contains(KEY));
}

#[test]
fn a_length_finish_is_reported_as_length() {
    let upstream = Upstream::start();
    upstream.push(Reply::Stream {
        tokens: tokens(&["cut", " short"]),
        delay: Duration::ZERO,
        finish: "length",
        usage: None,
    });
    let server = chorus(&[&upstream], "");
    let answer = server.client().ask_and_wait(None, "Talk a lot");
    assert!(answer.is_done(), "{}", answer.end);
    assert_eq!(answer.finish(), "length");
    assert_eq!(answer.text, "cut short");
}

#[test]
fn an_error_body_goes_to_the_log_not_to_clients_and_is_not_retried() {
    let upstream = Upstream::start();
    let secret = "db password rejected for user admin at 10.1.2.3:5432";
    upstream.push(Reply::Error {
        status: 400,
        message: format!("{secret} (you sent Bearer {KEY})"),
        retry_after: None,
    });
    let server = chorus(&[&upstream], "");
    let mut c = server.client();
    let answer = c.ask_and_wait(None, "Hello?");
    assert_eq!(answer.code(), "upstream_error", "{}", answer.end);
    let message = answer.end["message"].as_str().unwrap();
    // Clients get the code and a sentence naming the endpoint, nothing of
    // what the upstream said.
    assert!(message.contains("\"up0\""), "{message}");
    for leak in ["db password", "10.1.2.3", "admin", "400", KEY] {
        assert!(
            !message.contains(leak),
            "{leak} reached the client: {message}"
        );
    }
    assert_eq!(upstream.requests().len(), 1, "a 400 is not worth a retry");
    // The operator finds the detail in the log, without the key.
    eventually("the detail is logged", || server.log().contains(secret));
    assert!(server.log().contains("HTTP 400"), "{}", server.log());
    assert!(!server.log().contains(KEY));
    // The connection still works.
    upstream.push(stream(&["fine"]));
    assert!(c.ask_and_wait(None, "Hello again?").is_done());
}

#[test]
fn a_5xx_is_retried_and_then_succeeds() {
    let upstream = Upstream::start();
    upstream.push(Reply::Error {
        status: 503,
        message: "warming up".into(),
        retry_after: None,
    });
    upstream.push(stream(&["after", " a", " retry"]));
    let server = chorus(&[&upstream], "");
    let answer = server.client().ask_and_wait(None, "Anyone there?");
    assert!(answer.is_done(), "{}", answer.end);
    assert_eq!(answer.text, "after a retry");
    assert_eq!(upstream.requests().len(), 2);
    let stats = provider_stats(&server);
    assert_eq!(stats[0]["calls"], 2);
    assert_eq!(stats[0]["failures"], 1);
    assert_eq!(stats[0]["retries"], 1);
}

#[test]
fn a_429_is_retried_after_the_time_it_asks_for() {
    let upstream = Upstream::start();
    upstream.push(Reply::Error {
        status: 429,
        message: "slow down".into(),
        retry_after: Some(1),
    });
    upstream.push(stream(&["patience"]));
    let server = chorus(&[&upstream], "");
    let answer = server.client().ask_and_wait(None, "Now?");
    assert!(answer.is_done(), "{}", answer.end);
    let requests = upstream.requests();
    assert_eq!(requests.len(), 2);
    let waited = requests[1].at - requests[0].at;
    assert!(
        waited >= Duration::from_millis(1000),
        "retried after {waited:?}, Retry-After said 1 s"
    );
}

#[test]
fn when_one_provider_keeps_failing_the_next_one_answers() {
    let (first, second) = (Upstream::start(), Upstream::start());
    for _ in 0..3 {
        first.push(Reply::Error {
            status: 500,
            message: "broken".into(),
            retry_after: None,
        });
    }
    second.push(stream(&["from", " the", " backup"]));
    let server = chorus(&[&first, &second], "");
    let answer = server.client().ask_and_wait(None, "Who answers?");
    assert!(answer.is_done(), "{}", answer.end);
    assert_eq!(answer.text, "from the backup");
    assert_eq!(first.requests().len(), 3, "the first call and two retries");
    assert_eq!(second.requests().len(), 1);
    let stats = provider_stats(&server);
    assert_eq!(
        (stats[0]["calls"].clone(), stats[0]["failures"].clone()),
        (json!(3), json!(3))
    );
    assert_eq!(
        (stats[1]["calls"].clone(), stats[1]["failures"].clone()),
        (json!(1), json!(0))
    );
}

#[test]
fn an_endpoint_that_refuses_connections_falls_back_too() {
    // A port that was free a moment ago: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}/v1", closed.local_addr().unwrap());
    drop(closed);
    let live = Upstream::start();
    live.push(stream(&["alive"]));
    let config = format!(
        r#"
[llm]
provider = "openai"
model = "test-model"
max_retries = 1
retry_base_ms = 10

[tools]
enabled = false

[[llm.providers]]
name = "dead"
base_url = "{dead_url}"

[[llm.providers]]
name = "live"
base_url = "{}"
"#,
        live.base_url()
    );
    let server = Server::start(&config);
    let answer = server.client().ask_and_wait(None, "Anyone alive?");
    assert!(answer.is_done(), "{}", answer.end);
    assert_eq!(answer.text, "alive");
    let stats = provider_stats(&server);
    assert_eq!(stats[0]["name"], "dead");
    assert_eq!(stats[0]["failures"], 2);
}

#[test]
fn a_reset_mid_stream_fails_the_request_keeps_the_partial_answer_and_caches_nothing() {
    let upstream = Upstream::start();
    upstream.push(Reply::ResetAfter {
        tokens: tokens(&["half", " an"]),
        delay: Duration::from_millis(20),
    });
    let server = chorus(&[&upstream], "");
    let mut c = server.client();
    let (request, conversation) = c.ask(None, "Tell me everything");
    let answer = c.answer(&request);
    assert_eq!(answer.code(), "upstream_error", "{}", answer.end);
    assert_eq!(answer.text, "half an");
    assert_eq!(upstream.requests().len(), 1, "tokens were out: no retry");
    // The partial answer is stored.
    c.send(json!({"type": "history", "conversation": conversation}));
    let history = c.recv_matching(|v| v["type"] == "history");
    let messages = history["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{history}");
    assert_eq!(messages[1]["content"], "half an");
    // And nothing was cached: the same first question goes upstream again.
    upstream.push(stream(&["whole"]));
    let again = server.client().ask_and_wait(None, "Tell me everything");
    assert_eq!(again.role.as_deref(), Some("leader"));
    assert_eq!(again.text, "whole");
    assert_eq!(upstream.requests().len(), 2);
}

#[test]
fn a_stalled_stream_times_out_and_the_upstream_sees_us_leave() {
    let upstream = Upstream::start();
    upstream.push(Reply::StallAfter {
        tokens: tokens(&["and", " then"]),
    });
    let server = chorus(&[&upstream], "[timeouts]\nstream_idle_ms = 400\n");
    let mut c = server.client();
    let answer = c.ask_and_wait(None, "Go on");
    assert_eq!(answer.code(), "processing_timeout", "{}", answer.end);
    assert_eq!(answer.text, "and then");
    assert!(
        upstream.wait_disconnects(1, Duration::from_secs(3)),
        "the upstream never saw the connection close"
    );
}

#[test]
fn cancelling_reaches_the_upstream_within_a_chunk_interval() {
    let upstream = Upstream::start();
    let words: Vec<String> = (0..100).map(|i| format!(" w{i}")).collect();
    upstream.push(Reply::Stream {
        tokens: words,
        delay: Duration::from_millis(100),
        finish: "stop",
        usage: None,
    });
    let server = chorus(&[&upstream], "");
    let mut c = server.client();
    let (request, _) = c.ask(None, "A long story, please");
    c.recv_matching(|v| v["type"] == "token");
    let cancelled = Instant::now();
    c.send(json!({"type": "cancel", "request": request}));
    let end = c.answer(&request);
    assert!(end.is_cancelled(), "{}", end.end);
    assert!(
        upstream.wait_disconnects(1, Duration::from_secs(3)),
        "the upstream kept streaming to nobody"
    );
    // One chunk interval is 100 ms; allow for scheduling on a busy machine.
    let seen_after = cancelled.elapsed();
    assert!(
        seen_after < Duration::from_millis(1000),
        "the upstream saw the disconnect only after {seen_after:?}"
    );
    assert_eq!(server.stats()["upstream"]["aborted"], 1);
}

#[test]
fn identical_chats_share_one_upstream_call() {
    let upstream = Upstream::start();
    upstream.push(Reply::Stream {
        tokens: tokens(&["one", " for", " all"]),
        delay: Duration::from_millis(100),
        finish: "stop",
        usage: None,
    });
    let server = chorus(&[&upstream], "");
    let mut clients: Vec<Client> = (0..5).map(|_| server.client()).collect();
    let requests: Vec<String> = clients
        .iter_mut()
        .map(|c| c.ask(None, "Same question").0)
        .collect();
    for (c, r) in clients.iter_mut().zip(&requests) {
        let answer = c.answer(r);
        assert!(answer.is_done(), "{}", answer.end);
        assert_eq!(answer.text, "one for all");
    }
    assert_eq!(upstream.requests().len(), 1);
}

#[test]
fn a_model_the_operator_did_not_offer_is_refused_before_any_upstream_call() {
    let upstream = Upstream::start();
    let server = chorus(&[&upstream], "");
    let mut c = server.client();
    let e = c.expect_error(json!({"type": "chat", "id": "m1", "message": "Hi",
        "options": {"model": "gpt-very-expensive"}}));
    assert_eq!(e["code"], "bad_request", "{e}");
    assert_eq!(e["id"], "m1", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("gpt-very-expensive"),
        "{e}"
    );
    assert!(upstream.requests().is_empty(), "the operator paid for it");
    // The configured model may be named, and the connection still works.
    upstream.push(stream(&["ok"]));
    let answer = ask_with(&mut c, json!({"model": "test-model"}));
    assert!(answer.is_done(), "{}", answer.end);
    assert_eq!(upstream.requests().len(), 1);
}

#[test]
fn allowed_models_opens_more_models_or_all_of_them() {
    let upstream = Upstream::start();
    let server = chorus(&[&upstream], "allowed_models = [\"small\"]");
    let mut c = server.client();
    upstream.push(stream(&["ok"]));
    let answer = ask_with(&mut c, json!({"model": "small"}));
    assert!(answer.is_done(), "{}", answer.end);
    assert_eq!(upstream.requests()[0].body["model"], "small");
    let e = c.expect_error(json!({"type": "chat", "id": "m2", "message": "Hi",
        "options": {"model": "large"}}));
    assert_eq!(e["code"], "bad_request", "{e}");

    let any = chorus(&[&upstream], "allowed_models = [\"*\"]");
    upstream.push(stream(&["ok"]));
    let answer = ask_with(&mut any.client(), json!({"model": "large"}));
    assert!(answer.is_done(), "{}", answer.end);
    assert_eq!(upstream.requests()[1].body["model"], "large");
}

/// Asks "Hi" with `options` and waits for the whole answer.
fn ask_with(c: &mut Client, options: Value) -> common::Answer {
    let accepted = c.chat(None, "Hi", options);
    assert_eq!(accepted["type"], "accepted", "{accepted}");
    c.answer(accepted["request"].as_str().unwrap())
}
