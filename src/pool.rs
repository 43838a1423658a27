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

use crossbeam_channel::Receiver;

/// A running pool; see the module docs.
pub struct Pool {
    name: &'static str,
    workers: usize,
    busy: Arc<AtomicUsize>,
    handles: Vec<JoinHandle<()>>,
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
        let busy = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(handler);
        let mut handles = Vec::with_capacity(workers);
        for i in 0..workers {
            let (jobs, busy, handler) = (jobs.clone(), busy.clone(), handler.clone());
            let handle = std::thread::Builder::new()
                .name(format!("chorus-{name}-{i}"))
                .stack_size(stack)
                .spawn(move || {
                    // recv() blocks until a job arrives; it fails only once
                    // every sender is gone and the queue is drained.
                    while let Ok(job) = jobs.recv() {
                        busy.fetch_add(1, Ordering::Relaxed);
                        if catch_unwind(AssertUnwindSafe(|| handler(job))).is_err() {
                            log::error!("a {name} job panicked; the worker carries on");
                        }
                        busy.fetch_sub(1, Ordering::Relaxed);
                    }
                })?;
            handles.push(handle);
        }
        Ok(Pool {
            name,
            workers,
            busy,
            handles,
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
        self.busy.load(Ordering::Relaxed)
    }

    /// Waits until every worker has exited (after all senders are dropped).
    pub fn join(self) {
        for handle in self.handles {
            let _ = handle.join();
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
    use std::sync::Barrier;
    use std::time::Duration;

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
