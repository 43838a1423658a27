//! The answer cache: complete answers keyed by the identical-request key.
//!
//! Threads: the cache lane workers read ([`Cache::get`]); the thread that
//! finishes a leader's generation writes ([`Cache::put`]). Implementations
//! are internally synchronised and never block for long: a cache that cannot
//! answer quickly answers "miss", because the cache is an optimisation and
//! must never make a chat fail.

mod memory;

use std::sync::Arc;

pub use memory::MemoryCache;

use crate::protocol::TokenTail;

/// The identical-request key: a SHA-256 over everything the model would see.
pub type Key = [u8; 32];

/// A complete answer, stored with its original token boundaries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedAnswer {
    /// Each token's frame tail, encoded once when the answer was stored, so a
    /// hit costs no JSON encoding.
    pub tails: Vec<TokenTail>,
    /// The whole text (what goes into the asking conversation's history).
    pub text: String,
}

impl CachedAnswer {
    /// Builds an entry from the tokens as they were produced.
    pub fn from_pieces<'a>(pieces: impl IntoIterator<Item = &'a str>) -> CachedAnswer {
        let mut text = String::new();
        let tails = pieces
            .into_iter()
            .enumerate()
            .map(|(seq, piece)| {
                text.push_str(piece);
                TokenTail::encode(seq as u64, piece)
            })
            .collect();
        CachedAnswer { tails, text }
    }

    /// Number of tokens.
    pub fn tokens(&self) -> u64 {
        self.tails.len() as u64
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
    /// Entries held now (approximate for shared backends).
    fn entries(&self) -> u64;
}
