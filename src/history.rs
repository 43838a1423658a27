//! Conversation history, stored in SQLite.
//!
//! This module keeps the messages of every conversation and, for each
//! conversation, a [`Head`]: how many messages are stored and a SHA-256 digest
//! chained over all of them (see [`chain_digest`]). The pipeline compares the
//! head a client claims with the stored one to notice a diverged history, and
//! reads the stored messages back as model context.
//!
//! # Threading rules
//!
//! * **Reads** ([`History::head`], [`History::context`], [`History::recent`])
//!   run on the calling thread (connection threads, pipeline workers) with a
//!   connection borrowed from an r2d2 pool. In WAL mode readers never block
//!   the writer nor each other, so there is nothing to gain from funnelling
//!   them through another thread. Pooled connections are `query_only`, which
//!   turns any accidental write from a reader into an error.
//! * **Writes** ([`History::write`]) never touch SQLite on the caller's
//!   thread: they are queued on an unbounded channel and applied by **one**
//!   writer thread. SQLite allows a single writer at a time anyway; letting
//!   many pool threads fight for the write lock only buys `SQLITE_BUSY` waits.
//!   The writer commits whatever is queued in one transaction (group commit),
//!   so under load one fsync covers hundreds of messages.
//! * **Callbacks** passed to [`History::write`] run on the writer thread,
//!   after the transaction holding their op has committed, in the order the
//!   ops were queued. That is what lets the pipeline release a conversation
//!   (and tell the client `done`) only once its messages are durable, so the
//!   next request of that conversation always sees them. Callbacks hold up
//!   every later write, so they must be short and must not block; in
//!   particular they must not call [`History::sync`] (which would wait for
//!   the thread it runs on) or [`History::shutdown`] expecting it to have
//!   finished. A panicking callback is caught and logged.
//!
//! # Example
//!
//! ```
//! use chorus::history::{History, Role};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let history = History::open(&dir.path().join("history.db"), 2)?;
//!
//! history.write("conv-1", Some((Role::User, "Hello?".to_string())), |result| {
//!     if let Err(e) = result {
//!         log::error!("not stored: {e}");
//!     }
//! });
//! history.write("conv-1", Some((Role::Assistant, "Hi!".to_string())), |_| {});
//! // Wait until both messages are committed.
//! history.sync()?;
//!
//! let head = history.head("conv-1")?.ok_or("conversation missing")?;
//! assert_eq!(head.len, 2);
//! let messages = history.context("conv-1", head.len)?;
//! assert_eq!(messages[0].role, Role::User);
//! assert_eq!(messages[0].content, "Hello?");
//! assert_eq!(messages[1].content, "Hi!");
//!
//! history.shutdown();
//! # Ok(())
//! # }
//! ```

mod newest;

pub use newest::{Take, Walk};

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle, ThreadId};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, SendError, Sender};
use parking_lot::{Mutex, RwLock};
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ValueRef};
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use sha2::{Digest, Sha256};

/// Value of `PRAGMA user_version` for the schema this module creates.
const SCHEMA_VERSION: i64 = 3;

/// Most ops committed in one transaction. Bounds the latency a single batch
/// adds to the first op's callback while still amortising the commit.
const MAX_BATCH: usize = 512;

/// How long a connection waits on a locked database before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the writer goes without a write before it gives its
/// connection's caches back (`PRAGMA shrink_memory`): long enough that a
/// busy server never pays for it, short enough to come before the
/// janitor's release at the end of the replay window.
pub const WRITER_IDLE: Duration = Duration::from_secs(10);

const SCHEMA: &str = "
    BEGIN;
    CREATE TABLE IF NOT EXISTS conversations (
        id TEXT PRIMARY KEY,
        len INTEGER NOT NULL,
        digest BLOB NOT NULL,
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS messages (
        conversation TEXT NOT NULL,
        idx INTEGER NOT NULL,
        role TEXT NOT NULL CHECK(role IN ('user','assistant')),
        content TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        -- 1 for an answer cut short (cancelled, failed, timed out, drained).
        partial INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY(conversation, idx)
    ) WITHOUT ROWID;
    -- Full-text index for search_history, filled per conversation on
    -- demand (see `History::search`), so storing a message never pays for it.
    CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5(
        content,
        conversation UNINDEXED,
        idx UNINDEXED,
        role UNINDEXED
    );
    CREATE TABLE IF NOT EXISTS fts_progress (
        conversation TEXT PRIMARY KEY,
        indexed INTEGER NOT NULL
    ) WITHOUT ROWID;
    PRAGMA user_version = 3;
    COMMIT;
";

const SEARCH: &str = "SELECT role, content, idx FROM messages_fts \
     WHERE messages_fts MATCH ?1 AND conversation = ?2 ORDER BY rank LIMIT ?3";
const INDEXED: &str = "SELECT indexed FROM fts_progress WHERE conversation = ?1";
const INDEX_NEW: &str = "INSERT INTO messages_fts (content, conversation, idx, role) \
     SELECT content, conversation, idx, role FROM messages \
     WHERE conversation = ?1 AND idx >= ?2 ORDER BY idx";
const SET_INDEXED: &str = "INSERT INTO fts_progress (conversation, indexed) VALUES (?1, ?2) \
     ON CONFLICT(conversation) DO UPDATE SET indexed = excluded.indexed";

const SELECT_HEAD: &str = "SELECT len, digest FROM conversations WHERE id = ?1";
const SELECT_BEFORE: &str = "SELECT role, content, at_ms, partial FROM messages \
     WHERE conversation = ?1 AND idx < ?2 ORDER BY idx";
const SELECT_FROM: &str = "SELECT role, content, at_ms, partial FROM messages \
     WHERE conversation = ?1 AND idx >= ?2 ORDER BY idx";
const INSERT_MESSAGE: &str =
    "INSERT INTO messages (conversation, idx, role, content, at_ms, partial) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
const UPSERT_HEAD: &str = "INSERT INTO conversations (id, len, digest, created_ms, updated_ms) \
     VALUES (?1, ?2, ?3, ?4, ?4) \
     ON CONFLICT(id) DO UPDATE SET len = excluded.len, digest = excluded.digest, \
     updated_ms = excluded.updated_ms";

/// A message found by [`History::search`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    /// Who wrote it.
    pub role: Role,
    /// The whole message.
    pub content: String,
    /// Its position in the conversation, from 0.
    pub index: u64,
}

/// An FTS5 query matching any of the words of `query`, each quoted so
/// that nothing a user types is read as query syntax. `None` when there
/// is no word.
fn match_expression(query: &str) -> Option<String> {
    let words: Vec<String> = query
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(16)
        .map(|w| format!("\"{w}\""))
        .collect();
    (!words.is_empty()).then(|| words.join(" OR "))
}

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The human side of the conversation.
    User,
    /// The model's reply.
    Assistant,
}

impl Role {
    /// The name stored in the `role` column: `"user"` or `"assistant"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    /// The byte fed into the digest chain for this role.
    fn digest_byte(self) -> u8 {
        match self {
            Role::User => b'u',
            Role::Assistant => b'a',
        }
    }
}

impl FromSql for Role {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        match value.as_str()? {
            "user" => Ok(Role::User),
            "assistant" => Ok(Role::Assistant),
            _ => Err(FromSqlError::InvalidType),
        }
    }
}

/// One stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// The text, exactly as written.
    pub content: String,
    /// When it was queued for storage, in milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// An answer cut short: cancelled, failed, timed out or drained at
    /// shutdown (see [`History::write_answer`]). Never set on a question.
    pub partial: bool,
}

impl Message {
    /// [`Message::at_ms`] as RFC 3339 in UTC with seconds precision, e.g.
    /// `"2026-11-23T08:00:00Z"`.
    pub fn at_rfc3339(&self) -> String {
        rfc3339_seconds(self.at_ms)
    }
}

/// The state of a conversation: how many messages it has and a digest
/// chained over all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Number of stored messages.
    pub len: u64,
    /// [`chain_digest`] folded over the messages, starting from all zeroes.
    pub digest: [u8; 32],
}

impl Head {
    /// The head of a conversation without messages.
    pub const EMPTY: Head = Head {
        len: 0,
        digest: [0u8; 32],
    };
}

/// Extends a conversation digest by one message:
/// `sha256(prev || role_byte || (content.len() as u64).to_le_bytes() || content)`,
/// where `role_byte` is `b'u'` or `b'a'`.
///
/// The length prefix keeps the encoding unambiguous, so no two different
/// histories chain to the same input.
pub fn chain_digest(prev: &[u8; 32], role: Role, content: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(prev);
    hasher.update([role.digest_byte()]);
    hasher.update((content.len() as u64).to_le_bytes());
    hasher.update(content.as_bytes());
    hasher.finalize().into()
}

/// Errors of the history layer.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The database could not be opened or prepared.
    #[error("cannot open history database {}: {source}", path.display())]
    Open {
        /// The database path given to [`History::open`].
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A query or write failed.
    #[error("history database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// No read connection could be borrowed from the pool.
    #[error("history read pool: {0}")]
    Pool(#[from] r2d2::Error),
    /// The writer thread has stopped (after [`History::shutdown`]).
    #[error("history writer has stopped")]
    WriterStopped,
    /// [`History::sync`] was called from a write callback; waiting there for
    /// the writer thread would deadlock it.
    #[error("History::sync called on the history writer thread")]
    SyncOnWriterThread,
}

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
        // Runs on every checkout, so keep the statement cached.
        conn.prepare_cached("SELECT 1")?.query_row([], |_| Ok(()))
    }

    fn has_broken(&self, _conn: &mut Connection) -> bool {
        false
    }
}

type Callback = Box<dyn FnOnce(Result<(), HistoryError>) + Send + 'static>;

/// One queued write.
struct Op {
    conversation: String,
    /// Appended in order, in one transaction; empty for a barrier. Shared
    /// text, so one answer stored in several conversations (a leader's and
    /// its followers') is held once while it waits.
    messages: Vec<(Role, Arc<str>)>,
    /// Bring the conversation's full-text index up to date.
    index: bool,
    /// The op's answer is partial (see [`Message::partial`]).
    partial: bool,
    at_ms: i64,
    then: Callback,
}

/// Counters shared between handles and the writer thread.
#[derive(Default)]
struct Stats {
    pending: AtomicUsize,
    batches: AtomicU64,
    /// Rows read by [`History::newest_first`] and [`History::context`].
    rows_read: AtomicU64,
}

/// A handle on the conversation history. Cheap to clone; all clones share the
/// same pool and writer thread.
#[derive(Clone)]
pub struct History {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    pool: r2d2::Pool<SqliteManager>,
    /// `None` once shut down. Senders hold the read lock, so `shutdown` taking
    /// the write lock cannot race an op into a channel nobody drains.
    sender: RwLock<Option<Sender<Op>>>,
    /// Held while joining so a concurrent `shutdown` waits for the first one.
    writer: Mutex<Option<JoinHandle<()>>>,
    writer_id: ThreadId,
    stats: Arc<Stats>,
}

impl History {
    /// Opens (creating if needed) the history database at `path`, with up to
    /// `read_pool_size` pooled read connections (at least one), and starts
    /// the writer thread. Missing parent directories are created.
    pub fn open(path: &Path, read_pool_size: u32) -> Result<History, HistoryError> {
        let open_err = |source: Box<dyn std::error::Error + Send + Sync>| HistoryError::Open {
            path: path.to_path_buf(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| open_err(Box::new(e)))?;
        }

        let manager = SqliteManager::new(path);
        // The writer connection creates the schema before any reader exists,
        // so readers never see a half-made database.
        let conn = r2d2::ManageConnection::connect(&manager).map_err(|e| open_err(Box::new(e)))?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(|e| open_err(Box::new(e)))?;
        if version > SCHEMA_VERSION {
            return Err(open_err(
                format!("schema version {version} is newer than supported {SCHEMA_VERSION}").into(),
            ));
        }
        conn.execute_batch(SCHEMA)
            .map_err(|e| open_err(Box::new(e)))?;
        add_partial_column(&conn).map_err(|e| open_err(Box::new(e)))?;

        let pool = r2d2::Pool::builder()
            .thread_pool(crate::pool::r2d2_threads())
            .max_size(read_pool_size.max(1))
            // A local SQLite connection cannot go stale; testing it on every
            // checkout would add a query to every read.
            .test_on_check_out(false)
            // Readers run on connection threads: when every pooled connection
            // stays busy, fail fast (the client gets `overloaded`) rather
            // than hold the thread for r2d2's default 30 s.
            .connection_timeout(Duration::from_secs(2))
            .build(manager.query_only(true))?;

        let (sender, receiver) = crossbeam_channel::unbounded();
        let stats = Arc::new(Stats::default());
        let writer_stats = Arc::clone(&stats);
        let writer = thread::Builder::new()
            .name("history-writer".to_string())
            .spawn(move || writer_loop(conn, receiver, writer_stats))
            .map_err(|e| open_err(Box::new(e)))?;

        Ok(History {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                pool,
                sender: RwLock::new(Some(sender)),
                writer_id: writer.thread().id(),
                writer: Mutex::new(Some(writer)),
                stats,
            }),
        })
    }

    /// The head of `conversation`, or `None` if it has never been written.
    pub fn head(&self, conversation: &str) -> Result<Option<Head>, HistoryError> {
        let conn = self.inner.pool.get()?;
        Ok(read_head(&conn, conversation)?)
    }

    /// The first `before` messages (idx < before) of the conversation, oldest
    /// first.
    pub fn context(&self, conversation: &str, before: u64) -> Result<Vec<Message>, HistoryError> {
        let conn = self.inner.pool.get()?;
        let before = i64::try_from(before).unwrap_or(i64::MAX);
        let mut stmt = conn.prepare_cached(SELECT_BEFORE)?;
        let rows = stmt.query_map(rusqlite::params![conversation, before], message_from_row)?;
        let messages = rows.collect::<Result<Vec<_>, _>>()?;
        let read = messages.len() as u64;
        self.inner
            .stats
            .rows_read
            .fetch_add(read, Ordering::Relaxed);
        Ok(messages)
    }

    /// The last `limit` messages, oldest first; `None` when the conversation
    /// is unknown.
    pub fn recent(
        &self,
        conversation: &str,
        limit: usize,
    ) -> Result<Option<Vec<Message>>, HistoryError> {
        let mut conn = self.inner.pool.get()?;
        // One read transaction, so the length and the rows come from the same
        // snapshot even if the writer commits in between.
        let tx = conn.transaction()?;
        let Some(head) = read_head(&tx, conversation)? else {
            return Ok(None);
        };
        let from = head.len.saturating_sub(limit as u64);
        let from = i64::try_from(from).unwrap_or(i64::MAX);
        let messages = {
            let mut stmt = tx.prepare_cached(SELECT_FROM)?;
            let rows = stmt.query_map(rusqlite::params![conversation, from], message_from_row)?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        tx.finish()?;
        Ok(Some(messages))
    }

    /// Queues an append (or, with `None`, just a barrier) on the writer
    /// thread; `then` runs on the writer thread after the commit (or with the
    /// error). Never blocks on SQLite. If the writer is gone, `then` is called
    /// at once, on this thread, with [`HistoryError::WriterStopped`].
    ///
    /// A message for an unknown conversation creates it.
    pub fn write(
        &self,
        conversation: &str,
        message: Option<(Role, String)>,
        then: impl FnOnce(Result<(), HistoryError>) + Send + 'static,
    ) {
        self.write_all(conversation, message.into_iter().collect(), then);
    }

    /// Like [`History::write`] with several messages, appended in order and
    /// committed together (or not at all): a question and its answer cost
    /// one queue entry and at most one commit.
    pub fn write_all<S: Into<Arc<str>>>(
        &self,
        conversation: &str,
        messages: Vec<(Role, S)>,
        then: impl FnOnce(Result<(), HistoryError>) + Send + 'static,
    ) {
        self.submit(Op {
            conversation: conversation.to_string(),
            messages: messages
                .into_iter()
                .map(|(role, text)| (role, text.into()))
                .collect(),
            index: false,
            partial: false,
            at_ms: now_ms(),
            then: Box::new(then),
        });
    }

    /// Appends the answer of a request that ended, marked `partial` when it
    /// was cut short, so neither a reader of the history nor a crash test
    /// takes a cancelled answer for a complete one. Like [`History::write`]
    /// otherwise.
    pub fn write_answer(
        &self,
        conversation: &str,
        answer: Arc<str>,
        partial: bool,
        then: impl FnOnce(Result<(), HistoryError>) + Send + 'static,
    ) {
        self.submit(Op {
            conversation: conversation.to_string(),
            messages: vec![(Role::Assistant, answer)],
            index: false,
            partial,
            at_ms: now_ms(),
            then: Box::new(then),
        });
    }

    /// Queues `op` for the writer, or fails its callback when stopped.
    fn submit(&self, op: Op) {
        let guard = self.inner.sender.read();
        let Some(sender) = guard.as_ref() else {
            drop(guard);
            (op.then)(Err(HistoryError::WriterStopped));
            return;
        };
        // Count before sending so the writer's decrement can never come first.
        self.inner.stats.pending.fetch_add(1, Ordering::Relaxed);
        if let Err(SendError(op)) = sender.send(op) {
            drop(guard);
            self.inner.stats.pending.fetch_sub(1, Ordering::Relaxed);
            (op.then)(Err(HistoryError::WriterStopped));
        }
    }

    /// Full-text search over one conversation's messages: up to `limit`
    /// best matches for any of the words of `query`, best first. Nobody
    /// else's messages can match. The conversation's index is brought up
    /// to date first, by the writer thread, so this waits for one commit.
    pub fn search(
        &self,
        conversation: &str,
        query: &str,
        limit: usize,
    ) -> Result<Vec<Hit>, HistoryError> {
        let Some(expression) = match_expression(query) else {
            return Ok(Vec::new());
        };
        if thread::current().id() == self.inner.writer_id {
            return Err(HistoryError::SyncOnWriterThread);
        }
        let (done, wait) = crossbeam_channel::bounded(1);
        let op = Op {
            conversation: conversation.to_owned(),
            messages: Vec::new(),
            index: true,
            partial: false,
            at_ms: now_ms(),
            then: Box::new(move |result| {
                let _ = done.send(result);
            }),
        };
        self.submit(op);
        wait.recv().unwrap_or(Err(HistoryError::WriterStopped))?;
        let conn = self.inner.pool.get()?;
        let mut stmt = conn.prepare_cached(SEARCH)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map(rusqlite::params![expression, conversation, limit], |row| {
            Ok(Hit {
                role: row.get(0)?,
                content: row.get(1)?,
                index: row.get::<_, i64>(2)?.try_into().unwrap_or(0),
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Blocks until everything queued before this call is committed.
    ///
    /// Must not be called from a write callback (returns
    /// [`HistoryError::SyncOnWriterThread`] there).
    pub fn sync(&self) -> Result<(), HistoryError> {
        if thread::current().id() == self.inner.writer_id {
            return Err(HistoryError::SyncOnWriterThread);
        }
        let (done, wait) = crossbeam_channel::bounded(1);
        self.write("", None, move |result| {
            // The waiter only goes away if sync's caller did; nothing to do.
            let _ = done.send(result);
        });
        // A dropped callback (writer died mid-batch) also means stopped.
        wait.recv().unwrap_or(Err(HistoryError::WriterStopped))
    }

    /// Commits what is queued, stops and joins the writer thread, and runs
    /// `PRAGMA wal_checkpoint(TRUNCATE)`. Idempotent. Later writes get
    /// [`HistoryError::WriterStopped`].
    ///
    /// Called from a write callback it cannot wait for its own thread: the
    /// writer then finishes the queue and stops on its own.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }

    /// Gives the page caches of the pooled read connections that are idle
    /// now back to the allocator. The writer's connection does the same by
    /// itself after [`WRITER_IDLE`] without a write. Called when the server
    /// has nothing running; a connection in use is skipped.
    pub fn release_memory(&self) {
        let idle = self.inner.pool.state().idle_connections;
        // Held together, so every idle connection is visited once.
        let conns: Vec<_> = (0..idle).map_while(|_| self.inner.pool.try_get()).collect();
        for conn in &conns {
            shrink_memory(conn);
        }
    }

    /// Number of ops queued and not yet committed (for metrics).
    pub fn pending_writes(&self) -> usize {
        self.inner.stats.pending.load(Ordering::Relaxed)
    }

    /// Number of write transactions committed so far (each commits a batch
    /// of ops: group commit).
    pub fn committed_batches(&self) -> u64 {
        self.inner.stats.batches.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History")
            .field("path", &self.inner.path)
            .field("pending_writes", &self.pending_writes())
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn shutdown(&self) {
        // Dropping the only sender lets the writer drain the queue and exit.
        drop(self.sender.write().take());
        if thread::current().id() == self.writer_id {
            return;
        }
        let mut writer = self.writer.lock();
        if let Some(handle) = writer.take() {
            if handle.join().is_err() {
                log::error!("history writer thread panicked");
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Losing the last handle must not lose queued writes.
        self.shutdown();
    }
}

/// Version 3 marks partial answers: a database made by an older version
/// has the `messages` table without that column (its answers are taken as
/// complete, which is all that version could say of them).
fn add_partial_column(conn: &Connection) -> rusqlite::Result<()> {
    let has_it = conn
        .prepare("SELECT 1 FROM pragma_table_info('messages') WHERE name = 'partial'")?
        .exists([])?;
    if !has_it {
        conn.execute_batch("ALTER TABLE messages ADD COLUMN partial INTEGER NOT NULL DEFAULT 0")?;
    }
    Ok(())
}

fn read_head(conn: &Connection, conversation: &str) -> rusqlite::Result<Option<Head>> {
    let mut stmt = conn.prepare_cached(SELECT_HEAD)?;
    stmt.query_row([conversation], |row| {
        let len: i64 = row.get(0)?;
        Ok(Head {
            len: u64::try_from(len)
                .map_err(|_| rusqlite::Error::IntegralValueOutOfRange(0, len))?,
            digest: row.get(1)?,
        })
    })
    .optional()
}

fn message_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
    Ok(Message {
        role: row.get(0)?,
        content: row.get(1)?,
        at_ms: row.get(2)?,
        partial: row.get(3)?,
    })
}

fn writer_loop(mut conn: Connection, receiver: Receiver<Op>, stats: Arc<Stats>) {
    let mut batch: Vec<Op> = Vec::with_capacity(MAX_BATCH);
    // Whether the connection wrote since it last gave its caches back.
    let mut wrote = false;
    loop {
        // recv fails only once every sender is gone and the queue is empty,
        // so everything queued before shutdown still gets committed.
        let first = if wrote {
            match receiver.recv_timeout(WRITER_IDLE) {
                Ok(op) => op,
                Err(RecvTimeoutError::Timeout) => {
                    shrink_memory(&conn);
                    wrote = false;
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match receiver.recv() {
                Ok(op) => op,
                Err(_) => break,
            }
        };
        wrote = true;
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let results = commit(&mut conn, &batch);
        stats.pending.fetch_sub(batch.len(), Ordering::Relaxed);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        for (op, result) in batch.drain(..).zip(results) {
            let then = op.then;
            if catch_unwind(AssertUnwindSafe(move || then(result))).is_err() {
                log::error!(
                    "history write callback for conversation {:?} panicked",
                    op.conversation
                );
            }
        }
    }
    checkpoint(&conn);
}

/// Commits `batch` and returns one result per op, in order.
fn commit(conn: &mut Connection, batch: &[Op]) -> Vec<Result<(), HistoryError>> {
    match apply_all(conn, batch) {
        Ok(()) => batch.iter().map(|_| Ok(())).collect(),
        Err(e) if batch.len() == 1 => vec![Err(e.into())],
        Err(e) => {
            // One bad op must not fail its neighbours: retry each alone so
            // every op gets its own outcome.
            log::warn!(
                "history batch of {} failed ({e}); retrying one by one",
                batch.len()
            );
            batch
                .iter()
                .map(|op| apply_all(conn, std::slice::from_ref(op)).map_err(HistoryError::from))
                .collect()
        }
    }
}

fn apply_all(conn: &mut Connection, ops: &[Op]) -> rusqlite::Result<()> {
    // IMMEDIATE takes the write lock up front instead of upgrading later,
    // which could fail with SQLITE_BUSY if another process also writes.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for op in ops {
        apply(&tx, op)?;
    }
    tx.commit()
}

fn apply(conn: &Connection, op: &Op) -> rusqlite::Result<()> {
    if op.index {
        return index_conversation(conn, &op.conversation);
    }
    if op.messages.is_empty() {
        return Ok(());
    }
    // Read inside the write transaction: an earlier op of the same batch may
    // already have moved this head.
    let mut head = read_head(conn, &op.conversation)?.unwrap_or(Head::EMPTY);
    for (role, content) in &op.messages {
        let idx = to_sql_int(head.len)?;
        conn.prepare_cached(INSERT_MESSAGE)?
            .execute(rusqlite::params![
                op.conversation,
                idx,
                role.as_str(),
                &**content,
                op.at_ms,
                op.partial && *role == Role::Assistant
            ])?;
        head = Head {
            len: head.len + 1,
            digest: chain_digest(&head.digest, *role, content),
        };
    }
    let len = to_sql_int(head.len)?;
    conn.prepare_cached(UPSERT_HEAD)?
        .execute(rusqlite::params![
            op.conversation,
            len,
            head.digest,
            op.at_ms
        ])?;
    Ok(())
}

/// Adds the conversation's messages that are not in the full-text index yet.
fn index_conversation(conn: &Connection, conversation: &str) -> rusqlite::Result<()> {
    use rusqlite::OptionalExtension;
    let indexed: i64 = conn
        .prepare_cached(INDEXED)?
        .query_row([conversation], |row| row.get(0))
        .optional()?
        .unwrap_or(0);
    let added = conn
        .prepare_cached(INDEX_NEW)?
        .execute(rusqlite::params![conversation, indexed])?;
    if added > 0 {
        let total = indexed.saturating_add(i64::try_from(added).unwrap_or(i64::MAX));
        conn.prepare_cached(SET_INDEXED)?
            .execute(rusqlite::params![conversation, total])?;
    }
    Ok(())
}

fn to_sql_int(value: u64) -> rusqlite::Result<i64> {
    i64::try_from(value).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

/// Hands the connection's page cache and lookaside memory back to the
/// allocator (`PRAGMA shrink_memory`): a connection keeps up to its
/// `cache_size` of pages for as long as it lives, which at idle is memory
/// that only a new burst would reuse.
fn shrink_memory(conn: &Connection) {
    if let Err(e) = conn.execute_batch("PRAGMA shrink_memory") {
        log::debug!("history: PRAGMA shrink_memory failed: {e}");
    }
}

fn checkpoint(conn: &Connection) {
    // Leaves a small database file and an empty WAL behind, so a restart
    // does not first replay a large log.
    let result = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
        row.get::<_, i64>(0)
    });
    match result {
        Ok(0) => {}
        Ok(_) => log::warn!("history WAL checkpoint incomplete: readers still busy"),
        Err(e) => log::warn!("history WAL checkpoint failed: {e}"),
    }
}

fn now_ms() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        // A clock before 1970 is broken; a negative stamp records that as-is.
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// Formats milliseconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub(crate) fn rfc3339_seconds(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's
/// `civil_from_days`), to avoid a date crate for one format.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tempfile::TempDir;

    fn open(dir: &TempDir) -> History {
        History::open(&dir.path().join("db").join("history.db"), 4).unwrap()
    }

    fn append(h: &History, conversation: &str, role: Role, content: &str) {
        h.write(conversation, Some((role, content.to_string())), |r| {
            r.unwrap()
        });
    }

    fn digest_of(messages: &[(Role, &str)]) -> [u8; 32] {
        messages
            .iter()
            .fold([0u8; 32], |d, (role, c)| chain_digest(&d, *role, c))
    }

    #[test]
    fn schema_created_and_wal_on() {
        let dir = TempDir::new().unwrap();
        let h = open(&dir);
        let conn = h.inner.pool.get().unwrap();
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let fk: i64 = conn
            .pragma_query_value(None, "foreign_keys", |r| r.get(0))
            .unwrap();
        assert_eq!(fk, 1);
        let tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            tables,
            [
                "conversations",
                "fts_progress",
                "messages",
                "messages_fts",
                "messages_fts_config",
                "messages_fts_content",
                "messages_fts_data",
                "messages_fts_docsize",
                "messages_fts_idx"
            ]
        );
        // Pool connections are for reading only.
        assert!(conn
            .execute("DELETE FROM messages WHERE conversation = ?1", ["x"])
            .is_err());
    }

    #[test]
    fn append_head_context_recent() {
        let dir = TempDir::new().unwrap();
        let h = open(&dir);
        append(&h, "c", Role::User, "one");
        append(&h, "c", Role::Assistant, "two");
        append(&h, "c", Role::User, "three");
        h.sync().unwrap();

        let head = h.head("c").unwrap().unwrap();
        assert_eq!(head.len, 3);

        let all = h.context("c", 3).unwrap();
        let texts: Vec<_> = all.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts, ["one", "two", "three"]);
        assert_eq!(all[1].role, Role::Assistant);
        assert!(all[0].at_ms > 0);
        assert_eq!(h.context("c", 2).unwrap(), all[..2]);
        assert_eq!(h.context("c", 0).unwrap(), []);
        assert_eq!(h.context("c", u64::MAX).unwrap(), all);

        assert_eq!(h.recent("c", 2).unwrap().unwrap(), all[1..]);
        assert_eq!(h.recent("c", 10).unwrap().unwrap(), all);
        assert_eq!(h.recent("c", 0).unwrap().unwrap(), []);
        assert_eq!(h.pending_writes(), 0);
    }

    #[test]
    fn digest_chain_matches_hand_computation() {
        let dir = TempDir::new().unwrap();
        let h = open(&dir);
        let msgs = [
            (Role::User, "hi"),
            (Role::Assistant, "hello"),
            (Role::User, ""),
        ];
        for (role, c) in msgs {
            append(&h, "a", role, c);
            append(&h, "b", role, c);
        }
        append(&h, "c", Role::Assistant, "hi");
        append(&h, "d", Role::User, "h");
        append(&h, "d", Role::User, "i");
        h.sync().unwrap();

        // By hand for the first step, to pin the encoding itself.
        let mut hasher = Sha256::new();
        hasher.update([0u8; 32]);
        hasher.update(b"u");
        hasher.update(2u64.to_le_bytes());
        hasher.update(b"hi");
        let first: [u8; 32] = hasher.finalize().into();
        assert_eq!(chain_digest(&[0u8; 32], Role::User, "hi"), first);

        let a = h.head("a").unwrap().unwrap();
        assert_eq!(
            a,
            Head {
                len: 3,
                digest: digest_of(&msgs)
            }
        );
        assert_eq!(h.head("b").unwrap().unwrap(), a);
        // Same text, other role; same bytes, other split.
        let c = h.head("c").unwrap().unwrap();
        assert_ne!(c.digest, digest_of(&msgs[..1]));
        let d = h.head("d").unwrap().unwrap();
        assert_ne!(d.digest, a.digest);
        assert_ne!(d.digest, digest_of(&[(Role::User, "hi")]));
        assert_ne!(Head::EMPTY.digest, first);
    }

    #[test]
    fn unknown_conversation_is_none() {
        let dir = TempDir::new().unwrap();
        let h = open(&dir);
        assert_eq!(h.head("nope").unwrap(), None);
        assert_eq!(h.recent("nope", 5).unwrap(), None);
        assert_eq!(h.context("nope", 5).unwrap(), []);
        // A barrier does not create a conversation.
        h.write("nope", None, |r| r.unwrap());
        h.sync().unwrap();
        assert_eq!(h.head("nope").unwrap(), None);
    }

    #[test]
    fn callbacks_run_after_commit_in_fifo_order() {
        let dir = TempDir::new().unwrap();
        let h = open(&dir);
        let seen = Arc::new(Mutex::new(Vec::new()));
        for i in 0..50u64 {
            let reader = h.clone();
            let seen = Arc::clone(&seen);
            h.write("c", Some((Role::User, format!("m{i}"))), move |r| {
                r.unwrap();
                // Read through the pool: the message must already be durable.
                let head = reader.head("c").unwrap().unwrap();
                assert!(head.len > i);
                let last = reader.context("c", i + 1).unwrap().pop().unwrap();
                assert_eq!(last.content, format!("m{i}"));
                seen.lock().push(i);
            });
        }
        h.sync().unwrap();
        assert_eq!(*seen.lock(), (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn barrier_runs_its_callback() {
        let dir = TempDir::new().unwrap();
        let h = open(&dir);
        append(&h, "c", Role::User, "x");
        let (tx, rx) = crossbeam_channel::bounded(1);
        let reader = h.clone();
        h.write("c", None, move |r| {
            tx.send((r.is_ok(), reader.head("c").unwrap().map(|x| x.len)))
                .unwrap();
        });
        let (ok, len) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(ok);
        assert_eq!(len, Some(1));
        // The barrier added no message.
        h.sync().unwrap();
        assert_eq!(h.head("c").unwrap().unwrap().len, 1);
    }

    #[test]
    fn group_commit_from_many_threads() {
        const THREADS: usize = 8;
        const PER_THREAD: usize = 250;
        const CONVERSATIONS: usize = 5;
        let dir = TempDir::new().unwrap();
        let h = open(&dir);
        let ok = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        thread::scope(|s| {
            for t in 0..THREADS {
                let h = h.clone();
                let ok = Arc::clone(&ok);
                s.spawn(move || {
                    for i in 0..PER_THREAD {
                        let ok = Arc::clone(&ok);
                        let conv = format!("conv-{}", (t + i) % CONVERSATIONS);
                        h.write(&conv, Some((Role::User, format!("{t}:{i}"))), move |r| {
                            r.unwrap();
                            ok.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        h.sync().unwrap();
        let elapsed = start.elapsed();
        let total = THREADS * PER_THREAD;
        println!(
            "group commit: {total} writes in {elapsed:?} ({:.0} writes/s, {} transactions)",
            total as f64 / elapsed.as_secs_f64(),
            h.committed_batches()
        );
        assert_eq!(ok.load(Ordering::Relaxed), total);
        assert_eq!(h.pending_writes(), 0);

        let conn = h.inner.pool.get().unwrap();
        let mut stored = 0;
        for c in 0..CONVERSATIONS {
            let conv = format!("conv-{c}");
            let head = h.head(&conv).unwrap().unwrap();
            let idx: Vec<i64> = conn
                .prepare("SELECT idx FROM messages WHERE conversation = ?1 ORDER BY idx")
                .unwrap()
                .query_map([&conv], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(idx, (0..head.len as i64).collect::<Vec<_>>());
            let msgs = h.context(&conv, head.len).unwrap();
            let digest = msgs
                .iter()
                .fold([0u8; 32], |d, m| chain_digest(&d, m.role, &m.content));
            assert_eq!(digest, head.digest);
            // Each thread's own messages keep their order within a conversation.
            for t in 0..THREADS {
                let mine: Vec<usize> = msgs
                    .iter()
                    .filter_map(|m| m.content.strip_prefix(&format!("{t}:")))
                    .map(|i| i.parse().unwrap())
                    .collect();
                assert!(mine.windows(2).all(|w| w[0] < w[1]));
            }
            stored += head.len as usize;
        }
        assert_eq!(stored, total);
    }

    #[test]
    fn reopen_after_shutdown_keeps_data() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("db").join("history.db");
        let before;
        {
            let h = History::open(&path, 2).unwrap();
            for i in 0..100 {
                append(&h, &format!("c{}", i % 3), Role::User, &format!("m{i}"));
            }
            // No sync: shutdown itself must commit what is queued.
            h.shutdown();
            h.shutdown();
            before = h.head("c1").unwrap().unwrap();
            let wal = path.with_file_name("history.db-wal");
            let wal_len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
            assert_eq!(wal_len, 0, "WAL should be truncated by the checkpoint");
        }
        let h = History::open(&path, 2).unwrap();
        assert_eq!(h.head("c1").unwrap().unwrap(), before);
        assert_eq!(before.len, 33);
        let msgs = h.context("c0", 100).unwrap();
        assert_eq!(msgs.len(), 34);
        assert_eq!(msgs[1].content, "m3");
        append(&h, "c1", Role::Assistant, "after restart");
        h.sync().unwrap();
        assert_eq!(h.head("c1").unwrap().unwrap().len, 34);
    }

    #[test]
    fn panicking_callback_does_not_stop_writer() {
        let dir = TempDir::new().unwrap();
        let h = open(&dir);
        h.write("c", Some((Role::User, "a".into())), |_| {
            panic!("callback panic (expected by this test)")
        });
        append(&h, "c", Role::Assistant, "b");
        h.sync().unwrap();
        append(&h, "c", Role::User, "c");
        h.sync().unwrap();
        assert_eq!(h.head("c").unwrap().unwrap().len, 3);
    }

    #[test]
    fn injection_looking_content_is_stored_literally() {
        let dir = TempDir::new().unwrap();
        let h = open(&dir);
        let evil = "'); DROP TABLE messages;--";
        append(&h, evil, Role::User, evil);
        append(&h, "c", Role::User, evil);
        h.sync().unwrap();
        assert_eq!(h.context("c", 1).unwrap()[0].content, evil);
        assert_eq!(h.context(evil, 1).unwrap()[0].content, evil);
        assert_eq!(h.head("c").unwrap().unwrap().len, 1);
    }

    #[test]
    fn unicode_round_trips() {
        let dir = TempDir::new().unwrap();
        let h = open(&dir);
        let text = "héllo wörld — 你好, мир 👋🏽 e\u{301} \u{0} tab\tnl\n";
        append(&h, "ünï-😀", Role::Assistant, text);
        h.sync().unwrap();
        let msgs = h.recent("ünï-😀", 1).unwrap().unwrap();
        assert_eq!(msgs[0].content, text);
        assert_eq!(
            h.head("ünï-😀").unwrap().unwrap().digest,
            digest_of(&[(Role::Assistant, text)])
        );
    }

    #[test]
    fn write_after_shutdown_reports_writer_stopped() {
        let dir = TempDir::new().unwrap();
        let h = open(&dir);
        let other = h.clone();
        h.shutdown();
        let called = Arc::new(Mutex::new(None));
        let slot = Arc::clone(&called);
        other.write("c", Some((Role::User, "late".into())), move |r| {
            *slot.lock() = Some(matches!(r, Err(HistoryError::WriterStopped)));
        });
        // Called at once, on this thread.
        assert_eq!(*called.lock(), Some(true));
        assert!(matches!(other.sync(), Err(HistoryError::WriterStopped)));
        assert_eq!(other.head("c").unwrap(), None);
        assert_eq!(other.pending_writes(), 0);
    }

    #[test]
    fn sync_inside_callback_is_refused() {
        let dir = TempDir::new().unwrap();
        let h = open(&dir);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let inner = h.clone();
        h.write("c", None, move |_| {
            tx.send(matches!(
                inner.sync(),
                Err(HistoryError::SyncOnWriterThread)
            ))
            .unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap());
    }

    #[test]
    fn rfc3339_formatting() {
        let m = |at_ms| Message {
            role: Role::User,
            content: String::new(),
            at_ms,
            partial: false,
        };
        assert_eq!(m(0).at_rfc3339(), "1970-01-01T00:00:00Z");
        assert_eq!(m(1_795_420_800_999).at_rfc3339(), "2026-11-23T08:00:00Z");
        assert_eq!(m(951_782_400_000).at_rfc3339(), "2000-02-29T00:00:00Z");
        assert_eq!(m(-1).at_rfc3339(), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn search_finds_only_the_asking_conversations_messages() {
        let dir = tempfile::tempdir().unwrap();
        let h = open(&dir);
        let store = |c: &str, role: Role, text: &str| {
            let (tx, rx) = crossbeam_channel::bounded(1);
            h.write(c, Some((role, text.to_owned())), move |r| {
                tx.send(r).unwrap();
            });
            rx.recv().unwrap().unwrap();
        };
        store("c-mine", Role::User, "My cat is called Pixel");
        store("c-mine", Role::Assistant, "Pixel is a fine name for a cat");
        store("c-other", Role::User, "My cat is called Secret");
        let hits = h.search("c-mine", "cat", 10).unwrap();
        assert_eq!(hits.len(), 2);
        assert!(hits.iter().all(|hit| !hit.content.contains("Secret")));
        assert!(h.search("c-mine", "Secret", 10).unwrap().is_empty());
        assert_eq!(h.search("c-other", "secret", 10).unwrap().len(), 1);
        // Later messages are indexed on the next search, once.
        store("c-mine", Role::User, "Pixel likes tuna");
        let hits = h.search("c-mine", "tuna", 10).unwrap();
        assert_eq!(hits.len(), 1);
        assert_eq!((hits[0].index, hits[0].role), (2, Role::User));
        assert_eq!(h.search("c-mine", "Pixel", 10).unwrap().len(), 3);
        // Query syntax is never interpreted: these are just words.
        assert!(h.search("c-mine", "\" OR * NEAR(", 10).unwrap().is_empty());
        assert!(h.search("c-mine", "   ", 10).unwrap().is_empty());
        assert_eq!(h.search("c-mine", "cat) OR (tuna", 10).unwrap().len(), 3);
    }

    #[test]
    fn a_version_1_database_is_upgraded_and_searchable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "PRAGMA journal_mode = WAL;
                 CREATE TABLE conversations (id TEXT PRIMARY KEY, len INTEGER NOT NULL,
                     digest BLOB NOT NULL, created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL);
                 CREATE TABLE messages (conversation TEXT NOT NULL, idx INTEGER NOT NULL,
                     role TEXT NOT NULL CHECK(role IN ('user','assistant')), content TEXT NOT NULL,
                     at_ms INTEGER NOT NULL, PRIMARY KEY(conversation, idx)) WITHOUT ROWID;
                 INSERT INTO messages VALUES ('c-old', 0, 'user', 'an old question about tea', 1);
                 INSERT INTO conversations VALUES ('c-old', 1, zeroblob(32), 1, 1);
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let h = History::open(&path, 1).unwrap();
        let hits = h.search("c-old", "tea", 5).unwrap();
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].content, "an old question about tea");
        // Version 3's mark of partial answers: old rows are unmarked, new
        // answers marked as written.
        let (done, wait) = crossbeam_channel::bounded(2);
        let done2 = done.clone();
        h.write_answer("c-old", "cut".into(), true, move |r| done.send(r).unwrap());
        h.write_answer("c-old", "whole".into(), false, move |r| {
            done2.send(r).unwrap()
        });
        wait.recv().unwrap().unwrap();
        wait.recv().unwrap().unwrap();
        let messages = h.recent("c-old", 10).unwrap().unwrap();
        let marks: Vec<(&str, bool)> = messages
            .iter()
            .map(|m| (m.content.as_str(), m.partial))
            .collect();
        assert_eq!(
            marks,
            [
                ("an old question about tea", false),
                ("cut", true),
                ("whole", false)
            ]
        );
        let version: i64 = Connection::open(&path)
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }
}
