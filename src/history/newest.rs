//! Reading a conversation newest first, stopping as soon as the caller has
//! enough: a `history` answer stops at its byte bound, a prompt at its token
//! budget, so neither reads (or holds) a long conversation whole.
//!
//! Threads: like every read of [`History`], this runs on the calling thread
//! (a connection thread answering `history`, a preparation worker) with a
//! connection borrowed from the read pool. The rows are stepped one at a
//! time from SQLite's cursor over the `(conversation, idx)` key, so stopping
//! early really stops reading.

use std::sync::atomic::Ordering;

use super::read::{message_from_row, read_head};
use super::{History, HistoryError, Message};

const SELECT_NEWEST: &str = "SELECT role, content, at_ms, partial, idx FROM messages \
     WHERE conversation = ?1 AND idx < ?2 ORDER BY idx DESC";

/// What the caller of [`History::newest_first`] does with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Kept it; hand me the next older one.
    More,
    /// Kept it; that was the last one I want.
    Last,
    /// Did not keep it, and want no older one.
    Refuse,
}

/// What [`History::newest_first`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walk {
    /// Messages stored in the conversation.
    pub len: u64,
    /// Index of the oldest message the caller kept; `before` (clamped to
    /// `len`) when it kept none.
    pub first_kept: u64,
}

impl History {
    /// Hands the messages with index below `before` (all of them when
    /// `None`) to `keep`, newest first, with their index, until `keep`
    /// says it wants no more or they run out. `None` when the conversation is
    /// unknown. The conversation's length and its rows come from one
    /// snapshot, even while the writer commits.
    pub fn newest_first(
        &self,
        conversation: &str,
        before: Option<u64>,
        mut keep: impl FnMut(u64, Message) -> Take,
    ) -> Result<Option<Walk>, HistoryError> {
        let mut conn = self.inner.pool.get()?;
        let tx = conn.transaction()?;
        let Some(head) = read_head(&tx, conversation)? else {
            return Ok(None);
        };
        let before = before.map_or(head.len, |b| b.min(head.len));
        let mut first_kept = before;
        {
            let mut stmt = tx.prepare_cached(SELECT_NEWEST)?;
            let upper = i64::try_from(before).unwrap_or(i64::MAX);
            let mut rows = stmt.query(rusqlite::params![conversation, upper])?;
            while let Some(row) = rows.next()? {
                self.inner.stats.rows_read.fetch_add(1, Ordering::Relaxed);
                let message = message_from_row(row)?;
                let idx: i64 = row.get(4)?;
                let idx = u64::try_from(idx)
                    .map_err(|_| rusqlite::Error::IntegralValueOutOfRange(4, idx))?;
                match keep(idx, message) {
                    Take::More => first_kept = idx,
                    Take::Last => {
                        first_kept = idx;
                        break;
                    }
                    Take::Refuse => break,
                }
            }
        }
        tx.finish()?;
        Ok(Some(Walk {
            len: head.len,
            first_kept,
        }))
    }

    /// Rows [`History::newest_first`] and [`History::context`] have read
    /// through this store (every clone of the handle): lets a test prove
    /// that a read stopped early.
    pub fn rows_read(&self) -> u64 {
        self.inner.stats.rows_read.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Role;

    fn filled(n: usize) -> (tempfile::TempDir, History) {
        let dir = tempfile::tempdir().unwrap();
        let history = History::open(&dir.path().join("h.db"), 2).unwrap();
        let messages = (0..n)
            .map(|i| {
                let role = if i % 2 == 0 {
                    Role::User
                } else {
                    Role::Assistant
                };
                (role, format!("message {i}"))
            })
            .collect();
        history.write_all("c", messages, |_| {});
        history.sync().unwrap();
        (dir, history)
    }

    #[test]
    fn walks_newest_first_and_stops_when_told() {
        let (_dir, history) = filled(10);
        let mut seen = Vec::new();
        let walk = history
            .newest_first("c", None, |idx, m| {
                seen.push((idx, m.content));
                if seen.len() < 3 {
                    Take::More
                } else {
                    Take::Refuse
                }
            })
            .unwrap()
            .unwrap();
        assert_eq!(
            seen,
            [
                (9, "message 9".to_string()),
                (8, "message 8".to_string()),
                (7, "message 7".to_string())
            ]
        );
        assert_eq!(
            walk,
            Walk {
                len: 10,
                first_kept: 8
            },
            "the third was refused"
        );
        let mut older = Vec::new();
        let walk = history
            .newest_first("c", Some(2), |idx, _| {
                older.push(idx);
                Take::More
            })
            .unwrap()
            .unwrap();
        assert_eq!(older, [1, 0]);
        assert_eq!(walk.first_kept, 0);
        let beyond = history
            .newest_first("c", Some(99), |_, _| Take::Refuse)
            .unwrap();
        assert_eq!(beyond.map(|w| w.first_kept), Some(10));
        let last = history.newest_first("c", None, |_, _| Take::Last).unwrap();
        assert_eq!(last.map(|w| w.first_kept), Some(9));
        assert!(history
            .newest_first("nope", None, |_, _| Take::More)
            .unwrap()
            .is_none());
    }

    #[test]
    fn stopping_early_reads_few_rows_of_a_long_conversation() {
        let (_dir, history) = filled(300);
        assert_eq!(history.rows_read(), 0);
        let mut kept = 0;
        history
            .newest_first("c", None, |_, _| {
                kept += 1;
                if kept <= 5 {
                    Take::More
                } else {
                    Take::Refuse
                }
            })
            .unwrap();
        assert_eq!(history.rows_read(), 6, "five kept, the sixth refused");
    }
}
