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

use super::api;
use super::http::{self, Request};
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

/// A plain HTTP answer (one that ends the connection), as [`route`] picks it.
enum Answer {
    Health,
    Metrics,
    Stats,
    /// A file of the page, its path already checked.
    Static(String),
    NotFound,
    /// 405, with the methods the path does take.
    MethodNotAllowed(&'static str),
    /// 421: the `Host` is not one this server answers for.
    HostNotAllowed,
}

/// Answers `req`: the one place where a method and path pick what answers
/// them. A route that keeps the socket (the WebSocket upgrade; later
/// families such as a streaming HTTP API go beside it) takes it and returns
/// `None`; every other route is a plain [`Answer`], and the socket comes
/// back for its lingering close.
fn route(tcp: TcpStream, req: Request, shared: &Arc<Shared>) -> Option<TcpStream> {
    // Before anything else, so a rebinding page learns nothing, not even 404.
    if !shared.hosts.allows(req.header("host")) {
        return plain(tcp, &req, Answer::HostNotAllowed, shared);
    }
    let answer = match (req.method.as_str(), req.path.as_str()) {
        #[cfg(test)]
        (_, PANIC_PATH) => panic!("a connection thread panics on purpose (test)"),
        ("GET", "/ws") => return upgrade(tcp, req, shared),
        // The OpenAI-compatible API keeps the connection for later requests.
        (_, path) if path.starts_with("/v1/") => return api::serve(tcp, req, shared),
        ("GET" | "HEAD", "/healthz") => Answer::Health,
        ("GET" | "HEAD", "/metrics") => Answer::Metrics,
        ("GET" | "HEAD", "/api/stats") => Answer::Stats,
        ("GET" | "HEAD", "/") => Answer::Static("index.html".to_owned()),
        ("GET" | "HEAD", path) if path.starts_with("/static/") => {
            match path
                .strip_prefix("/static/")
                .and_then(static_files::safe_relative_path)
            {
                Some(file) => Answer::Static(file),
                None => Answer::NotFound,
            }
        }
        // Known paths asked with another method.
        (_, "/ws") => Answer::MethodNotAllowed("GET"),
        (_, "/healthz" | "/metrics" | "/api/stats" | "/") => Answer::MethodNotAllowed("GET, HEAD"),
        (_, path) if path.starts_with("/static/") => Answer::MethodNotAllowed("GET, HEAD"),
        _ => Answer::NotFound,
    };
    plain(tcp, &req, answer, shared)
}

/// Writes `answer` (only its head for `HEAD`) and gives the socket back.
fn plain(mut tcp: TcpStream, req: &Request, answer: Answer, shared: &Shared) -> Option<TcpStream> {
    let written = if req.method == "HEAD" {
        self::answer(&mut http::HeadOnly::new(&mut tcp), answer, shared)
    } else {
        self::answer(&mut tcp, answer, shared)
    };
    if let Err(e) = written {
        log::debug!("HTTP answer failed: {e}");
    }
    Some(tcp)
}

/// Writes `answer` to `out` (the socket, or its head-only view for `HEAD`).
fn answer(out: &mut impl io::Write, answer: Answer, shared: &Shared) -> io::Result<()> {
    match answer {
        Answer::Health => {
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
        Answer::Metrics => {
            shared.pipeline.stages();
            let body = shared.metrics.render();
            http::respond(out, 200, Metrics::content_type(), &[], body.as_bytes())
        }
        Answer::Stats => {
            let body = stats_json(shared).to_string();
            http::respond(out, 200, "application/json", &[], body.as_bytes())
        }
        Answer::Static(file) => serve_static(out, &shared.static_files, &file),
        Answer::NotFound => http::respond_error(out, 404, "not found"),
        Answer::MethodNotAllowed(allow) => http::respond(
            out,
            405,
            "application/json",
            &[("Allow", allow)],
            br#"{"error":"method not allowed"}"#,
        ),
        Answer::HostNotAllowed => {
            http::respond_error(out, 421, "host not allowed (see server.allowed_hosts)")
        }
    }
}
