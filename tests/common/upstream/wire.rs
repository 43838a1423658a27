//! HTTP/1.1 on the socket: reading one request (its head, and a body
//! framed by `Content-Length` or chunked) from bytes that may arrive split
//! anywhere, and the head of a response. Only connection threads run
//! this, each on its own socket.

use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use serde_json::Value;

use super::Recorded;

/// Longest request head accepted; anything longer is answered with a 400.
const MAX_HEAD: usize = 64 * 1024;
/// Largest request body accepted; chat prompts in tests are far smaller.
const MAX_BODY: usize = 16 << 20;

/// Why no request could be read.
pub(super) enum BadRequest {
    /// The client closed, reset or timed out: nobody to answer.
    Gone,
    /// The bytes are not an HTTP/1.x request; answered with a 400.
    Malformed(&'static str),
}

impl From<io::Error> for BadRequest {
    fn from(_: io::Error) -> Self {
        BadRequest::Gone
    }
}

/// How the end of a response body is found.
pub(super) enum Framing {
    /// `Content-Length: N`.
    Length(usize),
    /// `Transfer-Encoding: chunked`, ended by the last (empty) chunk.
    Chunked,
    /// Neither: the body runs until the socket closes.
    ToClose,
}

/// A response head, with `Connection: close` when `close`.
pub(super) fn head(
    status: u16,
    content_type: &str,
    framing: Framing,
    extra: &str,
    close: bool,
) -> String {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\n",
        reason(status)
    );
    match framing {
        Framing::Length(n) => head.push_str(&format!("Content-Length: {n}\r\n")),
        Framing::Chunked => {
            head.push_str("Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n")
        }
        Framing::ToClose => head.push_str("Cache-Control: no-cache\r\n"),
    }
    head.push_str(extra);
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    head
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        529 => "Overloaded",
        _ => "Unknown",
    }
}

/// Reads one request: the head up to the blank line, then a body framed by
/// `Content-Length` or chunked transfer coding.
pub(super) fn read_request(conn: &mut Conn) -> Result<Recorded, BadRequest> {
    let raw = conn.take_until(b"\r\n\r\n", MAX_HEAD)?;
    let at = Instant::now();
    let text = String::from_utf8_lossy(&raw[..raw.len() - 4]).into_owned();
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, path) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(method), Some(path), Some(version), None)
            if !method.is_empty() && !path.is_empty() && version.starts_with("HTTP/1.") =>
        {
            (method.to_owned(), path.to_owned())
        }
        _ => return Err(BadRequest::Malformed("bad request line")),
    };
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or(BadRequest::Malformed("header line without a colon"))?;
        if name.is_empty() || name.contains(|c: char| c.is_ascii_whitespace()) {
            return Err(BadRequest::Malformed("bad header name"));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    let header = |wanted: &str| {
        headers
            .iter()
            .find(|(name, _)| name == wanted)
            .map(|(_, value)| value.as_str())
    };
    if header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        conn.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let chunked =
        header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        read_chunked(conn)?
    } else if let Some(length) = header("content-length") {
        let length: usize = length
            .parse()
            .map_err(|_| BadRequest::Malformed("bad Content-Length"))?;
        if length > MAX_BODY {
            return Err(BadRequest::Malformed("body too large"));
        }
        conn.take(length)?
    } else {
        Vec::new()
    };
    Ok(Recorded {
        method,
        path,
        headers,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        at,
    })
}

/// A chunked request body, decoded; trailers are read and ignored.
fn read_chunked(conn: &mut Conn) -> Result<Vec<u8>, BadRequest> {
    let mut body = Vec::new();
    loop {
        let line = conn.take_until(b"\r\n", 1024)?;
        let line = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
        let size = line.split(';').next().unwrap_or_default().trim();
        let size =
            usize::from_str_radix(size, 16).map_err(|_| BadRequest::Malformed("bad chunk size"))?;
        if size == 0 {
            while conn.take_until(b"\r\n", MAX_HEAD)?.len() > 2 {}
            return Ok(body);
        }
        if body.len() + size > MAX_BODY {
            return Err(BadRequest::Malformed("body too large"));
        }
        body.extend_from_slice(&conn.take(size)?);
        if conn.take(2)? != b"\r\n" {
            return Err(BadRequest::Malformed("chunk without its CRLF"));
        }
    }
}

/// A socket plus the bytes read from it but not consumed yet: the head may
/// arrive together with (part of) the body, or split anywhere.
pub(super) struct Conn {
    pub(super) stream: TcpStream,
    pub(super) buf: Vec<u8>,
}

impl Conn {
    /// Reads whatever arrives next into `buf`; end of stream is `Gone`.
    fn fill(&mut self) -> Result<(), BadRequest> {
        let mut chunk = [0u8; 8192];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(BadRequest::Gone),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err(BadRequest::Gone),
            }
        }
    }

    /// Everything up to and including the first `delim`, at most `limit`
    /// bytes before it.
    fn take_until(&mut self, delim: &[u8], limit: usize) -> Result<Vec<u8>, BadRequest> {
        let mut from = 0;
        loop {
            if let Some(i) = self.buf[from..]
                .windows(delim.len())
                .position(|window| window == delim)
            {
                let end = from + i + delim.len();
                return Ok(self.buf.drain(..end).collect());
            }
            if self.buf.len() > limit {
                return Err(BadRequest::Malformed("request head too long"));
            }
            // The delimiter may straddle what is here and what comes next.
            from = self.buf.len().saturating_sub(delim.len() - 1);
            self.fill()?;
        }
    }

    /// Exactly `n` bytes.
    fn take(&mut self, n: usize) -> Result<Vec<u8>, BadRequest> {
        while self.buf.len() < n {
            self.fill()?;
        }
        Ok(self.buf.drain(..n).collect())
    }
}
