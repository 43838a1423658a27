//! Full-text search over one conversation's messages (SQLite FTS5), and the
//! upkeep of its index: a conversation is indexed on demand, when it is
//! searched, so storing a message never pays for it.
//!
//! Threads: [`History::search`] runs on the calling thread; it has the
//! writer thread bring the index up to date ([`index_conversation`]) and
//! waits for that commit, then queries with a pooled read connection.

use std::thread;

use rusqlite::{Connection, OptionalExtension};

use super::writer::Op;
use super::{now_ms, History, HistoryError, Role};

const SEARCH: &str = "SELECT role, content, idx FROM messages_fts \
     WHERE messages_fts MATCH ?1 AND conversation = ?2 ORDER BY rank LIMIT ?3";
const INDEXED: &str = "SELECT indexed FROM fts_progress WHERE conversation = ?1";
const INDEX_NEW: &str = "INSERT INTO messages_fts (content, conversation, idx, role) \
     SELECT content, conversation, idx, role FROM messages \
     WHERE conversation = ?1 AND idx >= ?2 ORDER BY idx";
const SET_INDEXED: &str = "INSERT INTO fts_progress (conversation, indexed) VALUES (?1, ?2) \
     ON CONFLICT(conversation) DO UPDATE SET indexed = excluded.indexed";

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

impl History {
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
}

/// Adds the conversation's messages that are not in the full-text index yet.
/// Runs on the writer thread, inside its transaction: the index and its
/// progress mark move together with the messages they cover.
pub(super) fn index_conversation(conn: &Connection, conversation: &str) -> rusqlite::Result<()> {
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

#[cfg(test)]
mod tests {
    use crate::history::tests::open;
    use crate::history::Role;

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
}
