//! Which nodes still have clients following a generation another node
//! leads: a sorted set per generation ([`super::keys::watchers`]) of node
//! ids scored by when their interest lapses (milliseconds since the
//! epoch). A follower node re-marks itself every third of the lease time
//! while it has clients attached; the leader asks whether anyone is left
//! before it gives up a generation nobody here wants.
//!
//! Threads: the commands are queued by the janitor and the streaming
//! threads (sent by the cluster writer thread); [`count`] runs on the
//! janitor.

use std::time::Duration;

use super::keys;

/// Queues the mark of `node_id` watching generation `token` for `lease`.
pub(crate) fn watch(pipe: &mut redis::Pipeline, node_id: &str, token: &str, lease: Duration) {
    let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
    let key = keys::watchers(token);
    pipe.cmd("ZADD")
        .arg(&key)
        .arg(now_ms().saturating_add(lease_ms))
        .arg(node_id)
        .ignore()
        .cmd("PEXPIRE")
        .arg(&key)
        .arg(lease_ms.saturating_mul(2))
        .ignore();
}

/// Queues the removal of `node_id` from generation `token`'s watchers.
pub(crate) fn unwatch(pipe: &mut redis::Pipeline, node_id: &str, token: &str) {
    pipe.cmd("ZREM")
        .arg(keys::watchers(token))
        .arg(node_id)
        .ignore();
}

/// How many nodes' interest in generation `token` has not lapsed yet.
pub(crate) fn count(conn: &mut redis::Connection, token: &str) -> redis::RedisResult<u64> {
    redis::cmd("ZCOUNT")
        .arg(keys::watchers(token))
        .arg(format!("({}", now_ms()))
        .arg("+inf")
        .query(conn)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
