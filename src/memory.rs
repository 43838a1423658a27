//! Giving memory back to the operating system when the load ends.
//!
//! When a burst of big answers ends, what they used is freed, but the C
//! allocator keeps most of it: glibc only returns the top of each arena
//! (and the server has many threads, so many arenas), so RSS stays high
//! long after the replay window. Asking the allocator to release its free
//! pages (`malloc_trim`) walks every arena, which is too costly to do after
//! every free; the janitor asks once when it has just forgotten finished
//! requests and nothing is running any more ([`idle_after_forgetting`]).
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
//! assert!(chorus::memory::idle_after_forgetting(3, 0));
//! assert!(!chorus::memory::idle_after_forgetting(3, 1), "still busy");
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

/// Called by the janitor after a sweep: when it `forgot` finished requests
/// and `running` (live requests and generations) is zero, releases memory
/// and returns true.
pub fn idle_after_forgetting(forgot: usize, running: usize) -> bool {
    if forgot == 0 || running > 0 {
        return false;
    }
    if let Some(release) = HOOK.get() {
        release();
    }
    RELEASES.fetch_add(1, Ordering::Relaxed);
    true
}

/// How many times memory was released, for `/metrics` and tests.
pub fn releases() -> u64 {
    RELEASES.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_only_when_something_was_forgotten_and_nothing_runs() {
        let before = releases();
        assert!(!idle_after_forgetting(0, 0));
        assert!(!idle_after_forgetting(5, 2));
        assert!(idle_after_forgetting(5, 0));
        assert!(releases() > before);
    }
}
