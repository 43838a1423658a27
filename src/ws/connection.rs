//! One WebSocket connection, served by one OS thread for its whole life.
//!
//! Why one thread per connection, and how it reads and writes at once:
//! blocking tungstenite cannot be split across two threads (its `read` also
//! writes pongs and close replies), and a read timeout loop would add its
//! interval to every token's latency. So the socket is non-blocking and the
//! thread sleeps in `poll(2)` on two descriptors: the socket (readable, or
//! writable when output is pending) and its [`Outbox`]'s eventfd, which any
//! producer writes when it queues a frame for a parked connection. A token
//! therefore reaches the socket as soon as it is published, and an idle
//! connection costs one sleeping thread with a small stack.
//!
//! Outgoing frames are encoded by [`super::frame`] straight into this
//! connection's write buffer (`Socket::pending`): a token frame is the
//! request's prefix plus the generation's shared tail, never re-serialised.
//! tungstenite still owns reading and its own control replies; its writes go
//! through [`Socket::write`], which first drains our pending bytes, so the
//! two writers never interleave inside a frame.
//!
//! While this thread sleeps with nothing of its own to write, producers
//! write their frames to the socket themselves instead of waking it (see
//! [`Outbox`]: "writing straight through"); the thread takes the socket back
//! with [`Outbox::unpark`] whenever its poll returns.
//!
//! The same loop pings a silent peer and closes one that stays silent
//! ([`super::keepalive`]), so a vanished client does not hold its thread
//! for ever. Whatever way the loop ends, also by a panic, dropping the
//! `Connection` detaches its requests (`Pipeline::connection_closed`).
//!
//! Threads: only this connection's thread touches the tungstenite state
//! and the write buffer, and it reads the socket alone. Other threads reach
//! the connection only through its outbox, which writes to the socket only
//! while this thread is parked.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Error as WsError, Message, WebSocket};

use super::frame::close;
use super::keepalive::{Due, Keepalive};
use super::{encode, frame, history_page, WsClient};
use crate::broadcast::Token;
use crate::delivery::Client;
use crate::outbox::{Frame, Outbox, Replay};
use crate::pipeline::{self, Pipeline};
use crate::protocol::{self, ClientFrame, ErrorCode, Failure, FrameLimits};

/// Stop reading client frames while this many bytes wait to be written: a
/// client that sends without reading is slowed down by TCP instead of
/// growing our buffers.
const READ_PAUSE_BYTES: usize = 256 * 1024;
/// Frames taken from the outbox per round; bounds the write buffer growth.
const BATCH: usize = 512;
/// Bytes taken from the outbox (or expanded from a replay) per round: what
/// the write buffer holds beyond one frame, whatever the token size.
const CHUNK_BYTES: usize = 64 * 1024;
/// Replayed tokens fetched per round (fewer are encoded past `CHUNK_BYTES`).
const REPLAY_CHUNK: u64 = 256;
/// How long a closing connection may take to flush its last bytes.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Request ids a connection remembers for `Pipeline::connection_closed`.
const RECENT_REQUESTS: usize = 32;
/// Capacity the write buffer shrinks back to after a burst.
const IDLE_BUFFER: usize = 4096;

/// The limits a connection enforces, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest text frame answered with `too_large` and kept open.
    pub max_message_bytes: usize,
    /// Largest message in characters.
    pub max_message_chars: usize,
    /// Token frames an outbox holds before its subscriber is cut off.
    pub outbox_frames: usize,
    /// Chats per minute this connection may send; 0 means no limit.
    pub max_chats_per_minute: u32,
    /// Silence after which the server pings; `None`: never.
    pub ping_interval: Option<Duration>,
    /// How long a pinged peer may stay silent before it is closed.
    pub pong_timeout: Duration,
}

/// A text frame that makes the connection thread panic, in unit tests only:
/// how the tests prove that a panicking connection gives back everything
/// it holds. Not compiled into the server.
#[cfg(test)]
pub(crate) const PANIC_FRAME: &str = "test:panic";

/// A token bucket of chats: it holds at most a minute's worth and refills
/// continuously, so a client may burst up to the limit and then gets one
/// chat every `60 / per_minute` seconds.
#[derive(Debug)]
struct ChatBudget {
    per_minute: f64,
    available: f64,
    refilled_at: Instant,
}

impl ChatBudget {
    fn new(per_minute: u32, now: Instant) -> Option<ChatBudget> {
        (per_minute > 0).then(|| ChatBudget {
            per_minute: f64::from(per_minute),
            available: f64::from(per_minute),
            refilled_at: now,
        })
    }

    /// Takes one chat if one is available at `now`.
    fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.available = (self.available + elapsed * self.per_minute / 60.0).min(self.per_minute);
        self.refilled_at = now;
        if self.available >= 1.0 {
            self.available -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Limits {
    /// Frames above this close the connection with 1009: reading them whole
    /// to answer `too_large` would let a client make us buffer anything.
    fn hard_cap(&self) -> usize {
        self.max_message_bytes.saturating_mul(16).max(1 << 20)
    }
}

/// The TCP stream plus our own pending output.
struct Socket {
    tcp: Arc<TcpStream>,
    pending: Vec<u8>,
    written: usize,
    /// Bytes the kernel took so far, ours and tungstenite's: progress
    /// after a blocked write means the peer acknowledged.
    sent: u64,
    /// Set when a read returned less than asked: the kernel had nothing
    /// more, so the next read can answer `WouldBlock` without a system
    /// call. Cleared when poll reports input.
    input_drained: bool,
}

impl Socket {
    /// Writes what is pending; `Ok(true)` when everything went out.
    fn drain(&mut self) -> io::Result<bool> {
        while self.written < self.pending.len() {
            match (&*self.tcp).write(&self.pending[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.written += n;
                    self.sent += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.pending.clear();
        self.written = 0;
        if self.pending.capacity() > 16 * IDLE_BUFFER {
            self.pending.shrink_to(IDLE_BUFFER);
        }
        Ok(true)
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input_drained {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = (&*self.tcp).read(buf)?;
        // A short read of a stream socket took everything there was.
        self.input_drained = n > 0 && n < buf.len();
        Ok(n)
    }
}

impl Write for Socket {
    /// tungstenite's writes (pongs, close replies) go after our pending
    /// frames, never into the middle of one.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.drain()? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = (&*self.tcp).write(buf)?;
        self.sent += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Serves an upgraded connection until it closes. `leftover` holds bytes
/// read past the HTTP head.
pub fn serve(
    tcp: TcpStream,
    leftover: Vec<u8>,
    outbox: &Arc<Outbox>,
    pipeline: &Pipeline,
    limits: Limits,
) {
    if let Err(e) = tcp
        .set_nonblocking(true)
        .and_then(|()| tcp.set_nodelay(true))
    {
        log::debug!("cannot prepare a WebSocket socket: {e}");
        return;
    }
    let config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_write_buffer_size(64 * 1024)
        .max_message_size(Some(limits.hard_cap()))
        .max_frame_size(Some(limits.hard_cap()));
    let tcp = Arc::new(tcp);
    outbox.attach_socket(tcp.clone());
    let socket = Socket {
        tcp,
        pending: Vec::new(),
        written: 0,
        sent: 0,
        input_drained: false,
    };
    let mut ws = WebSocket::from_partially_read(socket, leftover, Role::Server, Some(config));
    let mut conn = Connection {
        outbox,
        client: WsClient::new(outbox.clone()),
        pipeline,
        limits,
        taken: VecDeque::new(),
        replay: None,
        scratch: Vec::new(),
        readable: true,
        chat_budget: ChatBudget::new(limits.max_chats_per_minute, Instant::now()),
        closing_since: None,
        requests: VecDeque::new(),
        keepalive: Keepalive::new(limits.ping_interval, limits.pong_timeout, Instant::now()),
        blocked_at: None,
    };
    if let Err(e) = conn.run(&mut ws) {
        log::debug!("connection ended: {e}");
    }
}

/// Ends a connection whose close frame is written: sends FIN, then reads
/// and discards what the client still sends until it closes or `deadline`.
/// Closing a socket with unread input makes the kernel send a reset, which
/// can destroy the close frame before the client reads it (for example
/// after an oversized frame the client is still sending).
fn linger_close(tcp: &TcpStream, deadline: Instant) {
    let _ = tcp.shutdown(std::net::Shutdown::Write);
    let mut scratch = [0u8; 4096];
    let mut reader = tcp;
    loop {
        match reader.read(&mut scratch) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return;
                }
                let timeout = Timespec {
                    tv_sec: left.as_secs() as i64,
                    tv_nsec: i64::from(left.subsec_nanos()),
                };
                let fd = tcp.as_fd();
                let mut fds = [PollFd::new(&fd, PollFlags::IN)];
                if poll(&mut fds, Some(&timeout)).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

struct Connection<'a> {
    outbox: &'a Arc<Outbox>,
    /// The pipeline's handle on this connection, writing into `outbox`.
    client: Arc<dyn Client>,
    pipeline: &'a Pipeline,
    limits: Limits,
    /// Frames taken from the outbox and not yet encoded (a replay in front of them).
    taken: VecDeque<Frame>,
    /// The replay being expanded, chunk by chunk, ahead of `taken`.
    replay: Option<Replay>,
    /// Tokens of the replay being expanded, fetched a chunk at a time.
    scratch: Vec<Token>,
    /// False after a read found the socket empty, until poll reports input:
    /// a token wake-up then costs no useless `recv`.
    readable: bool,
    chat_budget: Option<ChatBudget>,
    /// Set once a close frame is queued; the connection ends when it is written.
    closing_since: Option<Instant>,
    /// Ids of the most recent requests this connection chatted or resumed.
    requests: VecDeque<String>,
    keepalive: Keepalive,
    /// `Socket::sent` when the last write blocked.
    blocked_at: Option<u64>,
}

impl Drop for Connection<'_> {
    /// Detaches this connection's requests however the loop ended, a panic
    /// included: a generation nobody follows any more must be aborted
    /// after its grace, not streamed for ever.
    fn drop(&mut self) {
        self.pipeline
            .connection_closed(self.requests.make_contiguous());
    }
}

impl Connection<'_> {
    /// This is the main loop of a connection: write what is queued, read
    /// what arrived, then sleep until either side has more.
    fn run(&mut self, ws: &mut WebSocket<Socket>) -> io::Result<()> {
        loop {
            match self.keepalive.due(Instant::now()) {
                Due::Nothing => {}
                // Nothing may follow a close frame.
                Due::Ping if self.closing_since.is_some() => {}
                Due::Ping => frame::encode_ping(&mut ws.get_mut().pending),
                Due::Dead => {
                    self.close_dead(ws);
                    return Ok(());
                }
            }
            let write_blocked = self.write_out(ws)?;
            let sent = ws.get_ref().sent;
            if self.blocked_at.is_some_and(|at| sent > at) {
                self.keepalive.heard(Instant::now());
            }
            self.blocked_at = write_blocked.then_some(sent);
            if let Some(since) = self.closing_since {
                if !write_blocked {
                    linger_close(&ws.get_ref().tcp, since + CLOSE_GRACE);
                    return Ok(());
                }
                if since.elapsed() > CLOSE_GRACE {
                    let _ = ws.get_ref().tcp.shutdown(std::net::Shutdown::Both);
                    return Ok(());
                }
            }
            let may_read = self.closing_since.is_none() && !self.backlogged(ws);
            if may_read && self.readable && !self.read_in(ws)? {
                return Ok(());
            }
            let local_work = self.replay.is_some() || !self.taken.is_empty();
            let socket_idle = !write_blocked && self.closing_since.is_none();
            let parked = !local_work && self.outbox.park_if_empty(socket_idle);
            if !parked && !write_blocked {
                continue;
            }
            let mut socket_events = PollFlags::empty();
            if may_read {
                socket_events |= PollFlags::IN;
            }
            if write_blocked {
                socket_events |= PollFlags::OUT;
            }
            let tcp = ws.get_ref().tcp.as_fd();
            let mut fds = [
                PollFd::new(&tcp, socket_events),
                PollFd::from_borrowed_fd(self.outbox.waker_fd(), PollFlags::IN),
            ];
            let closing = self.closing_since.map(|_| Duration::from_millis(100));
            let keepalive = self
                .keepalive
                .next_wakeup()
                .map(|at| at.saturating_duration_since(Instant::now()));
            let timeout = match (closing, keepalive) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
            .map(|d| Timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: i64::from(d.subsec_nanos()),
            });
            match poll(&mut fds, timeout.as_ref()) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
            let (socket_ready, woken) = (fds[0].revents(), fds[1].revents());
            self.outbox.unpark(woken.contains(PollFlags::IN));
            if socket_ready.intersects(PollFlags::IN | PollFlags::HUP | PollFlags::RDHUP) {
                self.readable = true;
                ws.get_mut().input_drained = false;
            }
            if socket_ready.intersects(PollFlags::ERR | PollFlags::NVAL) {
                return Ok(());
            }
        }
    }

    /// Gives up a peer that answered no ping: a close frame if the socket
    /// takes it, then both directions shut at once (a dead peer would only
    /// make a lingering close wait).
    fn close_dead(&mut self, ws: &mut WebSocket<Socket>) {
        log::debug!(
            "closing a WebSocket that stayed silent {:?} after a ping",
            self.limits.pong_timeout
        );
        let socket = ws.get_mut();
        frame::encode_close(&mut socket.pending, close::GOING_AWAY, "ping timeout");
        let _ = socket.drain();
        let _ = socket.tcp.shutdown(std::net::Shutdown::Both);
    }

    /// Encodes queued frames and writes them. Returns true when the socket
    /// would block with bytes still pending. What stays unwritten is
    /// reported to the outbox: it counts against the connection's byte bound.
    fn write_out(&mut self, ws: &mut WebSocket<Socket>) -> io::Result<bool> {
        let blocked = self.encode_and_write(ws);
        let socket = ws.get_ref();
        let taken: usize = self.taken.iter().map(Frame::encoded_len).sum();
        self.outbox
            .set_unwritten(socket.pending.len() - socket.written + taken);
        blocked
    }

    fn encode_and_write(&mut self, ws: &mut WebSocket<Socket>) -> io::Result<bool> {
        match ws.flush() {
            Ok(()) => {}
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) => return Err(io::Error::other(e)),
        }
        loop {
            let socket = ws.get_mut();
            if !socket.drain()? {
                return Ok(true);
            }
            if self.closing_since.is_some() {
                return Ok(false);
            }
            if let Some(replay) = &mut self.replay {
                let done = replay.expand_into(
                    frame::encode_text,
                    &mut socket.pending,
                    CHUNK_BYTES,
                    REPLAY_CHUNK,
                    &mut self.scratch,
                );
                if done {
                    self.replay = None;
                }
                continue;
            }
            if self.taken.is_empty() {
                self.outbox.take_some(&mut self.taken, BATCH, CHUNK_BYTES);
                if self.taken.is_empty() {
                    return Ok(false);
                }
            }
            while let Some(f) = self.taken.pop_front() {
                // The same encoding a producer writing straight through uses.
                if f.encode_into(frame::encode_text, &mut socket.pending) {
                    continue;
                }
                match f {
                    // A WebSocket's answers have no end of their own.
                    Frame::Token { .. } | Frame::Message(_) | Frame::Encoded(_) | Frame::End => {}
                    Frame::Replay(replay) => {
                        self.replay = Some(replay);
                        break;
                    }
                    Frame::Close(code, reason) => {
                        frame::encode_close(&mut socket.pending, code, reason);
                        self.closing_since = Some(Instant::now());
                        break;
                    }
                }
            }
        }
    }

    /// True while enough output waits that reading more requests would only
    /// queue more answers: a client that sends without reading is then held
    /// back by TCP instead of growing our buffers.
    fn backlogged(&self, ws: &WebSocket<Socket>) -> bool {
        ws.get_ref().pending.len() >= READ_PAUSE_BYTES
            || self.outbox.queued_bytes() >= READ_PAUSE_BYTES
            || self.outbox.len() >= self.limits.outbox_frames
    }

    /// Reads and handles client frames until the socket is empty or output
    /// backs up. Returns false when the peer closed.
    fn read_in(&mut self, ws: &mut WebSocket<Socket>) -> io::Result<bool> {
        loop {
            if self.backlogged(ws) {
                // More may be buffered: read it once the output drains.
                return Ok(true);
            }
            match ws.read() {
                Ok(message) => {
                    self.keepalive.heard(Instant::now());
                    self.handle(message);
                }
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return Ok(true);
                }
                Err(WsError::Capacity(e)) => {
                    // Too big to skip safely: close with 1009 as the protocol says.
                    log::debug!("closing a connection that sent an oversized frame: {e}");
                    let _ = self
                        .outbox
                        .push(Frame::Close(close::TOO_BIG, "message too big"));
                    return Ok(true);
                }
                Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => return Ok(false),
                Err(WsError::Utf8(e)) => {
                    // RFC 6455 §7.4.1: 1007 for data inconsistent with its type.
                    log::debug!("closing a connection that sent invalid UTF-8: {e}");
                    let _ = self
                        .outbox
                        .push(Frame::Close(close::INVALID_DATA, "invalid UTF-8"));
                    return Ok(true);
                }
                Err(WsError::Io(e)) => return Err(e),
                Err(e) => {
                    log::debug!("WebSocket protocol error: {e}");
                    let _ = self
                        .outbox
                        .push(Frame::Close(close::PROTOCOL_ERROR, "protocol error"));
                    return Ok(true);
                }
            }
        }
    }

    fn handle(&mut self, message: Message) {
        let text = match message {
            Message::Text(text) => text,
            Message::Binary(bytes) if bytes.len() > self.limits.max_message_bytes => {
                let message = format!(
                    "the frame has {} bytes, the limit is {}",
                    bytes.len(),
                    self.limits.max_message_bytes
                );
                return self.reply_error(None, None, ErrorCode::TooLarge, &message);
            }
            Message::Binary(_) => {
                return self.reply_error(
                    None,
                    None,
                    ErrorCode::BadRequest,
                    "binary frames are not supported; send JSON text",
                );
            }
            // tungstenite answers pings and close frames itself.
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => return,
        };
        #[cfg(test)]
        if text.as_str() == PANIC_FRAME {
            panic!("a connection thread panics on purpose (test)");
        }
        if text.len() > self.limits.max_message_bytes {
            let message = format!(
                "the frame has {} bytes, the limit is {}",
                text.len(),
                self.limits.max_message_bytes
            );
            return self.reply_error(None, None, ErrorCode::TooLarge, &message);
        }
        let limits = FrameLimits {
            max_message_chars: self.limits.max_message_chars,
        };
        match protocol::parse_client_frame(text.as_str(), limits) {
            Err(e) => self.reply_error(None, e.id.as_deref(), e.code, &e.message),
            Ok(ClientFrame::Chat(chat)) => {
                let id = chat.id.clone();
                if let Some(budget) = &mut self.chat_budget {
                    if !budget.try_take(Instant::now()) {
                        let message = format!(
                            "more than {} chats per minute on this connection; wait a little",
                            self.limits.max_chats_per_minute
                        );
                        return self.reply(
                            None,
                            Some(&id),
                            &Failure::new(ErrorCode::RateLimited, message),
                        );
                    }
                }
                match self.pipeline.submit(&self.client, chat) {
                    Ok(request) => self.remember(request),
                    Err(f) => self.reply(None, Some(&id), &f),
                }
            }
            Ok(ClientFrame::Cancel { request }) => {
                if let Err(f) = self.pipeline.cancel(&request) {
                    self.reply(Some(&request), None, &f);
                }
            }
            Ok(ClientFrame::Resume { request, from }) => {
                match self.pipeline.resume(&self.client, &request, from) {
                    Ok(()) => self.remember(request),
                    Err(f) => self.reply(Some(&request), None, &f),
                }
            }
            Ok(ClientFrame::History {
                conversation,
                limit,
                before,
            }) => match self.history(&conversation, limit, before) {
                Ok(frame) => {
                    let _ = self.outbox.push(Frame::Message(frame));
                }
                Err(f) => self.reply(None, None, &f),
            },
        }
    }

    /// Keeps the ids of this connection's recent requests, for the
    /// pipeline when the connection closes.
    fn remember(&mut self, request: String) {
        if self.requests.len() == RECENT_REQUESTS {
            self.requests.pop_front();
        }
        self.requests.push_back(request);
    }

    fn reply_error(&self, request: Option<&str>, id: Option<&str>, code: ErrorCode, message: &str) {
        self.reply(request, id, &Failure::new(code, message));
    }

    fn reply(&self, request: Option<&str>, id: Option<&str>, failure: &Failure) {
        let _ = self
            .outbox
            .push(Frame::Message(encode::error(request, id, failure)));
    }

    /// The `history` answer for a conversation: up to `limit` messages
    /// before `before`, newest first as far as they fit in
    /// `history.max_answer_bytes` and in what this connection's outbox
    /// still admits.
    fn history(
        &self,
        conversation: &str,
        limit: usize,
        before: Option<u64>,
    ) -> Result<Vec<u8>, Failure> {
        let max_bytes = self
            .pipeline
            .history_max_answer_bytes()
            .min(self.outbox.room());
        if max_bytes < history_page::MIN_ANSWER_BYTES {
            return Err(Failure::new(
                ErrorCode::SlowConsumer,
                "the connection is not reading what it was already sent; read, then ask again",
            ));
        }
        let history = self.pipeline.stored_history(conversation);
        history_page::history_answer(history, conversation, limit, before, max_bytes)
            .map_err(|e| pipeline::history_failure(&e))?
            .ok_or_else(|| Failure::new(ErrorCode::NotFound, "no such conversation"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn chat_budget_bursts_then_refills() {
        let t0 = Instant::now();
        let mut b = ChatBudget::new(60, t0).unwrap();
        assert!((0..60).all(|_| b.try_take(t0)));
        assert!(!b.try_take(t0));
        // One chat per second comes back.
        assert!(b.try_take(t0 + Duration::from_secs(1)));
        assert!(!b.try_take(t0 + Duration::from_secs(1)));
        // Never more than a minute's worth.
        let later = t0 + Duration::from_secs(3600);
        assert!((0..60).all(|_| b.try_take(later)));
        assert!(!b.try_take(later));
        assert!(ChatBudget::new(0, t0).is_none());
    }
}
