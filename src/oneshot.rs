//! A one-shot channel: one value, sent once from one thread to one thread
//! that sleeps until it comes, without spinning first.
//!
//! # Why not a crossbeam channel of one
//!
//! A crossbeam `recv` on an empty channel spins before it sleeps (about a
//! hundred `pause` instructions, then four `sched_yield`s), the right trade
//! when the value is microseconds away. A streaming worker waits for its
//! upstream response to end, a second or more later: every one of those
//! spins is wasted, and each `sched_yield` on a machine with few cores
//! hands the core to a runnable thread and costs a context switch that the
//! upstream reader, the thread every token goes through, pays for. Here the
//! receiver takes a lock, finds nothing, and sleeps on a condvar at once;
//! the sender takes the same lock, leaves the value and wakes it.
//!
//! # Ends
//!
//! - [`Sender::send`] consumes the sender; a value sent to a receiver that
//!   is gone comes back as `Err(value)`.
//! - A sender dropped without sending wakes the receiver with [`Closed`],
//!   so a lost sender (a thread that died, a callback never called) can
//!   never hang the waiter.
//!
//! Threads: the sender and the receiver may each be on any thread and move
//! between threads; one lock, held only to look at or change the slot.
//!
//! ```
//! use chorus::oneshot;
//!
//! let (tx, rx) = oneshot::channel();
//! let worker = std::thread::spawn(move || tx.send(6 * 7).unwrap());
//! assert_eq!(rx.recv(), Ok(42));
//! worker.join().unwrap();
//!
//! // A sender that goes away without a word still ends the wait.
//! let (tx, rx) = oneshot::channel::<u32>();
//! drop(tx);
//! assert_eq!(rx.recv(), Err(oneshot::Closed));
//! ```

use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

/// The sender was dropped without sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the sender was dropped without sending")]
pub struct Closed;

/// Makes a connected sender and receiver.
pub fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let slot = Arc::new(Slot {
        state: Mutex::new(State::Waiting),
        changed: Condvar::new(),
    });
    (
        Sender {
            slot: Some(slot.clone()),
        },
        Receiver { slot },
    )
}

/// The sending half; see the module docs.
pub struct Sender<T> {
    /// `None` once sent, so that the drop knows.
    slot: Option<Arc<Slot<T>>>,
}

/// The receiving half; see the module docs.
pub struct Receiver<T> {
    slot: Arc<Slot<T>>,
}

struct Slot<T> {
    state: Mutex<State<T>>,
    changed: Condvar,
}

enum State<T> {
    Waiting,
    Sent(T),
    SenderGone,
    ReceiverGone,
}

impl<T> Sender<T> {
    /// Hands `value` to the receiver and wakes it; gives `value` back when
    /// the receiver is gone.
    pub fn send(mut self, value: T) -> Result<(), T> {
        let Some(slot) = self.slot.take() else {
            return Err(value);
        };
        {
            let mut state = slot.state.lock();
            if matches!(*state, State::ReceiverGone) {
                return Err(value);
            }
            *state = State::Sent(value);
        }
        // The sender's own `Arc` keeps the slot alive even if the receiver
        // took the value and went away in between.
        slot.changed.notify_one();
        Ok(())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let Some(slot) = self.slot.take() else {
            return;
        };
        {
            let mut state = slot.state.lock();
            if !matches!(*state, State::Waiting) {
                return;
            }
            *state = State::SenderGone;
        }
        slot.changed.notify_one();
    }
}

impl<T> Receiver<T> {
    /// Sleeps until the value comes, or until the sender is dropped
    /// without sending ([`Closed`]).
    pub fn recv(self) -> Result<T, Closed> {
        let mut state = self.slot.state.lock();
        while matches!(*state, State::Waiting) {
            self.slot.changed.wait(&mut state);
        }
        match std::mem::replace(&mut *state, State::ReceiverGone) {
            State::Sent(value) => Ok(value),
            _ => Err(Closed),
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        // A value nobody will take is dropped outside the lock.
        let _unread = std::mem::replace(&mut *self.slot.state.lock(), State::ReceiverGone);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::thread;
    use std::time::Duration;

    #[test]
    fn a_value_sent_before_the_wait_is_there() {
        let (tx, rx) = channel();
        tx.send("hello").unwrap();
        assert_eq!(rx.recv(), Ok("hello"));
    }

    #[test]
    fn a_waiting_receiver_wakes_for_a_value() {
        let (tx, rx) = channel();
        let waiter = thread::spawn(move || rx.recv());
        thread::sleep(Duration::from_millis(50));
        tx.send(7u8).unwrap();
        assert_eq!(waiter.join().unwrap(), Ok(7));
    }

    #[test]
    fn a_dropped_sender_wakes_a_waiting_receiver() {
        let (tx, rx) = channel::<u8>();
        let waiter = thread::spawn(move || rx.recv());
        thread::sleep(Duration::from_millis(50));
        drop(tx);
        assert_eq!(waiter.join().unwrap(), Err(Closed));
    }

    #[test]
    fn a_value_for_a_receiver_that_is_gone_comes_back() {
        let (tx, rx) = channel();
        drop(rx);
        assert_eq!(tx.send(String::from("late")), Err(String::from("late")));
    }

    /// Counts its drops, to see that no value is lost or dropped twice.
    struct Counted(Arc<AtomicUsize>);

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn an_unread_value_is_dropped_once_with_the_receiver() {
        let drops = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = channel();
        assert!(tx.send(Counted(drops.clone())).is_ok());
        assert_eq!(drops.load(Ordering::Relaxed), 0);
        drop(rx);
        assert_eq!(drops.load(Ordering::Relaxed), 1);
    }

    /// Many pairs at once, each racing its send, or its sender's drop,
    /// against its receiver's wait or drop: every receiver that waits
    /// wakes with exactly what happened, and every value is dropped once.
    #[test]
    fn stress_many_threads_every_wait_ends_and_no_value_is_lost() {
        const PAIRS: usize = 2_000;
        const THREADS: usize = 16;
        let drops = Arc::new(AtomicUsize::new(0));
        let made = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let drops = drops.clone();
                let made = made.clone();
                thread::spawn(move || {
                    for i in (t..PAIRS).step_by(THREADS) {
                        let (tx, rx) = channel();
                        let sends = i % 3 != 0;
                        let sender = {
                            let drops = drops.clone();
                            let made = made.clone();
                            thread::spawn(move || {
                                if i % 5 == 0 {
                                    thread::yield_now();
                                }
                                if sends {
                                    made.fetch_add(1, Ordering::Relaxed);
                                    // A value refused by a gone receiver is dropped here.
                                    let _ = tx.send((i, Counted(drops)));
                                }
                            })
                        };
                        if i % 7 == 0 {
                            drop(rx);
                        } else {
                            match rx.recv() {
                                Ok((got, value)) => {
                                    assert!(sends, "pair {i} got a value it never sent");
                                    assert_eq!(got, i);
                                    drop(value);
                                }
                                Err(Closed) => assert!(!sends, "pair {i} lost its value"),
                            }
                        }
                        sender.join().unwrap();
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        let sent = made.load(Ordering::Relaxed);
        assert_eq!(sent, PAIRS - PAIRS.div_ceil(3));
        assert_eq!(drops.load(Ordering::Relaxed), sent);
    }
}
