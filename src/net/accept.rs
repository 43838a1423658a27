//! The accept thread: it only accepts and spawns, refuses what it must
//! with a plain HTTP answer, and goes on when descriptors run out.
//!
//! Threads: [`accept_loop`] runs on the one `chorus-accept` thread; the
//! [`ThreadSlot`] it takes for each socket moves into the connection thread
//! it starts.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};

use super::descriptors::{self, Spare};
use super::route::handle_connection;
use super::Shared;

/// Connection threads allowed beyond `max_connections`, for plain HTTP
/// requests and handshakes in progress.
const PRE_UPGRADE_SLACK: usize = 256;
/// What the accept thread answers when no connection thread may start.
const BUSY_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 32\r\nConnection: close\r\n\r\n{\"error\":\"too many connections\"}";
/// What a connection accepted into the spare descriptor's slot gets.
const NO_DESCRIPTORS_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 46\r\nConnection: close\r\n\r\n{\"error\":\"the server is out of file descriptors\"}";
/// Longest the accept thread waits on one such connection, per step.
const SPARE_LINGER: Duration = Duration::from_millis(50);
/// Longest pause of accepting while descriptors are short and the spare is gone.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Sockets refused with a 503 by the accept thread, kept open briefly while
/// their request is read and dropped: closing a socket with unread input
/// makes the kernel send a reset that can destroy the answer in flight.
struct Refused {
    sockets: std::collections::VecDeque<(TcpStream, Instant)>,
}

impl Refused {
    const MAX: usize = 64;
    const LINGER: Duration = Duration::from_secs(1);

    fn add(&mut self, mut tcp: TcpStream) {
        // Best effort on a fresh socket; the accept thread never waits.
        let _ = std::io::Write::write(&mut tcp, BUSY_RESPONSE);
        let _ = tcp.shutdown(std::net::Shutdown::Write);
        if self.sockets.len() == Self::MAX {
            self.sockets.pop_front();
        }
        self.sockets.push_back((tcp, Instant::now() + Self::LINGER));
    }

    /// Drains what the refused clients sent; closes those that are done or out of time.
    fn sweep(&mut self) {
        let now = Instant::now();
        let mut scratch = [0u8; 1024];
        self.sockets.retain_mut(|(tcp, deadline)| loop {
            match std::io::Read::read(tcp, &mut scratch) {
                Ok(0) => return false,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return now < *deadline,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        });
    }
}

/// Accepts until `shared.stopping` is set and the waker fires.
pub(super) fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, waker: &OwnedFd) {
    let stack = shared.config.server.connection_stack_kib * 1024;
    let listener_fd = listener.as_fd();
    let mut refused = Refused {
        sockets: std::collections::VecDeque::new(),
    };
    let mut spare = Spare::reserve();
    // Set while descriptors are short and the spare is gone: accepting
    // pauses (the listener stays out of the poll) instead of spinning.
    let mut backoff: Option<Duration> = None;
    loop {
        refused.sweep();
        spare.restore();
        // Wake up now and then only while refused sockets linger or
        // accepting is paused.
        let tick = Duration::from_millis(50);
        let wait = match (backoff, refused.sockets.is_empty()) {
            (Some(pause), true) => Some(pause),
            (Some(pause), false) => Some(pause.min(tick)),
            (None, false) => Some(tick),
            (None, true) => None,
        };
        let timeout = wait.map(|d| Timespec {
            tv_sec: d.as_secs() as i64,
            tv_nsec: i64::from(d.subsec_nanos()),
        });
        let polled = if backoff.is_some() {
            poll(&mut [PollFd::new(waker, PollFlags::IN)], timeout.as_ref())
        } else {
            let mut fds = [
                PollFd::new(&listener_fd, PollFlags::IN),
                PollFd::new(waker, PollFlags::IN),
            ];
            poll(&mut fds, timeout.as_ref())
        };
        if let Err(e) = polled {
            if e != rustix::io::Errno::INTR {
                log::error!("accept poll failed: {e}");
                return;
            }
        }
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        let paused = backoff.take();
        loop {
            match listener.accept() {
                Ok((tcp, _)) => {
                    shared.exhaustion.accepted();
                    // WebSockets are capped by `max_connections` at the
                    // handshake; this caps the threads still reading an HTTP
                    // head, so a flood of idle sockets cannot exhaust threads.
                    let Some(slot) = ThreadSlot::take(shared) else {
                        if tcp.set_nonblocking(true).is_ok() {
                            refused.add(tcp);
                        }
                        continue;
                    };
                    // The slot moves into the thread; if the thread never
                    // starts, dropping the closure gives it back.
                    let spawned = std::thread::Builder::new()
                        .name("chorus-conn".into())
                        .stack_size(stack)
                        .spawn(move || {
                            handle_connection(tcp, &slot.shared);
                            drop(slot);
                        });
                    if let Err(e) = spawned {
                        log::warn!("cannot start a connection thread: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if descriptors::is_exhaustion(&e) => {
                    // The kernel looks for a free descriptor before it looks
                    // at the queue, so this does not say anyone is waiting.
                    if spare.release() {
                        let waiting = listener.accept();
                        let answered = waiting.is_ok();
                        if let Ok((tcp, _)) = waiting {
                            shared.exhaustion.refused(&e);
                            refuse_without_descriptors(tcp);
                        }
                        spare.restore();
                        if answered {
                            continue;
                        }
                        break;
                    }
                    shared.exhaustion.refused(&e);
                    backoff = Some(paused.map_or(Duration::from_millis(10), |p| {
                        (p * 2).min(MAX_ACCEPT_BACKOFF)
                    }));
                    break;
                }
                Err(e) => {
                    // Out of memory or buffers and similar: pause briefly
                    // instead of spinning. Debug level: a real shortage
                    // shows in the log lines of its causes.
                    log::debug!("accept failed: {e}");
                    backoff = Some(Duration::from_millis(10));
                    break;
                }
            }
        }
    }
}

/// Answers a socket accepted into the spare descriptor's slot with a 503,
/// then lingers briefly so that the client's unread request does not turn
/// the close into a reset. Runs on the accept thread, so every wait is
/// short ([`SPARE_LINGER`]).
fn refuse_without_descriptors(mut tcp: TcpStream) {
    let mut scratch = [0u8; 4096];
    let ready = tcp.set_nonblocking(false).is_ok()
        && tcp.set_read_timeout(Some(SPARE_LINGER)).is_ok()
        && tcp.set_write_timeout(Some(SPARE_LINGER)).is_ok();
    if !ready {
        return;
    }
    // The request head, if it is already there.
    let _ = std::io::Read::read(&mut tcp, &mut scratch);
    let _ = std::io::Write::write_all(&mut tcp, NO_DESCRIPTORS_RESPONSE);
    let _ = tcp.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + SPARE_LINGER;
    while Instant::now() < deadline {
        match std::io::Read::read(&mut tcp, &mut scratch) {
            Ok(n) if n > 0 => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            _ => return,
        }
    }
}

/// A connection thread counted in `connection_threads`; dropping it gives
/// the count back, also when the thread panics or never starts.
struct ThreadSlot {
    shared: Arc<Shared>,
}

impl ThreadSlot {
    /// Counts one more connection thread, unless `max_connections` +
    /// [`PRE_UPGRADE_SLACK`] are already running.
    fn take(shared: &Arc<Shared>) -> Option<ThreadSlot> {
        // Count first, then check: two racing takers cannot both get the last one.
        let running = shared.connection_threads.fetch_add(1, Ordering::AcqRel);
        if running >= shared.config.server.max_connections + PRE_UPGRADE_SLACK {
            shared.connection_threads.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ThreadSlot {
            shared: shared.clone(),
        })
    }
}

impl Drop for ThreadSlot {
    fn drop(&mut self) {
        self.shared
            .connection_threads
            .fetch_sub(1, Ordering::AcqRel);
    }
}
