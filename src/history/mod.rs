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
//! Where things are: this file is the [`History`] handle (opening, queueing
//! writes, `sync`, `shutdown`); `message` what is stored ([`Message`],
//! [`Head`], [`chain_digest`]); `schema` the tables, their upgrades and the
//! statements; `connection` how a connection is opened ([`SqliteManager`]);
//! `read` and `newest` the reads; `writer` the writer thread; `search` the
//! full-text search and its index; `date` the RFC 3339 form of a stored
//! timestamp.
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

mod connection;
mod date;
mod message;
mod newest;
mod read;
mod schema;
mod search;
mod writer;

pub use connection::SqliteManager;
pub(crate) use date::rfc3339_seconds;
pub use message::{chain_digest, Head, Message, Role};
pub use newest::{Take, Walk};
pub use search::Hit;
pub use writer::WRITER_IDLE;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle, ThreadId};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{SendError, Sender};
use parking_lot::{Mutex, RwLock};

use connection::shrink_memory;
use writer::{writer_loop, Op};

/// Errors of the history layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
        schema::migrate(&conn).map_err(open_err)?;

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
            crate::threads::join(handle, "history writer");
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Losing the last handle must not lose queued writes.
        self.shutdown();
    }
}

fn now_ms() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        // A clock before 1970 is broken; a negative stamp records that as-is.
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests {
    //! The handle's own tests, and the helpers that the tests in the other
    //! files of the history share, so that they all open and fill a
    //! database the same way.

    use super::*;
    use tempfile::TempDir;

    pub(super) fn open(dir: &TempDir) -> History {
        History::open(&dir.path().join("db").join("history.db"), 4).unwrap()
    }

    pub(super) fn append(h: &History, conversation: &str, role: Role, content: &str) {
        h.write(conversation, Some((role, content.to_string())), |r| {
            r.unwrap()
        });
    }

    pub(super) fn digest_of(messages: &[(Role, &str)]) -> [u8; 32] {
        messages
            .iter()
            .fold([0u8; 32], |d, (role, c)| chain_digest(&d, *role, c))
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
}
