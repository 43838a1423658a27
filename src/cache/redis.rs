//! The Redis cache backend: answers shared by every chorus node that points
//! at the same Redis.
//!
//! Entries live under `chorus:v1:answer:<hex key>` with the cache TTL set
//! by Redis (`SET … PX`), so nothing outlives `ttl_s` and nothing needs
//! cleaning up. The value keeps the original token boundaries: a version
//! byte, then each token as a little-endian `u32` length and its bytes.
//!
//! Redis is an optimisation here, never a dependency: connections come
//! from an r2d2 pool (the `redis` crate's own r2d2 support) that is built
//! without connecting, so a node starts while Redis is down; checkout,
//! connect and every command are bounded by `redis_timeout_ms`; any failure
//! is a miss. A failure also opens a [`Breaker`]: while Redis is known to be
//! down, `get` is a miss and `put` does nothing, at once, without touching
//! the network, so a frozen Redis costs the calls in flight when it froze
//! and nothing after; a background probe closes the breaker when Redis
//! answers again. An outage is logged when it starts and when it ends.
//!
//! Threads: cache lane workers call `get`, the thread ending a generation
//! calls `put`; the pool is shared and internally synchronised.

use std::sync::Arc;
use std::time::Duration;

use redis::Commands;

use crate::breaker::{Breaker, BreakerError};
use crate::redis_pool::RedisPool;

use super::{Cache, CacheError, CachedAnswer, Key};

/// Version of the stored value's layout; part of every key. A value starts
/// with it, or with [`LAYOUT_USAGE`] when it carries its usage.
const LAYOUT: u8 = 1;
/// The same, with the usage the answer cost upstream in front.
const LAYOUT_USAGE: u8 = 2;

/// The backend. See the module documentation.
pub struct RedisCache {
    pool: RedisPool,
    ttl: Duration,
    breaker: Breaker,
}

impl RedisCache {
    /// A cache on the Redis at `url`; does not connect yet.
    pub fn new(
        url: &str,
        ttl: Duration,
        timeout: Duration,
        pool_size: u32,
    ) -> Result<RedisCache, CacheError> {
        let pool = crate::redis_pool::pool(url, timeout, pool_size)
            .map_err(|e| CacheError::Unavailable(format!("bad cache.redis_url: {e}")))?;
        let breaker = crate::redis_pool::breaker(
            &pool,
            "the Redis cache",
            "every lookup is a miss until it is back",
        );
        Ok(RedisCache { pool, ttl, breaker })
    }

    /// A cache on a loopback port nothing listens on (one that was just
    /// free): every command fails, within a 200 ms timeout.
    #[cfg(test)]
    pub(crate) fn unreachable() -> RedisCache {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        RedisCache::new(
            &format!("redis://127.0.0.1:{port}/"),
            Duration::from_secs(60),
            Duration::from_millis(200),
            2,
        )
        .expect("a valid URL")
    }

    fn redis_key(key: &Key) -> String {
        crate::cluster::keys::answer(key)
    }

    /// Runs `f` on a pooled connection unless Redis is known to be down.
    fn with_connection<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, CacheError> {
        self.breaker
            .call(|| {
                let mut conn = self.pool.get().map_err(|e| e.to_string())?;
                f(&mut conn).map_err(|e| e.to_string())
            })
            .map_err(|e| match e {
                BreakerError::Open => CacheError::Unavailable("known to be down".into()),
                BreakerError::Failed(e) => CacheError::Unavailable(e),
            })
    }
}

/// `[LAYOUT]`, then with [`LAYOUT_USAGE`] the usage (prompt and completion
/// tokens, u64 LE each), then `[len u32 LE][bytes]…` for each token.
fn encode(answer: &CachedAnswer) -> Vec<u8> {
    let mut out = Vec::with_capacity(17 + answer.text.len() + 4 * answer.ends.len());
    match answer.usage {
        Some(usage) => {
            out.push(LAYOUT_USAGE);
            out.extend_from_slice(&usage.prompt_tokens.to_le_bytes());
            out.extend_from_slice(&usage.completion_tokens.to_le_bytes());
        }
        None => out.push(LAYOUT),
    }
    for piece in answer.pieces() {
        out.extend_from_slice(&(piece.len() as u32).to_le_bytes());
        out.extend_from_slice(piece.as_bytes());
    }
    out
}

fn decode(bytes: &[u8]) -> Option<CachedAnswer> {
    let (&layout, mut rest) = bytes.split_first()?;
    let usage = match layout {
        LAYOUT => None,
        LAYOUT_USAGE => {
            let (prompt, tail) = rest.split_first_chunk::<8>()?;
            let (completion, tail) = tail.split_first_chunk::<8>()?;
            rest = tail;
            Some(crate::protocol::Usage {
                prompt_tokens: u64::from_le_bytes(*prompt),
                completion_tokens: u64::from_le_bytes(*completion),
            })
        }
        _ => return None,
    };
    let mut pieces = Vec::new();
    while !rest.is_empty() {
        let (len, tail) = rest.split_first_chunk::<4>()?;
        let len = u32::from_le_bytes(*len) as usize;
        let piece = std::str::from_utf8(tail.get(..len)?).ok()?;
        pieces.push(piece);
        rest = &tail[len..];
    }
    Some(CachedAnswer {
        usage,
        ..CachedAnswer::from_pieces(pieces)
    })
}

impl Cache for RedisCache {
    fn get(&self, key: &Key) -> Result<Option<Arc<CachedAnswer>>, CacheError> {
        let name = Self::redis_key(key);
        let value: Option<Vec<u8>> = self.with_connection(|conn| conn.get(&name))?;
        match value.as_deref().map(decode) {
            Some(Some(answer)) => Ok(Some(Arc::new(answer))),
            Some(None) => {
                log::warn!("ignoring a malformed cache entry {name}");
                Ok(None)
            }
            None => Ok(None),
        }
    }

    fn put(&self, key: &Key, answer: Arc<CachedAnswer>) -> Result<(), CacheError> {
        let name = Self::redis_key(key);
        let value = encode(&answer);
        let ttl_ms = u64::try_from(self.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.with_connection(|conn| {
            redis::cmd("SET")
                .arg(&name)
                .arg(value)
                .arg("PX")
                .arg(ttl_ms)
                .query::<()>(conn)
        })
    }

    fn entries(&self) -> Option<u64> {
        None
    }

    fn is_up(&self) -> bool {
        !self.breaker.is_open()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_keeps_the_usage_it_cost() {
        let answer = CachedAnswer {
            usage: Some(crate::protocol::Usage {
                prompt_tokens: 12,
                completion_tokens: 3,
            }),
            ..CachedAnswer::from_pieces(["a", "b", "c"])
        };
        assert_eq!(decode(&encode(&answer)), Some(answer.clone()));
        let without = CachedAnswer::from_pieces(["a"]);
        assert_eq!(decode(&encode(&without)), Some(without));
        assert!(decode(&[LAYOUT_USAGE, 1, 2, 3]).is_none(), "short usage");
    }

    #[test]
    fn values_keep_token_boundaries_and_refuse_garbage() {
        let answer = CachedAnswer::from_pieces(["Hel", "lo", " wörld", "", "🦀"]);
        let back = decode(&encode(&answer)).unwrap();
        assert_eq!(back, answer);
        assert_eq!(
            back.pieces().collect::<Vec<_>>(),
            ["Hel", "lo", " wörld", "", "🦀"]
        );
        assert!(decode(&[]).is_none());
        assert!(decode(&[9, 0, 0, 0, 0]).is_none(), "unknown layout");
        assert!(decode(&[LAYOUT, 5, 0, 0, 0, b'a']).is_none(), "truncated");
        assert!(decode(&[LAYOUT, 1, 0, 0, 0, 0xff]).is_none(), "not UTF-8");
        assert!(decode(&[LAYOUT, 1, 0]).is_none(), "short length");
    }

    #[test]
    fn keys_are_namespaced_and_versioned() {
        let name = RedisCache::redis_key(&[0xab; 32]);
        assert!(name.starts_with("chorus:v1:answer:abab"));
        assert_eq!(name.len(), "chorus:v1:answer:".len() + 64);
    }

    #[test]
    fn an_unreachable_redis_is_a_miss_within_the_timeout() {
        let cache = RedisCache::unreachable();
        let started = std::time::Instant::now();
        assert!(cache.get(&[1; 32]).is_err());
        assert!(!cache.is_up());
        assert!(cache
            .put(&[1; 32], Arc::new(CachedAnswer::from_pieces(["x"])))
            .is_err());
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(cache.breaker.outages(), 1);
    }
}
