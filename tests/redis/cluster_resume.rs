//! `resume` on a node that did not accept the request (several nodes, one
//! real `redis-server`): the lookup never holds up the connection, a
//! repeated resume replaces the previous attachment, resumes of one
//! generation share one reader, ended answers (short ones, cache hits) can
//! be resumed within the replay window, a resumer elsewhere keeps the
//! generation alive, and a full outbox ends the attachment with
//! `slow_consumer`.

use std::net::TcpStream;

use crate::cluster::node_with as node;
use crate::common::redis_server::RedisServer;
use crate::common::{eventually, Client, Server};
use serde_json::json;
use socket2::{Domain, Socket, Type};

/// Reads `request`'s first `n` tokens on `c`, then closes that connection.
fn read_then_drop(mut c: Client, request: &str, n: u64) {
    for seq in 0..n {
        let v = c.recv_matching(|v| v["request"] == request && v["type"] == "token");
        assert_eq!(v["seq"], seq);
    }
    drop(c);
}

#[test]
fn a_resume_elsewhere_never_holds_up_the_connection() {
    let redis = RedisServer::start();
    let c = node(&redis, "node-c", "");
    let mut client = c.client();
    // Nobody ever recorded this request: the lookup takes a while to give
    // up, and the connection answers a cancel meanwhile.
    client.send(json!({"type": "resume", "request": "r-nowhere", "from": 0}));
    client.send(json!({"type": "cancel", "request": "r-other"}));
    let first = client.recv_matching(|v| v["type"] == "error");
    assert_eq!(
        first["request"], "r-other",
        "the resume held the connection: {first}"
    );
    let second = client.recv_matching(|v| v["type"] == "error");
    assert_eq!(second["request"], "r-nowhere");
    assert_eq!(second["code"], "not_found");
}

#[test]
fn repeated_resumes_on_one_connection_deliver_each_token_once() {
    let redis = RedisServer::start();
    let (a, c) = (node(&redis, "node-a", ""), node(&redis, "node-c", ""));
    let mut ca = a.client();
    let (request, _) = ca.ask(None, "Resume me three times");
    read_then_drop(ca, &request, 3);
    let mut cc = c.client();
    for _ in 0..3 {
        cc.send(json!({"type": "resume", "request": request, "from": 3}));
    }
    let rest = cc.answer(&request);
    assert!(rest.is_done(), "{}", rest.end);
    assert_eq!(rest.seqs, (3..30).collect::<Vec<u64>>(), "gap or duplicate");
    // Nothing more for it: a sentinel error comes next, not a token or a
    // second `done`.
    cc.send(json!({"type": "cancel", "request": "r-sentinel"}));
    let next =
        cc.recv_matching(|v| v["request"] == request.as_str() || v["request"] == "r-sentinel");
    assert_eq!(next["request"], "r-sentinel", "more after the end: {next}");
}

#[test]
fn thirty_resumes_of_one_generation_share_one_reader() {
    let redis = RedisServer::start();
    let (a, c) = (node(&redis, "node-a", ""), node(&redis, "node-c", ""));
    let mut ca = a.client();
    let (request, _) = ca.ask(None, "Thirty resumers");
    read_then_drop(ca, &request, 2);
    let mut clients: Vec<Client> = (0..30).map(|_| c.client()).collect();
    // Every connection thread exists before counting.
    for client in &mut clients {
        client.send(json!({"type": "cancel", "request": "r-warm"}));
        client.recv_matching(|v| v["type"] == "error");
    }
    let before = c.threads();
    for client in &mut clients {
        client.send(json!({"type": "resume", "request": request, "from": 2}));
    }
    for client in &mut clients {
        client.recv_matching(|v| v["request"] == request.as_str() && v["type"] == "token");
    }
    let during = c.threads();
    assert!(
        during <= before + 3,
        "30 resumes started {} threads",
        during - before
    );
    for client in &mut clients {
        let rest = client.answer(&request);
        assert!(rest.is_done(), "{}", rest.end);
        assert_eq!(rest.seqs.last().copied(), Some(29));
    }
}

#[test]
fn ended_answers_and_cache_hits_are_resumable_on_another_node() {
    let redis = RedisServer::start();
    let fast = "[timeouts]\nreplay_window_ms = 10000\n";
    let (a, c) = (node(&redis, "node-a", fast), node(&redis, "node-c", fast));
    // A short answer that ends before its client loses the connection.
    let mut ca = a.client();
    let whole = ca.ask_and_wait(None, "Over before I left");
    assert!(whole.is_done(), "{}", whole.end);
    // And the same question again: a cache hit.
    let mut hit_client = a.client();
    let hit = hit_client.ask_and_wait(None, "Over before I left");
    assert_eq!(hit.role.as_deref(), Some("cache"));
    drop(ca);
    drop(hit_client);
    let mut cc = c.client();
    cc.send(json!({"type": "resume", "request": whole.request, "from": 5}));
    let rest = cc.answer(&whole.request);
    assert!(rest.is_done(), "{}", rest.end);
    assert_eq!(rest.role.as_deref(), Some("leader"));
    assert_eq!(rest.seqs, (5..30).collect::<Vec<u64>>());
    assert_eq!(rest.end["tokens"], whole.end["tokens"]);
    assert!(whole.text.ends_with(&rest.text));
    cc.send(json!({"type": "resume", "request": hit.request, "from": 0}));
    let again = cc.answer(&hit.request);
    assert!(again.is_done(), "{}", again.end);
    assert_eq!(again.role.as_deref(), Some("cache"));
    assert_eq!(again.text, hit.text);
    again.assert_contiguous();
}

/// A `fresh` chat leads a generation of its own, which has no stream in
/// Redis while it runs: when its client leaves mid-answer, the request is
/// recorded as "not findable yet", which keeps a resume elsewhere waiting
/// past the second it waits for a record that does not exist, and then
/// for real once it ends; the resume elsewhere gets the rest.
#[test]
fn a_request_not_findable_when_its_client_left_keeps_a_resume_elsewhere_waiting() {
    let redis = RedisServer::start();
    let quick = |name: &str| {
        Server::start(&format!(
            "[llm.simulated]\nfirst_token_ms = 50\ntoken_interval_ms = 80\ntokens = 50\n\
             [cluster]\nenabled = true\nredis_url = \"{url}\"\nnode_id = \"{name}\"\n",
            url = redis.url()
        ))
    };
    let (a, c) = (quick("node-a"), quick("node-c"));
    let mut ca = a.client();
    let accepted = ca.chat(None, "Mine alone", json!({"fresh": true}));
    let request = accepted["request"].as_str().expect("accepted").to_owned();
    read_then_drop(ca, &request, 2);
    let mut cc = c.client();
    cc.send(json!({"type": "resume", "request": request, "from": 2}));
    let rest = cc.answer(&request);
    assert!(rest.is_done(), "{}", rest.end);
    assert_eq!(rest.seqs, (2..50).collect::<Vec<u64>>());
    assert_eq!(rest.end["tokens"], 50);
}

#[test]
fn a_resume_on_another_node_keeps_the_generation_alive() {
    let redis = RedisServer::start();
    let grace = "[timeouts]\norphan_grace_ms = 500\n";
    let (a, c) = (node(&redis, "node-a", grace), node(&redis, "node-c", grace));
    let mut ca = a.client();
    let (request, _) = ca.ask(None, "Keep going for me elsewhere");
    read_then_drop(ca, &request, 1);
    let mut cc = c.client();
    cc.send(json!({"type": "resume", "request": request, "from": 1}));
    // 29 more tokens take over a second: more than twice the grace.
    let rest = cc.answer(&request);
    assert!(rest.is_done(), "{}", rest.end);
    assert_eq!(rest.finish(), "stop", "{}", rest.end);
    assert_eq!(rest.seqs, (1..30).collect::<Vec<u64>>());
    assert_eq!(a.stats()["upstream"]["aborted"], 0);
}

#[test]
fn a_full_outbox_on_a_cross_node_replay_ends_with_slow_consumer() {
    let redis = RedisServer::start();
    let flood = r#"
[server]
outbox_frames = 64
send_buffer_bytes = 4096
[llm]
max_tokens = 10000
[llm.simulated]
first_token_ms = 200
token_interval_ms = 1
tokens = 4000
[cluster]
enabled = true
"#;
    let start = |name: &str| {
        Server::start(&format!(
            "{flood}redis_url = \"{url}\"\nnode_id = \"{name}\"\nlease_ms = 1000\n",
            url = redis.url()
        ))
    };
    let (a, c) = (start("node-a"), start("node-c"));
    let mut ca = a.client();
    let (request, _) = ca.ask(None, "flood me elsewhere");
    read_then_drop(ca, &request, 1);
    // The resumer's socket has a tiny receive buffer and is not read until
    // the generation is over.
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&c.addr.into()).unwrap();
    let tcp: TcpStream = socket.into();
    let mut slow = Client::over(tcp, c.addr);
    slow.send(json!({"type": "resume", "request": request, "from": 1}));
    // Node C hands each token to the resumer's outbox while it publishes
    // it, so once its follower of the generation has ended, the outbox
    // holds all it will ever get: the tokens that fitted and the cut.
    eventually("the generation to end", || {
        a.stats()["upstream"]["in_flight"] == 0 && c.stats()["upstream"]["in_flight"] == 0
    });
    let cut = slow.answer(&request);
    assert_eq!(cut.code(), "slow_consumer", "{}", cut.end);
    assert!(cut.seqs.len() < 3999);
}
