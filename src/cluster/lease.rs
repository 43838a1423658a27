//! Generation leases: which node leads the generation of an
//! identical-request key, cluster-wide.
//!
//! The lease is one Redis key, `chorus:v1:lead:<hex key>`, whose value is
//! the leader's *token* (`<node id>/<generation id>`) and which expires
//! after the lease time unless the leader renews it. Claiming is
//! `SET NX PX`; renewing and releasing check the token first (in a Lua
//! script, so check and act are one step), so a node can never extend or
//! drop a lease that has passed to someone else.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use chorus::cluster::lease::{Claim, Leases};
//! let pool = chorus::redis_pool::pool("redis://127.0.0.1:6379/", Duration::from_millis(250), 4)?;
//! let leases = Leases::new(pool, Duration::from_secs(5));
//! match leases.claim(&[7; 32], "node-a/1")? {
//!     Claim::Ours => { /* lead; renew every lease/3; release at the end */ }
//!     Claim::Theirs(token) => { /* follow the stream named after `token` */ }
//! }
//! # Ok(()) }
//! ```

use std::time::Duration;

use super::ClusterError;
use crate::redis_pool::RedisPool;
use crate::request_key::Key;

/// Extends the lease only while it is still ours.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";

/// Drops the lease only while it is still ours.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key was free: this token leads it now.
    Ours,
    /// Another generation leads it; its token.
    Theirs(String),
}

/// Lease operations of one node.
pub struct Leases {
    pool: RedisPool,
    lease: Duration,
    renew: redis::Script,
    release: redis::Script,
}

impl Leases {
    /// Leases lasting `lease` unless renewed, kept in the Redis of `pool`.
    pub fn new(pool: RedisPool, lease: Duration) -> Leases {
        Leases {
            pool,
            lease,
            renew: redis::Script::new(RENEW),
            release: redis::Script::new(RELEASE),
        }
    }

    fn name(key: &Key) -> String {
        super::keys::lead(key)
    }

    fn lease_ms(&self) -> u64 {
        u64::try_from(self.lease.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Claims `key` for `token`, or tells whose it is.
    pub fn claim(&self, key: &Key, token: &str) -> Result<Claim, ClusterError> {
        let name = Self::name(key);
        let mut conn = self.pool.get()?;
        // The holder can expire between our SET and GET; then claim again.
        for _ in 0..3 {
            let set: Option<String> = redis::cmd("SET")
                .arg(&name)
                .arg(token)
                .arg("NX")
                .arg("PX")
                .arg(self.lease_ms())
                .query(&mut *conn)?;
            if set.is_some() {
                return Ok(Claim::Ours);
            }
            let holder: Option<String> = redis::cmd("GET").arg(&name).query(&mut *conn)?;
            if let Some(holder) = holder {
                return Ok(if holder == token {
                    Claim::Ours
                } else {
                    Claim::Theirs(holder)
                });
            }
        }
        Err(ClusterError::Unavailable(format!(
            "the lease {name} changed hands three times in a row"
        )))
    }

    /// Extends `token`'s lease on `key` by the lease time; false when the
    /// lease is no longer `token`'s (it expired, or another node took it).
    pub fn renew(&self, key: &Key, token: &str) -> Result<bool, ClusterError> {
        let mut conn = self.pool.get()?;
        let renewed: i64 = self
            .renew
            .key(Self::name(key))
            .arg(token)
            .arg(self.lease_ms())
            .invoke(&mut *conn)?;
        Ok(renewed == 1)
    }

    /// Gives `token`'s lease on `key` up, so the next identical request
    /// starts a fresh generation at once.
    pub fn release(&self, key: &Key, token: &str) -> Result<(), ClusterError> {
        let mut conn = self.pool.get()?;
        let _: i64 = self
            .release
            .key(Self::name(key))
            .arg(token)
            .invoke(&mut *conn)?;
        Ok(())
    }

    /// The command that gives `token`'s lease on `key` up, for a pipeline
    /// of other writes (see [`super::stream::StreamWriter::finish_with`]).
    pub fn release_command(&self, key: &Key, token: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(RELEASE).arg(1).arg(Self::name(key)).arg(token);
        cmd
    }

    /// The token holding `key`'s lease, if any.
    pub fn holder(&self, key: &Key) -> Result<Option<String>, ClusterError> {
        let mut conn = self.pool.get()?;
        Ok(redis::cmd("GET").arg(Self::name(key)).query(&mut *conn)?)
    }
}
