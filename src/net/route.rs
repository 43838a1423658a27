//! What a connection thread does with its one request: reads the head,
//! picks the answer, and either writes a plain HTTP answer and closes with
//! a linger, or hands the socket to the WebSocket upgrade.
//!
//! Threads: runs on the connection thread the accept thread started for
//! the socket.

use std::io;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::http;
use super::static_files::{self, serve_static};
use super::stats::stats_json;
use super::upgrade::upgrade;
use super::Shared;
use crate::metrics::Metrics;

/// How long a client may take to send its whole HTTP request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// A plain HTTP request for this path makes its connection thread panic
/// (unit tests only: the thread must give back all it holds).
#[cfg(test)]
pub(crate) const PANIC_PATH: &str = "/test/panic";

/// The connection thread's whole life for a socket that never becomes a
/// WebSocket, and its start for one that does.
pub(super) fn handle_connection(mut tcp: TcpStream, shared: &Arc<Shared>) {
    // The listener is non-blocking and accepted sockets inherit nothing on
    // Linux, but be explicit: the head is read with blocking reads and a timeout.
    if tcp.set_nonblocking(false).is_err() {
        return;
    }
    let answered = match http::read_request(&mut tcp, HEAD_TIMEOUT) {
        Ok(request) => match route(tcp, request, shared) {
            Some(tcp) => tcp,
            None => return,
        },
        Err(http::HttpError::Closed) => return,
        Err(http::HttpError::TooLarge) => {
            let _ = http::respond_error(&mut tcp, 413, "request head too large");
            tcp
        }
        Err(e) => {
            let _ = http::respond_error(&mut tcp, 400, &e.to_string());
            tcp
        }
    };
    http::linger_close(&answered);
}

/// Answers `req`. Gives the socket back when it got a plain HTTP answer
/// (to be closed with a linger), `None` once it was a WebSocket.
fn route(mut tcp: TcpStream, req: http::Request, shared: &Arc<Shared>) -> Option<TcpStream> {
    let host_allowed = shared.hosts.allows(req.header("host"));
    if req.path == "/ws" && req.method == "GET" && host_allowed {
        return upgrade(tcp, req, shared);
    }
    let written = if req.method == "HEAD" {
        plain(
            &mut http::HeadOnly::new(&mut tcp),
            &req,
            host_allowed,
            shared,
        )
    } else {
        plain(&mut tcp, &req, host_allowed, shared)
    };
    if let Err(e) = written {
        log::debug!("HTTP answer failed: {e}");
    }
    Some(tcp)
}

/// Every answer that is not a WebSocket, written to `out` (the socket, or
/// its head-only view for `HEAD`).
fn plain(
    out: &mut impl std::io::Write,
    req: &http::Request,
    host_allowed: bool,
    shared: &Shared,
) -> io::Result<()> {
    if !host_allowed {
        return http::respond_error(out, 421, "host not allowed (see server.allowed_hosts)");
    }
    let path = req.path.as_str();
    #[cfg(test)]
    if path == PANIC_PATH {
        panic!("a connection thread panics on purpose (test)");
    }
    let known = path == "/"
        || path == "/ws"
        || path == "/healthz"
        || path == "/metrics"
        || path == "/api/stats"
        || path.starts_with("/static/");
    if !known {
        return http::respond_error(out, 404, "not found");
    }
    let allowed = req.method == "GET" || (req.method == "HEAD" && path != "/ws");
    if !allowed {
        return http::respond(
            out,
            405,
            "application/json",
            &[("Allow", if path == "/ws" { "GET" } else { "GET, HEAD" })],
            br#"{"error":"method not allowed"}"#,
        );
    }
    answer(out, path, shared)
}

/// The plain HTTP endpoints, written to `out` (the socket, or its
/// head-only view for `HEAD`).
fn answer(out: &mut impl std::io::Write, path: &str, shared: &Shared) -> io::Result<()> {
    match path {
        "/healthz" => {
            let (status, body) = if shared.draining.load(Ordering::Acquire) {
                (503, serde_json::json!({"status": "draining"}))
            } else {
                (
                    200,
                    serde_json::json!({
                        "status": "ok",
                        "version": env!("CARGO_PKG_VERSION"),
                        "uptime_s": shared.started_at.elapsed().as_secs(),
                    }),
                )
            };
            http::respond(
                out,
                status,
                "application/json",
                &[],
                body.to_string().as_bytes(),
            )
        }
        "/metrics" => {
            shared.pipeline.stages();
            let body = shared.metrics.render();
            http::respond(out, 200, Metrics::content_type(), &[], body.as_bytes())
        }
        "/api/stats" => {
            let body = stats_json(shared).to_string();
            http::respond(out, 200, "application/json", &[], body.as_bytes())
        }
        "/" => serve_static(out, &shared.static_files, "index.html"),
        _ => match path
            .strip_prefix("/static/")
            .and_then(static_files::safe_relative_path)
        {
            Some(file) => serve_static(out, &shared.static_files, &file),
            None => http::respond_error(out, 404, "not found"),
        },
    }
}
