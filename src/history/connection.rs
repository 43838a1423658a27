//! How a connection to the history database is opened ([`SqliteManager`],
//! for the read pool and the writer alike) and how one gives its memory
//! back when idle.

use std::path::PathBuf;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

/// How long a connection waits on a locked database before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// An r2d2 connection manager for SQLite files.
///
/// Every connection it opens is in WAL mode with `synchronous=NORMAL` (durable
/// across process crashes, and the WAL makes commits cheap), a 5 s busy
/// timeout and foreign keys enabled.
#[derive(Debug, Clone)]
pub struct SqliteManager {
    path: PathBuf,
    query_only: bool,
}

impl SqliteManager {
    /// A manager for the database file at `path`, which is created if missing.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SqliteManager {
            path: path.into(),
            query_only: false,
        }
    }

    /// Makes connections refuse writes (`PRAGMA query_only`), for pools that
    /// must only read.
    pub fn query_only(mut self, query_only: bool) -> Self {
        self.query_only = query_only;
        self
    }
}

impl r2d2::ManageConnection for SqliteManager {
    type Connection = Connection;
    type Error = rusqlite::Error;

    fn connect(&self) -> Result<Connection, rusqlite::Error> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        // Set the timeout first: switching to WAL may itself meet a lock.
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            // Without WAL, readers would block the writer; refuse rather than
            // run with silently different concurrency.
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
                Some(format!("journal_mode is {mode}, WAL required")),
            ));
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        if self.query_only {
            conn.pragma_update(None, "query_only", "ON")?;
        }
        Ok(conn)
    }

    fn is_valid(&self, conn: &mut Connection) -> Result<(), rusqlite::Error> {
        // r2d2 calls it only for pools that test connections on checkout
        // (the history's do not: a local file cannot go stale); cheap anyway.
        conn.prepare_cached("SELECT 1")?.query_row([], |_| Ok(()))
    }

    fn has_broken(&self, _conn: &mut Connection) -> bool {
        false
    }
}

/// Hands the connection's page cache and lookaside memory back to the
/// allocator (`PRAGMA shrink_memory`): a connection keeps up to its
/// `cache_size` of pages for as long as it lives, which at idle is memory
/// that only a new burst would reuse.
pub(super) fn shrink_memory(conn: &Connection) {
    if let Err(e) = conn.execute_batch("PRAGMA shrink_memory") {
        log::debug!("history: PRAGMA shrink_memory failed: {e}");
    }
}
