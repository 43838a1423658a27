//! The writer thread: the only one that writes to the history database. It
//! commits whatever is queued in one transaction (group commit), then runs
//! the callbacks of those ops in order; it gives its connection's caches
//! back after [`WRITER_IDLE`] without a write, and checkpoints the WAL when
//! the last handle has stopped it.
//!
//! Threads: everything here but the types runs on the `history-writer`
//! thread, including the callbacks.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use rusqlite::{Connection, TransactionBehavior};

use super::connection::shrink_memory;
use super::read::read_head;
use super::schema::{INSERT_MESSAGE, UPSERT_HEAD};
use super::search::index_conversation;
use super::{chain_digest, Head, HistoryError, Role, Stats};

/// Most ops committed in one transaction. Bounds the latency a single batch
/// adds to the first op's callback while still amortising the commit.
const MAX_BATCH: usize = 512;

/// How long the writer goes without a write before it gives its
/// connection's caches back (`PRAGMA shrink_memory`): long enough that a
/// busy server never pays for it, short enough to come before the
/// janitor's release at the end of the replay window.
pub const WRITER_IDLE: Duration = Duration::from_secs(10);

pub(super) type Callback = Box<dyn FnOnce(Result<(), HistoryError>) + Send + 'static>;

/// One queued write.
pub(super) struct Op {
    pub(super) conversation: String,
    /// Appended in order, in one transaction; empty for a barrier. Shared
    /// text, so one answer stored in several conversations (a leader's and
    /// its followers') is held once while it waits.
    pub(super) messages: Vec<(Role, Arc<str>)>,
    /// Bring the conversation's full-text index up to date.
    pub(super) index: bool,
    /// The op's answer is partial (see [`Message::partial`]).
    ///
    /// [`Message::partial`]: super::Message::partial
    pub(super) partial: bool,
    pub(super) at_ms: i64,
    pub(super) then: Callback,
}

pub(super) fn writer_loop(mut conn: Connection, receiver: Receiver<Op>, stats: Arc<Stats>) {
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

fn to_sql_int(value: u64) -> rusqlite::Result<i64> {
    i64::try_from(value).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::thread;
    use std::time::Instant;

    use parking_lot::Mutex;
    use tempfile::TempDir;

    use super::*;
    use crate::history::tests::{append, open};
    use crate::history::History;

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
}
