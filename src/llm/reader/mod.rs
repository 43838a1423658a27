//! The upstream reader: one thread that reads the bodies of all streamed
//! upstream responses on plain `http://` connections.
//!
//! A streaming worker makes the request and reads the response head itself
//! (see [`super::http1`]), then hands the socket here and sleeps until the
//! round is over. Tokens of one stream come tens of milliseconds apart, so
//! a thread per stream wakes up once per token, and on a virtual machine
//! that wake-up costs more than everything else done for the token. This
//! thread waits on all sockets at once with `epoll` and reads each token
//! the moment it arrives; when it is busy, the tokens that arrived
//! meanwhile share its next wake-up. (Waiting a short window on purpose
//! before each read, to gather more of them, saved nothing measurable at
//! 200 and 256 streams, so it does not.)
//!
//! Everything else a stream needs (decoding the body's framing, the read
//! timeout, an abort from another thread, the end of the stream) happens
//! here too; what the body *says* is the [`Stream`]'s business.
//!
//! Use: one [`Reader`] ([`Reader::start`]) serves
//! every stream. For each streamed response, a streaming worker
//!
//! 1. sends the request and reads the response head itself, blocking
//!    ([`super::http1::Pool::post`]);
//! 2. hands the response's connection, [`BodyDecoder`], leftover bytes (the
//!    body's start, read with the head), keep-alive flag and read timeout
//!    to [`Reader::add`], with a [`Stream`] of its own: the reader thread
//!    gives it the body's payload, framing removed ([`Stream::on_body`],
//!    which answers with a [`Step`]), then its [`End`] ([`Stream::on_end`],
//!    once);
//! 3. sleeps until the stream's `on_end` tells it the end (a channel), and
//!    gives the connection of an [`End::Finished`] back to its pool;
//! 4. meanwhile, anything that must end the stream early (a cancel, the
//!    janitor, shutdown) calls [`Aborter::abort`] with the [`StreamId`]
//!    that `add` returned: the socket is closed and the stream ends as
//!    [`End::Aborted`].
//!
//! The tests open with that round trip as a runnable example
//! (`example_one_stream_end_to_end`); [`super::direct`] makes it for every
//! call to a plain `http://` upstream.
//!
//! Threads: the `chorus-upstream` thread owns every registered socket;
//! [`Reader::add`] and [`Aborter::abort`] are called from streaming workers
//! and from abort hooks (any thread) and only queue a command and write an
//! eventfd. Streams end on the reader thread. Should it die (a panic in a
//! stream), its streams, and any handed over later, are dropped without an
//! end, which their waiters see as a closed channel.

use std::collections::HashMap;
use std::io::{ErrorKind, Read};
use std::net::TcpStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustix::event::{epoll, eventfd, EventfdFlags, Timespec};
use rustix::fd::{AsFd, OwnedFd};

use super::http1::BodyDecoder;

/// What the reader does after handing a stream some body bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Read on.
    More,
    /// The stream has all it needs (e.g. `[DONE]`): end it now.
    Done,
    /// The stream wants no more (its clients are gone): close the socket.
    Stop,
}

/// How a stream ended.
#[derive(Debug)]
pub(crate) enum End {
    /// The body is over, or the stream said [`Step::Done`] or
    /// [`Step::Stop`]. `conn` is the connection, blocking again, when its
    /// response was read to the end and it may carry another request.
    Finished { conn: Option<TcpStream> },
    /// The connection failed or closed before the body was complete.
    Failed(std::io::Error),
    /// Nothing came for the read timeout.
    TimedOut,
    /// [`Aborter::abort`] ended it; the socket is closed.
    Aborted,
}

/// The reading side of one stream, run on the reader thread.
pub(crate) trait Stream: Send {
    /// Body bytes, framing removed, as they arrive.
    fn on_body(&mut self, payload: &[u8]) -> Step;
    /// The end; called exactly once. (Only if the reader thread dies of a
    /// panic is a stream dropped without it: whoever waits for the end
    /// should notice the drop, e.g. a channel that closes.)
    fn on_end(self: Box<Self>, end: End);
}

/// Identifies a registered stream, for [`Aborter::abort`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct StreamId(u64);

enum Command {
    Add(StreamId, Entry),
    Abort(StreamId),
    Shutdown,
}

struct Entry {
    conn: TcpStream,
    decoder: BodyDecoder,
    keep_alive: bool,
    timeout: Duration,
    last_read: Instant,
    /// Bytes read from the socket so far (bounded by [`MAX_BODY`]).
    received: u64,
    stream: Box<dyn Stream>,
    /// Body bytes not yet handed to the stream (the response's first bytes).
    pending: Vec<u8>,
    /// The stream said [`Step::Done`] before the body's framing ended:
    /// since when the rest (the last chunk) is awaited, to keep the
    /// connection.
    draining: Option<Instant>,
}

struct Shared {
    commands: Mutex<Commands>,
    waker: OwnedFd,
}

/// What the other threads hand the reader thread.
#[derive(Default)]
struct Commands {
    queue: Vec<Command>,
    /// The last [`StreamId`] given out.
    last_id: u64,
    /// The thread has stopped (shut down, or died of a panic): nothing
    /// queued from now on would ever run.
    closed: bool,
}

impl Shared {
    fn send(&self, command: Command) {
        let refused = {
            let mut commands = self.commands.lock();
            if commands.closed {
                Some(command)
            } else {
                commands.queue.push(command);
                None
            }
        };
        match refused {
            // Dropped outside the lock. A stream handed over now is dropped
            // without an end, as the registered ones were when the thread
            // died, rather than queued for a thread that is gone.
            Some(command) => drop(command),
            // EAGAIN: already signalled, which is all that is needed.
            None => {
                let _ = rustix::io::write(&self.waker, &1u64.to_ne_bytes());
            }
        }
    }
}

/// Closes the command queue when the reader thread stops, however it
/// stops (a panic too), and drops what was still queued.
struct CloseOnExit(Arc<Shared>);

impl Drop for CloseOnExit {
    fn drop(&mut self) {
        let queued = {
            let mut commands = self.0.commands.lock();
            commands.closed = true;
            std::mem::take(&mut commands.queue)
        };
        drop(queued);
    }
}

/// The reader thread and the way to reach it. Dropping it stops the
/// thread; streams still registered end as [`End::Aborted`].
pub(crate) struct Reader {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Largest read from one socket at a time.
const READ_BUFFER: usize = 16 * 1024;
/// Most bytes one response may send: an upstream that sends more fails
/// its stream instead of growing the server without end.
const MAX_BODY: u64 = 256 << 20;
/// How often read timeouts are checked while the reader is busy.
const TIMEOUT_CHECK: Duration = Duration::from_millis(100);
/// How long the end of a body's framing is awaited after its stream has
/// all it needs: it normally follows at once; a server that never sends
/// it costs its connection, not the stream's end.
const DRAIN_GRACE: Duration = Duration::from_millis(200);

impl Reader {
    /// Starts the thread.
    pub fn start() -> std::io::Result<Reader> {
        let waker = eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)?;
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        epoll::add(
            &epoll,
            &waker,
            epoll::EventData::new_u64(u64::MAX),
            epoll::EventFlags::IN,
        )?;
        let shared = Arc::new(Shared {
            commands: Mutex::new(Commands::default()),
            waker,
        });
        let thread = std::thread::Builder::new()
            .name("chorus-upstream".into())
            .stack_size(256 * 1024)
            .spawn({
                let shared = shared.clone();
                move || {
                    // Dropped last, after the streams, even in a panic.
                    let _closed = CloseOnExit(shared.clone());
                    Loop::new(shared, epoll).run();
                }
            })?;
        Ok(Reader {
            shared,
            thread: Some(thread),
        })
    }

    /// Hands over a response's body: `conn` (any mode; it is made
    /// non-blocking here), its framing, the body bytes already read with
    /// the head, and the read timeout. `keep_alive`: the response allows
    /// another request on the connection.
    pub fn add(
        &self,
        conn: TcpStream,
        decoder: BodyDecoder,
        leftover: Vec<u8>,
        keep_alive: bool,
        timeout: Duration,
        stream: Box<dyn Stream>,
    ) -> StreamId {
        let id = {
            let mut commands = self.shared.commands.lock();
            commands.last_id += 1;
            StreamId(commands.last_id)
        };
        let entry = Entry {
            conn,
            decoder,
            keep_alive,
            timeout,
            last_read: Instant::now(),
            stream,
            pending: leftover,
            draining: None,
            received: 0,
        };
        self.shared.send(Command::Add(id, entry));
        id
    }

    /// A handle that ends streams from any thread, e.g. an abort hook.
    pub fn aborter(&self) -> Aborter {
        Aborter(self.shared.clone())
    }
}

/// See [`Reader::aborter`].
#[derive(Clone)]
pub(crate) struct Aborter(Arc<Shared>);

impl Aborter {
    /// Ends stream `id` (if it is still running): its socket is closed, so
    /// the upstream sees the client leave, and it ends as [`End::Aborted`].
    pub fn abort(&self, id: StreamId) {
        self.0.send(Command::Abort(id));
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.shared.send(Command::Shutdown);
        if let Some(thread) = self.thread.take() {
            crate::threads::join(thread, "upstream reader");
        }
    }
}

/// The reader thread's state.
struct Loop {
    shared: Arc<Shared>,
    epoll: OwnedFd,
    streams: HashMap<u64, Entry>,
    buf: Vec<u8>,
    payload: Vec<u8>,
    last_timeout_check: Instant,
}

impl Loop {
    fn new(shared: Arc<Shared>, epoll: OwnedFd) -> Loop {
        Loop {
            shared,
            epoll,
            streams: HashMap::new(),
            buf: vec![0; READ_BUFFER],
            payload: Vec::with_capacity(READ_BUFFER),
            last_timeout_check: Instant::now(),
        }
    }

    fn run(mut self) {
        let mut events = Vec::with_capacity(256);
        loop {
            // Sleep until something is readable; with streams open, wake up
            // often enough to end the ones that went silent.
            let timeout = (!self.streams.is_empty())
                .then(|| Timespec::try_from(TIMEOUT_CHECK).ok())
                .flatten();
            events.clear();
            match epoll::wait(
                &self.epoll,
                rustix::buffer::spare_capacity(&mut events),
                timeout.as_ref(),
            ) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    log::error!("the upstream reader cannot wait: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            for event in &events {
                let id = event.data.u64();
                if id == u64::MAX {
                    if self.commands() {
                        return;
                    }
                } else {
                    self.read(id);
                }
            }
            let now = Instant::now();
            if events.is_empty() || now.duration_since(self.last_timeout_check) >= TIMEOUT_CHECK {
                self.last_timeout_check = now;
                self.expire(now);
            }
        }
    }

    /// Runs the queued commands; true on shutdown.
    fn commands(&mut self) -> bool {
        let mut buf = [0u8; 8];
        // Reading a non-blocking eventfd resets it.
        let _ = rustix::io::read(&self.shared.waker, &mut buf);
        let commands = std::mem::take(&mut self.shared.commands.lock().queue);
        for command in commands {
            match command {
                Command::Add(id, entry) => self.register(id, entry),
                Command::Abort(id) => {
                    if let Some(entry) = self.remove(id.0) {
                        // Dropping the socket closes it: the upstream sees us go.
                        entry.stream.on_end(End::Aborted);
                    }
                }
                Command::Shutdown => {
                    for id in self.streams.keys().copied().collect::<Vec<_>>() {
                        if let Some(entry) = self.remove(id) {
                            entry.stream.on_end(End::Aborted);
                        }
                    }
                    return true;
                }
            }
        }
        false
    }

    fn register(&mut self, id: StreamId, mut entry: Entry) {
        if let Err(e) = entry.conn.set_nonblocking(true) {
            entry.stream.on_end(End::Failed(e));
            return;
        }
        if let Err(e) = epoll::add(
            &self.epoll,
            entry.conn.as_fd(),
            epoll::EventData::new_u64(id.0),
            epoll::EventFlags::IN | epoll::EventFlags::RDHUP,
        ) {
            entry.stream.on_end(End::Failed(e.into()));
            return;
        }
        let pending = std::mem::take(&mut entry.pending);
        self.streams.insert(id.0, entry);
        if !pending.is_empty() && !self.take(id.0, &pending) {
            return;
        }
        // Whatever else is already waiting in the socket.
        self.read(id.0);
    }

    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.streams.remove(&id)?;
        let _ = epoll::delete(&self.epoll, entry.conn.as_fd());
        Some(entry)
    }

    /// Reads what socket `id` has, until it would block or the stream ends.
    fn read(&mut self, id: u64) {
        let mut buf = std::mem::take(&mut self.buf);
        while let Some(entry) = self.streams.get_mut(&id) {
            match entry.conn.read(&mut buf) {
                Ok(0) => {
                    let complete = entry.decoder.until_close()
                        || entry.decoder.is_complete()
                        || entry.draining.is_some();
                    let entry = self.remove(id);
                    if let Some(entry) = entry {
                        entry.stream.on_end(if complete {
                            End::Finished { conn: None }
                        } else {
                            End::Failed(ErrorKind::UnexpectedEof.into())
                        });
                    }
                    break;
                }
                Ok(n) => {
                    entry.last_read = Instant::now();
                    if !self.take(id, &buf[..n]) || n < buf.len() {
                        // A short read emptied the socket: asking again
                        // would only return `WouldBlock`, one system call
                        // per token for nothing. epoll tells when more comes.
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    if let Some(entry) = self.remove(id) {
                        entry.stream.on_end(if entry.draining.is_some() {
                            End::Finished { conn: None }
                        } else {
                            End::Failed(e)
                        });
                    }
                    break;
                }
            }
        }
        self.buf = buf;
    }

    /// Decodes `bytes` of stream `id` and hands the payload over; false
    /// when the stream ended.
    fn take(&mut self, id: u64, bytes: &[u8]) -> bool {
        let Some(entry) = self.streams.get_mut(&id) else {
            return false;
        };
        entry.received += bytes.len() as u64;
        if entry.received > MAX_BODY {
            if let Some(entry) = self.remove(id) {
                let why = format!("the response is longer than {} MiB", MAX_BODY >> 20);
                let error = std::io::Error::new(ErrorKind::InvalidData, why);
                entry.stream.on_end(End::Failed(error));
            }
            return false;
        }
        self.payload.clear();
        let complete = match entry.decoder.decode(bytes, &mut self.payload) {
            Ok(complete) => complete,
            Err(why) => {
                if let Some(entry) = self.remove(id) {
                    let error = std::io::Error::new(ErrorKind::InvalidData, why);
                    entry.stream.on_end(End::Failed(error));
                }
                return false;
            }
        };
        let step = if entry.draining.is_some() {
            // What follows `Done` is of no interest; only the framing is.
            Step::Done
        } else if self.payload.is_empty() {
            Step::More
        } else {
            entry.stream.on_body(&self.payload)
        };
        if step == Step::More && !complete {
            return true;
        }
        if step == Step::Done && !complete && entry.keep_alive {
            // The last chunk is usually already on its way: wait for it
            // (briefly) so the connection can carry the next request.
            entry.draining.get_or_insert_with(Instant::now);
            return true;
        }
        let Some(entry) = self.remove(id) else {
            return false;
        };
        // Kept only when its response was read to the end and may be
        // followed by another: a stopped stream's connection still carries
        // the rest of its answer.
        let keep = complete && entry.keep_alive && step != Step::Stop;
        let conn = keep
            .then(|| entry.conn.set_nonblocking(false).ok().map(|()| entry.conn))
            .flatten();
        entry.stream.on_end(End::Finished { conn });
        false
    }

    /// Ends the streams that have been silent for their read timeout, and
    /// gives up waiting for the end of a finished stream's body.
    fn expire(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .streams
            .iter()
            .filter(|(_, e)| match e.draining {
                Some(since) => now.duration_since(since) >= DRAIN_GRACE,
                None => now.duration_since(e.last_read) >= e.timeout,
            })
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(entry) = self.remove(id) {
                entry.stream.on_end(if entry.draining.is_some() {
                    End::Finished { conn: None }
                } else {
                    End::TimedOut
                });
            }
        }
    }
}

#[cfg(test)]
mod tests;
