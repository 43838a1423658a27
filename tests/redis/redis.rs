//! The Redis cache backend with a real `redis-server` on loopback: answers
//! shared between nodes, and chats that keep working while Redis is away.

use std::time::Duration;

use crate::common::redis_server::RedisServer;
use crate::common::{eventually, Server, FAST};

fn node(redis: &RedisServer, extra: &str) -> Server {
    Server::start(&format!(
        "{FAST}\n{extra}\n[cache]\nbackend = \"redis\"\nredis_url = \"{}\"\nredis_timeout_ms = 200\n",
        redis.url()
    ))
}

fn answer_keys(redis: &RedisServer) -> Vec<String> {
    let mut conn = redis.connection();
    redis::cmd("KEYS")
        .arg("chorus:v1:answer:*")
        .query(&mut conn)
        .expect("KEYS")
}

#[test]
fn an_answer_cached_by_one_node_is_a_hit_on_another_with_its_token_boundaries() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis, ""), node(&redis, ""));
    let first = a.client().ask_and_wait(None, "Shared between nodes?");
    assert_eq!(first.role.as_deref(), Some("leader"));
    let hit = b.client().ask_and_wait(None, "Shared between nodes?");
    assert_eq!(hit.role.as_deref(), Some("cache"), "{}", hit.end);
    assert_eq!(hit.text, first.text);
    assert_eq!(hit.seqs, first.seqs);
    assert_eq!(b.stats()["upstream"]["calls"], 0);
    assert_eq!(b.stats()["cache"]["backend_up"], true);
    // Namespaced, versioned, and expiring.
    let keys = answer_keys(&redis);
    assert_eq!(keys.len(), 1, "{keys:?}");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&keys[0])
        .query(&mut redis.connection())
        .unwrap();
    assert!(ttl > 0 && ttl <= 3_600_000, "ttl {ttl}");
}

#[test]
fn entries_expire_after_the_ttl() {
    let redis = RedisServer::start();
    let server = node(&redis, "");
    // ttl_s is whole seconds; 1 s is the shortest.
    let server2 = Server::start(&format!(
        "{FAST}\n[cache]\nbackend = \"redis\"\nredis_url = \"{}\"\nttl_s = 1\n",
        redis.url()
    ));
    drop(server);
    let first = server2.client().ask_and_wait(None, "Short-lived?");
    assert_eq!(first.role.as_deref(), Some("leader"));
    std::thread::sleep(Duration::from_millis(1300));
    assert!(
        answer_keys(&redis).is_empty(),
        "Redis kept an expired answer"
    );
    let again = server2.client().ask_and_wait(None, "Short-lived?");
    assert_eq!(again.role.as_deref(), Some("leader"));
}

#[test]
fn a_node_starts_without_redis_answers_anyway_and_uses_redis_once_it_is_up() {
    let mut redis = RedisServer::reserve();
    let server = node(&redis, "");
    let mut c = server.client();
    let first = c.ask_and_wait(None, "Is anyone caching?");
    assert!(first.is_done(), "{}", first.end);
    let again = c.ask_and_wait(None, "Is anyone caching?");
    assert_eq!(
        again.role.as_deref(),
        Some("leader"),
        "no cache without Redis"
    );
    let stats = server.stats();
    assert_eq!(stats["cache"]["backend_up"], false);
    let metrics = server.get("/metrics").2;
    assert!(metrics.contains("chorus_cache_backend_up 0"), "{metrics}");
    assert!(
        !metrics.contains("chorus_cache_errors_total 0"),
        "no error counted"
    );
    let log = server.log();
    assert!(log.contains("Redis cache is unavailable"), "{log}");
    assert_eq!(
        log.matches("Redis cache is unavailable").count(),
        1,
        "logged per request"
    );

    redis.restart();
    // The next answer is stored, and the one after it is a hit.
    eventually("the node to use Redis again", || {
        c.ask_and_wait(None, "Now with Redis?");
        c.ask_and_wait(None, "Now with Redis?").role.as_deref() == Some("cache")
    });
    assert_eq!(server.stats()["cache"]["backend_up"], true);
    assert!(server
        .get("/metrics")
        .2
        .contains("chorus_cache_backend_up 1"));
    assert!(server.log().contains("reachable again"));
}

#[test]
fn chats_keep_working_while_redis_is_stopped_and_hits_return_after_it_restarts() {
    let mut redis = RedisServer::start();
    let server = node(&redis, "");
    let mut c = server.client();
    c.ask_and_wait(None, "Before the outage");
    assert_eq!(
        c.ask_and_wait(None, "Before the outage").role.as_deref(),
        Some("cache")
    );
    redis.stop();
    for i in 0..5 {
        let answer = c.ask_and_wait(None, &format!("During the outage {i}"));
        assert!(answer.is_done(), "{}", answer.end);
    }
    assert_eq!(server.stats()["cache"]["backend_up"], false);
    redis.restart();
    eventually("hits after Redis restarted", || {
        c.ask_and_wait(None, "After the outage");
        c.ask_and_wait(None, "After the outage").role.as_deref() == Some("cache")
    });
}
