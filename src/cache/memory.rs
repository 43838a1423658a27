//! The in-memory cache backend: a bounded LRU with a time to live.
//!
//! One `parking_lot::Mutex` guards the map. Operations are a hash lookup and
//! an `Arc` clone, so the lock is held for well under a microsecond and the
//! cache lane workers do not queue behind each other.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lru::LruCache;
use parking_lot::Mutex;

use super::{Cache, CacheError, CachedAnswer, Key};

/// Bounded LRU of answers, each valid for `ttl` after it was stored.
pub struct MemoryCache {
    entries: Mutex<LruCache<Key, (Instant, Arc<CachedAnswer>)>>,
    ttl: Duration,
}

impl MemoryCache {
    /// A cache holding at most `max_entries` answers for `ttl` each.
    pub fn new(max_entries: usize, ttl: Duration) -> MemoryCache {
        let cap = NonZeroUsize::new(max_entries).unwrap_or(NonZeroUsize::MIN);
        MemoryCache {
            entries: Mutex::new(LruCache::new(cap)),
            ttl,
        }
    }
}

impl Cache for MemoryCache {
    fn get(&self, key: &Key) -> Result<Option<Arc<CachedAnswer>>, CacheError> {
        let mut entries = self.entries.lock();
        match entries.get(key) {
            Some((stored, answer)) if stored.elapsed() < self.ttl => Ok(Some(answer.clone())),
            Some(_) => {
                entries.pop(key);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    fn put(&self, key: &Key, answer: Arc<CachedAnswer>) -> Result<(), CacheError> {
        self.entries.lock().put(*key, (Instant::now(), answer));
        Ok(())
    }

    fn entries(&self) -> Option<u64> {
        Some(self.entries.lock().len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(text: &str) -> Arc<CachedAnswer> {
        Arc::new(CachedAnswer::from_pieces(text.split_inclusive(' ')))
    }

    #[test]
    fn get_put_and_boundaries() {
        let c = MemoryCache::new(4, Duration::from_secs(60));
        assert!(c.get(&[1; 32]).unwrap().is_none());
        c.put(&[1; 32], answer("a bc d")).unwrap();
        let got = c.get(&[1; 32]).unwrap().unwrap();
        assert_eq!(&*got.text, "a bc d");
        assert_eq!(got.token_count(), 3);
    }

    #[test]
    fn bounded_lru() {
        let c = MemoryCache::new(2, Duration::from_secs(60));
        c.put(&[1; 32], answer("1")).unwrap();
        c.put(&[2; 32], answer("2")).unwrap();
        c.get(&[1; 32]).unwrap();
        c.put(&[3; 32], answer("3")).unwrap();
        assert!(c.get(&[2; 32]).unwrap().is_none());
        assert!(c.get(&[1; 32]).unwrap().is_some());
        assert_eq!(c.entries(), Some(2));
    }

    #[test]
    fn expired_entries_miss() {
        let c = MemoryCache::new(2, Duration::ZERO);
        c.put(&[1; 32], answer("1")).unwrap();
        assert!(c.get(&[1; 32]).unwrap().is_none());
        assert_eq!(c.entries(), Some(0));
    }
}
