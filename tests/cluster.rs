//! Several chorus nodes sharing one real `redis-server`: identical chats on
//! different nodes cost one generation, remote followers get every token
//! from `seq` 0, and a leader's node that dies is reported in time.

mod common;

use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use common::Server;

/// A node whose simulated model takes a while to start and to finish.
fn node(redis: &RedisServer, name: &str) -> Server {
    Server::start(&format!(
        r#"
[llm.simulated]
first_token_ms = 700
token_interval_ms = 40
tokens = 30

[cluster]
enabled = true
redis_url = "{url}"
node_id = "{name}"
lease_ms = 1000

[cache]
backend = "redis"
redis_url = "{url}"
"#,
        url = redis.url()
    ))
}

fn calls(server: &Server) -> u64 {
    server.stats()["upstream"]["calls"].as_u64().unwrap()
}

#[test]
fn identical_chats_on_two_nodes_cost_one_generation() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis, "node-a"), node(&redis, "node-b"));
    let (mut ca, mut cb, mut cb2) = (a.client(), b.client(), b.client());
    let (ra, _) = ca.ask(None, "One question, two nodes");
    std::thread::sleep(Duration::from_millis(100));
    let (rb, _) = cb.ask(None, "One question, two nodes");
    let (rb2, _) = cb2.ask(None, "One question, two nodes");
    let (answer_a, answer_b, answer_b2) = (ca.answer(&ra), cb.answer(&rb), cb2.answer(&rb2));
    for answer in [&answer_a, &answer_b, &answer_b2] {
        assert!(answer.is_done(), "{}", answer.end);
        answer.assert_contiguous();
    }
    assert_eq!(answer_a.role.as_deref(), Some("leader"));
    assert_eq!(answer_b.role.as_deref(), Some("follower"));
    assert_eq!(answer_b2.role.as_deref(), Some("follower"));
    assert_eq!(answer_b.text, answer_a.text);
    assert_eq!(answer_b2.text, answer_a.text);
    assert_eq!(answer_b.seqs.len(), 30);
    assert_eq!(
        calls(&a) + calls(&b),
        1,
        "one upstream generation in the cluster"
    );
    // The lease is given up at the end; the stream stays for the replay window.
    let leases: Vec<String> = redis::cmd("KEYS")
        .arg("chorus:v1:lead:*")
        .query(&mut redis.connection())
        .unwrap();
    assert!(leases.is_empty(), "{leases:?}");
}

#[test]
fn followers_learn_in_time_that_the_leaders_node_died() {
    let redis = RedisServer::start();
    let (mut a, b) = (node(&redis, "node-a"), node(&redis, "node-b"));
    let (mut ca, mut cb) = (a.client(), b.client());
    ca.ask(None, "Will the leader survive?");
    std::thread::sleep(Duration::from_millis(100));
    let (rb, _) = cb.ask(None, "Will the leader survive?");
    // Some tokens reach node B through Redis, then the leader's node dies.
    cb.recv_matching(|v| v["type"] == "token" && v["seq"] == 3);
    a.kill();
    let killed = Instant::now();
    let end = cb.answer(&rb);
    let took = killed.elapsed();
    assert_eq!(end.code(), "upstream_error", "{}", end.end);
    assert!(
        took < Duration::from_millis(1000 + 1000),
        "followers waited {took:?}, more than lease_ms + 1 s"
    );
    // The next identical request starts a fresh generation.
    let again = cb.ask_and_wait(None, "Will the leader survive?");
    assert!(again.is_done(), "{}", again.end);
    assert_eq!(again.role.as_deref(), Some("leader"));
}
