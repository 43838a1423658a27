//! Reading a conversation's head and its messages oldest first (reading
//! newest first, stopping early, is in `newest`).
//!
//! Threads: runs on the calling thread (a connection thread, a pipeline
//! worker) with a connection borrowed from the read pool: in WAL mode
//! readers block neither the writer nor each other.

use std::sync::atomic::Ordering;

use rusqlite::{Connection, OptionalExtension};

use super::schema::{SELECT_BEFORE, SELECT_FROM, SELECT_HEAD};
use super::{Head, History, HistoryError, Message};

impl History {
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
}

/// Shared with the writer, which reads the head inside its write
/// transaction to extend it.
pub(super) fn read_head(conn: &Connection, conversation: &str) -> rusqlite::Result<Option<Head>> {
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

/// A message from a row whose first columns are `role, content, at_ms,
/// partial`, as every statement reading messages selects them.
pub(super) fn message_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
    Ok(Message {
        role: row.get(0)?,
        content: row.get(1)?,
        at_ms: row.get(2)?,
        partial: row.get(3)?,
    })
}

#[cfg(test)]
mod tests {
    use crate::history::tests::{append, digest_of, open};
    use crate::history::Role;
    use tempfile::TempDir;

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
}
