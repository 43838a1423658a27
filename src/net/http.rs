//! HTTP/1.1 on the single port: reading a request head with httparse,
//! writing answers (also head-only ones for `HEAD`), the lingering close,
//! and the bearer-token check. Which `Host` and `Origin` may reach the
//! server is `crate::authority`'s job; which answer a request gets is
//! `route`'s.
//!
//! Threads: runs on the connection thread that accepted the socket, before
//! the connection becomes a WebSocket (or instead of it). Every answer
//! closes the connection (`Connection: close`): the endpoints are cheap, and
//! one request per connection keeps the thread's life simple. The close
//! lingers ([`linger_close`]) so that unread input cannot turn it into a
//! reset.

use std::borrow::Cow;
use std::io::{self, Read, Write};
use std::net::TcpStream;

/// Largest request head accepted; a real browser's is a few hundred bytes.
const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 48;

/// Why a request could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The socket failed or timed out.
    #[error("reading the request failed: {0}")]
    Io(#[from] io::Error),
    /// The bytes were not an HTTP/1.x request head.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The head exceeded 16 KiB.
    #[error("request head too large")]
    TooLarge,
    /// The peer closed before sending a full head.
    #[error("connection closed before a full request")]
    Closed,
}

/// A parsed request head.
#[derive(Debug, Clone)]
pub struct Request {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path without the query.
    pub path: String,
    /// The query string without `?`, if any.
    pub query: Option<String>,
    /// Headers with lower-case names.
    pub headers: Vec<(String, String)>,
    /// Bytes read past the head (the start of WebSocket frames).
    pub leftover: Vec<u8>,
}

impl Request {
    /// The first header named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// True when a comma-separated header contains `token`, case-insensitively.
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The value of query parameter `name`, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query.as_deref()?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then(|| percent_decode(v).into_owned())
        })
    }
}

/// Reads one request head from a blocking socket. The whole head must
/// arrive within `timeout`, however slowly it trickles in.
pub fn read_request(
    tcp: &mut TcpStream,
    timeout: std::time::Duration,
) -> Result<Request, HttpError> {
    let deadline = std::time::Instant::now() + timeout;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(HttpError::Io(io::ErrorKind::TimedOut.into()));
        }
        tcp.set_read_timeout(Some(left))?;
        let n = tcp.read(&mut chunk)?;
        if n == 0 {
            return Err(HttpError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(request) = parse_head(&buf)? {
            return Ok(request);
        }
    }
}

/// Parses a request head from the bytes read so far: `None` while it is
/// incomplete and still within the 16 KiB bound. Bytes past the head are
/// kept in [`Request::leftover`].
pub fn parse_head(buf: &[u8]) -> Result<Option<Request>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            let target = req.path.unwrap_or("/");
            let (path, query) = match target.split_once('?') {
                Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
                None => (target.to_owned(), None),
            };
            let headers = req
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            Ok(Some(Request {
                method: req.method.unwrap_or("").to_owned(),
                path,
                query,
                headers,
                leftover: buf[len..].to_vec(),
            }))
        }
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => Ok(None),
        Ok(httparse::Status::Partial) => Err(HttpError::TooLarge),
        Err(e) => Err(HttpError::Malformed(e.to_string())),
    }
}

/// Writes a complete response and asks the client to close.
pub fn respond(
    tcp: &mut impl Write,
    status: u16,
    content_type: &str,
    extra_headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n",
        reason(status),
        body.len()
    );
    for (name, value) in extra_headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    tcp.write_all(&out)?;
    tcp.flush()
}

/// A JSON error body `{"error": "..."}` with `status`.
pub fn respond_error(tcp: &mut impl Write, status: u16, message: &str) -> io::Result<()> {
    let body = serde_json::json!({ "error": message }).to_string();
    respond(tcp, status, "application/json", &[], body.as_bytes())
}

fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        421 => "Misdirected Request",
        426 => "Upgrade Required",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// How long a closing HTTP connection waits for the client to stop sending.
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);
/// Most bytes read and discarded while lingering.
const LINGER_BYTES: usize = 1 << 20;

/// Ends a connection whose answer is written: sends FIN, then reads and
/// discards what the client still sends (a body never read, pipelined
/// requests, the rest of an oversized head) until it closes, up to
/// 1 MiB and 2 s. Closing a socket with unread input makes
/// the kernel send a reset, which can destroy the answer before the client
/// reads it.
pub fn linger_close(tcp: &TcpStream) {
    let _ = tcp.shutdown(std::net::Shutdown::Write);
    let deadline = std::time::Instant::now() + LINGER;
    let mut scratch = [0u8; 4096];
    let mut left = LINGER_BYTES;
    let mut reader = tcp;
    while left > 0 {
        let wait = deadline.saturating_duration_since(std::time::Instant::now());
        if wait.is_zero() || tcp.set_read_timeout(Some(wait)).is_err() {
            return;
        }
        match reader.read(&mut scratch) {
            Ok(0) => return,
            Ok(n) => left = left.saturating_sub(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// A writer that passes an HTTP response's head and drops its body: how a
/// `HEAD` request is answered with exactly the headers `GET` would get.
pub struct HeadOnly<W> {
    inner: W,
    /// How much of the blank line ending the head has been seen.
    matched: usize,
}

impl<W: Write> HeadOnly<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> HeadOnly<W> {
        HeadOnly { inner, matched: 0 }
    }
}

impl<W: Write> Write for HeadOnly<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        const END: &[u8] = b"\r\n\r\n";
        if self.matched == END.len() {
            return Ok(buf.len());
        }
        let mut head = buf.len();
        for (i, &b) in buf.iter().enumerate() {
            self.matched = if b == END[self.matched] {
                self.matched + 1
            } else {
                usize::from(b == END[0])
            };
            if self.matched == END.len() {
                head = i + 1;
                break;
            }
        }
        self.inner.write_all(&buf[..head])?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Percent-decodes `s` (invalid escapes are kept literally).
pub fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') && !s.contains('+') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// Whether the request carries one of `tokens` (empty: no auth configured),
/// as `Authorization: Bearer <t>` or `?token=<t>`.
pub fn authorized(req: &Request, tokens: &[String]) -> bool {
    if tokens.is_empty() {
        return true;
    }
    // The scheme name is case-insensitive (RFC 9110 §11.1).
    let bearer = req
        .header("authorization")
        .and_then(|v| v.trim().split_once([' ', '\t']))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().to_owned());
    let query = req.query_param("token");
    [bearer, query].into_iter().flatten().any(|given| {
        tokens
            .iter()
            .any(|t| constant_time_eq(t.as_bytes(), given.as_bytes()))
    })
}

/// Compares secrets without an early exit that would leak their prefix length.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_only_keeps_the_head_and_drops_the_body() {
        let mut out = Vec::new();
        respond(
            &mut HeadOnly::new(&mut out),
            200,
            "text/plain",
            &[],
            b"body\r\n\r\nmore",
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("Content-Length: 12\r\n"));
        assert!(text.ends_with("\r\n\r\n"), "{text:?}");
        // Split across writes, the end of the head is still found.
        let mut out = Vec::new();
        let mut w = HeadOnly::new(&mut out);
        for part in [&b"A: b\r"[..], b"\n\r", b"\nbody"] {
            w.write_all(part).unwrap();
        }
        assert_eq!(out, b"A: b\r\n\r\n");
    }

    #[test]
    fn auth_by_header_or_query() {
        let req = |headers: Vec<(String, String)>, query: Option<&str>| Request {
            method: "GET".into(),
            path: "/ws".into(),
            query: query.map(str::to_owned),
            headers,
            leftover: vec![],
        };
        let tokens = vec!["s3cret".to_owned()];
        assert!(authorized(&req(vec![], None), &[]));
        assert!(!authorized(&req(vec![], None), &tokens));
        assert!(authorized(
            &req(vec![("authorization".into(), "Bearer s3cret".into())], None),
            &tokens
        ));
        for scheme in ["bearer", "BEARER", "bEaReR"] {
            let header = format!("{scheme}  s3cret");
            assert!(authorized(
                &req(vec![("authorization".into(), header)], None),
                &tokens
            ));
        }
        for wrong in ["Basic s3cret", "Bearers3cret", "s3cret"] {
            assert!(!authorized(
                &req(vec![("authorization".into(), wrong.into())], None),
                &tokens
            ));
        }
        assert!(authorized(&req(vec![], Some("a=1&token=s3cret")), &tokens));
        assert!(!authorized(&req(vec![], Some("token=s3cre")), &tokens));
    }
}
