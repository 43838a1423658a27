//! Writing one HTTP response from its outbox while watching the
//! connection: what the pipeline queued (or a producer could not finish
//! writing straight through) goes out as the socket takes it, a replay is
//! expanded a chunk at a time, and the response is over at its
//! [`Frame::End`]. Input that arrives meanwhile is kept (a pipelined next
//! request, up to a bound); a peer that closes is a client gone.
//!
//! Threads: runs on the HTTP connection's own thread, the outbox's only
//! consumer.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;

use rustix::event::{poll, PollFd, PollFlags};

use super::client::chunked;
use crate::outbox::{Frame, Outbox, Replay};

/// Frames taken from the outbox per round.
const BATCH: usize = 512;
/// Bytes taken (or expanded from a replay) per round.
const CHUNK_BYTES: usize = 64 * 1024;
/// Replayed tokens fetched per round.
const REPLAY_CHUNK: u64 = 256;

/// How a response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Written whole; the connection may serve its next request.
    Answered,
    /// The peer closed or the socket failed: the client is gone.
    ClientGone,
}

/// Writes the response queued in `outbox` to `tcp` (non-blocking, attached
/// to the outbox) until its end. Bytes the client sends meanwhile are
/// appended to `input`, up to `max_input` bytes; past that the socket is
/// no longer read until the response is over.
pub fn write_response(
    tcp: &TcpStream,
    outbox: &Outbox,
    input: &mut Vec<u8>,
    max_input: usize,
) -> Ended {
    let mut pending: Vec<u8> = Vec::new();
    let mut written = 0;
    let mut taken: VecDeque<Frame> = VecDeque::new();
    let mut replay: Option<Replay> = None;
    let mut scratch = Vec::new();
    let mut ended = false;
    loop {
        // Write what there is, refilling from the outbox, until the socket
        // blocks or there is nothing left.
        loop {
            while written < pending.len() {
                match (&*tcp).write(&pending[written..]) {
                    Ok(0) => return Ended::ClientGone,
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Ended::ClientGone,
                }
            }
            if written < pending.len() {
                break;
            }
            pending.clear();
            written = 0;
            if ended {
                return Ended::Answered;
            }
            if let Some(r) = &mut replay {
                if r.expand_into(
                    chunked,
                    &mut pending,
                    CHUNK_BYTES,
                    REPLAY_CHUNK,
                    &mut scratch,
                ) {
                    replay = None;
                }
                continue;
            }
            if taken.is_empty() {
                outbox.take_some(&mut taken, BATCH, CHUNK_BYTES);
                if taken.is_empty() {
                    break;
                }
            }
            while let Some(f) = taken.pop_front() {
                if f.encode_into(chunked, &mut pending) {
                    continue;
                }
                match f {
                    Frame::Replay(r) => {
                        replay = Some(r);
                        break;
                    }
                    Frame::End | Frame::Close(..) => {
                        ended = true;
                        taken.clear();
                        break;
                    }
                    Frame::Token { .. } | Frame::Message(_) | Frame::Encoded(_) => {}
                }
            }
        }
        let blocked = written < pending.len();
        let queued: usize = taken.iter().map(Frame::encoded_len).sum();
        outbox.set_unwritten(pending.len() - written + queued);
        let local_work = replay.is_some() || !taken.is_empty() || ended;
        let parked = !local_work && outbox.park_if_empty(!blocked);
        if !parked && !blocked {
            continue;
        }
        let reading = input.len() < max_input;
        let mut events = PollFlags::empty();
        if reading {
            events |= PollFlags::IN;
        }
        if blocked {
            events |= PollFlags::OUT;
        }
        let fd = tcp.as_fd();
        let mut fds = [
            PollFd::new(&fd, events),
            PollFd::from_borrowed_fd(outbox.waker_fd(), PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => return Ended::ClientGone,
        }
        let (socket, woken) = (fds[0].revents(), fds[1].revents());
        if parked {
            outbox.unpark(woken.contains(PollFlags::IN));
        }
        if socket.intersects(PollFlags::ERR | PollFlags::NVAL) {
            return Ended::ClientGone;
        }
        if reading && socket.intersects(PollFlags::IN | PollFlags::HUP | PollFlags::RDHUP) {
            let mut buf = [0u8; 4096];
            let room = (max_input - input.len()).min(buf.len());
            match (&*tcp).read(&mut buf[..room]) {
                Ok(0) => return Ended::ClientGone,
                Ok(n) => input.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => return Ended::ClientGone,
            }
        }
    }
}
