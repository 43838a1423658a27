//! The layout of the history database: its tables, their version and the
//! upgrade of an older database, and the statements that read and write
//! messages and heads (the full-text ones are in `search`).
//!
//! Threads: [`migrate`] runs once, on the thread opening the history, on the
//! writer's connection before any reader exists, so readers never see a
//! half-made database.

use std::error::Error;

use rusqlite::Connection;

/// Value of `PRAGMA user_version` for the schema this module creates.
const SCHEMA_VERSION: i64 = 3;

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

pub(super) const SELECT_HEAD: &str = "SELECT len, digest FROM conversations WHERE id = ?1";
pub(super) const SELECT_BEFORE: &str = "SELECT role, content, at_ms, partial FROM messages \
     WHERE conversation = ?1 AND idx < ?2 ORDER BY idx";
pub(super) const SELECT_FROM: &str = "SELECT role, content, at_ms, partial FROM messages \
     WHERE conversation = ?1 AND idx >= ?2 ORDER BY idx";
pub(super) const INSERT_MESSAGE: &str =
    "INSERT INTO messages (conversation, idx, role, content, at_ms, partial) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
pub(super) const UPSERT_HEAD: &str =
    "INSERT INTO conversations (id, len, digest, created_ms, updated_ms) \
     VALUES (?1, ?2, ?3, ?4, ?4) \
     ON CONFLICT(id) DO UPDATE SET len = excluded.len, digest = excluded.digest, \
     updated_ms = excluded.updated_ms";

/// Creates the schema, or brings an older database up to
/// [`SCHEMA_VERSION`]; refuses a database made by a newer version, whose
/// layout this one cannot know.
pub(super) fn migrate(conn: &Connection) -> Result<(), Box<dyn Error + Send + Sync>> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(
            format!("schema version {version} is newer than supported {SCHEMA_VERSION}").into(),
        );
    }
    conn.execute_batch(SCHEMA)?;
    add_partial_column(conn)?;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::tests::open;
    use crate::history::History;
    use tempfile::TempDir;

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
