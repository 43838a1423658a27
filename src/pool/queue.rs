//! A stage's queue: a bounded crossbeam channel, with a doorbell on which
//! idle workers sleep.
//!
//! Why the doorbell: a crossbeam `recv` on an empty channel spins before it
//! sleeps (about a hundred `pause` instructions, then four `sched_yield`s).
//! A pool worker that finished its job usually waits far longer than that
//! for the next one, so the spin is wasted, and on a machine with few cores
//! each `sched_yield` that finds another thread runnable is a context
//! switch, paid by the thread it lets in (the upstream reader, say). Here a
//! worker that finds the channel empty sleeps on a condvar at once, and a
//! sender rings the doorbell when a worker sleeps.
//!
//! The channel stays the queue: its capacity is the stage's bound and
//! [`Sender::try_send`] is refused at once when it is full. The doorbell
//! only decides who sleeps and who wakes, under one short lock:
//!
//! - a worker looks at the channel again under the lock before it sleeps,
//!   and a sender rings under the same lock after its job is in, so a job
//!   sent while a worker was going to sleep is never left behind;
//! - the doorbell counts the senders, so the last one dropped wakes every
//!   sleeper, and a worker that then finds the channel empty knows it is
//!   over (it does not wait for crossbeam's own disconnect, which comes
//!   a moment later, when the last sender's channel end is dropped).
//!
//! Threads: senders on any thread; the [`Jobs`] end is shared by one pool's
//! workers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, SendError, TryRecvError, TrySendError};
use parking_lot::{Condvar, Mutex};

/// Makes a queue of `capacity` jobs: the sending end for the stage's
/// producers, and the [`Jobs`] end for [`super::Pool::spawn`].
pub fn queue<J>(capacity: usize) -> (Sender<J>, Jobs<J>) {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let bell = Arc::new(Bell {
        state: Mutex::new(BellState {
            sleeping: 0,
            senders: 1,
        }),
        rung: Condvar::new(),
    });
    (
        Sender {
            jobs: tx,
            bell: bell.clone(),
        },
        Jobs { jobs: rx, bell },
    )
}

/// The sending end of a stage's queue; clone it for more producers.
pub struct Sender<J> {
    jobs: crossbeam_channel::Sender<J>,
    bell: Arc<Bell>,
}

/// The receiving end, shared by one pool's workers.
pub struct Jobs<J> {
    jobs: crossbeam_channel::Receiver<J>,
    bell: Arc<Bell>,
}

struct Bell {
    state: Mutex<BellState>,
    rung: Condvar,
}

struct BellState {
    /// Workers asleep on `rung`.
    sleeping: usize,
    /// Live [`Sender`]s; none and an empty channel is the end.
    senders: usize,
}

impl Bell {
    fn ring(&self) {
        if self.state.lock().sleeping > 0 {
            self.rung.notify_one();
        }
    }
}

impl<J> Sender<J> {
    /// Queues `job` if there is room, at once either way.
    pub fn try_send(&self, job: J) -> Result<(), TrySendError<J>> {
        self.jobs.try_send(job)?;
        self.bell.ring();
        Ok(())
    }

    /// Queues `job`, waiting for room.
    pub fn send(&self, job: J) -> Result<(), SendError<J>> {
        self.jobs.send(job)?;
        self.bell.ring();
        Ok(())
    }

    /// Jobs waiting in the queue.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// No job is waiting.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }
}

impl<J> Clone for Sender<J> {
    fn clone(&self) -> Self {
        self.bell.state.lock().senders += 1;
        Sender {
            jobs: self.jobs.clone(),
            bell: self.bell.clone(),
        }
    }
}

impl<J> Drop for Sender<J> {
    fn drop(&mut self) {
        let mut state = self.bell.state.lock();
        state.senders -= 1;
        if state.senders == 0 {
            self.bell.rung.notify_all();
        }
    }
}

impl<J> Jobs<J> {
    /// The next job, sleeping (without spinning) for at most `timeout`;
    /// `Disconnected` once every sender is gone and the queue is empty.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<J, RecvTimeoutError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.jobs.try_recv() {
                Ok(job) => return Ok(job),
                Err(TryRecvError::Disconnected) => return Err(RecvTimeoutError::Disconnected),
                Err(TryRecvError::Empty) => {}
            }
            let mut state = self.bell.state.lock();
            // Again under the lock: a sender rings under it after its job is in.
            match self.jobs.try_recv() {
                Ok(job) => return Ok(job),
                Err(TryRecvError::Disconnected) => return Err(RecvTimeoutError::Disconnected),
                Err(TryRecvError::Empty) if state.senders == 0 => {
                    return Err(RecvTimeoutError::Disconnected)
                }
                Err(TryRecvError::Empty) => {}
            }
            state.sleeping += 1;
            let timed_out = self.bell.rung.wait_until(&mut state, deadline).timed_out();
            state.sleeping -= 1;
            if timed_out {
                drop(state);
                return self.jobs.try_recv().map_err(|e| match e {
                    TryRecvError::Empty => RecvTimeoutError::Timeout,
                    TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::thread;

    #[test]
    fn a_sleeping_worker_wakes_for_a_job() {
        let (tx, jobs) = queue::<u32>(4);
        let worker = thread::spawn(move || jobs.recv_timeout(Duration::from_secs(10)));
        thread::sleep(Duration::from_millis(50));
        tx.try_send(7).unwrap();
        assert_eq!(worker.join().unwrap(), Ok(7));
    }

    #[test]
    fn the_last_sender_gone_wakes_a_sleeping_worker_with_the_end() {
        let (tx, jobs) = queue::<u32>(4);
        let other = tx.clone();
        let worker = thread::spawn(move || jobs.recv_timeout(Duration::from_secs(10)));
        thread::sleep(Duration::from_millis(50));
        drop(tx);
        thread::sleep(Duration::from_millis(50));
        assert!(!worker.is_finished(), "one sender is still there");
        drop(other);
        assert_eq!(worker.join().unwrap(), Err(RecvTimeoutError::Disconnected));
    }

    #[test]
    fn jobs_queued_before_the_end_are_still_taken() {
        let (tx, jobs) = queue::<u32>(4);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        drop(tx);
        let second = Duration::from_secs(1);
        assert_eq!(jobs.recv_timeout(second), Ok(1));
        assert_eq!(jobs.recv_timeout(second), Ok(2));
        assert_eq!(
            jobs.recv_timeout(second),
            Err(RecvTimeoutError::Disconnected)
        );
    }

    #[test]
    fn an_idle_wait_times_out() {
        let (_tx, jobs) = queue::<u32>(4);
        let start = Instant::now();
        assert_eq!(
            jobs.recv_timeout(Duration::from_millis(30)),
            Err(RecvTimeoutError::Timeout)
        );
        assert!(start.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn a_full_queue_refuses_and_a_gone_pool_disconnects() {
        let (tx, jobs) = queue::<u32>(1);
        tx.try_send(1).unwrap();
        assert_eq!(tx.len(), 1);
        assert!(matches!(tx.try_send(2), Err(TrySendError::Full(2))));
        drop(jobs);
        assert!(matches!(tx.try_send(3), Err(TrySendError::Disconnected(3))));
    }

    /// Producers that send in bursts with pauses, so that the workers keep
    /// falling asleep and being woken: every job is taken exactly once,
    /// and none waits for a sleeper's timeout. (A lost wake-up would leave
    /// a job in the queue, with every worker asleep, until one's 20 s
    /// timeout; the whole run takes well under a second.)
    #[test]
    fn stress_sleeping_workers_miss_no_job() {
        const PRODUCERS: usize = 8;
        const EACH: usize = 3_000;
        const WORKERS: usize = 4;
        let (tx, jobs) = queue::<(usize, Instant)>(16);
        let jobs = Arc::new(jobs);
        let seen: Arc<Vec<AtomicUsize>> =
            Arc::new((0..PRODUCERS * EACH).map(|_| AtomicUsize::new(0)).collect());
        let workers: Vec<_> = (0..WORKERS)
            .map(|_| {
                let (jobs, seen) = (jobs.clone(), seen.clone());
                thread::spawn(move || {
                    let mut longest = Duration::ZERO;
                    loop {
                        match jobs.recv_timeout(Duration::from_secs(20)) {
                            Ok((n, sent)) => {
                                longest = longest.max(sent.elapsed());
                                seen[n].fetch_add(1, Ordering::Relaxed);
                            }
                            Err(RecvTimeoutError::Disconnected) => return longest,
                            Err(RecvTimeoutError::Timeout) => {}
                        }
                    }
                })
            })
            .collect();
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|p| {
                let tx = tx.clone();
                thread::spawn(move || {
                    for i in 0..EACH {
                        tx.send((p * EACH + i, Instant::now())).unwrap();
                        if i % 50 == 0 {
                            thread::sleep(Duration::from_micros(200));
                        }
                    }
                })
            })
            .collect();
        drop(tx);
        for p in producers {
            p.join().unwrap();
        }
        let longest = workers.into_iter().map(|w| w.join().unwrap()).max();
        assert!(seen.iter().all(|c| c.load(Ordering::Relaxed) == 1));
        let longest = longest.unwrap();
        assert!(
            longest < Duration::from_secs(10),
            "a job waited {longest:?}"
        );
    }
}
