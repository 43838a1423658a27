//! Pooled Redis connections with bounded waits, shared by the Redis cache
//! backend and the cluster: the `redis` crate's own r2d2 support
//! (`r2d2_redis` is unmaintained), with a connect timeout, a checkout
//! timeout and read/write timeouts on every connection, so a slow or absent
//! Redis costs a caller at most that long.
//!
//! The pool is built without connecting: a node starts while Redis is down,
//! and connections are opened (again) on demand, so it reconnects by itself.
//! Its users put a [`Breaker`] in front of it ([`breaker`]): r2d2's own
//! error log (one ERROR line per failed connection attempt) is silenced,
//! and the breaker logs an outage once when it starts and once when it ends.
//!
//! Threads: the pool is shared by any number of threads.

use std::time::Duration;

use redis::ConnectionLike;

use crate::breaker::Breaker;

/// First pause of a breaker's probe after an outage starts.
const FIRST_PROBE: Duration = Duration::from_millis(100);
/// Longest pause between two probes of a Redis that stays away.
const MAX_PROBE: Duration = Duration::from_secs(2);

/// A pool of Redis connections.
pub type RedisPool = r2d2::Pool<Connector>;

/// Builds a pool of up to `size` connections to `url`, every wait bounded by
/// `timeout`. Fails only on a malformed URL.
pub fn pool(url: &str, timeout: Duration, size: u32) -> Result<RedisPool, redis::RedisError> {
    let client = redis::Client::open(url)?;
    Ok(r2d2::Pool::builder()
        .thread_pool(crate::pool::r2d2_threads())
        .max_size(size.max(1))
        .min_idle(Some(0))
        // A failed command shows a dead connection; a PING per checkout
        // would double every command's round trips.
        .test_on_check_out(false)
        .connection_timeout(timeout)
        .connection_customizer(Box::new(CommandTimeouts(timeout)))
        // The breaker in front of the pool logs outages; r2d2 would log
        // every failed connection attempt of its own, hundreds a second.
        .error_handler(Box::new(r2d2::NopErrorHandler))
        .build_unchecked(Connector { client, timeout }))
}

/// A breaker for the Redis behind `pool`, probed with a `PING` on a
/// pooled connection. `name` and `consequence` go into its outage lines.
pub fn breaker(pool: &RedisPool, name: &str, consequence: &str) -> Breaker {
    let pool = pool.clone();
    Breaker::new(
        name,
        consequence,
        move || {
            let mut conn = pool.get().map_err(|e| e.to_string())?;
            redis::cmd("PING")
                .query::<String>(&mut *conn)
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
        FIRST_PROBE,
        MAX_PROBE,
    )
}

/// Sets the command timeouts on each new connection of the pool.
#[derive(Debug)]
struct CommandTimeouts(Duration);

impl r2d2::CustomizeConnection<redis::Connection, redis::RedisError> for CommandTimeouts {
    fn on_acquire(&self, conn: &mut redis::Connection) -> Result<(), redis::RedisError> {
        conn.set_read_timeout(Some(self.0))?;
        conn.set_write_timeout(Some(self.0))
    }
}

/// Opens connections with a bounded connect time.
#[derive(Debug)]
pub struct Connector {
    client: redis::Client,
    timeout: Duration,
}

impl r2d2::ManageConnection for Connector {
    type Connection = redis::Connection;
    type Error = redis::RedisError;

    fn connect(&self) -> Result<redis::Connection, redis::RedisError> {
        self.client.get_connection_with_timeout(self.timeout)
    }

    fn is_valid(&self, conn: &mut redis::Connection) -> Result<(), redis::RedisError> {
        redis::cmd("PING").query::<String>(conn).map(|_| ())
    }

    fn has_broken(&self, conn: &mut redis::Connection) -> bool {
        !conn.is_open()
    }
}
