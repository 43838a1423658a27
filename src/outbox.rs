//! A connection's outbound queue: frames waiting to be written to one
//! socket, plus the waker that tells the connection thread to write them.
//! Shared by the transports: each gives its queue the framing of its wire
//! ([`Outbox::framed`]: WebSocket frames, HTTP chunks) and encodes its own
//! messages; the queue holds tokens as the broadcaster made them
//! ([`Frame::Token`]) and lays them out only when it writes them.
//!
//! Threads: any number of producers (pipeline workers, the broadcaster on a
//! streaming thread, the history writer) push; exactly one consumer, the
//! connection's own thread, pops. The queue is a `Mutex<VecDeque>` rather
//! than a channel because it needs two admission rules in one ordered queue:
//! token frames are refused once `capacity` frames or `max_bytes` bytes are
//! waiting (that is how a slow consumer is detected), while control frames
//! (`done`, `error`, …) are always admitted so the end of a request is never
//! lost and always comes after that request's tokens. Control frames are
//! bounded by the number of requests in flight, not by the token rate.
//!
//! Counting bytes. Everything waiting for the connection counts against
//! `max_bytes`: queued token and JSON frames (history answers too), the
//! unwritten rest of frames written straight through, and what the
//! consumer has already taken and encoded but not yet written (it reports
//! that with [`Outbox::set_unwritten`]). A [`Frame::Replay`] counts only
//! once it is expanded: until then it holds no bytes of its own, since its
//! tokens live in the generation's history whoever reads them. Token
//! frames are what grows with a client that does not read, so they are
//! what the bound refuses; control frames still count, so a big one makes
//! the next token of that connection hit the bound.
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
//! Riding along. `accepted` and the first `state` of a chat go out once
//! the history writer has stored the question, and the request's next
//! frames (a cached answer, usually within microseconds) come from a
//! worker. Writing the first two at once would cost a system call per chat
//! and a second TCP segment (or a wake-up of the sleeping connection
//! thread), so they are queued as *deferred* ([`Outbox::push_deferred`]):
//! the next producer's write carries them, in front of its own frames. If
//! no producer comes, the janitor releases them
//! ([`Outbox::release_deferred`]) within one of its ticks.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::Write;
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use rustix::event::{eventfd, EventfdFlags};

use crate::broadcast::{Token, TokenSource};
pub use crate::delivery::PushError;
use crate::delivery::TokenLayout;

/// How a transport wraps one message's bytes for the wire (a WebSocket
/// frame, an HTTP chunk): appends the framed concatenation of `parts` to
/// `out`.
pub type Framing = fn(out: &mut Vec<u8>, parts: &[&[u8]]);

/// No framing: the parts, concatenated. For queues whose consumer reads
/// the frames itself instead of writing them to a socket.
pub fn unframed(out: &mut Vec<u8>, parts: &[&[u8]]) {
    for part in parts {
        out.extend_from_slice(part);
    }
}

/// One frame waiting to be written.
#[derive(Clone)]
pub enum Frame {
    /// A token, laid out as its request's transport wants it.
    Token {
        /// The request's layout, one allocation per request.
        layout: Arc<TokenLayout>,
        /// The token, escaped once per generation.
        token: Token,
    },
    /// Tokens `from..to` of a generation's history or of a cached answer,
    /// expanded lazily by the connection thread as the socket accepts them,
    /// so a late joiner's replay of thousands of tokens costs one queue
    /// slot, not thousands, and a big cache hit no copy of the answer.
    Replay(Replay),
    /// One message in the transport's encoding, not yet framed.
    Message(Vec<u8>),
    /// End the connection after what came before (a WebSocket closes with
    /// this close code and reason).
    Close(u16, &'static str),
    /// The answer ends here: the consumer writes what came before, then
    /// goes on as its transport does (an HTTP connection reads its next
    /// request).
    End,
    /// Bytes already framed, written verbatim: the rest of frames whose
    /// first bytes a producer already wrote to the socket, a small cached
    /// answer encoded whole.
    Encoded(Vec<u8>),
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Frame::Token { token, .. } => write!(f, "Token({})", token.seq),
            Frame::Replay(r) => write!(f, "Replay({}..{})", r.from, r.to),
            Frame::Message(m) => write!(f, "Message({} bytes)", m.len()),
            Frame::Close(code, _) => write!(f, "Close({code})"),
            Frame::End => f.write_str("End"),
            Frame::Encoded(e) => write!(f, "Encoded({} bytes)", e.len()),
        }
    }
}

impl Frame {
    /// Bytes this frame adds to the socket's output (payload only); a
    /// replay counts as nothing until it is expanded.
    pub fn encoded_len(&self) -> usize {
        match self {
            Frame::Token { layout, token } => layout.len(token),
            Frame::Message(bytes) | Frame::Encoded(bytes) => bytes.len(),
            Frame::Replay(_) | Frame::Close(..) | Frame::End => 0,
        }
    }

    /// Appends this frame, framed with `framing`, to `out`, or returns
    /// false for frames only the connection thread may write (a replay is
    /// expanded as the socket takes it; a close ends the connection).
    pub fn encode_into(&self, framing: Framing, out: &mut Vec<u8>) -> bool {
        match self {
            Frame::Token { layout, token } => layout.with_parts(token, |parts| framing(out, parts)),
            Frame::Message(bytes) => framing(out, &[bytes]),
            Frame::Encoded(bytes) => out.extend_from_slice(bytes),
            Frame::Replay(_) | Frame::Close(..) | Frame::End => return false,
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

/// A range of tokens with at most this many bytes of text is laid out
/// when it is sent ([`Outbox::tokens_frame`]), so a small cached answer
/// reaches the socket in one write with its neighbours; a bigger one is
/// replayed from where it is kept as the socket takes it: no copy per
/// client, and nothing held for a client that does not read.
const INLINE_TOKEN_BYTES: usize = 64 * 1024;
/// Ranges longer than this are replayed without looking at their size.
const INLINE_MAX_TOKENS: u64 = 4096;

/// A range of a generation's tokens, or of a cached answer's, for one request.
#[derive(Clone)]
pub struct Replay {
    /// Where the tokens are kept.
    pub source: Arc<dyn TokenSource>,
    /// How the request's tokens are laid out.
    pub layout: Arc<TokenLayout>,
    /// First `seq` still to write.
    pub from: u64,
    /// One past the last `seq` to write.
    pub to: u64,
}

impl Replay {
    /// Frames the next tokens into `out` until it holds `max_bytes` (at
    /// least one token goes in) or the range is done; fetches at most
    /// `chunk` tokens into `scratch`. Returns true when the whole range has
    /// been written (or its source has no more).
    pub fn expand_into(
        &mut self,
        framing: Framing,
        out: &mut Vec<u8>,
        max_bytes: usize,
        chunk: u64,
        scratch: &mut Vec<Token>,
    ) -> bool {
        let to = self.to.min(self.from.saturating_add(chunk));
        scratch.clear();
        self.source.tokens(self.from, to, scratch);
        let mut encoded = 0;
        for token in scratch.iter() {
            self.layout.with_parts(token, |parts| framing(out, parts));
            encoded += 1;
            if out.len() >= max_bytes {
                break;
            }
        }
        self.from += encoded;
        let done = self.from >= self.to || scratch.is_empty();
        scratch.clear();
        done
    }
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

    /// True when frames may be written to the socket right now: the
    /// consumer sleeps with nothing of its own to write except deferred
    /// frames, which then go first.
    fn can_write_through(&self) -> bool {
        self.socket.is_some()
            && self.parked
            && self.socket_idle
            && (self.frames.is_empty() || self.lingering)
    }

    /// Encodes the deferred frames waiting and then what `encode` adds, and
    /// writes them to the socket while it takes them; whatever it does not
    /// take is queued as bytes. Only when [`Queue::can_write_through`].
    fn write_through(&mut self, framing: Framing, encode: impl FnOnce(&mut Vec<u8>)) {
        SCRATCH.with_borrow_mut(|buf| {
            buf.clear();
            // Deferred frames are plain JSON, which always encodes.
            for waiting in self.frames.drain(..) {
                waiting.encode_into(framing, buf);
            }
            self.bytes = 0;
            self.deferred = 0;
            self.lingering = false;
            encode(buf);
            let mut written = 0;
            if let Some(socket) = &self.socket {
                while written < buf.len() {
                    match (&**socket).write(&buf[written..]) {
                        Ok(0) => break,
                        Ok(n) => written += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        // Full (WouldBlock) or broken: the consumer finds out which.
                        Err(_) => break,
                    }
                }
            }
            if written < buf.len() {
                self.enqueue(Frame::Encoded(buf[written..].to_vec()));
            }
            if buf.capacity() > SCRATCH_KEEP {
                *buf = Vec::new();
            }
        });
    }

    /// Writes `frames` through (see [`Queue::write_through`]) up to the
    /// first that only the consumer may write; that one and the rest are
    /// queued, in order.
    fn write_frames_through(&mut self, framing: Framing, frames: impl Iterator<Item = Frame>) {
        let mut frames = frames.peekable();
        self.write_through(framing, |buf| {
            while frames.next_if(|f| f.encode_into(framing, buf)).is_some() {}
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
/// use chorus::outbox::{Frame, Outbox, PushError};
/// let outbox = Outbox::bounded(8, 100).unwrap();
/// outbox.push(Frame::Message(b"{}".to_vec())).unwrap();
/// // Control frames count, and a token that would pass the byte bound is refused.
/// assert_eq!(outbox.push_token(Frame::Message(vec![b'x'; 99])), Err(PushError::Full));
/// let mut batch = Vec::new();
/// outbox.take_all(&mut batch);
/// assert_eq!(batch.len(), 1);
/// assert!(outbox.park_if_empty(false));
/// ```
pub struct Outbox {
    queue: Mutex<Queue>,
    capacity: usize,
    /// Bytes waiting for this connection past which token frames are refused.
    max_bytes: usize,
    /// Bytes the consumer took and has not written yet; written by the
    /// consumer alone, read by producers deciding whether a token fits.
    unwritten: AtomicUsize,
    waker: OwnedFd,
    framing: Framing,
}

impl Outbox {
    /// An empty outbox admitting up to `capacity` waiting token frames, with
    /// no byte bound.
    pub fn new(capacity: usize) -> std::io::Result<Outbox> {
        Outbox::bounded(capacity, usize::MAX)
    }

    /// An empty outbox admitting token frames while fewer than `capacity`
    /// frames and at most `max_bytes` bytes (this frame included) wait.
    pub fn bounded(capacity: usize, max_bytes: usize) -> std::io::Result<Outbox> {
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
            max_bytes,
            unwritten: AtomicUsize::new(0),
            waker,
            framing: unframed,
        })
    }

    /// The same outbox, framing every frame it writes with `framing` (the
    /// default writes frames' bytes unframed).
    pub fn framed(mut self, framing: Framing) -> Outbox {
        self.framing = framing;
        self
    }

    /// How this outbox frames what it writes; the consumer frames what it
    /// takes the same way.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// The frame that sends tokens `from..until` of `source` laid out with
    /// `layout`: framed now when small, else a replay; `None` for an empty
    /// range. Reads `source`, so never call it under that source's lock.
    pub fn tokens_frame(
        &self,
        layout: &Arc<TokenLayout>,
        source: &Arc<dyn TokenSource>,
        from: u64,
        until: u64,
    ) -> Option<Frame> {
        if from >= until {
            return None;
        }
        if until - from <= INLINE_MAX_TOKENS {
            let mut tokens = Vec::new();
            source.tokens(from, until, &mut tokens);
            let text: usize = tokens.iter().map(Token::json_len).sum();
            if text <= INLINE_TOKEN_BYTES {
                let mut bytes = Vec::with_capacity(text + tokens.len() * (layout.head.len() + 64));
                for token in &tokens {
                    layout.with_parts(token, |parts| (self.framing)(&mut bytes, parts));
                }
                return Some(Frame::Encoded(bytes));
            }
        }
        Some(Frame::Replay(Replay {
            source: source.clone(),
            layout: layout.clone(),
            from,
            to: until,
        }))
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
            if q.can_write_through() {
                q.write_frames_through(self.framing, frames);
            } else {
                frames.for_each(|f| q.enqueue(f));
            }
            q.take_wake()
        };
        if wake {
            self.wake();
        }
        Ok(())
    }

    /// Queues JSON frames that may wait for the next producer's write to
    /// carry them (see "Riding along" above): `accepted` and the first
    /// `state`, pushed by the history writer once the question is stored.
    /// They never wait longer than one janitor tick.
    pub fn push_deferred(&self, frames: impl IntoIterator<Item = Vec<u8>>) {
        let mut q = self.queue.lock();
        if q.closed {
            return;
        }
        for json in frames {
            q.enqueue(Frame::Message(json));
            q.deferred += 1;
        }
        // Pushed by another thread (`accepted` goes out once the history
        // writer has committed the question) while the consumer sleeps
        // with an idle socket: as if it had left them itself, so the next
        // producer's write carries them and nobody is woken for them.
        if q.parked && q.socket_idle && q.socket.is_some() && q.deferred == q.frames.len() {
            q.lingering = true;
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

    /// Queues a token frame unless `capacity` frames are already waiting or
    /// it would take the bytes waiting past `max_bytes`.
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
        let mut q = self.admit_token(frame.encoded_len())?;
        if q.can_write_through() {
            q.write_frames_through(self.framing, std::iter::once(frame));
        } else {
            q.enqueue(frame);
        }
        Ok(q.take_wake())
    }

    /// [`Outbox::queue_token`] for a live token, laid out with `layout`.
    /// A token written straight to the socket is encoded from the borrowed
    /// parts; only one that must wait becomes a [`Frame::Token`] (two
    /// reference counts taken), which on the streaming path is the
    /// exception.
    pub fn queue_live_token(
        &self,
        layout: &Arc<TokenLayout>,
        token: &Token,
    ) -> Result<bool, PushError> {
        let mut q = self.admit_token(layout.len(token))?;
        if q.can_write_through() {
            let framing = self.framing;
            q.write_through(framing, |buf| {
                layout.with_parts(token, |parts| framing(buf, parts))
            });
        } else {
            q.enqueue(Frame::Token {
                layout: layout.clone(),
                token: token.clone(),
            });
        }
        Ok(q.take_wake())
    }

    /// The queue, locked, when a token of `len` bytes may go in: the
    /// outbox is open, fewer than `capacity` frames wait, and the bytes
    /// waiting stay within the bound.
    fn admit_token(&self, len: usize) -> Result<MutexGuard<'_, Queue>, PushError> {
        let q = self.queue.lock();
        if q.closed {
            return Err(PushError::Closed);
        }
        if q.frames.len() >= self.capacity || !self.fits(q.bytes, len) {
            return Err(PushError::Full);
        }
        Ok(q)
    }

    /// Moves every waiting frame into `batch` (consumer only).
    pub fn take_all(&self, batch: &mut Vec<Frame>) {
        let mut q = self.queue.lock();
        q.bytes = 0;
        q.deferred = 0;
        batch.extend(q.frames.drain(..));
    }

    /// Moves up to `max` waiting frames into `batch` (consumer only),
    /// stopping after the first frame that brings what it took to
    /// `max_bytes`, so the consumer's own buffer stays small.
    pub fn take_some(&self, batch: &mut impl Extend<Frame>, max: usize, max_bytes: usize) {
        let mut q = self.queue.lock();
        // The consumer writes what it takes itself, deferred or not.
        q.deferred = 0;
        let mut n = 0;
        let mut taken = 0;
        for f in q.frames.iter().take(max) {
            n += 1;
            taken += f.encoded_len();
            if taken >= max_bytes {
                break;
            }
        }
        q.bytes -= taken;
        // Still this connection's bytes: they move to the consumer's count
        // under the lock, so no producer sees them vanish in between.
        self.unwritten.fetch_add(taken, Ordering::Relaxed);
        batch.extend(q.frames.drain(..n));
    }

    /// Consumer only: how many bytes it took from this outbox and has not
    /// written to the socket yet. They count against the byte bound;
    /// [`Outbox::take_some`] adds what it takes until the consumer says
    /// again.
    pub fn set_unwritten(&self, bytes: usize) {
        self.unwritten.store(bytes, Ordering::Relaxed);
    }

    /// True when `more` bytes fit beside `queued` and the consumer's unwritten ones.
    fn fits(&self, queued: usize, more: usize) -> bool {
        queued
            .saturating_add(self.unwritten.load(Ordering::Relaxed))
            .saturating_add(more)
            <= self.max_bytes
    }

    /// Bytes that may still be queued before token frames are refused.
    pub fn room(&self) -> usize {
        let q = self.queue.lock();
        self.max_bytes
            .saturating_sub(q.bytes)
            .saturating_sub(self.unwritten.load(Ordering::Relaxed))
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
        self.unwritten.store(0, Ordering::Relaxed);
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
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

#[cfg(test)]
mod tests;
