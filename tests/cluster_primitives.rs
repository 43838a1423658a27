//! The cluster's Redis primitives against a real `redis-server`: leases
//! that only their holder can renew or release and that expire when not
//! renewed, and token streams read live and from the start, with their end
//! and their expiry.

mod common;

use std::time::Duration;

use chorus::cluster::lease::{Claim, Leases};
use chorus::cluster::stream::{StreamEvent, StreamReader, StreamWriter};
use chorus::protocol::{ErrorCode, Failure};
use common::redis_server::RedisServer;

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
    // Renewed: still held after more than one lease time.
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(100));
        assert!(a.renew(&key, "node-a/1").unwrap());
    }
    assert!(matches!(
        b.claim(&key, "node-b/1").unwrap(),
        Claim::Theirs(_)
    ));
    // Not renewed (the leader's node died): gone within the lease time.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(b.claim(&key, "node-b/1").unwrap(), Claim::Ours);
    assert!(
        !a.renew(&key, "node-a/1").unwrap(),
        "a lost lease cannot be renewed"
    );
}

#[test]
fn a_stream_is_read_live_and_from_the_start_with_its_end() {
    let redis = RedisServer::start();
    let pool = chorus::redis_pool::pool(&redis.url(), Duration::from_millis(500), 2).unwrap();
    let writer = StreamWriter::new(pool, "node-a/42", Duration::from_secs(60));
    let url = redis.url();
    // A reader that is waiting before the first token gets it live.
    let live = std::thread::spawn({
        let url = url.clone();
        move || {
            let mut reader =
                StreamReader::open(&url, "node-a/42", Duration::from_millis(200)).unwrap();
            let mut events = Vec::new();
            while !matches!(events.last(), Some(StreamEvent::End(_))) {
                events.extend(reader.read().unwrap());
            }
            events
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    writer.append(&["Hel", "lo"]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    writer.append(&[" wör", "ld", ""]).unwrap();
    writer
        .finish(
            &Err(Failure::new(ErrorCode::UpstreamError, "leader lost")),
            Duration::from_millis(800),
        )
        .unwrap();
    let expected: Vec<StreamEvent> = ["Hel", "lo", " wör", "ld", ""]
        .iter()
        .map(|t| StreamEvent::Token((*t).into()))
        .chain([StreamEvent::End(Err(Failure::new(
            ErrorCode::UpstreamError,
            "leader lost",
        )))])
        .collect();
    assert_eq!(live.join().unwrap(), expected);
    // A reader that comes late replays everything from seq 0.
    let mut late = StreamReader::open(&url, "node-a/42", Duration::from_millis(100)).unwrap();
    assert_eq!(late.read().unwrap(), expected);
    assert!(late.read().unwrap().is_empty(), "nothing after the end");
    // The stream expires `keep` after its end.
    std::thread::sleep(Duration::from_millis(1000));
    let exists: i64 = redis::cmd("EXISTS")
        .arg(chorus::cluster::stream::stream_name("node-a/42"))
        .query(&mut redis.connection())
        .unwrap();
    assert_eq!(exists, 0);
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
