//! Giving memory back to the operating system when the load ends.
//!
//! When a burst of big answers ends, what they used is freed, but the C
//! allocator keeps most of it: glibc only returns the top of each arena
//! (and the server has many threads, so many arenas), so RSS stays high
//! long after the replay window. Asking the allocator to release its free
//! pages (`malloc_trim`) walks every arena, which is too costly to do after
//! every free; the janitor asks once ([`release`]) when it has just
//! forgotten finished requests and nothing is running any more, after
//! shrinking what the pipeline and the history keep from the peak.
//!
//! The library has no unsafe code, so the release itself is a hook the
//! binary installs ([`set_release_hook`]); without one, nothing happens.
//!
//! Threads: the hook is set once at start (before the server runs) and
//! called from the janitor thread.
//!
//! ```
//! fn release() { /* e.g. libc::malloc_trim(0) */ }
//! chorus::memory::set_release_hook(release);
//! let before = chorus::memory::releases();
//! chorus::memory::release();
//! assert_eq!(chorus::memory::releases(), before + 1);
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

static HOOK: OnceLock<fn()> = OnceLock::new();
static RELEASES: AtomicU64 = AtomicU64::new(0);

/// Installs `release` as what hands free memory back to the OS. Only the
/// first call counts.
pub fn set_release_hook(release: fn()) {
    let _ = HOOK.set(release);
}

/// Hands free memory back to the OS through the hook (if one is set).
/// The janitor calls it when a burst has ended: it is a walk over every
/// arena, never for a busy server.
pub fn release() {
    if let Some(release) = HOOK.get() {
        release();
    }
    RELEASES.fetch_add(1, Ordering::Relaxed);
}

/// How many times memory was released, for `/metrics` and tests.
pub fn releases() -> u64 {
    RELEASES.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_release_is_counted() {
        let before = releases();
        release();
        release();
        assert!(releases() >= before + 2);
    }
}
