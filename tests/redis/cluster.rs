//! Several chorus nodes sharing one real `redis-server`: identical chats on
//! different nodes cost one generation, remote followers get every token
//! from `seq` 0, and a leader's node that dies is reported in time.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::common;
use crate::common::redis_server::RedisServer;
use crate::common::{Client, Server};

/// A node whose simulated model takes a while to start and to finish.
fn node(redis: &RedisServer, name: &str) -> Server {
    node_with(redis, name, "")
}

/// [`node`] with `extra` TOML appended; the resume tests use it too.
pub(crate) fn node_with(redis: &RedisServer, name: &str, extra: &str) -> Server {
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
{extra}
"#,
        url = redis.url()
    ))
}

fn calls(server: &Server) -> u64 {
    server.stats()["upstream"]["calls"].as_u64().unwrap()
}

/// The generation leases held in `redis` now.
fn leases(redis: &RedisServer) -> HashSet<String> {
    redis::cmd("KEYS")
        .arg("chorus:v1:lead:*")
        .query(&mut redis.connection())
        .unwrap()
}

/// Asks `question` on `client` and waits until its generation holds a
/// lease in Redis that was not there before: an identical chat on another
/// node now follows it instead of leading one of its own.
fn ask_and_claim(client: &mut Client, redis: &RedisServer, question: &str) -> String {
    let before = leases(redis);
    let (request, _) = client.ask(None, question);
    common::eventually(&format!("a lease for {question:?}"), || {
        !leases(redis).is_subset(&before)
    });
    request
}

/// Waits until `client` has `request`'s first token (which stays there
/// for the answer collected later): tokens are flowing to it.
fn first_token(client: &mut Client, request: &str) {
    client.peek_matching(|v| v["request"] == request && v["type"] == "token");
}

#[test]
fn identical_chats_on_two_nodes_cost_one_generation() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis, "node-a"), node(&redis, "node-b"));
    let (mut ca, mut cb, mut cb2) = (a.client(), b.client(), b.client());
    let ra = ask_and_claim(&mut ca, &redis, "One question, two nodes");
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
    ask_and_claim(&mut ca, &redis, "Will the leader survive?");
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

/// Closes, from Redis's side, every connection whose last command was
/// an `XREAD` (the remote readers'); how many it closed.
fn kill_stream_readers(redis: &RedisServer) -> usize {
    let mut conn = redis.connection();
    let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut conn).unwrap();
    let readers: Vec<String> = list
        .lines()
        .filter(|client| client.split_whitespace().any(|f| f == "cmd=xread"))
        .filter_map(|client| {
            let id = client
                .split_whitespace()
                .find_map(|f| f.strip_prefix("id="))?;
            Some(id.to_owned())
        })
        .collect();
    for id in &readers {
        let _: redis::Value = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(id)
            .query(&mut conn)
            .unwrap();
    }
    readers.len()
}

#[test]
fn a_remote_follower_reads_on_when_its_redis_connection_drops() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis, "node-a"), node(&redis, "node-b"));
    let (mut ca, mut cb) = (a.client(), b.client());
    let ra = ask_and_claim(&mut ca, &redis, "Read on after a drop");
    let (rb, _) = cb.ask(None, "Read on after a drop");
    first_token(&mut cb, &rb);
    // Node B reads node A's stream on a connection of its own; Redis drops
    // it mid-answer (a proxy restarting, a client timeout, `CLIENT KILL`).
    common::eventually("node B's stream reader to be dropped", || {
        kill_stream_readers(&redis) > 0
    });
    let followed = cb.answer(&rb);
    assert!(followed.is_done(), "{}", followed.end);
    assert_eq!(
        followed.seqs,
        (0..30).collect::<Vec<u64>>(),
        "gap or duplicate"
    );
    assert_eq!(followed.text, ca.answer(&ra).text);
    assert_eq!(calls(&a) + calls(&b), 1);
}

#[test]
fn a_leader_whose_clients_all_left_goes_on_for_followers_on_other_nodes() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis, "node-a"), node(&redis, "node-b"));
    let (mut ca, mut cb) = (a.client(), b.client());
    let ra = ask_and_claim(&mut ca, &redis, "Stay for the others");
    let (rb, _) = cb.ask(None, "Stay for the others");
    // Tokens are flowing to the follower on the other node.
    first_token(&mut cb, &rb);
    // The only client on the leader's node cancels...
    ca.send(serde_json::json!({"type": "cancel", "request": ra}));
    let cancelled = ca.answer(&ra);
    assert!(cancelled.is_cancelled(), "{}", cancelled.end);
    // ...and the follower on the other node still gets the whole answer.
    let followed = cb.answer(&rb);
    assert!(followed.is_done(), "{}", followed.end);
    assert_eq!(followed.finish(), "stop");
    followed.assert_contiguous();
    assert_eq!(followed.seqs.len(), 30);
    assert_eq!(calls(&a) + calls(&b), 1);
}

#[test]
fn when_nobody_anywhere_wants_it_the_generation_stops() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis, "node-a"), node(&redis, "node-b"));
    let (mut ca, mut cb) = (a.client(), b.client());
    let ra = ask_and_claim(&mut ca, &redis, "Nobody wants this");
    let (rb, _) = cb.ask(None, "Nobody wants this");
    cb.recv_matching(|v| v["type"] == "token");
    cb.send(serde_json::json!({"type": "cancel", "request": rb}));
    cb.answer(&rb);
    ca.send(serde_json::json!({"type": "cancel", "request": ra}));
    ca.answer(&ra);
    common::eventually("the leader's generation to be aborted", || {
        a.stats()["upstream"]["aborted"].as_u64() == Some(1)
    });
}

#[test]
fn a_leaders_graceful_shutdown_ends_its_stream_with_an_error_marker() {
    let redis = RedisServer::start();
    // A short drain, so the leader's node stops long before the answer ends.
    let mut a = Server::start(&format!(
        r#"
[llm.simulated]
first_token_ms = 700
token_interval_ms = 40
tokens = 60

[timeouts]
drain_ms = 200

[cluster]
enabled = true
redis_url = "{url}"
node_id = "node-a"
lease_ms = 5000
"#,
        url = redis.url()
    ));
    let b = node(&redis, "node-b");
    let (mut ca, mut cb) = (a.client(), b.client());
    ask_and_claim(&mut ca, &redis, "Shutting down midway");
    let (rb, _) = cb.ask(None, "Shutting down midway");
    // Tokens are flowing to the follower on the other node.
    first_token(&mut cb, &rb);
    let stopped = Instant::now();
    assert!(a.terminate().success());
    let end = cb.answer(&rb);
    assert_eq!(end.code(), "shutting_down", "{}", end.end);
    // From the end marker, not from the 5 s lease running out.
    assert!(stopped.elapsed() < Duration::from_secs(3));
}

#[test]
fn without_redis_nodes_answer_alone_and_dedup_returns_with_redis() {
    let mut redis = RedisServer::start();
    let (a, b) = (node(&redis, "node-a"), node(&redis, "node-b"));
    redis.stop();
    // Redis is away: each node answers on its own (no cross-node dedup).
    let (mut ca, mut cb) = (a.client(), b.client());
    let (ra, _) = ca.ask(None, "Alone without Redis");
    let (rb, _) = cb.ask(None, "Alone without Redis");
    assert!(ca.answer(&ra).is_done());
    assert!(cb.answer(&rb).is_done());
    assert_eq!(calls(&a) + calls(&b), 2);
    for i in 0..3 {
        assert!(ca.ask_and_wait(None, &format!("Still alone {i}")).is_done());
    }
    // The outage is logged, once, not per chat.
    assert_eq!(
        a.log()
            .matches("the cluster's Redis is unavailable")
            .count(),
        1
    );
    let before = calls(&a) + calls(&b);
    // Redis is back: dedup across nodes resumes once each node's probe
    // has found it.
    redis.restart();
    common::eventually("both nodes to find Redis back", || {
        let back = |s: &Server| s.log().contains("the cluster's Redis is reachable again");
        back(&a) && back(&b)
    });
    let ra = ask_and_claim(&mut ca, &redis, "Together again");
    let (rb, _) = cb.ask(None, "Together again");
    let (answer_a, answer_b) = (ca.answer(&ra), cb.answer(&rb));
    assert!(answer_a.is_done() && answer_b.is_done());
    assert_eq!(answer_b.role.as_deref(), Some("follower"));
    assert_eq!(calls(&a) + calls(&b), before + 1);
}

#[test]
fn everything_a_node_writes_to_redis_expires() {
    let redis = RedisServer::start();
    let server = Server::start(&format!(
        r#"
[llm.simulated]
first_token_ms = 50
token_interval_ms = 5
tokens = 10

[timeouts]
replay_window_ms = 500
# A request's resume record lives request_ms + replay_window_ms at most.
request_ms = 1000

[cluster]
enabled = true
redis_url = "{url}"
node_id = "node-a"
lease_ms = 1000

[cache]
backend = "redis"
redis_url = "{url}"
ttl_s = 1
"#,
        url = redis.url()
    ));
    let mut c = server.client();
    for i in 0..3 {
        assert!(c
            .ask_and_wait(None, &format!("Leave no trace {i}"))
            .is_done());
    }
    let cluster = &server.stats()["cluster"];
    assert_eq!(cluster["redis_up"], true, "{cluster}");
    assert!(cluster["writes_queued"].is_u64(), "{cluster}");
    assert_eq!(cluster["resumes_waiting"], 0, "{cluster}");
    let mut conn = redis.connection();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    assert!(!keys.is_empty(), "nothing was written");
    for key in &keys {
        let ttl: i64 = redis::cmd("PTTL").arg(key).query(&mut conn).unwrap();
        // -2: gone since KEYS listed it (a lease released after `done`).
        assert!(ttl > 0 || ttl == -2, "{key} never expires (PTTL {ttl})");
    }
    let expired = common::poll_within(Duration::from_millis(2000), || {
        let left: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
        if left.is_empty() {
            Ok(())
        } else {
            Err(left)
        }
    });
    if let Err(left) = expired {
        panic!("left behind: {left:?}");
    }
}

#[test]
fn a_follower_resumes_on_another_node_without_a_gap() {
    let redis = RedisServer::start();
    let (a, b, c) = (
        node(&redis, "node-a"),
        node(&redis, "node-b"),
        node(&redis, "node-c"),
    );
    let mut ca = a.client();
    let ra = ask_and_claim(&mut ca, &redis, "Resume me elsewhere");
    let mut cb = b.client();
    let (rb, _) = cb.ask(None, "Resume me elsewhere");
    // Read the first few tokens on node B, then lose that connection.
    let mut text = String::new();
    let mut next = 0;
    while next < 5 {
        let v = cb.recv_matching(|v| v["request"] == rb.as_str() && v["type"] == "token");
        assert_eq!(v["seq"], next);
        text.push_str(v["text"].as_str().unwrap());
        next += 1;
    }
    drop(cb);
    // Reconnect to node C, which never saw the request, and resume.
    let mut cc = c.client();
    cc.send(serde_json::json!({"type": "resume", "request": rb, "from": next}));
    let rest = cc.answer(&rb);
    assert!(rest.is_done(), "{}", rest.end);
    assert_eq!(
        rest.seqs,
        (next..30).collect::<Vec<u64>>(),
        "gap or duplicate"
    );
    text.push_str(&rest.text);
    // Exactly the leader's answer.
    let leader = ca.answer(&ra);
    assert_eq!(text, leader.text);
}

#[test]
fn remote_readers_end_with_their_generations() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis, "node-a"), node(&redis, "node-b"));
    let (mut ca, mut cb) = (a.client(), b.client());
    // Settle: every pool thread of node B exists before counting.
    cb.ask_and_wait(None, "warm up node B");
    let before = b.threads();
    for i in 0..4 {
        let question = format!("Remote generation {i}");
        let ra = ask_and_claim(&mut ca, &redis, &question);
        let (rb, _) = cb.ask(None, &question);
        assert_eq!(cb.answer(&rb).role.as_deref(), Some("follower"));
        ca.answer(&ra);
    }
    common::eventually("node B's reader threads to end", || b.threads() == before);
}

#[test]
fn a_restarted_node_never_reuses_the_streams_of_its_previous_life() {
    let redis = RedisServer::start();
    let b = node(&redis, "node-b");
    let first = {
        let a = node(&redis, "node-a");
        a.client().ask_and_wait(None, "Before the restart")
    };
    assert!(first.is_done());
    // Same node id, generation ids from zero again; the old stream is still
    // in Redis (replay window).
    let a = node(&redis, "node-a");
    let mut ca = a.client();
    let ra = ask_and_claim(&mut ca, &redis, "After the restart");
    let mut cb = b.client();
    let (rb, _) = cb.ask(None, "After the restart");
    let (led, followed) = (ca.answer(&ra), cb.answer(&rb));
    assert_eq!(followed.role.as_deref(), Some("follower"));
    assert_eq!(followed.text, led.text, "followed an old stream");
    assert_ne!(followed.text, first.text);
}
