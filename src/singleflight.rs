//! Duplicate-call suppression: when many requests ask for the same thing at
//! once, one of them (the *leader*) does the work and the rest (the
//! *followers*) wait for its result instead of repeating it.
//!
//! # The job
//!
//! A [`Group`] maps keys to in-flight [`Call`]s. The first [`Group::claim`]
//! for a key creates the call and gets a [`Leader`] guard; every later claim
//! for the same key, until the leader finishes, gets the same call as a
//! follower. When the leader publishes its result with [`Leader::complete`],
//! the key leaves the group and every follower wakes with a clone of the
//! value. [`Group::run`] wraps the whole dance in one call, like Go's `Do`.
//!
//! # How it differs from Go's `singleflight`
//!
//! - **The leader is a guard, not a stack frame.** Go's `Do` runs the work
//!   inside the call, so leadership ends when the function returns. In the
//!   chorus pipeline the leader's work is handed from stage to stage across
//!   threads, so leadership is a value: [`Leader`] is `Send`, moves with the
//!   work, and ends when it is completed or dropped. Dropping it without
//!   completing (an error path, a panic, a closed channel) still wakes every
//!   follower, with [`Abandoned`], so a lost leader can never hang a waiter.
//! - **Shared state exists before the result.** Each call carries an `S`
//!   built by the leader's claim and visible to followers the moment they
//!   join. chorus puts the live token broadcast there, so a follower can
//!   stream tokens while the leader is still generating, long before the
//!   final value exists.
//! - **No panic re-raising.** A panicking leader hands followers
//!   `Abandoned { panicked: true }` rather than re-panicking in their threads;
//!   the caller decides whether to retry.
//!
//! # Threading rules
//!
//! - `Group` is cheap to clone and all clones share one map; share it freely.
//! - Exactly one party holds a [`Leader`] at a time. It may move between
//!   threads, but must not wait on its own call: that waits on itself
//!   forever. For the same reason, a thread holding a `Leader` should not
//!   block as a follower of another key whose leader might be waiting on it.
//! - The group's map lock is held only for lookups, inserts, removals and the
//!   `make_shared` closure; waiters are notified, and `work` runs, outside
//!   it, so a slow leader never stalls claims on other keys.
//! - `S` is shared immutably between the leader and all followers; give it
//!   interior synchronisation (channels, locks, atomics) if it must change.
//!
//! # Examples
//!
//! Claiming by hand, with the leader's work on another thread and the
//! follower reading shared state before the result exists:
//!
//! ```
//! use chorus::singleflight::{Claim, Group};
//! use crossbeam_channel::{unbounded, Receiver, Sender};
//! use std::thread;
//!
//! // The shared state is a token channel the leader streams into. (A real
//! // pipeline uses a broadcast so that every follower sees every token.)
//! let group: Group<String, (Sender<String>, Receiver<String>), String> = Group::new();
//!
//! let Claim::Leader(leader) = group.claim("hi".to_string(), unbounded) else {
//!     panic!("first claim leads");
//! };
//! let Claim::Follower(call) = group.claim("hi".to_string(), unbounded) else {
//!     panic!("second claim follows");
//! };
//!
//! // Leadership travels with the work.
//! let worker = thread::spawn(move || {
//!     leader.shared().0.send("hel".to_string()).expect("receiver alive");
//!     leader.complete("hello".to_string());
//! });
//!
//! assert_eq!(call.shared().1.recv().expect("token"), "hel");
//! assert_eq!(call.wait(), Ok("hello".to_string()));
//! worker.join().expect("worker finished");
//! assert!(group.is_empty());
//! ```
//!
//! The Go-style one-liner:
//!
//! ```
//! use chorus::singleflight::Group;
//!
//! let group: Group<&str, (), u32> = Group::new();
//! let (result, shared) = group.run("answer", || 42);
//! assert_eq!(result, Ok(42));
//! assert!(!shared); // nobody else was asking
//! ```

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// The leader went away without publishing a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("leader abandoned the call")]
pub struct Abandoned {
    /// The leader was dropped while its thread was unwinding from a panic.
    pub panicked: bool,
}

type CallMap<K, S, V> = Mutex<HashMap<K, Arc<Call<S, V>>>>;

/// A set of in-flight calls keyed by `K`.
///
/// Cheap to clone (an `Arc` inside); clones share the map. `S` is state every
/// participant of a call sees from the start, `V` the final result, cloned
/// out to each waiter.
pub struct Group<K, S, V> {
    /// In-flight calls. An entry is inserted by the claim that becomes leader
    /// and removed by that leader's completion or drop (if still the same
    /// call) or by `forget`. The lock is held only for map operations and
    /// `make_shared`, never across notification or user work.
    calls: Arc<CallMap<K, S, V>>,
}

impl<K, S, V> Clone for Group<K, S, V> {
    fn clone(&self) -> Self {
        Self {
            calls: Arc::clone(&self.calls),
        }
    }
}

impl<K: Eq + Hash + Clone, S, V: Clone> Default for Group<K, S, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K, S, V> fmt::Debug for Group<K, S, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Group")
            .field("in_flight", &self.calls.lock().len())
            .finish()
    }
}

impl<K: Eq + Hash + Clone, S, V: Clone> Group<K, S, V> {
    /// An empty group.
    pub fn new() -> Self {
        Self {
            calls: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Joins the call for `key`.
    ///
    /// If no call is in flight, creates one whose shared state is
    /// `make_shared()` and returns [`Claim::Leader`]; the caller now owns the
    /// work and must complete or drop the guard. Otherwise returns
    /// [`Claim::Follower`] with the existing call, whose shared state was
    /// built by the leader's claim (this `make_shared` is not run).
    ///
    /// Never waits for a leader. `make_shared` runs under the group's map
    /// lock, so keep it short and never touch the group from inside it.
    pub fn claim(&self, key: K, make_shared: impl FnOnce() -> S) -> Claim<K, S, V> {
        let mut calls = self.calls.lock();
        match calls.entry(key) {
            Entry::Occupied(entry) => {
                let call = Arc::clone(entry.get());
                call.followers.fetch_add(1, Ordering::Relaxed);
                Claim::Follower(call)
            }
            Entry::Vacant(entry) => {
                let key = entry.key().clone();
                let call = Arc::new(Call::new(make_shared()));
                entry.insert(Arc::clone(&call));
                Claim::Leader(Leader {
                    calls: Arc::clone(&self.calls),
                    key,
                    call,
                    finished: false,
                })
            }
        }
    }

    /// Go's `Do`: runs `work` if this caller becomes the leader, otherwise
    /// waits for the leader's result.
    ///
    /// Returns the result and whether it came from another caller's work
    /// (`true` for followers, `false` for the leader).
    ///
    /// What blocks it: for a follower, the leader not having finished yet;
    /// for the leader, `work` itself. What wakes a follower: the leader
    /// completing or its guard dropping. If the leader goes away (its work
    /// panics, or a hand-made leader is dropped) followers get
    /// `Err(Abandoned)`; if this caller's own `work` panics, the panic
    /// propagates here after the followers have been released.
    pub fn run(&self, key: K, work: impl FnOnce() -> V) -> (Result<V, Abandoned>, bool)
    where
        S: Default,
    {
        match self.claim(key, S::default) {
            Claim::Leader(leader) => {
                // `leader` stays alive across `work`, so a panic in it drops
                // the guard during unwinding and followers see `panicked`.
                let value = work();
                leader.complete(value.clone());
                (Ok(value), false)
            }
            Claim::Follower(call) => (call.wait(), true),
        }
    }

    /// Stops new claims from joining the in-flight call for `key`: later
    /// claims create a new call. Existing followers keep waiting on the old
    /// one, and its leader's completion will not disturb the new call. Like
    /// Go's `Forget`.
    pub fn forget(&self, key: &K) {
        let removed = self.calls.lock().remove(key);
        // Drop outside the lock: S and V are user types with arbitrary Drop.
        drop(removed);
    }

    /// Number of keys with a call in flight.
    pub fn len(&self) -> usize {
        self.calls.lock().len()
    }

    /// Whether no call is in flight.
    pub fn is_empty(&self) -> bool {
        self.calls.lock().is_empty()
    }

    /// The call currently in flight for `key`, without joining it (its
    /// follower count is not changed).
    pub fn get(&self, key: &K) -> Option<Arc<Call<S, V>>> {
        self.calls.lock().get(key).cloned()
    }
}

/// What [`Group::claim`] handed out.
pub enum Claim<K: Eq + Hash, S, V> {
    /// This caller created the call and owns the work.
    Leader(Leader<K, S, V>),
    /// A call was already in flight; wait on it or read its shared state.
    Follower(Arc<Call<S, V>>),
}

impl<K: Eq + Hash, S, V> Claim<K, S, V> {
    /// The call claimed, whichever side of it this is.
    pub fn call(&self) -> &Arc<Call<S, V>> {
        match self {
            Claim::Leader(leader) => leader.call(),
            Claim::Follower(call) => call,
        }
    }

    /// Whether this claim made the caller the leader.
    pub fn is_leader(&self) -> bool {
        matches!(self, Claim::Leader(_))
    }
}

impl<K: Eq + Hash + fmt::Debug, S, V> fmt::Debug for Claim<K, S, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Claim::Leader(leader) => f.debug_tuple("Leader").field(leader).finish(),
            Claim::Follower(call) => f.debug_tuple("Follower").field(call).finish(),
        }
    }
}

/// One in-flight call.
pub struct Call<S, V> {
    /// Built once by the leader's claim before the call is visible to anyone
    /// else, then only read; whatever changes inside it synchronises itself.
    shared: S,
    /// `None` while pending. Written exactly once, by the leader's
    /// completion or drop, under this lock; read by waiters under the same
    /// lock after `done` wakes them.
    result: Mutex<Option<Result<V, Abandoned>>>,
    /// Notified (all) right after `result` is written. Waiters recheck
    /// `result` in a loop, so spurious wake-ups are harmless.
    done: Condvar,
    /// Bumped under the group's map lock by each follower claim. Relaxed:
    /// it is a statistic and publishes no other data.
    followers: AtomicUsize,
}

impl<S, V> Call<S, V> {
    fn new(shared: S) -> Self {
        Self {
            shared,
            result: Mutex::new(None),
            done: Condvar::new(),
            followers: AtomicUsize::new(0),
        }
    }

    /// State shared by the leader and every follower from the start.
    pub fn shared(&self) -> &S {
        &self.shared
    }

    /// Number of follower claims made on this call. Calls reached through
    /// [`Group::get`] are not counted.
    pub fn followers(&self) -> usize {
        self.followers.load(Ordering::Relaxed)
    }
}

impl<S, V: Clone> Call<S, V> {
    /// Blocks until the call has a result and returns a clone of it.
    ///
    /// What blocks it: the leader not having completed yet. What wakes it:
    /// [`Leader::complete`], or the [`Leader`] guard dropping, including
    /// during a panic. If the leader goes away without completing, returns
    /// `Err(Abandoned)`, with `panicked` telling whether it was unwinding.
    /// Never call this from the thread holding this call's leader: it would
    /// wait on itself forever.
    pub fn wait(&self) -> Result<V, Abandoned> {
        let mut slot = self.result.lock();
        loop {
            if let Some(result) = slot.as_ref() {
                return result.clone();
            }
            self.done.wait(&mut slot);
        }
    }

    /// Like [`Call::wait`], but gives up after `timeout` and returns `None`.
    ///
    /// What blocks it: the leader not having completed yet, for at most
    /// `timeout`. What wakes it: [`Leader::complete`], the [`Leader`] guard
    /// dropping (then `Some(Err(Abandoned))`), or the timeout elapsing
    /// (then `None`; the call is still in flight and can be waited on again).
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Result<V, Abandoned>> {
        let Some(deadline) = Instant::now().checked_add(timeout) else {
            // A deadline past what Instant can hold is no deadline at all.
            return Some(self.wait());
        };
        let mut slot = self.result.lock();
        loop {
            if let Some(result) = slot.as_ref() {
                return Some(result.clone());
            }
            if self.done.wait_until(&mut slot, deadline).timed_out() {
                return slot.clone();
            }
        }
    }

    /// The result if the call has finished, `None` if it is still pending.
    /// Never blocks beyond the brief lock on the result slot.
    pub fn try_result(&self) -> Option<Result<V, Abandoned>> {
        self.result.lock().clone()
    }
}

impl<S, V> fmt::Debug for Call<S, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Call")
            .field("finished", &self.result.lock().is_some())
            .field("followers", &self.followers())
            .finish_non_exhaustive()
    }
}

/// The right, and duty, to finish one call.
///
/// Held by exactly one party. It is `Send` (for `Send` keys and values and
/// `Send + Sync` shared state), so it can travel from thread to thread
/// through a pipeline along with the work it stands for. Finishing is
/// [`Leader::complete`]; dropping it unfinished releases every waiter with
/// [`Abandoned`].
// `K: Eq + Hash` sits on the struct because Drop, which removes the key from
// the map, may not ask for more bounds than the type declares.
pub struct Leader<K: Eq + Hash, S, V> {
    /// The owning group's map, to unregister the call when finished.
    calls: Arc<CallMap<K, S, V>>,
    key: K,
    call: Arc<Call<S, V>>,
    /// Set once the result is published so Drop does not publish again.
    /// Plain bool: a Leader is moved, never shared.
    finished: bool,
}

impl<K: Eq + Hash, S, V> Leader<K, S, V> {
    /// The call this guard leads; hand it to anyone who should wait on it.
    pub fn call(&self) -> &Arc<Call<S, V>> {
        &self.call
    }

    /// State shared with every follower of this call.
    pub fn shared(&self) -> &S {
        &self.call.shared
    }

    /// The key this call was claimed under.
    pub fn key(&self) -> &K {
        &self.key
    }

    /// Publishes `value` to every waiter and removes the key from the group,
    /// but only if the group's entry is still this call: after a
    /// [`Group::forget`] and a new claim, the new call stays in place.
    pub fn complete(mut self, value: V) {
        self.finish(Ok(value));
    }

    fn finish(&mut self, result: Result<V, Abandoned>) {
        self.finished = true;
        // Unregister before publishing, so anyone who has seen the result
        // also finds the key free for a fresh call.
        let removed = {
            let mut calls = self.calls.lock();
            match calls.get(&self.key) {
                Some(current) if Arc::ptr_eq(current, &self.call) => calls.remove(&self.key),
                _ => None,
            }
        };
        drop(removed);
        *self.call.result.lock() = Some(result);
        // Notify after releasing the slot lock so woken waiters do not
        // immediately block on it again.
        self.call.done.notify_all();
    }
}

impl<K: Eq + Hash, S, V> Drop for Leader<K, S, V> {
    fn drop(&mut self) {
        if !self.finished {
            self.finish(Err(Abandoned {
                panicked: std::thread::panicking(),
            }));
        }
    }
}

impl<K: Eq + Hash + fmt::Debug, S, V> fmt::Debug for Leader<K, S, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leader")
            .field("key", &self.key)
            .field("call", &self.call)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;
    use std::thread;

    const LONG: Duration = Duration::from_secs(10);

    fn leader<K: Eq + Hash + fmt::Debug, S, V>(claim: Claim<K, S, V>) -> Leader<K, S, V> {
        match claim {
            Claim::Leader(leader) => leader,
            Claim::Follower(call) => panic!("expected leader, got follower of {call:?}"),
        }
    }

    fn follower<K: Eq + Hash + fmt::Debug, S, V>(claim: Claim<K, S, V>) -> Arc<Call<S, V>> {
        match claim {
            Claim::Follower(call) => call,
            Claim::Leader(leader) => panic!("expected follower, got {leader:?}"),
        }
    }

    /// Spins until `key`'s call has `n` followers, so tests can line threads
    /// up without sleeping for a guessed duration.
    fn await_followers<K: Eq + Hash + Clone, S, V: Clone>(g: &Group<K, S, V>, key: &K, n: usize) {
        let deadline = Instant::now() + LONG;
        while g.get(key).map(|c| c.followers()) != Some(n) {
            assert!(Instant::now() < deadline, "followers never arrived");
            thread::yield_now();
        }
    }

    #[test]
    fn is_send_and_sync() {
        fn send<T: Send>() {}
        fn sync<T: Sync>() {}
        send::<Leader<String, Vec<u8>, String>>();
        send::<Group<String, Vec<u8>, String>>();
        sync::<Group<String, Vec<u8>, String>>();
        send::<Arc<Call<Vec<u8>, String>>>();
        sync::<Call<Vec<u8>, String>>();
    }

    #[test]
    fn smoke() {
        let g: Group<&str, u8, u32> = Group::new();
        assert!(g.is_empty());
        let l = leader(g.claim("k", || 7));
        assert_eq!(*l.key(), "k");
        assert_eq!(*l.shared(), 7);
        assert_eq!(g.len(), 1);
        let call = Arc::clone(l.call());
        assert!(g.get(&"k").is_some_and(|c| Arc::ptr_eq(&c, &call)));
        assert_eq!(call.try_result(), None);

        let f = follower(g.claim("k", || unreachable!("shared built once")));
        assert!(Arc::ptr_eq(&f, &call));
        assert_eq!(*f.shared(), 7);
        assert_eq!(call.followers(), 1);

        l.complete(5);
        assert!(g.is_empty());
        assert_eq!(f.wait(), Ok(5));
        assert_eq!(f.try_result(), Some(Ok(5)));
        assert_eq!(g.run("k", || 6), (Ok(6), false));
    }

    #[test]
    fn duplicate_suppression() {
        const N: usize = 50;
        let g: Group<&str, (), u64> = Group::new();
        let executed = AtomicUsize::new(0);
        let barrier = Barrier::new(N);
        let results: Vec<_> = thread::scope(|s| {
            let handles: Vec<_> = (0..N)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        g.run("key", || {
                            executed.fetch_add(1, Ordering::SeqCst);
                            // Hold the call open until everyone has joined,
                            // or a late thread would start a second call.
                            await_followers(&g, &"key", N - 1);
                            99
                        })
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("runner panicked"))
                .collect()
        });
        assert_eq!(executed.load(Ordering::SeqCst), 1);
        assert!(results.iter().all(|(r, _)| *r == Ok(99)));
        assert_eq!(results.iter().filter(|(_, shared)| *shared).count(), N - 1);
        assert!(g.is_empty());
    }

    #[test]
    fn leader_panic_releases_waiters() {
        const FOLLOWERS: usize = 3;
        let g: Group<&str, (), u32> = Group::new();
        let leader_thread = {
            let g = g.clone();
            thread::spawn(move || {
                g.run("k", || {
                    await_followers(&g, &"k", FOLLOWERS);
                    panic!("leader blew up on purpose");
                })
            })
        };
        // Followers must join after the leader has claimed.
        let deadline = Instant::now() + LONG;
        while g.get(&"k").is_none() {
            assert!(Instant::now() < deadline, "leader never claimed");
            thread::yield_now();
        }
        let followers: Vec<_> = (0..FOLLOWERS)
            .map(|_| {
                let g = g.clone();
                thread::spawn(move || g.run("k", || unreachable!("follower ran work")))
            })
            .collect();
        for f in followers {
            let (result, shared) = f.join().expect("follower panicked");
            assert_eq!(result, Err(Abandoned { panicked: true }));
            assert!(shared);
        }
        assert!(leader_thread.join().is_err());
        assert!(g.is_empty());
        assert_eq!(g.run("k", || 3), (Ok(3), false));
    }

    #[test]
    fn leader_dropped_without_complete() {
        let g: Group<u8, (), String> = Group::new();
        let l = leader(g.claim(1, || ()));
        let f = follower(g.claim(1, || ()));
        let waiter = thread::spawn(move || f.wait());
        drop(l);
        let err = waiter.join().expect("waiter panicked");
        assert_eq!(err, Err(Abandoned { panicked: false }));
        assert!(g.is_empty());
        assert_eq!(
            err.map_err(|e| e.to_string()),
            Err("leader abandoned the call".to_string())
        );
    }

    #[test]
    fn forget_starts_a_new_call() {
        let g: Group<u8, (), u32> = Group::new();
        let old = leader(g.claim(1, || ()));
        let old_follower = follower(g.claim(1, || ()));
        g.forget(&1);
        assert!(g.is_empty());

        let new = leader(g.claim(1, || ()));
        assert!(!Arc::ptr_eq(old.call(), new.call()));
        let new_follower = follower(g.claim(1, || ()));
        assert!(Arc::ptr_eq(&new_follower, new.call()));

        old.complete(10);
        assert_eq!(old_follower.wait(), Ok(10));
        assert_eq!(new_follower.try_result(), None);
        new.complete(20);
        assert_eq!(new_follower.wait(), Ok(20));
        assert!(g.is_empty());
    }

    #[test]
    fn finishing_after_forget_keeps_the_new_call() {
        let g: Group<u8, (), u32> = Group::new();
        let old = leader(g.claim(1, || ()));
        g.forget(&1);
        let new = leader(g.claim(1, || ()));
        old.complete(1);
        assert!(g.get(&1).is_some_and(|c| Arc::ptr_eq(&c, new.call())));

        // Abandoning goes through the same check.
        g.forget(&1);
        let newest = leader(g.claim(1, || ()));
        drop(new);
        assert!(g.get(&1).is_some_and(|c| Arc::ptr_eq(&c, newest.call())));
        newest.complete(3);
        assert!(g.is_empty());
    }

    #[test]
    fn wait_timeout_while_pending() {
        let g: Group<u8, (), u32> = Group::new();
        let l = leader(g.claim(1, || ()));
        let f = follower(g.claim(1, || ()));
        assert_eq!(f.wait_timeout(Duration::from_millis(20)), None);
        assert_eq!(f.try_result(), None);
        l.complete(4);
        assert_eq!(f.wait_timeout(Duration::from_millis(20)), Some(Ok(4)));
        assert_eq!(f.wait_timeout(Duration::MAX), Some(Ok(4)));
    }

    #[test]
    fn leader_hops_threads() {
        let g: Group<String, (), String> = Group::new();
        let l = leader(g.claim("q".to_string(), || ()));
        let f = follower(g.claim("q".to_string(), || ()));
        let (to_stage, stage_in) = crossbeam_channel::bounded::<Leader<String, (), String>>(1);
        let stage = thread::spawn(move || {
            let l = stage_in.recv().expect("leader sent");
            let answer = format!("answer to {}", l.key());
            l.complete(answer);
        });
        to_stage.send(l).expect("stage alive");
        assert_eq!(f.wait(), Ok("answer to q".to_string()));
        stage.join().expect("stage panicked");
        assert!(g.is_empty());
    }

    #[test]
    fn shared_state_reaches_followers_before_the_result() {
        type Tokens = (
            crossbeam_channel::Sender<&'static str>,
            crossbeam_channel::Receiver<&'static str>,
        );
        let g: Group<u8, Tokens, &'static str> = Group::new();
        let l = leader(g.claim(1, crossbeam_channel::unbounded));
        let f = follower(g.claim(1, crossbeam_channel::unbounded));
        let streamer = thread::spawn(move || {
            for t in ["a", "b"] {
                l.shared().0.send(t).expect("receiver alive");
            }
            l
        });
        assert_eq!(f.shared().1.recv_timeout(LONG), Ok("a"));
        assert_eq!(f.shared().1.recv_timeout(LONG), Ok("b"));
        assert_eq!(f.try_result(), None);
        streamer.join().expect("streamer panicked").complete("ab");
        assert_eq!(f.wait(), Ok("ab"));
    }

    /// xorshift64: deterministic per-thread choices without a dependency.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn stress_mixed_operations() {
        const THREADS: u64 = 16;
        const ITERS: u64 = 2000;
        const KEYS: u64 = 8;
        // Values and shared state carry their key so a mix-up between calls
        // shows; `run` builds shared state with Default, hence the Option.
        let g: Group<u64, Option<u64>, (u64, u64)> = Group::new();
        // Both paths must actually be exercised for the run to mean anything.
        let led = AtomicUsize::new(0);
        let waited = AtomicUsize::new(0);
        // A pipeline stage that finishes leaders handed to it, so leadership
        // also crosses threads under load. It never waits, so it cannot be
        // part of a wait cycle.
        let (to_stage, stage_in) =
            crossbeam_channel::unbounded::<(Leader<u64, Option<u64>, (u64, u64)>, bool)>();
        let stage = thread::spawn(move || {
            for (l, keep) in stage_in {
                if keep {
                    let value = (*l.key(), u64::MAX);
                    l.complete(value);
                }
            }
        });
        fn check(key: u64, result: Option<Result<(u64, u64), Abandoned>>) {
            match result {
                None => panic!("waiter on key {key} hung"),
                Some(Ok((k, _))) => assert_eq!(k, key),
                Some(Err(a)) => assert!(!a.panicked),
            }
        }

        thread::scope(|s| {
            for t in 0..THREADS {
                let g = g.clone();
                let to_stage = to_stage.clone();
                let (led, waited) = (&led, &waited);
                s.spawn(move || {
                    let mut rng = 0x9E37_79B9_7F4A_7C15 ^ (t + 1);
                    for i in 0..ITERS {
                        let key = next(&mut rng) % KEYS;
                        let op = next(&mut rng) % 8;
                        if op == 0 {
                            let (r, _) = g.run(key, || (key, i));
                            check(key, Some(r));
                            continue;
                        }
                        if op == 1 {
                            if let Some(call) = g.get(&key) {
                                assert!(call.shared().is_none_or(|k| k == key));
                                if let Some(r) = call.try_result() {
                                    check(key, Some(r));
                                }
                            }
                            continue;
                        }
                        match g.claim(key, || Some(key)) {
                            // Holding a leader, never wait on anything.
                            Claim::Leader(l) => {
                                led.fetch_add(1, Ordering::Relaxed);
                                assert_eq!(*l.shared(), Some(key));
                                match op {
                                    2 => drop(l),
                                    3 => {
                                        g.forget(&key);
                                        l.complete((key, i));
                                    }
                                    4 => to_stage.send((l, true)).expect("stage alive"),
                                    5 => to_stage.send((l, false)).expect("stage alive"),
                                    _ => {
                                        thread::yield_now();
                                        l.complete((key, i));
                                    }
                                }
                            }
                            Claim::Follower(call) => {
                                waited.fetch_add(1, Ordering::Relaxed);
                                assert!(call.shared().is_none_or(|k| k == key));
                                check(key, call.wait_timeout(LONG));
                            }
                        }
                    }
                });
            }
        });
        drop(to_stage);
        stage.join().expect("stage panicked");
        assert_eq!(g.len(), 0);
        eprintln!(
            "stress: {} leaders, {} follower waits",
            led.load(Ordering::Relaxed),
            waited.load(Ordering::Relaxed)
        );
        assert!(led.load(Ordering::Relaxed) > 0 && waited.load(Ordering::Relaxed) > 0);
    }
}
