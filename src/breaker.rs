//! A circuit breaker for a dependency that may go away or freeze (Redis):
//! after one failure the dependency is *known down*, every caller skips it
//! at once instead of waiting its timeout, and one background thread probes
//! it, with a growing pause between tries, until it answers again.
//!
//! Without it, a frozen Redis costs every caller the full command timeout:
//! each cache lookup, each claim, each stream write. With it, an outage
//! costs the calls already in flight when it starts and nothing after.
//! An outage is logged twice: once when it starts, once when it ends. A
//! relapse within [`RELAPSE`] of the end (a Redis thawed after a freeze,
//! still working off its backlog, fails one more call) is part of the same
//! outage in the log: debug lines, not a second warning.
//!
//! ```
//! use std::sync::atomic::{AtomicBool, Ordering};
//! use std::sync::Arc;
//! use std::time::Duration;
//! use chorus::breaker::{Breaker, BreakerError};
//!
//! let healthy = Arc::new(AtomicBool::new(false));
//! let h = healthy.clone();
//! let breaker = Breaker::new(
//!     "the example service",
//!     "callers skip it",
//!     move || if h.load(Ordering::Acquire) { Ok(()) } else { Err("down".into()) },
//!     Duration::from_millis(5),
//!     Duration::from_millis(20),
//! );
//! // A failure opens the breaker; the next call does not even run.
//! let failed: Result<(), _> = breaker.call(|| Err::<(), _>("refused"));
//! assert!(matches!(failed, Err(BreakerError::Failed("refused"))));
//! assert!(breaker.is_open());
//! assert!(matches!(breaker.call(|| Ok::<_, String>(1)), Err(BreakerError::Open)));
//! // Once the probe succeeds, callers use the service again.
//! healthy.store(true, Ordering::Release);
//! while breaker.is_open() {
//!     std::thread::sleep(Duration::from_millis(1));
//! }
//! assert!(matches!(breaker.call(|| Ok::<_, String>(1)), Ok(1)));
//! ```
//!
//! Threads: any number of threads call [`Breaker::call`] and
//! [`Breaker::is_open`] (one atomic load); while the breaker is open exactly
//! one probe thread of its own runs, and it ends when the breaker closes or
//! is dropped.

use std::fmt::Display;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// A failure this soon after the dependency came back is a relapse of the
/// same outage (see the module documentation).
pub const RELAPSE: Duration = Duration::from_secs(5);

/// The probe: `Ok` when the dependency answers.
type Probe = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Why [`Breaker::call`] returned no value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BreakerError<E> {
    /// The breaker is open: the dependency is known to be down and was not
    /// called.
    #[error("known to be down")]
    Open,
    /// The call ran and failed; the breaker is open now.
    #[error("{0}")]
    Failed(E),
}

/// A circuit breaker; see the module documentation.
pub struct Breaker {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    /// What callers do meanwhile, for the outage's log line.
    consequence: String,
    open: AtomicBool,
    outages: AtomicU64,
    /// Outages whose start was logged as one (not relapses).
    logged_outages: AtomicU64,
    /// When the last outage ended, and whether the open one is a relapse
    /// (its end is then logged at debug level too).
    recovery: Mutex<(Option<Instant>, bool)>,
    probes: AtomicU64,
    probe: Probe,
    first_pause: Duration,
    max_pause: Duration,
    /// Set when the breaker is dropped; the probe thread waits on `wake`.
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl Breaker {
    /// A closed breaker for the dependency called `name` (as log lines
    /// name it); `consequence` says what callers do while it is down.
    /// While open, `probe` runs on the probe thread after `first_pause`,
    /// then after pauses that double up to `max_pause`.
    pub fn new(
        name: &str,
        consequence: &str,
        probe: impl Fn() -> Result<(), String> + Send + Sync + 'static,
        first_pause: Duration,
        max_pause: Duration,
    ) -> Breaker {
        Breaker {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                consequence: consequence.to_owned(),
                open: AtomicBool::new(false),
                outages: AtomicU64::new(0),
                logged_outages: AtomicU64::new(0),
                recovery: Mutex::new((None, false)),
                probes: AtomicU64::new(0),
                probe: Box::new(probe),
                first_pause: first_pause.max(Duration::from_millis(1)),
                max_pause: max_pause.max(first_pause),
                stopped: Mutex::new(false),
                wake: Condvar::new(),
            }),
        }
    }

    /// True while the dependency is known to be down. Never blocks.
    pub fn is_open(&self) -> bool {
        self.inner.open.load(Ordering::Acquire)
    }

    /// Runs `f` unless the breaker is open; a failure of `f` opens it.
    /// Blocks only as long as `f` does.
    pub fn call<T, E: Display>(
        &self,
        f: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, BreakerError<E>> {
        if self.is_open() {
            return Err(BreakerError::Open);
        }
        f().map_err(|e| {
            self.trip(&e);
            BreakerError::Failed(e)
        })
    }

    /// Marks the dependency down because of `error`. The first trip of an
    /// outage logs it and starts the probe thread; later ones do nothing.
    pub fn trip(&self, error: &dyn Display) {
        let inner = &self.inner;
        if inner.open.swap(true, Ordering::AcqRel) {
            return;
        }
        inner.outages.fetch_add(1, Ordering::Relaxed);
        let relapse = {
            let mut recovery = inner.recovery.lock();
            recovery.1 = recovery.0.is_some_and(|at| at.elapsed() < RELAPSE);
            recovery.1
        };
        if relapse {
            log::debug!(
                "{} failed again right after it came back: {error}",
                inner.name
            );
        } else {
            inner.logged_outages.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "{} is unavailable, {}: {error}",
                inner.name,
                inner.consequence
            );
        }
        let probing = inner.clone();
        let spawned = std::thread::Builder::new()
            .name("chorus-probe".into())
            .stack_size(128 * 1024)
            .spawn(move || probing.probe_until_up());
        if let Err(e) = spawned {
            // Without a probe nothing would ever close it: stay closed and
            // let callers find out for themselves.
            log::warn!("cannot start the probe of {}: {e}", inner.name);
            inner.open.store(false, Ordering::Release);
        }
    }

    /// Outages seen so far (times the breaker opened).
    pub fn outages(&self) -> u64 {
        self.inner.outages.load(Ordering::Relaxed)
    }

    /// Outages logged as such: [`Breaker::outages`] without relapses.
    pub fn logged_outages(&self) -> u64 {
        self.inner.logged_outages.load(Ordering::Relaxed)
    }

    /// Probes run so far.
    pub fn probes(&self) -> u64 {
        self.inner.probes.load(Ordering::Relaxed)
    }
}

impl Inner {
    fn probe_until_up(&self) {
        let mut pause = self.first_pause;
        loop {
            {
                let mut stopped = self.stopped.lock();
                if !*stopped {
                    self.wake.wait_for(&mut stopped, pause);
                }
                if *stopped {
                    return;
                }
            }
            self.probes.fetch_add(1, Ordering::Relaxed);
            if (self.probe)().is_ok() {
                let relapse = {
                    let mut recovery = self.recovery.lock();
                    std::mem::replace(&mut *recovery, (Some(Instant::now()), false)).1
                };
                self.open.store(false, Ordering::Release);
                if relapse {
                    log::debug!("{} is back after a relapse", self.name);
                } else {
                    log::info!("{} is reachable again", self.name);
                }
                return;
            }
            pause = (pause * 2).min(self.max_pause);
        }
    }
}

impl Drop for Breaker {
    fn drop(&mut self) {
        *self.inner.stopped.lock() = true;
        self.inner.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn switchable() -> (Arc<AtomicBool>, Breaker) {
        let healthy = Arc::new(AtomicBool::new(false));
        let h = healthy.clone();
        let breaker = Breaker::new(
            "test",
            "skipped",
            move || {
                if h.load(Ordering::Acquire) {
                    Ok(())
                } else {
                    Err("down".into())
                }
            },
            Duration::from_millis(1),
            Duration::from_millis(4),
        );
        (healthy, breaker)
    }

    #[test]
    fn smoke() {
        let (healthy, breaker) = switchable();
        assert!(!breaker.is_open());
        assert_eq!(breaker.call(|| Ok::<_, String>(7)).ok(), Some(7));
        let ran = AtomicUsize::new(0);
        let failed = breaker.call(|| {
            ran.fetch_add(1, Ordering::Relaxed);
            Err::<(), _>("refused")
        });
        assert!(matches!(failed, Err(BreakerError::Failed("refused"))));
        assert!(breaker.is_open());
        let skipped = breaker.call(|| {
            ran.fetch_add(1, Ordering::Relaxed);
            Ok::<_, String>(())
        });
        assert!(matches!(skipped, Err(BreakerError::Open)));
        assert_eq!(
            ran.load(Ordering::Relaxed),
            1,
            "an open breaker ran the call"
        );
        healthy.store(true, Ordering::Release);
        wait_until("the probe to close it", || !breaker.is_open());
        assert_eq!(breaker.outages(), 1);
        assert!(breaker.call(|| Ok::<_, String>(())).is_ok());
    }

    #[test]
    fn probes_go_on_until_the_dependency_answers() {
        let (healthy, breaker) = switchable();
        breaker.trip(&"first");
        wait_until("several failed probes", || breaker.probes() >= 5);
        assert!(breaker.is_open());
        healthy.store(true, Ordering::Release);
        wait_until("the probe to close it", || !breaker.is_open());
        let probes = breaker.probes();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(breaker.probes(), probes, "probing went on after it closed");
    }

    #[test]
    fn trips_during_an_outage_do_not_start_another() {
        let (healthy, breaker) = switchable();
        for _ in 0..10 {
            breaker.trip(&"again");
        }
        assert_eq!(breaker.outages(), 1);
        healthy.store(true, Ordering::Release);
        wait_until("the probe to close it", || !breaker.is_open());
        healthy.store(false, Ordering::Release);
        breaker.trip(&"second outage");
        assert_eq!(breaker.outages(), 2);
        // So soon after the first ended: a relapse of it, not logged as a
        // second outage.
        assert_eq!(breaker.logged_outages(), 1);
    }

    #[test]
    fn drop_stops_the_probe_thread() {
        let probes = Arc::new(AtomicUsize::new(0));
        let p = probes.clone();
        let breaker = Breaker::new(
            "test",
            "skipped",
            move || {
                p.fetch_add(1, Ordering::Relaxed);
                Err("down".into())
            },
            Duration::from_millis(1),
            Duration::from_millis(1),
        );
        breaker.trip(&"down");
        wait_until("a probe", || probes.load(Ordering::Relaxed) > 0);
        drop(breaker);
        std::thread::sleep(Duration::from_millis(10));
        let after = probes.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            probes.load(Ordering::Relaxed) <= after + 1,
            "probing went on"
        );
    }

    /// Many threads call while the dependency flaps: at most one probe runs
    /// at any time, an open breaker never runs a call, and it closes in the
    /// end once the dependency stays up.
    #[test]
    fn stress_many_callers_one_probe() {
        let healthy = Arc::new(AtomicBool::new(true));
        let probing = Arc::new(AtomicUsize::new(0));
        let most_probing = Arc::new(AtomicUsize::new(0));
        let (h, p, m) = (healthy.clone(), probing.clone(), most_probing.clone());
        let breaker = Arc::new(Breaker::new(
            "stress",
            "skipped",
            move || {
                let now = p.fetch_add(1, Ordering::AcqRel) + 1;
                m.fetch_max(now, Ordering::AcqRel);
                std::thread::sleep(Duration::from_micros(200));
                p.fetch_sub(1, Ordering::AcqRel);
                if h.load(Ordering::Acquire) {
                    Ok(())
                } else {
                    Err("down".into())
                }
            },
            Duration::from_micros(100),
            Duration::from_millis(1),
        ));
        let deadline = Instant::now() + Duration::from_millis(400);
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (breaker, healthy) = (breaker.clone(), healthy.clone());
                std::thread::spawn(move || {
                    let mut calls = 0u64;
                    while Instant::now() < deadline && calls < 1_000_000 {
                        calls += 1;
                        let _ = breaker.call(|| {
                            if healthy.load(Ordering::Acquire) {
                                Ok(())
                            } else {
                                Err("down")
                            }
                        });
                    }
                })
            })
            .collect();
        let mut flips = 0;
        while Instant::now() < deadline {
            healthy.store(flips % 2 == 1, Ordering::Release);
            flips += 1;
            std::thread::sleep(Duration::from_millis(7));
        }
        for t in threads {
            t.join().unwrap();
        }
        healthy.store(true, Ordering::Release);
        wait_until("the breaker to close", || !breaker.is_open());
        assert_eq!(
            most_probing.load(Ordering::Acquire),
            1,
            "two probes ran at once"
        );
        assert!(breaker.outages() >= 2, "the flapping was never seen");
    }
}
