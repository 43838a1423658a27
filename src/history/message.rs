//! What the history stores: a [`Message`] and its [`Role`], and the [`Head`]
//! of a conversation with the digest chained over its messages
//! ([`chain_digest`]), which the pipeline compares with the head a client
//! claims to notice a diverged history.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ValueRef};
use sha2::{Digest, Sha256};

use super::date::rfc3339_seconds;

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
    /// shutdown (see [`History::write_answer`](super::History::write_answer)).
    /// Never set on a question.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::tests::{append, digest_of, open};
    use tempfile::TempDir;

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
}
