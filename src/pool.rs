//! A fixed pool of OS threads draining one bounded crossbeam channel.
//!
//! The pool size *is* the concurrency limit of a stage: at most `workers`
//! jobs run at once, the rest wait in the channel, and a full channel is
//! refused at once by `try_send` on the producer side. There is no separate
//! semaphore to keep in step with the threads.
//!
//! Threads: `workers` threads, each running `handler` on one job at a time.
//! A panicking job is caught and logged so the worker lives on (the job's own
//! drop guards clean up after it); the pool ends when every sender is
//! dropped and the channel is empty, and [`Pool::join`] waits for that.
//!
//! Renewal. A worker that ran jobs and then waited [`RENEW_AFTER_IDLE`]
//! for the next one starts its successor and exits. The C allocator keeps
//! a cache of freed blocks per thread (glibc's tcache: up to a few hundred
//! KiB), counted as in use, so a pool thread that never exits keeps every
//! page those blocks sit on after a burst of load; a thread's exit returns
//! them, and the janitor's release at idle can hand the pages back (see
//! `docs/reliability.md`, "What the pool threads keep"). The successor is
//! running before its predecessor stops taking jobs, so the pool never has
//! fewer than `workers` threads ready, and never more than `workers` jobs
//! running.
//!
//! ```
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use chorus::pool::Pool;
//!
//! let (tx, rx) = crossbeam_channel::bounded::<usize>(16);
//! let sum = Arc::new(AtomicUsize::new(0));
//! let total = sum.clone();
//! let pool = Pool::spawn("adder", 2, 64 * 1024, rx, move |n| {
//!     total.fetch_add(n, Ordering::Relaxed);
//! })
//! .unwrap();
//! for n in 1..=10 {
//!     tx.send(n).unwrap();
//! }
//! drop(tx);
//! pool.join();
//! assert_eq!(sum.load(Ordering::Relaxed), 55);
//! ```

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use parking_lot::Mutex;

/// A running pool; see the module docs.
pub struct Pool {
    name: &'static str,
    workers: usize,
    crew: Arc<dyn Status>,
}

/// How long a worker that ran jobs waits for the next before it renews
/// itself (see "Renewal" above).
pub const RENEW_AFTER_IDLE: Duration = Duration::from_secs(10);

/// What the workers of one pool share.
struct Crew<J, F> {
    name: &'static str,
    stack: usize,
    jobs: Receiver<J>,
    handler: F,
    renew_after: Duration,
    busy: AtomicUsize,
    handles: Mutex<Handles>,
}

/// The join handles of a pool's threads, under one lock so that a join
/// always finds every thread (see [`Pool::join`]).
struct Handles {
    /// The running worker of each slot.
    slots: Vec<Option<JoinHandle<()>>>,
    /// Workers that renewed themselves and exit: joined by the next worker
    /// that wakes up (which frees their stacks), or by [`Pool::join`].
    retired: Vec<JoinHandle<()>>,
}

/// The pool's view of its crew, whatever the job type.
trait Status: Send + Sync {
    fn busy(&self) -> usize;
    fn take_handle(&self) -> Option<JoinHandle<()>>;
}

impl<J: Send + 'static, F: Fn(J) + Send + Sync + 'static> Status for Crew<J, F> {
    fn busy(&self) -> usize {
        self.busy.load(Ordering::Relaxed)
    }

    fn take_handle(&self) -> Option<JoinHandle<()>> {
        let mut h = self.handles.lock();
        h.slots
            .iter_mut()
            .find_map(Option::take)
            .or_else(|| h.retired.pop())
    }
}

/// Starts worker `i` of `crew`.
fn start_worker<J, F>(crew: &Arc<Crew<J, F>>, i: usize) -> std::io::Result<JoinHandle<()>>
where
    J: Send + 'static,
    F: Fn(J) + Send + Sync + 'static,
{
    let crew = crew.clone();
    std::thread::Builder::new()
        .name(format!("chorus-{}-{i}", crew.name))
        .stack_size(crew.stack)
        .spawn(move || work(&crew, i))
}

/// A worker's life: jobs until the channel is closed and drained, or
/// until it renews itself.
fn work<J, F>(crew: &Arc<Crew<J, F>>, i: usize)
where
    J: Send + 'static,
    F: Fn(J) + Send + Sync + 'static,
{
    let mut ran = false;
    loop {
        let next = crew.jobs.recv_timeout(crew.renew_after);
        let retired = std::mem::take(&mut crew.handles.lock().retired);
        for predecessor in retired {
            crate::threads::join(predecessor, crew.name);
        }
        match next {
            Ok(job) => {
                ran = true;
                crew.busy.fetch_add(1, Ordering::Relaxed);
                if catch_unwind(AssertUnwindSafe(|| (crew.handler)(job))).is_err() {
                    log::error!("a {} job panicked; the worker carries on", crew.name);
                }
                crew.busy.fetch_sub(1, Ordering::Relaxed);
            }
            // Idle since it was started: nothing of its own to give back.
            Err(RecvTimeoutError::Timeout) if !ran => {}
            Err(RecvTimeoutError::Timeout) => match start_worker(crew, i) {
                Ok(successor) => {
                    let mut h = crew.handles.lock();
                    // Its own handle; taken already if a join waits for it.
                    let me = h.slots[i].replace(successor);
                    h.retired.extend(me);
                    return;
                }
                // No thread to spare now: carry on and try again later.
                Err(e) => {
                    log::debug!("cannot renew a {} worker: {e}", crew.name);
                    ran = false;
                }
            },
            // Every sender is gone and the queue is drained.
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

impl Pool {
    /// Starts `workers` threads named `chorus-{name}` with `stack` bytes of
    /// stack each, all receiving from `jobs`.
    pub fn spawn<J, F>(
        name: &'static str,
        workers: usize,
        stack: usize,
        jobs: Receiver<J>,
        handler: F,
    ) -> std::io::Result<Pool>
    where
        J: Send + 'static,
        F: Fn(J) + Send + Sync + 'static,
    {
        Pool::spawn_renewing(name, workers, stack, jobs, handler, RENEW_AFTER_IDLE)
    }

    /// [`Pool::spawn`], with workers renewed after `renew_after` idle.
    pub fn spawn_renewing<J, F>(
        name: &'static str,
        workers: usize,
        stack: usize,
        jobs: Receiver<J>,
        handler: F,
        renew_after: Duration,
    ) -> std::io::Result<Pool>
    where
        J: Send + 'static,
        F: Fn(J) + Send + Sync + 'static,
    {
        let crew = Arc::new(Crew {
            name,
            stack,
            jobs,
            handler,
            renew_after,
            busy: AtomicUsize::new(0),
            handles: Mutex::new(Handles {
                slots: (0..workers).map(|_| None).collect(),
                retired: Vec::new(),
            }),
        });
        {
            // Held while they start, so none can renew before its slot is set.
            let mut handles = crew.handles.lock();
            for i in 0..workers {
                handles.slots[i] = Some(start_worker(&crew, i)?);
            }
        }
        Ok(Pool {
            name,
            workers,
            crew: crew as Arc<dyn Status>,
        })
    }

    /// The stage name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Worker threads.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Workers running a job right now.
    pub fn busy(&self) -> usize {
        self.crew.busy()
    }

    /// Waits until every worker has exited (after all senders are dropped),
    /// successors of renewed workers included: a successor takes its
    /// predecessor's slot before the predecessor exits, under the lock this
    /// takes handles from, so it is there when that join returns.
    /// A worker that panicked is reported ([`crate::threads::join`]).
    pub fn join(self) {
        while let Some(handle) = self.crew.take_handle() {
            crate::threads::join(handle, self.name);
        }
    }
}

/// Helper threads for an r2d2 pool, as r2d2 makes them by default (three,
/// named `r2d2-worker-N`), except that they end as soon as the pool is
/// dropped: by default they wait for the next reap of idle connections, up
/// to 30 s later, so a server whose start failed would leave them behind.
pub(crate) fn r2d2_threads() -> Arc<scheduled_thread_pool::ScheduledThreadPool> {
    Arc::new(
        scheduled_thread_pool::ScheduledThreadPool::builder()
            .num_threads(3)
            .thread_name_pattern("r2d2-worker-{}")
            .on_drop_behavior(scheduled_thread_pool::OnPoolDropBehavior::DiscardPendingScheduled)
            .build(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::{bounded, TrySendError};
    use std::collections::HashSet;
    use std::sync::Barrier;

    /// The thread ids that ran `n` jobs which all had to run at once.
    fn ids_of_a_full_round(
        tx: &crossbeam_channel::Sender<()>,
        ids: &Mutex<Vec<std::thread::ThreadId>>,
        n: usize,
    ) -> HashSet<std::thread::ThreadId> {
        ids.lock().clear();
        for _ in 0..n {
            tx.send(()).unwrap();
        }
        while ids.lock().len() < n {
            std::thread::yield_now();
        }
        ids.lock().iter().copied().collect()
    }

    #[test]
    fn idle_workers_renew_themselves_and_the_pool_keeps_its_size() {
        const WORKERS: usize = 3;
        let (tx, rx) = bounded::<()>(8);
        let ids = Arc::new(Mutex::new(Vec::new()));
        let barrier = Arc::new(Barrier::new(WORKERS));
        let (i, b) = (ids.clone(), barrier.clone());
        let pool = Pool::spawn_renewing(
            "renew",
            WORKERS,
            64 * 1024,
            rx,
            move |()| {
                // Every worker must be there at once to pass.
                b.wait();
                i.lock().push(std::thread::current().id());
            },
            Duration::from_millis(30),
        )
        .unwrap();
        let first = ids_of_a_full_round(&tx, &ids, WORKERS);
        assert_eq!(first.len(), WORKERS);
        std::thread::sleep(Duration::from_millis(200));
        let second = ids_of_a_full_round(&tx, &ids, WORKERS);
        assert_eq!(second.len(), WORKERS, "all workers are there");
        assert!(first.is_disjoint(&second), "each was renewed");
        drop(tx);
        pool.join();
    }

    #[test]
    fn stress_renewals_under_load_lose_no_job_and_join_waits_for_all() {
        let (tx, rx) = bounded::<usize>(64);
        let done = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (d, r, p) = (done.clone(), running.clone(), peak.clone());
        // Renewed every millisecond of idleness: constantly, between bursts.
        let pool = Pool::spawn_renewing(
            "churn",
            4,
            64 * 1024,
            rx,
            move |_| {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                d.fetch_add(1, Ordering::SeqCst);
                r.fetch_sub(1, Ordering::SeqCst);
            },
            Duration::from_millis(1),
        )
        .unwrap();
        let producers: Vec<_> = (0..8)
            .map(|_| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for n in 0..2_000 {
                        tx.send(n).unwrap();
                        if n % 100 == 0 {
                            std::thread::sleep(Duration::from_millis(3));
                        }
                    }
                })
            })
            .collect();
        for p in producers {
            p.join().unwrap();
        }
        drop(tx);
        pool.join();
        assert_eq!(done.load(Ordering::SeqCst), 16_000);
        assert!(peak.load(Ordering::SeqCst) <= 4);
    }

    #[test]
    fn pool_size_is_the_concurrency_limit() {
        let (tx, rx) = bounded::<()>(8);
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (r, p) = (running.clone(), peak.clone());
        let pool = Pool::spawn("limit", 3, 64 * 1024, rx, move |()| {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(5));
            r.fetch_sub(1, Ordering::SeqCst);
        })
        .unwrap();
        for _ in 0..30 {
            tx.send(()).unwrap();
        }
        drop(tx);
        pool.join();
        assert_eq!(peak.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn full_queue_refuses_at_once() {
        let (tx, rx) = bounded::<()>(1);
        let gate = Arc::new(Barrier::new(2));
        let g = gate.clone();
        let pool = Pool::spawn("full", 1, 64 * 1024, rx, move |()| {
            g.wait();
        })
        .unwrap();
        tx.send(()).unwrap(); // taken by the worker, which blocks on the barrier
        while pool.busy() == 0 {
            std::thread::yield_now();
        }
        tx.try_send(()).unwrap(); // fills the queue
        assert!(matches!(tx.try_send(()), Err(TrySendError::Full(()))));
        gate.wait();
        gate.wait();
        drop(tx);
        pool.join();
    }

    #[test]
    fn a_panicking_job_does_not_kill_the_worker() {
        let (tx, rx) = bounded::<u32>(4);
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        let pool = Pool::spawn("panics", 1, 256 * 1024, rx, move |n| {
            if n == 0 {
                panic!("job zero panics on purpose");
            }
            d.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        for n in [0, 1, 0, 2] {
            tx.send(n).unwrap();
        }
        drop(tx);
        pool.join();
        assert_eq!(done.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn stress_many_producers_every_job_runs_once() {
        const PRODUCERS: usize = 8;
        const EACH: usize = 5_000;
        let (tx, rx) = bounded::<usize>(64);
        let seen = Arc::new(
            (0..PRODUCERS * EACH)
                .map(|_| AtomicUsize::new(0))
                .collect::<Vec<_>>(),
        );
        let s = seen.clone();
        let pool = Pool::spawn("stress", 4, 64 * 1024, rx, move |n| {
            s[n].fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|p| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for i in 0..EACH {
                        tx.send(p * EACH + i).unwrap();
                    }
                })
            })
            .collect();
        drop(tx);
        for p in producers {
            p.join().unwrap();
        }
        pool.join();
        assert!(seen.iter().all(|c| c.load(Ordering::Relaxed) == 1));
    }
}
