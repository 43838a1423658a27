//! The cluster's Redis primitives against a real `redis-server`: leases
//! that only their holder can renew or release and that expire when not
//! renewed, and token streams read live and from the start, with their end
//! and their expiry.

use std::time::{Duration, Instant};

use crate::common;
use crate::common::redis_server::RedisServer;
use chorus::cluster::lease::{Claim, Leases};
use chorus::cluster::stream::{StreamEvent, StreamReader, StreamWriter};
use chorus::protocol::{ErrorCode, Failure, Outcome};

fn leases(redis: &RedisServer, lease: Duration) -> Leases {
    let pool = chorus::redis_pool::pool(&redis.url(), Duration::from_millis(500), 2).unwrap();
    Leases::new(pool, lease)
}

#[test]
fn one_claim_wins_and_only_its_holder_renews_or_releases() {
    let redis = RedisServer::start();
    let (a, b) = (
        leases(&redis, Duration::from_secs(5)),
        leases(&redis, Duration::from_secs(5)),
    );
    let key = [3; 32];
    assert_eq!(a.claim(&key, "node-a/1").unwrap(), Claim::Ours);
    assert_eq!(
        b.claim(&key, "node-b/7").unwrap(),
        Claim::Theirs("node-a/1".into())
    );
    // Claiming again with the same token is idempotent.
    assert_eq!(a.claim(&key, "node-a/1").unwrap(), Claim::Ours);
    assert!(!b.renew(&key, "node-b/7").unwrap());
    b.release(&key, "node-b/7").unwrap();
    assert_eq!(a.holder(&key).unwrap().as_deref(), Some("node-a/1"));
    assert!(a.renew(&key, "node-a/1").unwrap());
    a.release(&key, "node-a/1").unwrap();
    assert_eq!(a.holder(&key).unwrap(), None);
    assert_eq!(b.claim(&key, "node-b/8").unwrap(), Claim::Ours);
}

#[test]
fn a_lease_nobody_renews_expires_and_the_key_is_free_again() {
    let redis = RedisServer::start();
    let a = leases(&redis, Duration::from_millis(300));
    let b = leases(&redis, Duration::from_millis(300));
    let key = [4; 32];
    assert_eq!(a.claim(&key, "node-a/1").unwrap(), Claim::Ours);
    // Renewed: still held after more than one lease time. (The time that
    // passes between renewals is what is tested here.)
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(100));
        assert!(a.renew(&key, "node-a/1").unwrap());
    }
    assert!(matches!(
        b.claim(&key, "node-b/1").unwrap(),
        Claim::Theirs(_)
    ));
    // Not renewed (the leader's node died): set to go within the lease
    // time, and claimable by another node no later than 400 ms from now.
    let ttl: i64 = redis::cmd("PTTL")
        .arg(format!("chorus:v1:lead:{}", "04".repeat(32)))
        .query(&mut redis.connection())
        .unwrap();
    assert!(ttl > 0 && ttl <= 300, "PTTL {ttl}");
    common::eventually_within(
        "the unrenewed lease to expire",
        Duration::from_millis(400),
        || b.claim(&key, "node-b/1").unwrap() == Claim::Ours,
    );
    assert!(
        !a.renew(&key, "node-a/1").unwrap(),
        "a lost lease cannot be renewed"
    );
}

/// Clients of `redis` parked in a blocking `XREAD` now (`CLIENT LIST`:
/// command `xread`, flag `b`).
fn readers_waiting(redis: &RedisServer) -> usize {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut redis.connection())
        .unwrap();
    list.lines()
        .filter(|client| {
            let field = |name: &str| {
                client
                    .split_whitespace()
                    .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
            };
            field("cmd") == Some("xread") && field("flags").is_some_and(|f| f.contains('b'))
        })
        .count()
}

/// How long a live reader's read blocks: far longer than [`LIVE`], so an
/// event that arrives within [`LIVE`] was handed over by the write that
/// woke the read, not fetched by a read that timed out and asked again.
const BLOCK: Duration = Duration::from_secs(10);
/// The most a write may take to reach a reader waiting for it.
const LIVE: Duration = Duration::from_secs(2);

#[test]
fn a_stream_is_read_live_and_from_the_start_with_its_end() {
    let redis = RedisServer::start();
    let pool = chorus::redis_pool::pool(&redis.url(), Duration::from_millis(500), 2).unwrap();
    let writer = StreamWriter::new(pool, "node-a/42", Duration::from_secs(60));
    let url = redis.url();
    // A reader that is waiting before the first token gets each write as
    // it happens. It hands on every event the moment its read returns.
    let (events, received) = std::sync::mpsc::channel();
    let live = std::thread::spawn({
        let url = url.clone();
        move || {
            let mut reader = StreamReader::open(&url, "node-a/42", BLOCK).unwrap();
            loop {
                let read = reader.read().unwrap();
                let end = matches!(read.last(), Some(StreamEvent::End(_)));
                for event in read {
                    if events.send(event).is_err() {
                        return;
                    }
                }
                if end {
                    return;
                }
            }
        }
    });
    let live_write = |what: &str, write: &dyn Fn(), expected: &[StreamEvent]| {
        // Before the write the reader has had everything written so far
        // and is parked in its blocking read, with nothing more to hand on.
        common::eventually("the reader to wait in its blocking read", || {
            readers_waiting(&redis) == 1
        });
        assert_eq!(
            received.try_recv(),
            Err(std::sync::mpsc::TryRecvError::Empty),
            "the reader had an event before {what}"
        );
        let wrote = Instant::now();
        write();
        for event in expected {
            let got = received
                .recv_timeout(LIVE.saturating_sub(wrote.elapsed()))
                .unwrap_or_else(|e| {
                    panic!("{event:?} of {what} did not reach the reader in {LIVE:?}: {e}")
                });
            assert_eq!(&got, event, "{what}");
        }
    };
    let tokens = |texts: &[&str]| -> Vec<StreamEvent> {
        texts
            .iter()
            .map(|t| StreamEvent::Token((*t).into()))
            .collect()
    };
    let failed: Outcome = Err(Failure::new(ErrorCode::UpstreamError, "leader lost"));
    live_write(
        "the first append",
        &|| writer.append(&["Hel", "lo"]).unwrap(),
        &tokens(&["Hel", "lo"]),
    );
    live_write(
        "the second append",
        &|| writer.append(&[" wör", "ld", ""]).unwrap(),
        &tokens(&[" wör", "ld", ""]),
    );
    live_write(
        "the end",
        &|| writer.finish(&failed, Duration::from_millis(800)).unwrap(),
        &[StreamEvent::End(failed.clone())],
    );
    live.join().unwrap();
    // The stream is set to expire `keep` after its end.
    let ttl: i64 = redis::cmd("PTTL")
        .arg(chorus::cluster::stream::stream_name("node-a/42"))
        .query(&mut redis.connection())
        .unwrap();
    assert!(ttl > 0 && ttl <= 800, "PTTL {ttl}");
    let mut expected = tokens(&["Hel", "lo", " wör", "ld", ""]);
    expected.push(StreamEvent::End(failed));
    // A reader that comes late replays everything from seq 0.
    let mut late = StreamReader::open(&url, "node-a/42", Duration::from_millis(100)).unwrap();
    assert_eq!(late.read().unwrap(), expected);
    assert!(late.read().unwrap().is_empty(), "nothing after the end");
    // The stream expires `keep` after its end.
    common::eventually_within(
        "the ended stream to expire",
        Duration::from_millis(1000),
        || {
            let exists: i64 = redis::cmd("EXISTS")
                .arg(chorus::cluster::stream::stream_name("node-a/42"))
                .query(&mut redis.connection())
                .unwrap();
            exists == 0
        },
    );
}

#[test]
fn without_redis_the_primitives_fail_fast_instead_of_hanging() {
    let redis = RedisServer::reserve();
    let a = leases(&redis, Duration::from_secs(1));
    let started = std::time::Instant::now();
    assert!(a.claim(&[5; 32], "node-a/1").is_err());
    assert!(StreamReader::open(&redis.url(), "x/1", Duration::from_millis(200)).is_err());
    assert!(started.elapsed() < Duration::from_secs(3));
}
