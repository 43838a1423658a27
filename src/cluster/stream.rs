//! Token streams: a generation's tokens in a Redis Stream, written by the
//! leader's node and read by every other node that has followers of it.
//!
//! The stream `chorus:v1:stream:<token>` holds one entry per token (field
//! `t`) and, last, one end marker (field `e`: `stop`, `length`,
//! `cancelled` or `error`, with `c` the error code and `m` the message).
//! Entry order is token order, so a reader that starts from the beginning
//! gets every token from `seq` 0 with no gap or duplicate, and a reader
//! that starts late replays what it missed, like the local broadcaster.
//! The writer appends several tokens per round trip (one pipeline), caps
//! the stream's length, and sets it to expire `keep` after the end.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use chorus::cluster::stream::{StreamEvent, StreamReader, StreamWriter};
//! use chorus::protocol::Finish;
//! let url = "redis://127.0.0.1:6379/";
//! let pool = chorus::redis_pool::pool(url, Duration::from_millis(250), 4)?;
//! let writer = StreamWriter::new(pool, "node-a/1", Duration::from_secs(60));
//! writer.append(&["Hel", "lo"])?;
//! writer.finish(&Ok(Finish::Stop), Duration::from_secs(60))?;
//! let mut reader = StreamReader::open(url, "node-a/1", Duration::from_millis(500))?;
//! let events = reader.read()?;
//! assert_eq!(events.last(), Some(&StreamEvent::End(Ok(Finish::Stop))));
//! # Ok(()) }
//! ```

use std::time::Duration;

use redis::streams::StreamReadReply;
use redis::Value;

use super::ClusterError;
use crate::protocol::{ErrorCode, Failure, Finish, Outcome};
use crate::redis_pool::RedisPool;

/// Entries a stream keeps at most (approximately): a bound on a runaway
/// generation's memory in Redis.
const MAX_ENTRIES: usize = 100_000;
/// Entries one read returns at most.
const READ_COUNT: usize = 512;

/// One entry of a token stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// The next token's text.
    Token(String),
    /// The end; nothing follows.
    End(Outcome),
}

/// The Redis key of the stream of generation `token`.
pub fn stream_name(token: &str) -> String {
    super::keys::stream(token)
}

/// Appends a generation's tokens and its end.
pub struct StreamWriter {
    pool: RedisPool,
    name: String,
    /// How long the stream outlives its last append: if the leader's node
    /// dies before the end, the stream still goes away by itself.
    idle_expiry_ms: u64,
}

impl StreamWriter {
    /// A writer for the stream of generation `token`; the stream expires
    /// `idle_expiry` after its last append until it is finished.
    pub fn new(pool: RedisPool, token: &str, idle_expiry: Duration) -> StreamWriter {
        StreamWriter {
            pool,
            name: stream_name(token),
            idle_expiry_ms: u64::try_from(idle_expiry.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
        }
    }

    /// Appends `tokens`, in order, in one round trip.
    pub fn append(&self, tokens: &[&str]) -> Result<(), ClusterError> {
        if tokens.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        self.queue_append(&mut pipe, tokens);
        let mut conn = self.pool.get()?;
        pipe.query::<()>(&mut *conn)?;
        Ok(())
    }

    /// Adds the commands of [`StreamWriter::append`] to `pipe`, so that
    /// the writes of many streams share one round trip.
    pub fn queue_append(&self, pipe: &mut redis::Pipeline, tokens: &[&str]) {
        if tokens.is_empty() {
            return;
        }
        self.add_tokens(pipe, tokens);
        pipe.cmd("PEXPIRE")
            .arg(&self.name)
            .arg(self.idle_expiry_ms)
            .ignore();
    }

    /// Appends the end marker and lets the stream expire `keep` later.
    pub fn finish(&self, end: &Outcome, keep: Duration) -> Result<(), ClusterError> {
        self.finish_with(&[], end, keep, &redis::pipe())
    }

    /// Appends the last `tokens`, the end marker and, in the same atomic
    /// round trip, runs the commands of `also` (e.g. the lease's release: a
    /// reader that finds the lease gone then always finds the end marker
    /// too); the stream expires `keep` later.
    pub fn finish_with(
        &self,
        tokens: &[&str],
        end: &Outcome,
        keep: Duration,
        also: &redis::Pipeline,
    ) -> Result<(), ClusterError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        self.queue_finish(&mut pipe, tokens, end, keep, also);
        let mut conn = self.pool.get()?;
        pipe.query::<()>(&mut *conn)?;
        Ok(())
    }

    /// Adds the commands of [`StreamWriter::finish_with`] to `pipe`, which
    /// must be atomic (`MULTI`…`EXEC`) for the end marker and `also` to go
    /// together; other streams' writes may share it.
    pub fn queue_finish(
        &self,
        pipe: &mut redis::Pipeline,
        tokens: &[&str],
        end: &Outcome,
        keep: Duration,
        also: &redis::Pipeline,
    ) {
        self.add_tokens(pipe, tokens);
        let add = pipe.cmd("XADD").arg(&self.name).arg("*");
        for (field, value) in end_fields(end) {
            add.arg(field).arg(value);
        }
        add.ignore();
        let keep_ms = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX).max(1);
        pipe.cmd("PEXPIRE").arg(&self.name).arg(keep_ms).ignore();
        for cmd in also.cmd_iter() {
            pipe.add_command(cmd.clone()).ignore();
        }
    }

    fn add_tokens(&self, pipe: &mut redis::Pipeline, tokens: &[&str]) {
        for token in tokens {
            pipe.cmd("XADD")
                .arg(&self.name)
                .arg("MAXLEN")
                .arg("~")
                .arg(MAX_ENTRIES)
                .arg("*")
                .arg(TOKEN_FIELD)
                .arg(*token)
                .ignore();
        }
    }
}

/// Reads one generation's stream from the start, blocking for new entries.
pub struct StreamReader {
    client: redis::Client,
    conn: redis::Connection,
    name: String,
    last_id: String,
    block: Duration,
}

impl StreamReader {
    /// A reader of generation `token`'s stream on its own connection
    /// (a blocking read holds a connection for up to `block`).
    pub fn open(url: &str, token: &str, block: Duration) -> Result<StreamReader, ClusterError> {
        let client = redis::Client::open(url)?;
        let conn = Self::connect(&client, block)?;
        Ok(StreamReader {
            client,
            conn,
            name: stream_name(token),
            last_id: "0".into(),
            block,
        })
    }

    fn connect(client: &redis::Client, block: Duration) -> Result<redis::Connection, ClusterError> {
        let conn = client.get_connection_with_timeout(block.max(Duration::from_millis(100)))?;
        conn.set_read_timeout(Some(block + Duration::from_secs(1)))?;
        Ok(conn)
    }

    /// A new connection in place of one a failed read may have left
    /// unusable (a reply cut off by a timeout); reading goes on after the
    /// last entry read, so nothing is read twice or skipped.
    pub fn reconnect(&mut self) -> Result<(), ClusterError> {
        self.conn = Self::connect(&self.client, self.block)?;
        Ok(())
    }

    /// The entries after the last one read, waiting up to the block time
    /// for the first; empty when none came.
    pub fn read(&mut self) -> Result<Vec<StreamEvent>, ClusterError> {
        let block_ms = u64::try_from(self.block.as_millis()).unwrap_or(u64::MAX);
        let reply: Option<StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(&self.name)
            .arg(&self.last_id)
            .query(&mut self.conn)?;
        let mut events = Vec::new();
        for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
            events.push(decode(&self.name, &entry)?);
            self.last_id = entry.id.clone();
        }
        Ok(events)
    }
}

/// The first `count` entries of generation `token`'s stream, as they are
/// now (no waiting): what a node replays of a request that already ended.
pub fn first_entries(
    conn: &mut redis::Connection,
    token: &str,
    count: usize,
) -> Result<Vec<StreamEvent>, ClusterError> {
    let name = stream_name(token);
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(&name)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(count.max(1))
        .query(conn)?;
    reply.ids.iter().map(|entry| decode(&name, entry)).collect()
}

/// The field of a token entry; an end marker has none.
pub(crate) const TOKEN_FIELD: &str = "t";

/// The fields of the end marker for `end`, as [`decode`] reads them back:
/// `e` is the finish's wire name, or `error` with the code in `c` and the
/// message in `m`.
pub(crate) fn end_fields(end: &Outcome) -> Vec<(&'static str, &str)> {
    match end {
        Ok(finish) => vec![("e", finish.as_str())],
        Err(failure) => vec![
            ("e", "error"),
            ("c", failure.code.as_str()),
            ("m", &failure.message),
        ],
    }
}

/// One stream entry: a token, or the end marker. Whatever Redis returns
/// (a stream another version wrote, a key someone overwrote), the answer
/// is an event or [`ClusterError::Corrupt`], never a panic.
pub(crate) fn decode(
    name: &str,
    entry: &redis::streams::StreamId,
) -> Result<StreamEvent, ClusterError> {
    let text = |field: &str| -> Option<String> {
        match entry.map.get(field)? {
            Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
            Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        }
    };
    if let Some(token) = text(TOKEN_FIELD) {
        return Ok(StreamEvent::Token(token));
    }
    let end = text("e");
    let end = match end.as_deref() {
        Some("error") => Err(Failure::new(
            // A code this version does not know (a newer node wrote it)
            // is still an upstream failure to this node's clients.
            text("c")
                .and_then(|c| c.parse().ok())
                .unwrap_or(ErrorCode::UpstreamError),
            text("m").unwrap_or_default(),
        )),
        other => Ok(other
            .and_then(|finish| finish.parse::<Finish>().ok())
            .ok_or_else(|| {
                ClusterError::Corrupt(format!(
                    "entry {} of {name} has no token and end {other:?}",
                    entry.id
                ))
            })?),
    };
    Ok(StreamEvent::End(end))
}

#[cfg(test)]
mod tests {
    use redis::streams::StreamId;
    use redis::Value;

    use super::*;

    fn entry(fields: &[(&str, &[u8])]) -> StreamId {
        StreamId {
            id: "7-1".into(),
            map: fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Value::BulkString(v.to_vec())))
                .collect(),
            ..StreamId::default()
        }
    }

    #[test]
    fn every_end_decodes_as_written() {
        let ends = [
            Ok(Finish::Stop),
            Ok(Finish::Length),
            Ok(Finish::Cancelled),
            Err(Failure::new(
                ErrorCode::UpstreamError,
                "the upstream said no",
            )),
            Err(Failure::new(ErrorCode::ProcessingTimeout, "too slow")),
        ];
        for end in ends {
            let fields: Vec<(&str, &[u8])> = end_fields(&end)
                .into_iter()
                .map(|(k, v)| (k, v.as_bytes()))
                .collect();
            assert_eq!(decode("s", &entry(&fields)).unwrap(), StreamEvent::End(end));
        }
        assert_eq!(
            decode("s", &entry(&[(TOKEN_FIELD, "wörld".as_bytes())])).unwrap(),
            StreamEvent::Token("wörld".into())
        );
    }

    #[test]
    fn an_entry_of_unknown_shape_is_corrupt_and_names_itself() {
        for fields in [
            &[("z", &b"?"[..])][..],
            &[(TOKEN_FIELD, &b"\xff\xfe"[..])],
            &[("e", &b"finished"[..])],
            &[],
        ] {
            match decode("chorus:v1:stream:x", &entry(fields)) {
                Err(ClusterError::Corrupt(why)) => {
                    assert!(
                        why.contains("7-1") && why.contains("chorus:v1:stream:x"),
                        "{why}"
                    )
                }
                other => panic!("{fields:?}: {other:?}"),
            }
        }
    }
}
