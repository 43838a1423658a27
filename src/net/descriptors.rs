//! Running out of file descriptors without dropping clients on the floor.
//!
//! When the process hits its open-file limit, `accept(2)` fails with
//! `EMFILE` and the connection stays in the kernel's backlog, where the
//! client sees nothing, then a timeout or an EOF. So the accept thread keeps
//! one [`Spare`] descriptor (`/dev/null`) open: on `EMFILE` it closes the
//! spare, accepts the waiting connection into the freed slot, answers it
//! `503`, closes it and opens the spare again. A handshake that gets its
//! socket but not its outbox's eventfd is answered `503` by its connection
//! thread the same way.
//!
//! [`Exhaustion`] keeps the log readable while that lasts: one warning when
//! it starts, at most one per [`Exhaustion::EVERY`] while it goes on (with
//! the number of refusals), and one line when connections are accepted
//! again.
//!
//! [`raise_limit`] runs once at start.
//!
//! Threads: the accept thread owns the [`Spare`]; the [`Exhaustion`] is
//! shared by the accept thread and every connection thread.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// True for the errors that mean "no descriptor left" (this process's
/// limit or the system's).
pub fn is_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Each WebSocket holds two descriptors (its socket and its eventfd), and
/// the usual soft limit of 1024 would stop a default server at a few hundred
/// connections. Raises the soft limit to the hard one, as far as it goes,
/// and says so when even that is too low for `max_connections`. (Only a
/// low *hard* limit makes a server run out; the tests use that.)
pub fn raise_limit(max_connections: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            log::warn!("cannot raise the open-file limit: {e}");
        }
    }
    let needed = (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(64);
    if let Some(current) = getrlimit(Resource::Nofile).current {
        if current < needed {
            log::warn!(
                "the open-file limit ({current}) allows fewer than server.max_connections = \
                 {max_connections} WebSockets (each needs 2 descriptors); raise `ulimit -n`"
            );
        }
    }
}

/// One descriptor held in reserve; see the module docs.
#[derive(Debug)]
pub struct Spare {
    file: Option<File>,
}

impl Spare {
    /// Opens the spare (`/dev/null`). If even that fails, the spare is
    /// missing until [`Spare::restore`] manages to open it.
    pub fn reserve() -> Spare {
        Spare {
            file: File::open("/dev/null").ok(),
        }
    }

    /// Whether the spare descriptor is open.
    #[cfg(test)]
    pub fn is_held(&self) -> bool {
        self.file.is_some()
    }

    /// Closes the spare; true when there was one to close.
    pub fn release(&mut self) -> bool {
        self.file.take().is_some()
    }

    /// Opens the spare again if it is not open (it may fail while other
    /// threads hold every descriptor; the next call tries again).
    pub fn restore(&mut self) {
        if self.file.is_none() {
            self.file = File::open("/dev/null").ok();
        }
    }
}

/// The rate-limited warning about refusing connections for lack of
/// descriptors; see the module docs. Any thread may call it; a refusal
/// takes a short lock, an accept while nothing is refused only an atomic
/// load.
#[derive(Debug, Default)]
pub struct Exhaustion {
    /// Set while refusing; read without the lock on every accept.
    active: AtomicBool,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Kept across outages, so that a limit hit on and off still logs at
    /// most one warning per period.
    last_warning: Option<Instant>,
    refused_since_warning: u64,
    /// Refusals in the current outage.
    refused_total: u64,
    /// Whether the current outage was warned about; only then is its end logged.
    warned: bool,
}

impl Exhaustion {
    /// Fewest seconds between two warnings while descriptors stay short.
    pub const EVERY: Duration = Duration::from_secs(10);

    /// Records one connection refused for lack of descriptors (`error`
    /// says which call failed). Logs a warning when the outage starts and
    /// then at most once per [`Exhaustion::EVERY`].
    pub fn refused(&self, error: &io::Error) {
        self.active.store(true, Ordering::Release);
        let mut s = self.state.lock();
        s.refused_since_warning += 1;
        s.refused_total += 1;
        let now = Instant::now();
        let due = s
            .last_warning
            .is_none_or(|at| now.duration_since(at) >= Self::EVERY);
        if due {
            log::warn!(
                "out of file descriptors ({error}): answering new connections with 503 \
                 ({} refused since the last warning); raise `ulimit -n` or lower \
                 server.max_connections",
                s.refused_since_warning
            );
            s.last_warning = Some(now);
            s.refused_since_warning = 0;
            s.warned = true;
        }
    }

    /// Records a connection accepted normally: ends an outage, with one log line.
    pub fn accepted(&self) {
        if !self.active.load(Ordering::Acquire) {
            return;
        }
        let mut s = self.state.lock();
        if self.active.swap(false, Ordering::AcqRel) {
            if s.warned {
                log::info!(
                    "file descriptors available again; {} connections were refused",
                    s.refused_total
                );
            }
            s.refused_total = 0;
            s.warned = false;
        }
    }

    /// Whether connections are being refused right now.
    #[cfg(test)]
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_released_spare_frees_exactly_one_descriptor() {
        let mut spare = Spare::reserve();
        assert!(spare.is_held());
        assert!(spare.release());
        assert!(!spare.is_held());
        assert!(!spare.release());
        spare.restore();
        spare.restore();
        assert!(spare.is_held());
    }

    #[test]
    fn exhaustion_errors_are_recognised() {
        assert!(is_exhaustion(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(is_exhaustion(&io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(!is_exhaustion(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
        assert!(!is_exhaustion(&io::ErrorKind::WouldBlock.into()));
    }

    #[test]
    fn an_outage_starts_and_ends_once() {
        let e = Exhaustion::default();
        assert!(!e.is_active());
        e.accepted();
        let err = io::Error::from_raw_os_error(libc::EMFILE);
        for _ in 0..100 {
            e.refused(&err);
        }
        assert!(e.is_active());
        {
            let s = e.state.lock();
            assert_eq!(s.refused_total, 100);
            // One warning at the start; the other 99 wait for the next one.
            assert_eq!(s.refused_since_warning, 99);
        }
        e.accepted();
        assert!(!e.is_active());
        assert_eq!(e.state.lock().refused_total, 0);
        // A new outage within the period is counted but not warned about again.
        e.refused(&err);
        assert_eq!(e.state.lock().refused_since_warning, 100);
        assert!(!e.state.lock().warned);
    }

    #[test]
    fn stress_many_threads_refuse_and_recover() {
        let e = std::sync::Arc::new(Exhaustion::default());
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let e = e.clone();
                std::thread::spawn(move || {
                    let err = io::Error::from_raw_os_error(libc::EMFILE);
                    for n in 0..2_000 {
                        if (n + i) % 3 == 0 {
                            e.accepted();
                        } else {
                            e.refused(&err);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        e.accepted();
        assert!(!e.is_active());
        let s = e.state.lock();
        assert_eq!(s.refused_total, 0);
        assert!(!s.warned);
    }
}
