//! Pooled Redis connections with bounded waits, shared by the Redis cache
//! backend and the cluster: the `redis` crate's own r2d2 support
//! (`r2d2_redis` is unmaintained), with a connect timeout, a checkout
//! timeout and read/write timeouts on every connection, so a slow or absent
//! Redis costs a caller at most that long.
//!
//! The pool is built without connecting: a node starts while Redis is down,
//! and connections are opened (again) on demand, so it reconnects by itself.
//!
//! Threads: the pool is shared by any number of threads.

use std::time::Duration;

use redis::ConnectionLike;

/// A pool of Redis connections.
pub type RedisPool = r2d2::Pool<Connector>;

/// Builds a pool of up to `size` connections to `url`, every wait bounded by
/// `timeout`. Fails only on a malformed URL.
pub fn pool(url: &str, timeout: Duration, size: u32) -> Result<RedisPool, redis::RedisError> {
    let client = redis::Client::open(url)?;
    Ok(r2d2::Pool::builder()
        .max_size(size.max(1))
        .min_idle(Some(0))
        // A failed command shows a dead connection; a PING per checkout
        // would double every command's round trips.
        .test_on_check_out(false)
        .connection_timeout(timeout)
        .connection_customizer(Box::new(CommandTimeouts(timeout)))
        .build_unchecked(Connector { client, timeout }))
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
