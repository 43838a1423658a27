//! A scripted [`Reply`] written out as one response, framed as the
//! server's [`Connections`] mode calls for, and the waits a response makes
//! (a delay between events, a stall, the end of a connection). Only
//! connection threads run this; each writes to its own socket and reads
//! the shared state only to see whether the server has stopped.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::wire::{head, Framing};
use super::{Reply, Shared, POLL};

/// How long a stalled stream stays open when the client never leaves.
const STALL_LIMIT: Duration = Duration::from_secs(60);
/// How long a finished connection waits for the client to close first.
const LINGER: Duration = Duration::from_secs(2);

/// How a response ended when it did not complete.
pub(super) enum End {
    /// The client went away before the response was fully sent.
    Abandoned,
    /// The [`Upstream`] was dropped; nobody is counting any more.
    Stopped,
}

/// How a response went out.
pub(super) enum Sent {
    /// Complete: the connection may carry another request.
    Whole,
    /// Cut short on purpose (a reset or a stall): the connection ends.
    Cut,
}

/// Writes one response in the framing the server's [`Connections`] mode
/// calls for.
pub(super) struct Out<'a> {
    pub(super) stream: &'a mut TcpStream,
    pub(super) shared: &'a Shared,
}

impl Out<'_> {
    /// Whether event streams are chunked (and responses keep the
    /// connection) rather than read to the close.
    fn chunked(&self) -> bool {
        !self.shared.connections.closes()
    }

    /// The head of a 200 event stream.
    fn open_stream(&mut self) -> Result<(), End> {
        let framing = if self.chunked() {
            Framing::Chunked
        } else {
            Framing::ToClose
        };
        let close = !self.chunked();
        send(
            self.stream,
            head(200, "text/event-stream", framing, "", close).as_bytes(),
        )
    }

    /// One server-sent event carrying `value`; in a chunked stream, in a
    /// chunk of its own.
    fn event(&mut self, value: &Value) -> Result<(), End> {
        self.data(format!("data: {value}\n\n").as_bytes())
    }

    /// Stream bytes, as one chunk when chunked.
    fn data(&mut self, bytes: &[u8]) -> Result<(), End> {
        if self.chunked() {
            let mut framed = format!("{:x}\r\n", bytes.len()).into_bytes();
            framed.extend_from_slice(bytes);
            framed.extend_from_slice(b"\r\n");
            send(self.stream, &framed)
        } else {
            send(self.stream, bytes)
        }
    }

    /// The end of a complete stream: the last chunk when chunked (a stream
    /// read to the close ends with the close).
    fn close_stream(&mut self) -> Result<(), End> {
        if self.chunked() {
            send(self.stream, b"0\r\n\r\n")
        } else {
            Ok(())
        }
    }

    /// A whole response with a `Content-Length`.
    fn whole(
        &mut self,
        status: u16,
        content_type: &str,
        body: &str,
        extra: &str,
    ) -> Result<(), End> {
        let close = !self.chunked();
        let head = head(
            status,
            content_type,
            Framing::Length(body.len()),
            extra,
            close,
        );
        send(self.stream, format!("{head}{body}").as_bytes())
    }

    /// One content chunk per token, each after `delay`.
    fn tokens(&mut self, tokens: &[String], delay: Duration) -> Result<(), End> {
        for token in tokens {
            pause(delay, self.shared)?;
            self.event(&chunk(json!({"content": token}), Value::Null))?;
        }
        Ok(())
    }
}

pub(super) fn respond(out: &mut Out<'_>, reply: Reply) -> Result<Sent, End> {
    match reply {
        Reply::Stream {
            tokens,
            delay,
            finish,
            usage,
        } => {
            out.open_stream()?;
            out.tokens(&tokens, delay)?;
            out.event(&chunk(json!({}), json!(finish)))?;
            if let Some((prompt, completion)) = usage {
                let usage = json!({
                    "id": "chatcmpl-test",
                    "object": "chat.completion.chunk",
                    "choices": [],
                    "usage": {
                        "prompt_tokens": prompt,
                        "completion_tokens": completion,
                        "total_tokens": prompt + completion,
                    },
                });
                out.event(&usage)?;
            }
            out.data(b"data: [DONE]\n\n")?;
            out.close_stream()?;
            Ok(Sent::Whole)
        }
        Reply::Error {
            status,
            message,
            retry_after,
        } => {
            let body = json!({"error": {"message": message, "type": "test_error"}}).to_string();
            let extra = retry_after
                .map(|seconds| format!("Retry-After: {seconds}\r\n"))
                .unwrap_or_default();
            out.whole(status, "application/json", &body, &extra)?;
            Ok(Sent::Whole)
        }
        Reply::ResetAfter { tokens, delay } => {
            out.open_stream()?;
            out.tokens(&tokens, delay)?;
            // The connection is dropped mid-stream (no last chunk when
            // chunked). A plain close (FIN) rather than SO_LINGER 0 (std
            // cannot set it): the client still gets every token it was
            // sent, then an end without `[DONE]`.
            Ok(Sent::Cut)
        }
        Reply::StallAfter { tokens } => {
            out.open_stream()?;
            out.tokens(&tokens, Duration::ZERO)?;
            stall(out.stream, out.shared)?;
            Ok(Sent::Cut)
        }
        Reply::Events {
            events,
            delay,
            finish,
        } => {
            out.open_stream()?;
            for value in events {
                pause(delay, out.shared)?;
                let chunk = if value.get("choices").is_some() {
                    value
                } else {
                    chunk(value, Value::Null)
                };
                out.event(&chunk)?;
            }
            out.event(&chunk(json!({}), json!(finish)))?;
            out.data(b"data: [DONE]\n\n")?;
            out.close_stream()?;
            Ok(Sent::Whole)
        }
        Reply::Json { status, body } => {
            out.whole(status, "application/json", &body.to_string(), "")?;
            Ok(Sent::Whole)
        }
    }
}

/// A `chat.completion.chunk` whose only choice carries `delta`.
fn chunk(delta: Value, finish_reason: Value) -> Value {
    json!({
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    })
}

/// Keeps the socket open and silent until the client leaves, the server
/// stops, or [`STALL_LIMIT`] passes.
fn stall(stream: &mut TcpStream, shared: &Shared) -> Result<(), End> {
    // Only a read tells a silent server that the client left: a short read
    // timeout turns the blocking read into a poll.
    stream
        .set_read_timeout(Some(POLL))
        .map_err(|_| End::Abandoned)?;
    let deadline = Instant::now() + STALL_LIMIT;
    let mut scratch = [0u8; 1024];
    while Instant::now() < deadline {
        if shared.is_stopped() {
            return Err(End::Stopped);
        }
        match stream.read(&mut scratch) {
            // End of input. HTTP clients do not half-close while they wait
            // for a response, so this is the client closing the socket.
            Ok(0) => return Err(End::Abandoned),
            // More bytes from the client are not a goodbye.
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => return Err(End::Abandoned),
        }
    }
    Ok(())
}

/// Sleeps `delay` in short steps so a dropped [`Upstream`] ends the stream
/// promptly.
fn pause(delay: Duration, shared: &Shared) -> Result<(), End> {
    let deadline = Instant::now() + delay;
    loop {
        if shared.is_stopped() {
            return Err(End::Stopped);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(());
        }
        std::thread::sleep((deadline - now).min(POLL));
    }
}

/// Writes `bytes` at once; any failure (EPIPE, ECONNRESET, a send timeout)
/// means the client is no longer reading.
pub(super) fn send(stream: &mut TcpStream, bytes: &[u8]) -> Result<(), End> {
    stream
        .write_all(bytes)
        .and_then(|()| stream.flush())
        .map_err(|_| End::Abandoned)
}

/// Ends a complete response: FIN first, then wait (bounded) for the client
/// to close its side. Closing a socket with unread input sends a reset,
/// which may destroy response bytes the client has not read yet; draining
/// first makes the end of every complete response an orderly EOF.
pub(super) fn close_gracefully(stream: &mut TcpStream, shared: &Shared) {
    if stream.shutdown(Shutdown::Write).is_err() || stream.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER;
    let mut scratch = [0u8; 1024];
    while Instant::now() < deadline && !shared.is_stopped() {
        match stream.read(&mut scratch) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}
