//! A connection's outbound queue: frames waiting to be written to one
//! WebSocket, plus the waker that tells the connection thread to write them.
//!
//! Threads: any number of producers (pipeline workers, the broadcaster on a
//! streaming thread, the history writer) push; exactly one consumer, the
//! connection's own thread, pops. The queue is a `Mutex<VecDeque>` rather
//! than a channel because it needs two admission rules in one ordered queue:
//! token frames are refused once `capacity` frames are waiting (that is how a
//! slow consumer is detected), while control frames (`done`, `error`, …) are
//! always admitted so the end of a request is never lost and always comes
//! after that request's tokens. Control frames are bounded by the number of
//! requests in flight, not by the token rate.
//!
//! Waking costs a syscall, so producers only write the eventfd when the
//! consumer said it is about to sleep (`parked`), which it does under the
//! same lock: a push after the consumer checked the queue always sees
//! `parked == true` and wakes it.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use parking_lot::Mutex;
use rustix::event::{eventfd, EventfdFlags};

use crate::broadcast::Broadcast;
use crate::protocol::TokenTail;

/// One frame waiting to be written.
#[derive(Debug, Clone)]
pub enum Frame {
    /// A token: the request's fixed prefix and the generation's shared tail.
    Token {
        /// `{"type":"token","request":"r-…`, one allocation per request.
        prefix: Arc<[u8]>,
        /// `","seq":N,"text":"…"}`, one allocation per generated token.
        tail: TokenTail,
    },
    /// Tokens `from..to` of a generation's history, expanded lazily by the
    /// connection thread as the socket accepts them, so a late joiner's
    /// replay of thousands of tokens costs one queue slot, not thousands.
    Replay(Replay),
    /// Any other JSON message, already encoded.
    Json(Vec<u8>),
    /// Close the WebSocket with this close code and reason, then end.
    Close(u16, &'static str),
}

impl Frame {
    /// Bytes this frame adds to the socket's output (payload only).
    fn encoded_len(&self) -> usize {
        match self {
            Frame::Token { prefix, tail } => prefix.len() + tail.0.len(),
            Frame::Json(bytes) => bytes.len(),
            Frame::Replay(_) | Frame::Close(..) => 0,
        }
    }
}

/// A range of a generation's tokens for one request.
#[derive(Debug, Clone)]
pub struct Replay {
    /// Where the tokens are kept.
    pub broadcast: Arc<Broadcast>,
    /// The request's token frame prefix.
    pub prefix: Arc<[u8]>,
    /// First `seq` still to write.
    pub from: u64,
    /// One past the last `seq` to write.
    pub to: u64,
}

/// Why a push was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// `capacity` token frames are already waiting: the consumer is slow.
    Full,
    /// The connection is gone; nothing will ever read the frame.
    Closed,
}

struct Queue {
    frames: VecDeque<Frame>,
    /// Encoded size of `frames` (a replay counts as nothing: it is expanded
    /// only as the socket takes it), so the connection can stop reading
    /// requests while big answers wait.
    bytes: usize,
    /// Set by the consumer just before it sleeps; cleared by the producer that wakes it.
    parked: bool,
    /// Set once by the consumer when the connection ends.
    closed: bool,
}

/// The outbound queue of one connection. Share it as `Arc<Outbox>`.
///
/// ```
/// use chorus::outbox::{Frame, Outbox};
/// let outbox = Outbox::new(8).unwrap();
/// outbox.push(Frame::Json(b"{}".to_vec())).unwrap();
/// let mut batch = Vec::new();
/// outbox.take_all(&mut batch);
/// assert_eq!(batch.len(), 1);
/// assert!(outbox.park_if_empty());
/// ```
pub struct Outbox {
    queue: Mutex<Queue>,
    capacity: usize,
    waker: OwnedFd,
}

impl Outbox {
    /// An empty outbox admitting up to `capacity` waiting token frames.
    pub fn new(capacity: usize) -> std::io::Result<Outbox> {
        let waker = eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)?;
        Ok(Outbox {
            queue: Mutex::new(Queue {
                frames: VecDeque::new(),
                bytes: 0,
                parked: false,
                closed: false,
            }),
            capacity,
            waker,
        })
    }

    /// Queues a control frame. Never blocks and never refuses, except when
    /// the connection is closed.
    pub fn push(&self, frame: Frame) -> Result<(), PushError> {
        self.push_all(std::iter::once(frame))
    }

    /// Queues several control frames at once with at most one wake-up, so a
    /// whole cached answer reaches the socket in one write.
    pub fn push_all(&self, frames: impl IntoIterator<Item = Frame>) -> Result<(), PushError> {
        let wake = {
            let mut q = self.queue.lock();
            if q.closed {
                return Err(PushError::Closed);
            }
            for frame in frames {
                q.bytes += frame.encoded_len();
                q.frames.push_back(frame);
            }
            std::mem::take(&mut q.parked)
        };
        if wake {
            self.wake();
        }
        Ok(())
    }

    /// Queues a token frame unless `capacity` frames are already waiting.
    pub fn push_token(&self, frame: Frame) -> Result<(), PushError> {
        if self.queue_token(frame)? {
            self.wake();
        }
        Ok(())
    }

    /// Like [`Outbox::push_token`] but leaves the wake-up to the caller:
    /// `Ok(true)` means the consumer is parked and must get [`Outbox::wake`].
    /// This lets a producer holding a lock of its own do the system call
    /// after releasing it.
    pub fn queue_token(&self, frame: Frame) -> Result<bool, PushError> {
        let mut q = self.queue.lock();
        if q.closed {
            return Err(PushError::Closed);
        }
        if q.frames.len() >= self.capacity {
            return Err(PushError::Full);
        }
        q.bytes += frame.encoded_len();
        q.frames.push_back(frame);
        Ok(std::mem::take(&mut q.parked))
    }

    /// Moves every waiting frame into `batch` (consumer only).
    pub fn take_all(&self, batch: &mut Vec<Frame>) {
        let mut q = self.queue.lock();
        q.bytes = 0;
        batch.extend(q.frames.drain(..));
    }

    /// Moves up to `max` waiting frames into `batch` (consumer only).
    pub fn take_some(&self, batch: &mut impl Extend<Frame>, max: usize) {
        let mut q = self.queue.lock();
        let n = q.frames.len().min(max);
        let Queue { frames, bytes, .. } = &mut *q;
        batch.extend(frames.drain(..n).inspect(|f| *bytes -= f.encoded_len()));
    }

    /// Consumer only: if nothing is waiting, records that the consumer is
    /// going to sleep on [`Outbox::waker_fd`] and returns true. A producer
    /// pushing afterwards will wake it.
    pub fn park_if_empty(&self) -> bool {
        let mut q = self.queue.lock();
        if q.frames.is_empty() {
            q.parked = true;
            true
        } else {
            false
        }
    }

    /// Consumer only: clears the waker after it fired, and the parked flag.
    pub fn clear_wake(&self) {
        let mut buf = [0u8; 8];
        // Reading a non-blocking eventfd resets it; EAGAIN only means it was not set.
        let _ = rustix::io::read(&self.waker, &mut buf);
        self.queue.lock().parked = false;
    }

    /// Wakes the consumer from its poll.
    pub fn wake(&self) {
        // An eventfd counter saturates long after anyone would notice; EAGAIN
        // means it is already signalled, which is all we need.
        let _ = rustix::io::write(&self.waker, &1u64.to_ne_bytes());
    }

    /// The file descriptor the consumer polls for readability.
    pub fn waker_fd(&self) -> BorrowedFd<'_> {
        self.waker.as_fd()
    }

    /// Marks the connection gone: later pushes fail with `Closed` and what
    /// is waiting is dropped.
    pub fn close(&self) {
        let mut q = self.queue.lock();
        q.closed = true;
        q.frames.clear();
        q.bytes = 0;
        q.frames.shrink_to_fit();
    }

    /// True once [`Outbox::close`] ran.
    pub fn is_closed(&self) -> bool {
        self.queue.lock().closed
    }

    /// Bytes of token and JSON frames waiting now.
    pub fn queued_bytes(&self) -> usize {
        self.queue.lock().bytes
    }

    /// Frames waiting now.
    pub fn len(&self) -> usize {
        self.queue.lock().frames.len()
    }

    /// True when nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("len", &self.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::event::{poll, PollFd, PollFlags};
    use std::time::Duration;

    fn token(seq: u64) -> Frame {
        Frame::Token {
            prefix: crate::protocol::token_prefix("r"),
            tail: TokenTail::encode(seq, "x"),
        }
    }

    #[test]
    fn tokens_are_bounded_but_control_frames_are_not() {
        let o = Outbox::new(2).unwrap();
        o.push_token(token(0)).unwrap();
        o.push_token(token(1)).unwrap();
        assert_eq!(o.push_token(token(2)), Err(PushError::Full));
        o.push(Frame::Json(b"{}".to_vec())).unwrap();
        assert_eq!(o.len(), 3);
    }

    #[test]
    fn queued_bytes_follow_pushes_and_takes() {
        let o = Outbox::new(8).unwrap();
        o.push(Frame::Json(vec![0; 100])).unwrap();
        o.push_token(token(0)).unwrap();
        let token_len = {
            let Frame::Token { prefix, tail } = token(0) else {
                unreachable!()
            };
            prefix.len() + tail.0.len()
        };
        assert_eq!(o.queued_bytes(), 100 + token_len);
        let mut batch = Vec::new();
        o.take_some(&mut batch, 1);
        assert_eq!(o.queued_bytes(), token_len);
        o.take_all(&mut batch);
        assert_eq!(o.queued_bytes(), 0);
        o.push(Frame::Json(vec![0; 7])).unwrap();
        o.close();
        assert_eq!(o.queued_bytes(), 0);
    }

    #[test]
    fn closed_refuses_everything() {
        let o = Outbox::new(2).unwrap();
        o.push(Frame::Json(vec![])).unwrap();
        o.close();
        assert!(o.is_empty());
        assert_eq!(o.push(Frame::Json(vec![])), Err(PushError::Closed));
        assert_eq!(o.push_token(token(0)), Err(PushError::Closed));
    }

    #[test]
    fn a_push_wakes_a_parked_consumer() {
        let o = Arc::new(Outbox::new(8).unwrap());
        assert!(o.park_if_empty());
        let producer = {
            let o = o.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                o.push(Frame::Json(b"1".to_vec())).unwrap();
            })
        };
        let mut fds = [PollFd::new(&o.waker, PollFlags::IN)];
        let ready = poll(&mut fds, None).unwrap();
        assert_eq!(ready, 1);
        o.clear_wake();
        let mut batch = Vec::new();
        o.take_all(&mut batch);
        assert_eq!(batch.len(), 1);
        producer.join().unwrap();
    }

    #[test]
    fn no_wake_when_the_consumer_is_not_parked() {
        let o = Outbox::new(8).unwrap();
        o.push(Frame::Json(vec![])).unwrap();
        let mut fds = [PollFd::new(&o.waker, PollFlags::IN)];
        let timeout = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        assert_eq!(poll(&mut fds, Some(&timeout)).unwrap(), 0);
    }

    #[test]
    fn stress_many_producers_one_consumer_loses_nothing() {
        const PRODUCERS: usize = 8;
        const EACH: usize = 5_000;
        let o = Arc::new(Outbox::new(usize::MAX).unwrap());
        let handles: Vec<_> = (0..PRODUCERS)
            .map(|_| {
                let o = o.clone();
                std::thread::spawn(move || {
                    for i in 0..EACH {
                        if i % 2 == 0 {
                            o.push(Frame::Json(vec![])).unwrap();
                        } else {
                            o.push_token(token(i as u64)).unwrap();
                        }
                    }
                })
            })
            .collect();
        let mut got = 0;
        let mut batch = Vec::new();
        while got < PRODUCERS * EACH {
            if o.park_if_empty() {
                let mut fds = [PollFd::new(&o.waker, PollFlags::IN)];
                let timeout = rustix::event::Timespec {
                    tv_sec: 5,
                    tv_nsec: 0,
                };
                assert_eq!(poll(&mut fds, Some(&timeout)).unwrap(), 1, "lost wake-up");
                o.clear_wake();
            }
            batch.clear();
            o.take_all(&mut batch);
            got += batch.len();
        }
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(got, PRODUCERS * EACH);
    }
}
