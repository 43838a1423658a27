//! The accept side of the single port: everything between a TCP connection
//! and the WebSocket loop of [`crate::ws`].
//!
//! A connection goes through, in order:
//! - `accept`: the accept thread takes it off the listener and starts its
//!   connection thread (or refuses it with a 503 when threads or
//!   descriptors run out, [`descriptors`]);
//! - [`http`]: the connection thread reads the request head;
//! - `route`: every request's `Host` is checked (`crate::authority`),
//!   then its method and path pick the answer: a plain HTTP answer
//!   (`/healthz`, `/metrics`, `/api/stats` from `stats`, the page from
//!   `static_files`), closed with a lingering close, or an upgrade;
//! - `upgrade`: the WebSocket handshake, then [`crate::ws::serve`] runs the
//!   connection on the same thread until it closes.
//!
//! Data flows one way: this module calls into `ws` and the pipeline and
//! nothing below calls back. The server ([`crate::server`]) builds
//! `Shared`, binds with `bind`, starts an `AcceptThread` and, at
//! shutdown, stops it and closes the WebSockets that are left.
//!
//! Threads: the one `chorus-accept` thread and the connection threads read
//! `Shared`; the thread that shuts the server down writes its flags.
//! Everything a connection thread counts or registers is held by a drop
//! guard (`ThreadSlot`, `ConnectionSlot`, `Registration`), so a thread that
//! panics gives it all back.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use parking_lot::Mutex;
use rustix::event::{eventfd, EventfdFlags};
use socket2::{Domain, Socket, Type};

mod accept;
mod api;
pub mod descriptors;
pub mod http;
mod route;
pub(crate) mod static_files;
mod stats;
mod upgrade;

#[cfg(test)]
pub(crate) use route::PANIC_PATH;

use crate::authority::HostPolicy;
use crate::config::Config;
use crate::history::History;
use crate::metrics::Metrics;
use crate::outbox::{Frame, Outbox};
use crate::pipeline::Pipeline;
use descriptors::Exhaustion;
use static_files::StaticFiles;

/// State shared by the accept thread and every connection thread.
pub(crate) struct Shared {
    pub(crate) config: Arc<Config>,
    pub(crate) pipeline: Pipeline,
    pub(crate) history: History,
    metrics: Arc<Metrics>,
    static_files: StaticFiles,
    /// The `Host` values answered.
    hosts: HostPolicy,
    /// The warning about refusing connections for lack of descriptors.
    exhaustion: Exhaustion,
    /// Open WebSocket connections by id, so shutdown can close them.
    connections: Mutex<HashMap<u64, Arc<Outbox>>>,
    /// Open WebSocket and HTTP API connections, against `max_connections`.
    open_connections: AtomicUsize,
    /// Connection threads alive (plain HTTP and WebSocket).
    connection_threads: AtomicUsize,
    next_connection: AtomicU64,
    draining: AtomicBool,
    /// Set once shutdown stops the accept thread: a handshake that
    /// completes after that closes its WebSocket at once.
    stopping: AtomicBool,
    started_at: Instant,
}

impl Shared {
    /// The state for a server listening on `local_addr` (which the default
    /// `Host` policy allows).
    pub(crate) fn new(
        config: Arc<Config>,
        pipeline: Pipeline,
        history: History,
        metrics: Arc<Metrics>,
        local_addr: SocketAddr,
    ) -> Shared {
        Shared {
            static_files: StaticFiles::from_config(&config.server.static_dir),
            hosts: HostPolicy::new(&config.server.allowed_hosts, local_addr),
            config,
            pipeline,
            history,
            metrics,
            exhaustion: Exhaustion::default(),
            connections: Mutex::new(HashMap::new()),
            open_connections: AtomicUsize::new(0),
            connection_threads: AtomicUsize::new(0),
            next_connection: AtomicU64::new(1),
            draining: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            started_at: Instant::now(),
        }
    }

    /// From now on `/healthz` says `draining` and handshakes get 503. False
    /// when the drain had already begun.
    pub(crate) fn begin_drain(&self) -> bool {
        !self.draining.swap(true, Ordering::AcqRel)
    }

    /// Closes every open WebSocket with 1001 and waits up to `wait` for
    /// their threads to flush the close and end.
    pub(crate) fn close_websockets(&self, wait: Duration) {
        let outboxes: Vec<Arc<Outbox>> = self.connections.lock().values().cloned().collect();
        for outbox in outboxes {
            let _ = outbox.push(Frame::Close(
                crate::ws::close::GOING_AWAY,
                "server shutting down",
            ));
        }
        let deadline = Instant::now() + wait;
        // WebSockets only: a kept-alive HTTP connection waiting for its
        // next request has nothing to flush.
        while !self.connections.lock().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// What the server's unit tests read of the connection bookkeeping.
#[cfg(test)]
impl Shared {
    pub(crate) fn connection_threads(&self) -> usize {
        self.connection_threads.load(Ordering::Acquire)
    }

    pub(crate) fn websockets(&self) -> usize {
        self.open_connections.load(Ordering::Acquire)
    }

    pub(crate) fn registered_websockets(&self) -> usize {
        self.connections.lock().len()
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// Binds `addr` with a listen backlog of `backlog`, non-blocking for the
/// accept thread's poll.
pub(crate) fn bind(addr: &str, backlog: i32) -> io::Result<TcpListener> {
    let parsed: SocketAddr = addr
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let socket = Socket::new(Domain::for_address(parsed), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&parsed.into())?;
    // std fixes the backlog at 128; a burst of browsers needs more.
    socket.listen(backlog)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// The accept thread. It sleeps in `poll(2)` on the listener and an
/// eventfd, so stopping it is an explicit wake-up, not a connection to
/// ourselves.
pub(crate) struct AcceptThread {
    shared: Arc<Shared>,
    waker: Arc<OwnedFd>,
    thread: JoinHandle<()>,
    /// Held until [`AcceptThread::open`]: the thread accepts nothing before,
    /// so the server can finish starting (or give up) first.
    gate: Option<Sender<()>>,
}

impl AcceptThread {
    /// Starts the thread for `listener`; it accepts once [`Self::open`]
    /// is called.
    pub(crate) fn start(listener: TcpListener, shared: &Arc<Shared>) -> io::Result<AcceptThread> {
        let waker = Arc::new(
            eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC).map_err(io::Error::from)?,
        );
        let (gate, opened) = crossbeam_channel::bounded::<()>(1);
        let thread = {
            let (shared, waker) = (shared.clone(), waker.clone());
            std::thread::Builder::new()
                .name("chorus-accept".into())
                .spawn(move || {
                    // A dropped gate: stopped before it was opened.
                    if opened.recv().is_ok() {
                        accept::accept_loop(&listener, &shared, &waker);
                    }
                })?
        };
        Ok(AcceptThread {
            shared: shared.clone(),
            waker,
            thread,
            gate: Some(gate),
        })
    }

    /// Lets the thread accept.
    pub(crate) fn open(&mut self) {
        if let Some(gate) = self.gate.take() {
            let _ = gate.send(());
        }
    }

    /// Stops accepting and waits for the thread; the listener closes with
    /// it. Connection threads already started go on.
    pub(crate) fn stop(mut self) {
        self.gate.take();
        self.shared.stopping.store(true, Ordering::Release);
        let _ = rustix::io::write(&*self.waker, &1u64.to_ne_bytes());
        crate::threads::join(self.thread, "accept");
    }
}
