//! The answer cache: complete answers keyed by the identical-request key.
//!
//! Threads: the cache lane workers read ([`Cache::get`]); the thread that
//! finishes a leader's generation writes ([`Cache::put`]). Implementations
//! are internally synchronised and never block for long: a cache that cannot
//! answer quickly answers "miss", because the cache is an optimisation and
//! must never make a chat fail.

mod memory;
mod redis;

use std::sync::Arc;

pub use memory::MemoryCache;
pub use redis::RedisCache;

use crate::broadcast::{tokens_of, Token, TokenSource};

use crate::request_key::Key;

/// A complete answer, stored with its original token boundaries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedAnswer {
    /// Each token escaped once when the answer was stored (shared with the
    /// generation that produced it), so a hit costs no JSON encoding.
    pub tokens: Vec<Token>,
    /// The whole text (what goes into the asking conversation's history),
    /// shared with every history write of a hit.
    pub text: Arc<str>,
    /// Byte offsets in `text` where each token ends: the original token
    /// boundaries, for backends that store the text.
    pub ends: Vec<usize>,
    /// What the generation that made it cost upstream, as reported.
    pub usage: Option<crate::protocol::Usage>,
}

impl CachedAnswer {
    /// Builds an entry from the tokens as they were produced.
    pub fn from_pieces<'a>(pieces: impl IntoIterator<Item = &'a str>) -> CachedAnswer {
        let mut text = String::new();
        let mut ends = Vec::new();
        let tokens = pieces
            .into_iter()
            .enumerate()
            .map(|(seq, piece)| {
                text.push_str(piece);
                ends.push(text.len());
                Token::new(seq as u64, piece)
            })
            .collect();
        CachedAnswer {
            tokens,
            text: text.into(),
            ends,
            usage: None,
        }
    }

    /// The tokens as they were produced.
    pub fn pieces(&self) -> impl Iterator<Item = &str> {
        crate::broadcast::split_at_ends(&self.text, &self.ends)
    }

    /// Number of tokens.
    pub fn token_count(&self) -> u64 {
        self.tokens.len() as u64
    }
}

impl TokenSource for CachedAnswer {
    fn tokens(&self, from: u64, to: u64, out: &mut Vec<Token>) {
        tokens_of(&self.tokens, from, to, out);
    }
}

/// Failures of a cache backend; callers treat every one as a miss.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The backend could not be reached or answered with an error.
    #[error("cache backend unavailable: {0}")]
    Unavailable(String),
}

/// A store of complete answers.
pub trait Cache: Send + Sync {
    /// The answer stored under `key`, if any and not expired.
    fn get(&self, key: &Key) -> Result<Option<Arc<CachedAnswer>>, CacheError>;
    /// Stores `answer` under `key`, replacing any older one.
    fn put(&self, key: &Key, answer: Arc<CachedAnswer>) -> Result<(), CacheError>;
    /// Entries held now; `None` when the backend cannot tell cheaply (a
    /// shared Redis holds other nodes' entries too).
    fn entries(&self) -> Option<u64>;
    /// False while the backend is unreachable (every lookup is then a miss).
    fn is_up(&self) -> bool {
        true
    }
}
