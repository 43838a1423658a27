//! A sick Redis (killed, or frozen with SIGSTOP so that every call would
//! wait the full timeout) costs chats nothing once the node has found out:
//! distinct chats start without waiting for Redis, tokens of running
//! generations keep flowing, the outage is logged once when it starts and
//! once when it ends, and the cache works again when Redis is back.

use std::time::{Duration, Instant};

use crate::common;
use crate::common::redis_server::RedisServer;
use crate::common::{eventually, Answer, Client, Server};
use serde_json::json;

/// Every Redis call of the node waits this long before it fails.
const TIMEOUT_MS: u64 = 1500;
/// Distinct chats sent while Redis is frozen.
const CHATS: usize = 12;

fn node(redis: &RedisServer, name: &str, rust_log: &str) -> Server {
    Server::start_env(
        &format!(
            r#"
[llm.simulated]
first_token_ms = 20
token_interval_ms = 20
tokens = 30

[workers]
cache_workers = 1
max_concurrent_llm_streams = 16

[cluster]
enabled = true
redis_url = "{url}"
node_id = "{name}"
lease_ms = 1000
redis_timeout_ms = {TIMEOUT_MS}

[cache]
backend = "redis"
redis_url = "{url}"
redis_timeout_ms = {TIMEOUT_MS}
"#,
            url = redis.url()
        ),
        &[("RUST_LOG", rust_log)],
    )
}

/// Reads `request` to its end, with the longest pause between two of its
/// frames after the first token.
fn answer_with_longest_gap(client: &mut Client, request: &str) -> (Answer, Duration) {
    let mut longest = Duration::ZERO;
    let mut last: Option<Instant> = None;
    let mut answer = Answer {
        request: request.to_owned(),
        role: None,
        seqs: Vec::new(),
        text: String::new(),
        end: serde_json::Value::Null,
    };
    loop {
        let v = client.recv_matching(|v| v["request"] == request);
        let now = Instant::now();
        if let Some(at) = last {
            longest = longest.max(now - at);
        }
        match v["type"].as_str() {
            Some("token") => {
                last = Some(now);
                answer.seqs.push(v["seq"].as_u64().unwrap());
                answer.text.push_str(v["text"].as_str().unwrap());
            }
            Some("start") => answer.role = v["role"].as_str().map(str::to_owned),
            Some("done") | Some("error") => {
                answer.end = v;
                return (answer, longest);
            }
            _ => {}
        }
    }
}

/// Sends `CHATS` distinct chats and waits for all of them; how long that took.
fn distinct_chats(client: &mut Client, tag: &str) -> Duration {
    let started = Instant::now();
    let requests: Vec<String> = (0..CHATS)
        .map(|i| client.ask(None, &format!("{tag} question {i}")).0)
        .collect();
    for request in &requests {
        let answer = client.answer(request);
        assert!(answer.is_done(), "{}", answer.end);
        answer.assert_contiguous();
    }
    started.elapsed()
}

fn outage_test(freeze: bool) {
    let mut redis = RedisServer::start();
    let server = node(&redis, "node-a", "chorus=debug,r2d2=info");
    let mut c = server.client();
    c.ask_and_wait(None, "Before the outage");
    assert_eq!(
        c.ask_and_wait(None, "Before the outage").role.as_deref(),
        Some("cache")
    );
    // A long answer is streaming when Redis goes away.
    let mut long = server.client();
    let (long_request, _) = long.ask(Some("long"), "A long answer");
    long.recv_matching(|v| v["type"] == "token" && v["seq"] == 2);
    if freeze {
        redis.freeze();
    } else {
        redis.stop();
    }
    let reader = std::thread::spawn(move || answer_with_longest_gap(&mut long, &long_request));
    // Each of these chats would wait the timeout at least once (lookup,
    // claim) on the one cache-lane worker if Redis were asked every time.
    let took = distinct_chats(&mut c, "During the outage");
    let (long_answer, longest_gap) = reader.join().expect("reader");
    assert!(long_answer.is_done(), "{}", long_answer.end);
    assert_eq!(
        long_answer.seqs,
        (0..30).filter(|s| *s != 2).collect::<Vec<u64>>()
    );
    assert!(
        took < Duration::from_millis(TIMEOUT_MS * CHATS as u64 / 2),
        "{CHATS} distinct chats took {took:?}: Redis was waited for (timeout {TIMEOUT_MS} ms)"
    );
    assert!(
        longest_gap < Duration::from_millis(TIMEOUT_MS / 2),
        "tokens stalled for {longest_gap:?} while Redis was away"
    );
    assert_eq!(server.stats()["cache"]["backend_up"], false);
    // Later chats do not wait either, and nothing is logged per chat.
    let again = distinct_chats(&mut c, "Still away");
    assert!(
        again < Duration::from_millis(TIMEOUT_MS),
        "{CHATS} chats took {again:?} with Redis known down"
    );
    if freeze {
        redis.thaw();
    } else {
        redis.restart();
    }
    eventually("hits after Redis came back", || {
        c.ask_and_wait(None, "After the outage");
        c.ask_and_wait(None, "After the outage").role.as_deref() == Some("cache")
    });
    assert_eq!(server.stats()["cache"]["backend_up"], true);
    let log = server.log();
    for name in ["the Redis cache", "the cluster's Redis"] {
        assert_eq!(
            log.matches(&format!("{name} is unavailable")).count(),
            1,
            "one line when the outage starts:\n{log}"
        );
        eventually("the end of the outage to be logged", || {
            server
                .log()
                .matches(&format!("{name} is reachable again"))
                .count()
                == 1
        });
    }
    assert!(
        !log.contains(" ERROR "),
        "errors logged during the outage:\n{log}"
    );
}

#[test]
fn a_frozen_redis_holds_up_neither_chats_nor_tokens() {
    outage_test(true);
}

#[test]
fn a_killed_redis_holds_up_neither_chats_nor_tokens_and_r2d2_stays_quiet() {
    outage_test(false);
}

#[test]
fn cluster_dedup_returns_when_a_frozen_redis_thaws() {
    let redis = RedisServer::start();
    let (a, b) = (
        node(&redis, "node-a", "chorus=debug"),
        node(&redis, "node-b", "chorus=debug"),
    );
    let (mut ca, mut cb) = (a.client(), b.client());
    redis.freeze();
    // Found out once per node; then each node answers alone.
    for i in 0..3 {
        assert!(ca.ask_and_wait(None, &format!("Alone {i}")).is_done());
        assert!(cb.ask_and_wait(None, &format!("Alone {i}")).is_done());
    }
    redis.thaw();
    eventually("the cluster's Redis to be back on both nodes", || {
        let back = |s: &Server| s.log().contains("the cluster's Redis is reachable again");
        back(&a) && back(&b)
    });
    let (ra, _) = ca.ask(None, "Together again after the thaw");
    std::thread::sleep(Duration::from_millis(100));
    let (rb, _) = cb.ask(None, "Together again after the thaw");
    let (answer_a, answer_b) = (ca.answer(&ra), cb.answer(&rb));
    assert!(answer_a.is_done() && answer_b.is_done());
    assert_eq!(
        answer_b.role.as_deref(),
        Some("follower"),
        "{}",
        answer_b.end
    );
    assert_eq!(answer_b.text, answer_a.text);
}

/// The cache write of an answer comes after its `done` (so a Redis that
/// has just frozen delays no `done`); a question asked again right after
/// `done` must still be a cache hit, with either cache backend.
#[test]
fn a_question_asked_again_right_after_done_is_a_cache_hit() {
    let redis = RedisServer::start();
    let memory = Server::start(common::FAST);
    let shared = Server::start(&format!(
        "{}\n[cache]\nbackend = \"redis\"\nredis_url = \"{}\"\n",
        common::FAST,
        redis.url()
    ));
    for server in [&memory, &shared] {
        let mut c = server.client();
        for i in 0..100 {
            let question = format!("Again and again {i}");
            let first = c.ask_and_wait(None, &question);
            assert_eq!(first.role.as_deref(), Some("leader"), "{}", first.end);
            let (request, conversation) = c.ask(None, &question);
            let again = c.answer(&request);
            assert_eq!(again.role.as_deref(), Some("cache"), "round {i}");
            assert_eq!(again.text, first.text);
            // A hit found after the first lookup (waiting for the cache
            // write) stores its answer too, like any other hit.
            c.send(json!({"type": "history", "conversation": conversation}));
            let history = c.recv_matching(|v| v["type"] == "history");
            let messages = history["messages"].as_array().expect("messages");
            assert_eq!(messages.len(), 2, "round {i}: {history}");
            assert_eq!(messages[0]["content"], question.as_str());
            assert_eq!(messages[1]["content"], first.text.as_str());
        }
    }
}
