//! The WebSocket upgrade: checks the handshake (version, token, `Origin`,
//! drain, the connection limit), answers 101, registers the connection so
//! shutdown can close it, and runs it ([`crate::ws::serve`]) until it ends.
//!
//! Threads: runs on the connection thread that read the request head; the
//! connection's [`Registration`] is also read by the thread that shuts the
//! server down.

use std::io;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::descriptors;
use super::http::{self, Request};
use super::Shared;
use crate::authority;
use crate::outbox::{Frame, Outbox};
use crate::ws::{self, Limits};

/// Logs a failed refusal and gives the socket back for its lingering close.
fn refusal_written(tcp: TcpStream, written: io::Result<()>) -> Option<TcpStream> {
    if let Err(e) = written {
        log::debug!("HTTP answer failed: {e}");
    }
    Some(tcp)
}

/// The WebSocket handshake and, once it succeeds, the connection's whole
/// life. Gives the socket back when it refused the handshake.
pub(super) fn upgrade(mut tcp: TcpStream, req: Request, shared: &Arc<Shared>) -> Option<TcpStream> {
    let server = &shared.config.server;
    let key = req.header("sec-websocket-key").map(str::to_owned);
    let is_upgrade = req.header_has_token("upgrade", "websocket")
        && req.header_has_token("connection", "upgrade")
        && req.header("sec-websocket-version") == Some("13");
    let Some(key) = key.filter(|_| is_upgrade) else {
        let written = http::respond(
            &mut tcp,
            426,
            "application/json",
            &[("Sec-WebSocket-Version", "13")],
            br#"{"error":"this endpoint speaks WebSocket (version 13)"}"#,
        );
        return refusal_written(tcp, written);
    };
    if !http::authorized(&req, &server.auth_tokens) {
        let written = http::respond(
            &mut tcp,
            401,
            "application/json",
            &[("WWW-Authenticate", "Bearer")],
            br#"{"error":"a valid token is required"}"#,
        );
        return refusal_written(tcp, written);
    }
    if !authority::origin_allowed(
        req.header("origin"),
        req.header("host"),
        &server.allowed_origins,
    ) {
        let written = http::respond_error(&mut tcp, 403, "origin not allowed");
        return refusal_written(tcp, written);
    }
    if shared.draining.load(Ordering::Acquire) {
        let written = http::respond_error(&mut tcp, 503, "the server is shutting down");
        return refusal_written(tcp, written);
    }
    let Some(slot) = ConnectionSlot::take(shared) else {
        let written = http::respond_error(&mut tcp, 503, "too many connections");
        return refusal_written(tcp, written);
    };
    let outbox = match ws::outbox(server.outbox_frames, server.outbox_bytes) {
        Ok(outbox) => Arc::new(outbox),
        Err(e) => {
            if descriptors::is_exhaustion(&e) {
                shared.exhaustion.refused(&e);
            } else {
                log::warn!("cannot create a connection's outbox: {e}");
            }
            drop(slot);
            let written = http::respond_error(&mut tcp, 503, "the server is out of resources");
            return refusal_written(tcp, written);
        }
    };
    let ready = tcp.set_read_timeout(None).and_then(|()| {
        if server.send_buffer_bytes > 0 {
            socket2::SockRef::from(&tcp).set_send_buffer_size(server.send_buffer_bytes)?;
        }
        std::io::Write::write_all(&mut tcp, upgrade_response(&key).as_bytes())
    });
    if let Err(e) = ready {
        log::debug!("the handshake failed: {e}");
        return None;
    }
    let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
    let registration = Registration::new(shared, id, outbox.clone());
    if shared.stopping.load(Ordering::Acquire) {
        // Upgraded after shutdown closed the others: close this one too.
        let _ = outbox.push(Frame::Close(
            crate::ws::close::GOING_AWAY,
            "server shutting down",
        ));
    }
    let limits = Limits {
        max_message_bytes: server.ws_max_message_bytes,
        max_message_chars: server.max_message_chars,
        outbox_frames: server.outbox_frames,
        max_chats_per_minute: server.max_chats_per_minute,
        ping_interval: (server.ping_interval_ms > 0)
            .then(|| Duration::from_millis(server.ping_interval_ms)),
        pong_timeout: Duration::from_millis(server.pong_timeout_ms),
    };
    ws::serve(tcp, req.leftover, &outbox, &shared.pipeline, limits);
    drop(registration);
    drop(slot);
    None
}

/// A WebSocket slot of `max_connections`, given back however the
/// connection ends.
pub(super) struct ConnectionSlot<'a> {
    shared: &'a Shared,
}

impl<'a> ConnectionSlot<'a> {
    pub(super) fn take(shared: &'a Shared) -> Option<ConnectionSlot<'a>> {
        let max = shared.config.server.max_connections;
        if shared.open_connections.fetch_add(1, Ordering::AcqRel) >= max {
            shared.open_connections.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ConnectionSlot { shared })
    }
}

impl Drop for ConnectionSlot<'_> {
    fn drop(&mut self) {
        self.shared.open_connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An open WebSocket as the server knows it: its entry in the connection
/// map (so shutdown can close it) and the connections gauge. Dropping it,
/// also while unwinding from a panic, closes the outbox (producers stop
/// queueing for it) and removes both.
struct Registration<'a> {
    shared: &'a Shared,
    id: u64,
    outbox: Arc<Outbox>,
}

impl<'a> Registration<'a> {
    fn new(shared: &'a Shared, id: u64, outbox: Arc<Outbox>) -> Registration<'a> {
        shared.connections.lock().insert(id, outbox.clone());
        shared.metrics.connections.inc();
        Registration { shared, id, outbox }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.outbox.close();
        self.shared.connections.lock().remove(&self.id);
        self.shared.metrics.connections.dec();
    }
}

/// The 101 answer that completes a WebSocket handshake.
fn upgrade_response(key: &str) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        tungstenite::handshake::derive_accept_key(key.as_bytes())
    )
}
