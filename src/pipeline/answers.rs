//! The answer cache as the pipeline uses it: the cache lane's lookups, the
//! look again a new leader makes when an answer was written since its
//! lookup, and the write at the end of a generation. A failing cache is a
//! miss here, counted, never an error a client sees.
//!
//! Threads: cache-lane workers look up; whichever thread ends a
//! generation (a streaming worker, the janitor, a cancelling connection)
//! writes. The write counter is the only state of its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::cache::{Cache, CachedAnswer};
use crate::metrics::Metrics;
use crate::request_key::Key;

/// The cache, its counters and the count of answers written so far.
pub(super) struct Answers {
    cache: Arc<dyn Cache>,
    metrics: Arc<Metrics>,
    /// Answers written so far (see [`Answers::writes_seen`]).
    writes: AtomicU64,
}

impl Answers {
    pub(super) fn new(cache: Arc<dyn Cache>, metrics: Arc<Metrics>) -> Answers {
        Answers {
            cache,
            metrics,
            writes: AtomicU64::new(0),
        }
    }

    /// The backend, for the statistics.
    pub(super) fn backend(&self) -> &dyn Cache {
        &*self.cache
    }

    /// Answers written so far. Taken just before a lookup: if it moved by
    /// the time the request would lead, an identical answer may have been
    /// written in between, and [`Answers::look_again`] is worth its cost.
    pub(super) fn writes_seen(&self) -> u64 {
        self.writes.load(Ordering::Acquire)
    }

    /// True when an answer was written since `seen`.
    pub(super) fn written_since(&self, seen: u64) -> bool {
        self.writes_seen() != seen
    }

    /// The cache lane's lookup: every call counts a hit or a miss.
    pub(super) fn look_up(&self, key: &Key) -> Option<Arc<CachedAnswer>> {
        match self.cache.get(key) {
            Ok(Some(answer)) => {
                self.metrics.cache_hits.inc();
                Some(answer)
            }
            Ok(None) => {
                self.metrics.cache_misses.inc();
                None
            }
            Err(e) => {
                // The backend logs its outages (rate-limited); this is per request.
                self.metrics.cache_errors.inc();
                self.metrics.cache_misses.inc();
                log::debug!("cache lookup failed, treating as a miss: {e}");
                None
            }
        }
    }

    /// A second look for a request that missed once: only a hit is
    /// counted, since its miss already was.
    pub(super) fn look_again(&self, key: &Key) -> Option<Arc<CachedAnswer>> {
        let answer = self.cache.get(key).ok().flatten()?;
        self.metrics.cache_hits.inc();
        Some(answer)
    }

    /// Writes a finished generation's answer. Counted as written even when
    /// the backend failed: a look again then costs one lookup, while a
    /// write the counter missed could leave an identical request leading
    /// a second generation.
    pub(super) fn store(&self, key: &Key, answer: Arc<CachedAnswer>) {
        if let Err(e) = self.cache.put(key, answer) {
            self.metrics.cache_errors.inc();
            log::debug!("cache write failed: {e}");
        }
        self.writes.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cache::{MemoryCache, RedisCache};

    fn counts(m: &Metrics) -> (u64, u64, u64) {
        (
            m.cache_hits.get(),
            m.cache_misses.get(),
            m.cache_errors.get(),
        )
    }

    #[test]
    fn a_lookup_counts_a_hit_or_a_miss_and_a_look_again_only_a_hit() {
        let metrics = Arc::new(Metrics::new());
        let cache = Arc::new(MemoryCache::new(8, Duration::from_secs(60)));
        let answers = Answers::new(cache, metrics.clone());
        let key = [7; 32];
        assert!(answers.look_up(&key).is_none());
        assert!(answers.look_again(&key).is_none());
        assert_eq!(counts(&metrics), (0, 1, 0));
        let seen = answers.writes_seen();
        answers.store(&key, Arc::new(CachedAnswer::from_pieces(["a", "b"])));
        assert!(answers.written_since(seen));
        assert!(!answers.written_since(answers.writes_seen()));
        assert_eq!(&*answers.look_again(&key).unwrap().text, "ab");
        assert_eq!(&*answers.look_up(&key).unwrap().text, "ab");
        assert_eq!(counts(&metrics), (2, 1, 0));
    }

    #[test]
    fn a_failing_cache_is_a_counted_miss_and_its_writes_still_count() {
        let cache = RedisCache::unreachable();
        let metrics = Arc::new(Metrics::new());
        let answers = Answers::new(Arc::new(cache), metrics.clone());
        let key = [9; 32];
        assert!(answers.look_up(&key).is_none());
        assert_eq!(counts(&metrics), (0, 1, 1));
        let seen = answers.writes_seen();
        answers.store(&key, Arc::new(CachedAnswer::from_pieces(["x"])));
        assert!(answers.written_since(seen));
        assert_eq!(counts(&metrics).2, 2);
    }
}
