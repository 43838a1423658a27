//! The resume records: where another node finds a request this node
//! accepted ([`super::keys::request`]), one JSON string each. What a
//! record says is the pipeline's business (`pipeline/cluster_resume.rs`);
//! this module only stores and fetches them.
//!
//! Threads: [`set`] queues on the thread that closes a connection or ends
//! a request (the cluster writer thread sends it); [`get_all`] runs on the
//! cluster's lookup thread.

use std::time::Duration;

use super::keys;

/// Queues storing `record` for request `id`, kept for `keep`.
pub(crate) fn set(pipe: &mut redis::Pipeline, id: &str, record: &str, keep: Duration) {
    let keep_ms = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX).max(1);
    pipe.cmd("SET")
        .arg(keys::request(id))
        .arg(record)
        .arg("PX")
        .arg(keep_ms)
        .ignore();
}

/// The records of `ids`, in order; `None` where there is none.
pub(crate) fn get_all(
    conn: &mut redis::Connection,
    ids: &[&str],
) -> redis::RedisResult<Vec<Option<String>>> {
    let keys: Vec<String> = ids.iter().map(|id| keys::request(id)).collect();
    redis::cmd("MGET").arg(&keys).query(conn)
}
