//! Every Redis key chorus writes, in one table, and the one place their
//! names are made. Bump the `v1` when a value's layout changes in a way
//! an older node would misread.
//!
//! | key | Redis type | what it holds | written by | expires |
//! | --- | --- | --- | --- | --- |
//! | `chorus:v1:answer:<hex key>` | string | a cached answer | `cache::redis` | `cache.ttl_s` |
//! | `chorus:v1:lead:<hex key>` | string | the token of the node leading that generation | [`super::lease`] | the lease time, renewed while it runs |
//! | `chorus:v1:stream:<token>` | stream | the generation's tokens and its end marker | [`super::stream`] | `replay_window_ms` after its end |
//! | `chorus:v1:watchers:<token>` | sorted set | nodes with clients following that generation, scored by when their interest lapses | `cluster::watchers` | twice the lease time |
//! | `chorus:v1:request:<id>` | string (JSON) | where another node finds a request for `resume` | `cluster::records` | `request_ms` + `replay_window_ms` |
//!
//! `<hex key>` is the identical-request key in lowercase hex (64
//! digits); `<token>` names one generation cluster-wide
//! (`<node id>.<random>/<generation>`, or `…/r/<request id>` for the
//! stream of one ended request). The operators' copy of this table, with
//! the same keys, is in docs/scaling.md (a test checks they agree).
//!
//! Threads: pure functions, any thread.

use crate::request_key::{hex, Key};

/// A cached answer.
pub(crate) fn answer(key: &Key) -> String {
    format!("chorus:v1:answer:{}", hex(key))
}

/// The lease on leading the generation of `key`.
pub(crate) fn lead(key: &Key) -> String {
    format!("chorus:v1:lead:{}", hex(key))
}

/// The token stream of generation `token`.
pub fn stream(token: &str) -> String {
    format!("chorus:v1:stream:{token}")
}

/// The nodes watching generation `token`.
pub(crate) fn watchers(token: &str) -> String {
    format!("chorus:v1:watchers:{token}")
}

/// The resume record of request `id`.
pub(crate) fn request(id: &str) -> String {
    format!("chorus:v1:request:{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_has_the_version_prefix() {
        let key = [1; 32];
        for name in [
            answer(&key),
            lead(&key),
            stream("n/1"),
            watchers("n/1"),
            request("r-1"),
        ] {
            assert!(name.starts_with("chorus:v1:"), "{name}");
        }
    }
}
