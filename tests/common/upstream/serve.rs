//! The server's threads: the accept loop, which runs on the one accept
//! thread (`upstream-accept`), and the loop of one connection, which runs
//! on a thread of its own per connection (`upstream-conn`): read a request,
//! record it, send its reply, then keep or close the connection as the
//! [`Connections`] mode says.

use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::respond::{close_gracefully, respond, send, End, Out, Sent};
use super::wire::{head, read_request, BadRequest, Conn, Framing};
use super::{Connections, Shared, KEPT_WAIT, POLL};

/// How long a client may take to send its request (and a send may block),
/// so a misbehaving client cannot pin a connection thread for ever.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        if shared.is_stopped() {
            return;
        }
        match accepted {
            Ok((stream, _)) => {
                shared.count_connection();
                let shared = Arc::clone(&shared);
                // When no thread can be spawned the closure, and with it the
                // socket, is dropped: the client sees the connection close.
                let _ = std::thread::Builder::new()
                    .name("upstream-conn".into())
                    .spawn(move || serve(stream, &shared));
            }
            // E.g. out of file descriptors: transient, try again shortly.
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// One connection: a request, its response, then whatever
/// [`Connections`] says (close, or the next request on it).
fn serve(stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let mut conn = Conn {
        stream,
        buf: Vec::new(),
    };
    loop {
        let request = match read_request(&mut conn) {
            Ok(request) => request,
            Err(BadRequest::Gone) => return,
            Err(BadRequest::Malformed(why)) => {
                // Whatever the mode: after bytes that are not HTTP there is
                // no telling where a next request would start.
                let body = json!({"error": {"message": why, "type": "bad_request"}}).to_string();
                let head = head(
                    400,
                    "application/json",
                    Framing::Length(body.len()),
                    "",
                    true,
                );
                if send(&mut conn.stream, format!("{head}{body}").as_bytes()).is_ok() {
                    close_gracefully(&mut conn.stream, shared);
                }
                return;
            }
        };
        let last = request
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let reply = shared.record(request);
        if !shared.wait_released() {
            return;
        }
        let mut out = Out {
            stream: &mut conn.stream,
            shared,
        };
        match respond(&mut out, reply) {
            Ok(Sent::Whole) => {}
            // The reply itself ends the connection: drop the socket.
            Ok(Sent::Cut) | Err(End::Stopped) => return,
            Err(End::Abandoned) => {
                shared.count_disconnect();
                return;
            }
        }
        match shared.connections {
            Connections::Close => {
                close_gracefully(&mut conn.stream, shared);
                return;
            }
            Connections::KeepAlive if last => {
                close_gracefully(&mut conn.stream, shared);
                return;
            }
            Connections::KeepAlive => {
                if !next_request_arrives(&mut conn, shared) {
                    return;
                }
            }
            // Returning drops (closes) the socket; the client has sent
            // nothing since its request, so the close is a plain FIN.
            Connections::CloseAfterResponse => return,
            Connections::CloseOnNextRequest => {
                // Whether a request came, the client closed or the wait
                // ran out, the socket is closed unread: with a request in
                // it, the close is a reset.
                let _ = next_request_arrives(&mut conn, shared);
                return;
            }
        }
    }
}

/// Waits on a kept connection until the client's next request starts
/// arriving (true), or the client closes, the server stops or
/// [`KEPT_WAIT`] passes (false). Reads nothing: the request stays for
/// [`read_request`].
fn next_request_arrives(conn: &mut Conn, shared: &Shared) -> bool {
    if !conn.buf.is_empty() {
        return true;
    }
    if conn.stream.set_read_timeout(Some(POLL)).is_err() {
        return false;
    }
    let deadline = Instant::now() + KEPT_WAIT;
    let mut probe = [0u8; 1];
    let arrived = loop {
        if shared.is_stopped() || Instant::now() >= deadline {
            break false;
        }
        match conn.stream.peek(&mut probe) {
            Ok(0) => break false,
            Ok(_) => break true,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => break false,
        }
    };
    arrived && conn.stream.set_read_timeout(Some(IO_TIMEOUT)).is_ok()
}
