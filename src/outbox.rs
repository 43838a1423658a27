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
//!
//! Writing straight through. Waking a sleeping thread is the most expensive
//! thing a delivery does (a context switch in, another out; far more than
//! the `write` itself), and one generation fanned out to thousands of
//! connections would pay it thousands of times per token. So when the
//! consumer parks with nothing of its own left to write (its write buffer
//! and tungstenite's are empty), it says so (`socket_idle`), and a producer
//! that finds the queue empty encodes its frames and writes them to the
//! non-blocking socket itself, under this queue's lock, without waking
//! anyone. If the socket takes only part, the rest is queued as
//! [`Frame::Encoded`] ahead of everything else and the consumer is woken to
//! finish it when the socket drains. The consumer gives the socket back to
//! itself ([`Outbox::unpark`]) as soon as its poll returns, before it reads
//! (tungstenite may answer a ping while reading), so at any moment exactly
//! one side writes, and bytes reach the socket in the order they were
//! pushed. The connection thread stays the socket's owner: it reads,
//! answers control frames, writes whenever output backs up, and closes.
//!
//! Riding along. `accepted` and the first `state` of a chat are made by the
//! connection thread itself, and the request's next frames (a cached
//! answer, usually within microseconds) come from a worker. Writing the
//! first two at once would cost a system call per chat and a second TCP
//! segment, so the connection thread may leave them queued as *deferred*
//! ([`Outbox::push_deferred`]) and sleep: the next producer's write carries
//! them, in front of its own frames. If no producer comes, the janitor
//! releases them ([`Outbox::release_deferred`]) within one of its ticks.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::Write;
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use parking_lot::Mutex;
use rustix::event::{eventfd, EventfdFlags};

use crate::broadcast::Broadcast;
use crate::protocol::TokenTail;
use crate::ws::frame;

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
    /// WebSocket frames already encoded, written verbatim: a whole cached
    /// answer, or the rest of frames whose first bytes a producer already
    /// wrote to the socket.
    Encoded(Vec<u8>),
}

impl Frame {
    /// Bytes this frame adds to the socket's output (payload only).
    fn encoded_len(&self) -> usize {
        match self {
            Frame::Token { prefix, tail } => prefix.len() + tail.0.len(),
            Frame::Json(bytes) | Frame::Encoded(bytes) => bytes.len(),
            Frame::Replay(_) | Frame::Close(..) => 0,
        }
    }

    /// Appends this frame's WebSocket encoding to `out`, or returns false
    /// for frames only the connection thread may write (a replay is
    /// expanded as the socket takes it; a close ends the connection).
    pub fn encode_into(&self, out: &mut Vec<u8>) -> bool {
        match self {
            Frame::Token { prefix, tail } => frame::encode_text(out, &[prefix, &tail.0]),
            Frame::Json(bytes) => frame::encode_text(out, &[bytes]),
            Frame::Encoded(bytes) => out.extend_from_slice(bytes),
            Frame::Replay(_) | Frame::Close(..) => return false,
        }
        true
    }
}

thread_local! {
    /// A producer's encoding buffer for frames it writes straight to a socket.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Largest scratch buffer a producer thread keeps between writes.
const SCRATCH_KEEP: usize = 64 * 1024;

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
    /// Set by the consumer just before it sleeps; cleared by the producer
    /// that wakes it, or by the consumer when it wakes up.
    parked: bool,
    /// Set with `parked` when the consumer has no bytes of its own waiting:
    /// producers may then write to `socket` themselves.
    socket_idle: bool,
    /// How many of `frames` the consumer pushed with
    /// [`Outbox::push_deferred`]; when that is all of them, it may sleep
    /// and leave them to the next producer.
    deferred: usize,
    /// Set with `parked` when the consumer sleeps leaving deferred frames.
    lingering: bool,
    /// The connection's socket (non-blocking), for writing straight through.
    socket: Option<Arc<TcpStream>>,
    /// Set once by the consumer when the connection ends.
    closed: bool,
}

impl Queue {
    fn enqueue(&mut self, frame: Frame) {
        self.bytes += frame.encoded_len();
        self.frames.push_back(frame);
    }

    /// The socket, when frames may be written to it right now: the
    /// consumer sleeps with nothing of its own to write except deferred
    /// frames, which then go first.
    fn direct_socket(&self) -> Option<Arc<TcpStream>> {
        if self.parked && self.socket_idle && (self.frames.is_empty() || self.lingering) {
            self.socket.clone()
        } else {
            None
        }
    }

    /// Encodes the deferred frames waiting and then `frames`, and writes
    /// them to `socket` while it takes them; whatever it does not take is
    /// queued, in order.
    fn write_through(&mut self, socket: &TcpStream, frames: impl Iterator<Item = Frame>) {
        let mut frames = frames.peekable();
        SCRATCH.with_borrow_mut(|buf| {
            buf.clear();
            // Deferred frames are plain JSON, which always encodes.
            for waiting in self.frames.drain(..) {
                waiting.encode_into(buf);
            }
            self.bytes = 0;
            self.deferred = 0;
            self.lingering = false;
            while frames.next_if(|f| f.encode_into(buf)).is_some() {}
            let mut written = 0;
            while written < buf.len() {
                match (&*socket).write(&buf[written..]) {
                    Ok(0) => break,
                    Ok(n) => written += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    // Full (WouldBlock) or broken: the consumer finds out which.
                    Err(_) => break,
                }
            }
            if written < buf.len() {
                self.enqueue(Frame::Encoded(buf[written..].to_vec()));
            }
            if buf.capacity() > SCRATCH_KEEP {
                *buf = Vec::new();
            }
        });
        for f in frames {
            self.enqueue(f);
        }
    }

    /// True when the consumer sleeps and has frames to write: the caller
    /// must wake it.
    fn take_wake(&mut self) -> bool {
        !self.frames.is_empty() && std::mem::take(&mut self.parked)
    }
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
/// assert!(outbox.park_if_empty(false));
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
                socket_idle: false,
                deferred: 0,
                lingering: false,
                socket: None,
                closed: false,
            }),
            capacity,
            waker,
        })
    }

    /// Lets producers write straight to `socket` (which must be
    /// non-blocking) whenever the consumer parks with its socket idle.
    pub fn attach_socket(&self, socket: Arc<TcpStream>) {
        self.queue.lock().socket = Some(socket);
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
            let frames = frames.into_iter();
            match q.direct_socket() {
                Some(socket) => q.write_through(&socket, frames),
                None => frames.for_each(|f| q.enqueue(f)),
            }
            q.take_wake()
        };
        if wake {
            self.wake();
        }
        Ok(())
    }

    /// Consumer only: queues JSON frames it made itself that may wait for
    /// the next producer's write to carry them (see "Riding along" above);
    /// they never wait longer than one janitor tick.
    pub fn push_deferred(&self, frames: impl IntoIterator<Item = Vec<u8>>) {
        let mut q = self.queue.lock();
        if q.closed {
            return;
        }
        for json in frames {
            q.enqueue(Frame::Json(json));
            q.deferred += 1;
        }
    }

    /// Wakes a consumer that sleeps leaving deferred frames, so it writes
    /// them itself. Called by the janitor: it bounds how long they wait.
    pub fn release_deferred(&self) {
        {
            let mut q = self.queue.lock();
            if !q.lingering {
                return;
            }
            q.lingering = false;
            q.parked = false;
        }
        self.wake();
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
        match q.direct_socket() {
            Some(socket) => q.write_through(&socket, std::iter::once(frame)),
            None => q.enqueue(frame),
        }
        Ok(q.take_wake())
    }

    /// Moves every waiting frame into `batch` (consumer only).
    pub fn take_all(&self, batch: &mut Vec<Frame>) {
        let mut q = self.queue.lock();
        q.bytes = 0;
        q.deferred = 0;
        batch.extend(q.frames.drain(..));
    }

    /// Moves up to `max` waiting frames into `batch` (consumer only).
    pub fn take_some(&self, batch: &mut impl Extend<Frame>, max: usize) {
        let mut q = self.queue.lock();
        let n = q.frames.len().min(max);
        // The consumer writes what it takes itself, deferred or not.
        q.deferred = 0;
        let Queue { frames, bytes, .. } = &mut *q;
        batch.extend(frames.drain(..n).inspect(|f| *bytes -= f.encoded_len()));
    }

    /// Consumer only: if nothing is waiting, records that the consumer is
    /// going to sleep on [`Outbox::waker_fd`] and returns true. A producer
    /// pushing afterwards will wake it, or, when `socket_idle` (the
    /// consumer has no bytes of its own to write) and a socket is attached,
    /// write to the socket itself. With `socket_idle`, frames pushed with
    /// [`Outbox::push_deferred`] count as nothing waiting: the next
    /// producer's write carries them.
    pub fn park_if_empty(&self, socket_idle: bool) -> bool {
        let mut q = self.queue.lock();
        let lingering = !q.frames.is_empty()
            && socket_idle
            && q.socket.is_some()
            && q.deferred == q.frames.len();
        if q.frames.is_empty() || lingering {
            q.parked = true;
            q.socket_idle = socket_idle;
            q.lingering = lingering;
            true
        } else {
            false
        }
    }

    /// Consumer only: call whenever it returns from its sleep, for whatever
    /// reason, before it reads or writes the socket; `woken` says the
    /// waker fired. From here on producers queue instead of writing.
    pub fn unpark(&self, woken: bool) {
        if woken {
            let mut buf = [0u8; 8];
            // Reading a non-blocking eventfd resets it; EAGAIN only means it was not set.
            let _ = rustix::io::read(&self.waker, &mut buf);
        }
        let mut q = self.queue.lock();
        q.parked = false;
        q.socket_idle = false;
        q.lingering = false;
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
        q.socket = None;
        q.frames.clear();
        q.bytes = 0;
        q.deferred = 0;
        q.lingering = false;
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
        assert!(o.park_if_empty(false));
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
        o.unpark(true);
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
            if o.park_if_empty(false) {
                let mut fds = [PollFd::new(&o.waker, PollFlags::IN)];
                let timeout = rustix::event::Timespec {
                    tv_sec: 5,
                    tv_nsec: 0,
                };
                assert_eq!(poll(&mut fds, Some(&timeout)).unwrap(), 1, "lost wake-up");
                o.unpark(true);
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

    /// A connected loopback pair: the server side non-blocking (as a
    /// connection thread sets it), the client side blocking.
    fn socket_pair() -> (Arc<TcpStream>, TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (Arc::new(server), client)
    }

    /// Reads `n` text frames from `client` with tungstenite as the client.
    fn read_texts(client: TcpStream, n: usize) -> Vec<String> {
        use tungstenite::protocol::Role;
        let mut ws = tungstenite::WebSocket::from_raw_socket(client, Role::Client, None);
        (0..n)
            .map(|_| ws.read().unwrap().into_text().unwrap().to_string())
            .collect()
    }

    fn json(text: &str) -> Frame {
        Frame::Json(text.as_bytes().to_vec())
    }

    #[test]
    fn a_parked_idle_consumer_is_written_through_without_a_wake() {
        let (server, client) = socket_pair();
        let o = Outbox::new(8).unwrap();
        o.attach_socket(server);
        assert!(o.park_if_empty(true));
        o.push(json("1")).unwrap();
        o.push_token(token(0)).unwrap();
        o.push_all([json("2"), json("3")]).unwrap();
        assert!(o.is_empty(), "everything went straight to the socket");
        let mut fds = [PollFd::new(&o.waker, PollFlags::IN)];
        let now = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        assert_eq!(poll(&mut fds, Some(&now)).unwrap(), 0, "nobody was woken");
        let texts = read_texts(client, 4);
        assert_eq!(texts[0], "1");
        assert!(texts[1].starts_with(r#"{"type":"token","request":"r","seq":0"#));
        assert_eq!(&texts[2..], ["2", "3"]);
    }

    #[test]
    fn no_write_through_unless_parked_with_an_idle_socket() {
        let (server, _client) = socket_pair();
        let o = Outbox::new(8).unwrap();
        o.attach_socket(server);
        o.push(json("awake")).unwrap();
        assert_eq!(o.len(), 1, "the consumer is awake: it writes");
        let mut batch = Vec::new();
        o.take_all(&mut batch);
        assert!(o.park_if_empty(false));
        o.push(json("busy")).unwrap();
        assert_eq!(
            o.len(),
            1,
            "the consumer has bytes pending: queue behind them"
        );
        o.take_all(&mut batch);
        assert!(o.park_if_empty(true));
        o.unpark(false);
        o.push(json("unparked")).unwrap();
        assert_eq!(o.len(), 1, "the consumer took the socket back");
        // Replays and closes are the consumer's to write even when it sleeps.
        o.take_all(&mut batch);
        assert!(o.park_if_empty(true));
        o.push(Frame::Close(1000, "bye")).unwrap();
        assert_eq!(o.len(), 1);
    }

    #[test]
    fn a_full_socket_leaves_the_rest_queued_in_order_and_wakes_the_consumer() {
        let (server, client) = socket_pair();
        let o = Outbox::new(usize::MAX).unwrap();
        o.attach_socket(server.clone());
        // Big frames fill the kernel's buffers while nobody reads.
        let big = |i: usize| json(&format!("{i:05}{}", "x".repeat(64 * 1024)));
        let mut pushed = 0;
        assert!(o.park_if_empty(true));
        while o.is_empty() {
            o.push(big(pushed)).unwrap();
            pushed += 1;
            assert!(pushed < 10_000, "the socket never filled");
        }
        let mut batch = Vec::new();
        o.take_all(&mut batch);
        assert!(
            matches!(batch.first(), Some(Frame::Encoded(_))),
            "the unwritten rest of a frame comes first"
        );
        let mut fds = [PollFd::new(&o.waker, PollFlags::IN)];
        assert_eq!(poll(&mut fds, None).unwrap(), 1, "the consumer was woken");
        let reader = std::thread::spawn(move || read_texts(client, pushed));
        // What a connection thread does with the queued rest.
        let mut rest = Vec::new();
        for f in batch {
            assert!(f.encode_into(&mut rest));
        }
        let mut written = 0;
        while written < rest.len() {
            match (&*server).write(&rest[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        }
        let texts = reader.join().unwrap();
        for (i, text) in texts.iter().enumerate() {
            assert!(
                text.starts_with(&format!("{i:05}")),
                "frame {i} out of order"
            );
            assert_eq!(text.len(), 5 + 64 * 1024);
        }
    }

    /// Producers push from many threads while a consumer parks and unparks
    /// the way a connection thread does, deferring frames of its own; the
    /// client must read every frame whole, and each pusher's frames in its
    /// own order.
    #[test]
    fn stress_write_through_and_queue_interleave_without_loss_or_reordering() {
        const PRODUCERS: usize = 8;
        const EACH: usize = 2_000;
        // The consumer's own frames are numbered as pusher PRODUCERS.
        const OWN: usize = 500;
        let (server, client) = socket_pair();
        let o = Arc::new(Outbox::new(usize::MAX).unwrap());
        o.attach_socket(server.clone());
        let reader = std::thread::spawn(move || read_texts(client, PRODUCERS * EACH + OWN));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let consumer = {
            let (o, done) = (o.clone(), done.clone());
            std::thread::spawn(move || {
                let mut pending: Vec<u8> = Vec::new();
                let mut batch = Vec::new();
                let mut own = 0;
                loop {
                    batch.clear();
                    o.take_all(&mut batch);
                    for f in batch.drain(..) {
                        assert!(f.encode_into(&mut pending));
                    }
                    while !pending.is_empty() {
                        match (&*server).write(&pending) {
                            Ok(n) => drop(pending.drain(..n)),
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                std::thread::yield_now()
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                    if own < OWN {
                        o.push_deferred([format!("{PRODUCERS}:{own}").into_bytes()]);
                        own += 1;
                    }
                    let finished = done.load(std::sync::atomic::Ordering::Acquire);
                    if o.park_if_empty(true) {
                        if finished && own == OWN && o.is_empty() {
                            return;
                        }
                        let mut fds = [PollFd::new(&o.waker, PollFlags::IN)];
                        let short = rustix::event::Timespec {
                            tv_sec: 0,
                            tv_nsec: 200_000,
                        };
                        poll(&mut fds, Some(&short)).unwrap();
                        let woken = fds[0].revents().contains(PollFlags::IN);
                        o.unpark(woken);
                    }
                }
            })
        };
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|p| {
                let o = o.clone();
                std::thread::spawn(move || {
                    for i in 0..EACH {
                        let text = format!("{p}:{i}");
                        if i % 3 == 0 {
                            o.push_token(Frame::Json(text.into_bytes())).unwrap();
                        } else {
                            o.push(json(&text)).unwrap();
                        }
                    }
                })
            })
            .collect();
        for p in producers {
            p.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Release);
        o.wake();
        consumer.join().unwrap();
        let texts = reader.join().unwrap();
        let mut next = [0usize; PRODUCERS + 1];
        for text in texts {
            let (p, i) = text.split_once(':').unwrap();
            let (p, i): (usize, usize) = (p.parse().unwrap(), i.parse().unwrap());
            assert_eq!(i, next[p], "pusher {p}'s frames out of order");
            next[p] += 1;
        }
        let mut expected = [EACH; PRODUCERS + 1];
        expected[PRODUCERS] = OWN;
        assert_eq!(next, expected);
    }

    #[test]
    fn deferred_frames_ride_along_with_the_next_producer_write() {
        let (server, client) = socket_pair();
        let o = Outbox::new(8).unwrap();
        o.attach_socket(server);
        o.push_deferred([b"accepted".to_vec(), b"state".to_vec()]);
        assert!(
            o.park_if_empty(true),
            "only deferred frames: the consumer may sleep"
        );
        o.push(json("answer")).unwrap();
        assert!(o.is_empty());
        let mut fds = [PollFd::new(&o.waker, PollFlags::IN)];
        let now = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        assert_eq!(poll(&mut fds, Some(&now)).unwrap(), 0, "nobody was woken");
        assert_eq!(read_texts(client, 3), ["accepted", "state", "answer"]);
    }

    #[test]
    fn release_deferred_wakes_a_lingering_consumer_only() {
        let (server, _client) = socket_pair();
        let o = Outbox::new(8).unwrap();
        o.attach_socket(server);
        let now = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let woken = |o: &Outbox| {
            let mut fds = [PollFd::new(&o.waker, PollFlags::IN)];
            poll(&mut fds, Some(&now)).unwrap() == 1
        };
        assert!(o.park_if_empty(true));
        o.release_deferred();
        assert!(!woken(&o), "nothing was deferred");
        o.unpark(false);
        o.push_deferred([b"accepted".to_vec()]);
        assert!(o.park_if_empty(true));
        o.release_deferred();
        assert!(woken(&o));
        o.unpark(true);
        assert_eq!(o.len(), 1, "the consumer writes it itself now");
    }

    #[test]
    fn deferred_frames_do_not_linger_behind_other_frames_or_a_busy_socket() {
        let (server, _client) = socket_pair();
        let o = Outbox::new(8).unwrap();
        o.attach_socket(server);
        o.push(json("token from a worker")).unwrap();
        o.push_deferred([b"accepted".to_vec()]);
        assert!(!o.park_if_empty(true), "a worker's frame must not wait");
        let mut batch = Vec::new();
        o.take_all(&mut batch);
        o.push_deferred([b"accepted".to_vec()]);
        assert!(
            !o.park_if_empty(false),
            "the consumer's own bytes are pending"
        );
        // Without a socket nobody else could write them.
        let unattached = Outbox::new(8).unwrap();
        unattached.push_deferred([b"accepted".to_vec()]);
        assert!(!unattached.park_if_empty(true));
    }
}
