//! A minimal synchronous HTTP/1.1 client for plain `http://` upstreams:
//! sends one chat completion POST, reads the response head, and hands over
//! the socket itself with a [`BodyDecoder`] for its body, so the upstream
//! reader can wait on many streams at once (non-blocking) instead of one
//! blocked thread per stream. ureq hides its socket, so it keeps `https://`.
//!
//! Kept connections ([`Pool`]) are checked before reuse with a
//! non-blocking peek: an upstream that closed one while it lay idle has
//! left an EOF there. A close that lands after the check can still fail the
//! request; [`Http1Error::Unanswered`] with `reused` tells the caller that
//! the request never reached the upstream and may be sent again at once.
//!
//! Threads: a [`Pool`] is shared by every streaming worker that calls its
//! endpoint (the idle list sits behind a mutex held only to push or pop);
//! [`Pool::post`] runs on the calling worker. The [`Response`]'s connection
//! then belongs to one thread at a time: the caller, or the upstream reader
//! thread it is handed to, which feeds the [`BodyDecoder`] and gives the
//! connection back to the pool from there.

use std::io::{self, Read, Write};
use std::mem::MaybeUninit;
use std::net::{Ipv6Addr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Largest response head read (status line and header fields).
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a response head.
const MAX_HEADERS: usize = 96;
/// Longest chunk-size line or trailer line of a chunked body.
const MAX_LINE: usize = 4 * 1024;
/// Most trailer bytes after the last chunk.
const MAX_TRAILERS: usize = 64 * 1024;
/// Bytes asked of the socket per read.
const READ_SIZE: usize = 16 * 1024;

/// Where an `http://` base URL points: host, port and path prefix (e.g. `/v1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// Name or address; an IPv6 address without its brackets.
    pub host: String,
    pub port: u16,
    /// Path before each request's own (`/v1`), without a trailing slash;
    /// empty for none.
    pub prefix: String,
}

impl Target {
    /// `None` for anything but a plain `http://` URL (https stays on ureq).
    /// Accepts `http://host`, `http://host:port`, `http://host:port/prefix/`, IPv6 `[::1]:port`;
    /// default port 80; trailing slashes of the prefix removed.
    ///
    /// Anything this client would have to escape or cannot express (user
    /// info, a query, spaces, non-ASCII) is `None` too, so it stays on
    /// ureq, which handles it, rather than going out malformed.
    pub fn parse(base_url: &str) -> Option<Target> {
        let url = base_url.trim();
        let scheme = url.get(..7)?;
        if !scheme.eq_ignore_ascii_case("http://") {
            return None;
        }
        let rest = &url[7..];
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) = bracketed.split_once(']')?;
            host.parse::<Ipv6Addr>().ok()?;
            (
                host,
                if after.is_empty() {
                    ""
                } else {
                    after.strip_prefix(':')?
                },
            )
        } else {
            let (host, port) = authority.split_once(':').unwrap_or((authority, ""));
            let fine = |b: u8| b.is_ascii_alphanumeric() || b"-._".contains(&b);
            if host.is_empty() || !host.bytes().all(fine) {
                return None;
            }
            (host, port)
        };
        let port = match port {
            "" => 80,
            digits if digits.bytes().all(|b| b.is_ascii_digit()) => digits.parse().ok()?,
            _ => return None,
        };
        let prefix = path.trim_end_matches('/');
        let plain = |b: u8| b.is_ascii_graphic() && !b"?#\"<>\\^`{|}".contains(&b);
        if port == 0 || !prefix.bytes().all(plain) {
            return None;
        }
        Some(Target {
            host: host.to_owned(),
            port,
            prefix: prefix.to_owned(),
        })
    }

    /// `host:port`, with brackets around an IPv6 address: for messages.
    fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The `Host` field: the port only when it is not the default.
    fn host_field(&self) -> String {
        match (self.host.contains(':'), self.port) {
            (false, 80) => self.host.clone(),
            (true, 80) => format!("[{}]", self.host),
            _ => self.address(),
        }
    }
}

/// Kept connections to one target, so a worker does not connect per call.
pub(crate) struct Pool {
    target: Target,
    /// Oldest first: pushed as they come back, popped from the end.
    idle: Mutex<Vec<(TcpStream, Instant)>>,
    max_idle: usize,
    /// Connections idle longer than this are closed rather than reused:
    /// servers close idle connections on timers of their own, and one found
    /// closed only when the request is written costs a reconnect.
    idle_age: Duration,
}

impl Pool {
    /// A pool with nothing kept yet.
    pub fn new(target: Target, max_idle: usize, idle_age: Duration) -> Pool {
        Pool {
            target,
            idle: Mutex::new(Vec::new()),
            max_idle,
            idle_age,
        }
    }

    /// Where the pool's connections go (for the tests).
    #[cfg(test)]
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Sends `POST {prefix}{path}` with `body` (JSON) and extra `headers` (name, value),
    /// on a kept connection when one is idle (checked alive first: a non-blocking
    /// MSG_PEEK that finds EOF or unexpected bytes discards it) or on a new one
    /// (connect_timeout per address; TCP_NODELAY), and reads the response head
    /// (bounded: 64 KiB; read_timeout per read). Request head: `POST … HTTP/1.1`,
    /// `Host`, `Content-Type: application/json`, `Content-Length`, `Accept: text/event-stream`,
    /// the extra headers; no `Connection: close`.
    ///
    /// `watch` is called with the connection once it is chosen, before
    /// anything is written: the caller can arrange to shut it down (an
    /// abort) while this blocks on it.
    ///
    /// A header name or value, or a path, that would break the request head
    /// (a line break, a space in the path) fails as [`Http1Error::Connect`]
    /// with [`io::ErrorKind::InvalidInput`], before anything is sent.
    pub fn post(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        connect_timeout: Duration,
        read_timeout: Duration,
        watch: &dyn Fn(&TcpStream),
    ) -> Result<Response, Http1Error> {
        let address = self.target.address();
        let request = self.request(path, headers, body).map_err(|why| {
            let error = io::Error::new(io::ErrorKind::InvalidInput, why);
            Http1Error::Connect(context(&address, error))
        })?;
        // A zero timeout means "none" to nobody: std refuses it.
        let read_timeout = read_timeout.max(Duration::from_millis(1));
        let (mut conn, reused) = match self.take_idle() {
            Some(conn) => (conn, true),
            None => (
                self.connect(connect_timeout.max(Duration::from_millis(1)))?,
                false,
            ),
        };
        let unanswered = |error: io::Error| Http1Error::Unanswered {
            reused,
            error: context(&address, error),
        };
        let timed_out = |what: &str| {
            let ms = read_timeout.as_millis();
            Http1Error::Timeout(format!("{address} {what} within {ms} ms"))
        };
        watch(&conn);
        // The write gets the same bound: an upstream that stops reading
        // must not hold a worker forever either.
        conn.set_read_timeout(Some(read_timeout))
            .and_then(|()| conn.set_write_timeout(Some(read_timeout)))
            .map_err(unanswered)?;
        match conn.write_all(&request) {
            Ok(()) => {}
            Err(e) if is_timeout(&e) => return Err(timed_out("took no request")),
            Err(e) => return Err(unanswered(e)),
        }
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = [0u8; READ_SIZE];
        // All bytes read, interim `1xx` heads included: the head's bound
        // holds for them together, and any at all means the request arrived.
        let mut received = 0;
        loop {
            let room = (MAX_HEAD - received).min(READ_SIZE);
            if room == 0 {
                return Err(Http1Error::BadResponse(format!(
                    "{address} sent a response head over {} KiB",
                    MAX_HEAD / 1024
                )));
            }
            let read = match conn.read(&mut chunk[..room]) {
                Ok(0) => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed",
                )),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_timeout(&e) => return Err(timed_out("sent no response head")),
                other => other,
            };
            let n = match read {
                Ok(n) => n,
                // Only a connection that sent nothing back is unanswered: a
                // partial head means the request did reach the upstream.
                Err(e) if received == 0 => return Err(unanswered(e)),
                Err(e) => {
                    let why = format!("{address} broke off a response head: {e}");
                    return Err(Http1Error::BadResponse(why));
                }
            };
            received += n;
            buf.extend_from_slice(&chunk[..n]);
            if let Some(head) = parse_head(&address, &mut buf)? {
                return Ok(Response {
                    status: head.status,
                    retry_after: head.retry_after,
                    conn,
                    reused,
                    body: head.body,
                    leftover: buf,
                    keep_alive: head.keep_alive,
                });
            }
        }
    }

    /// Keeps `conn` for a later call (drops it when `max_idle` are kept already).
    /// The caller gives back only connections whose response was read to its end.
    pub fn give_back(&self, conn: TcpStream) {
        // The upstream reader reads non-blocking; the next call reads the
        // head blocking, with its own timeout.
        if conn.set_nonblocking(false).is_err() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock();
        let stale = self.drain_stale(&mut idle, now);
        let unkept = if idle.len() < self.max_idle {
            idle.push((conn, now));
            None
        } else {
            Some(conn)
        };
        // Closed outside the lock.
        drop(idle);
        drop((stale, unkept));
    }

    /// The most recently kept connection that is still open, closing the
    /// stale and the dead ones on the way.
    fn take_idle(&self) -> Option<TcpStream> {
        loop {
            let conn = {
                let mut idle = self.idle.lock();
                drop(self.drain_stale(&mut idle, Instant::now()));
                idle.pop()?.0
            };
            if still_open(&conn) {
                return Some(conn);
            }
        }
    }

    /// Takes out the connections kept longer than `idle_age` (the front of
    /// the list, which is in the order they came back).
    fn drain_stale(&self, idle: &mut Vec<(TcpStream, Instant)>, now: Instant) -> Vec<TcpStream> {
        let stale = idle
            .iter()
            .take_while(|(_, since)| now.duration_since(*since) > self.idle_age)
            .count();
        idle.drain(..stale).map(|(conn, _)| conn).collect()
    }

    /// A new connection, trying each address the host resolves to.
    fn connect(&self, timeout: Duration) -> Result<TcpStream, Http1Error> {
        let address = self.target.address();
        let addrs = (self.target.host.as_str(), self.target.port)
            .to_socket_addrs()
            .map_err(|e| Http1Error::Connect(context(&address, e)))?;
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the name has no address");
        let mut timed_out = false;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(conn) => {
                    // Small writes (the request) go out at once, not after
                    // the peer's delayed ACK.
                    conn.set_nodelay(true)
                        .map_err(|e| Http1Error::Connect(context(&address, e)))?;
                    return Ok(conn);
                }
                Err(e) => {
                    timed_out |= is_timeout(&e);
                    last = e;
                }
            }
        }
        if timed_out {
            return Err(Http1Error::Timeout(format!(
                "connecting to {address} took over {} ms",
                timeout.as_millis()
            )));
        }
        Err(Http1Error::Connect(context(&address, last)))
    }

    /// The request head and body in one buffer, so they go out in one write
    /// (one segment for a small request).
    fn request(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Vec<u8>, String> {
        if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("the path {path:?} cannot go into a request line"));
        }
        let token = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        };
        let mut head = format!(
            "POST {}{path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nAccept: text/event-stream\r\n",
            self.target.prefix,
            self.target.host_field(),
            body.len()
        );
        for (name, value) in headers {
            if !token(name) || value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                // The value is left out: it may be a key.
                return Err(format!("the header {name:?} cannot go into a request head"));
            }
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        Ok(request)
    }
}

/// True when a kept connection has neither EOF nor stray bytes waiting: a
/// peek that would block. Bytes before a request would be read as its
/// response, so a connection holding any is as good as closed.
fn still_open(conn: &TcpStream) -> bool {
    let mut byte = [MaybeUninit::<u8>::uninit(); 1];
    let peeked = socket2::SockRef::from(conn)
        .recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT);
    matches!(peeked, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// A timeout: reads and writes report `WouldBlock` on Unix, connects and
/// other systems `TimedOut`.
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// `e` with the address in its message, so it reads well on its own.
fn context(address: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{address}: {e}"))
}

/// Failures of [`Pool::post`].
#[derive(Debug)]
pub(crate) enum Http1Error {
    /// No connection could be made (refused, unreachable, DNS): nothing was sent.
    Connect(io::Error),
    /// The connection failed or closed before a response head came back.
    /// `reused`: it was a kept connection (then the upstream most likely closed it while idle,
    /// and the request never reached it).
    Unanswered { reused: bool, error: io::Error },
    /// Connect or a read of the head took longer than its timeout.
    Timeout(String),
    /// The bytes that came back are not an HTTP/1.x response (or the head is over 64 KiB).
    BadResponse(String),
}

impl std::fmt::Display for Http1Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The io errors carry the address already (see `context`).
        match self {
            Http1Error::Connect(e) => write!(f, "cannot reach {e}"),
            Http1Error::Unanswered {
                reused: true,
                error,
            } => {
                write!(f, "no answer on a kept connection to {error}")
            }
            Http1Error::Unanswered {
                reused: false,
                error,
            } => write!(f, "no answer from {error}"),
            Http1Error::Timeout(s) | Http1Error::BadResponse(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for Http1Error {}

/// A response whose head has been read.
#[derive(Debug)]
pub(crate) struct Response {
    pub status: u16,
    /// `Retry-After` in seconds, when present and numeric.
    pub retry_after: Option<Duration>,
    /// The connection, blocking, with the read timeout set.
    pub conn: TcpStream,
    /// It came from the pool (the tests check reuse with it).
    #[cfg_attr(not(test), allow(dead_code))]
    pub reused: bool,
    /// How the body is framed.
    pub body: BodyDecoder,
    /// Bytes read after the head: the start of the body.
    pub leftover: Vec<u8>,
    /// False when the response said `Connection: close` (or is HTTP/1.0 without keep-alive):
    /// then the connection must not be given back. False too for a body
    /// that runs until close.
    pub keep_alive: bool,
}

impl Response {
    /// Reads the body (blocking, at most `limit` bytes kept; reads and discards nothing
    /// beyond what is needed) and returns it as text (lossy UTF-8); for error answers.
    ///
    /// A failure midway (timeout, bad framing, early close) ends it with
    /// what came so far. The connection is closed afterwards.
    pub fn read_body(mut self, limit: usize) -> String {
        let mut out = Vec::new();
        let mut done = self.body.decode(&self.leftover, &mut out);
        let mut chunk = [0u8; READ_SIZE];
        while matches!(done, Ok(false)) && out.len() < limit {
            done = match self.conn.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => self.body.decode(&chunk[..n], &mut out),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
                Err(_) => break,
            };
        }
        out.truncate(limit);
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// What `parse_head` found.
struct Head {
    status: u16,
    retry_after: Option<Duration>,
    body: BodyDecoder,
    keep_alive: bool,
}

/// Parses the response head at the start of `buf`, leaving only the bytes
/// after it there; `None` while it is incomplete. Interim `1xx` heads (a
/// server may send `100 Continue` unasked) are dropped and parsing goes on.
fn parse_head(address: &str, buf: &mut Vec<u8>) -> Result<Option<Head>, Http1Error> {
    let bad = |why: String| Http1Error::BadResponse(format!("{address} {why}"));
    loop {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut fields);
        let size = match response.parse(buf) {
            Ok(httparse::Status::Complete(size)) => size,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(bad(format!("sent a response that is not HTTP/1.x: {e}"))),
        };
        let status = response.code.unwrap_or(0);
        if (100..200).contains(&status) && status != 101 {
            buf.drain(..size);
            continue;
        }
        // HTTP/1.1 keeps the connection unless told otherwise, 1.0 only
        // when told to; `close` wins over everything.
        let (mut close, mut keep) = (false, response.version == Some(1));
        let mut chunked = false;
        let mut length: Option<u64> = None;
        let mut retry_after = None;
        for field in response.headers.iter() {
            let value = String::from_utf8_lossy(field.value);
            let value = value.trim();
            let name = field.name;
            if name.eq_ignore_ascii_case("connection") {
                for option in value.split(',').map(str::trim) {
                    close |= option.eq_ignore_ascii_case("close");
                    keep |= option.eq_ignore_ascii_case("keep-alive");
                }
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                    if coding.eq_ignore_ascii_case("chunked") {
                        chunked = true;
                    } else if !coding.eq_ignore_ascii_case("identity") {
                        return Err(bad(format!("sent a body in an unknown coding: {coding}")));
                    }
                }
            } else if name.eq_ignore_ascii_case("content-length") {
                let parsed = Some(value)
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<u64>().ok());
                match (parsed, length) {
                    (Some(n), None) => length = Some(n),
                    (Some(n), Some(m)) if n == m => {}
                    _ => return Err(bad(format!("sent a bad Content-Length: {value:?}"))),
                }
            } else if name.eq_ignore_ascii_case("retry-after") {
                retry_after = value.parse::<u64>().ok().map(Duration::from_secs);
            }
        }
        if status == 101 {
            return Err(bad("switched protocols, unasked".into()));
        }
        let mut keep_alive = keep && !close;
        let framing = if status == 204 || status == 304 {
            Framing::Length(0)
        } else if chunked {
            Framing::Chunked(Chunked::default())
        } else if let Some(n) = length {
            Framing::Length(n)
        } else {
            // Only the close ends this body: the connection cannot serve
            // another request.
            keep_alive = false;
            Framing::UntilClose
        };
        buf.drain(..size);
        return Ok(Some(Head {
            status,
            retry_after,
            body: BodyDecoder { framing },
            keep_alive,
        }));
    }
}

/// Incremental decoder of a response body's framing.
#[derive(Debug)]
pub(crate) struct BodyDecoder {
    framing: Framing,
}

#[derive(Debug)]
enum Framing {
    /// Payload bytes still to come.
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

/// Where a chunked body is, and the part of a line read so far.
#[derive(Debug, Default)]
struct Chunked {
    state: ChunkState,
    /// The chunk-size or trailer line being read, without its CR LF.
    line: Vec<u8>,
    trailer_bytes: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading a chunk-size line.
    #[default]
    Size,
    /// Payload bytes of the chunk still to come.
    Data(u64),
    /// Reading the line break after a chunk's payload.
    DataEnd,
    /// Reading trailer lines after the last chunk, until an empty one.
    Trailer,
    Done,
}

impl BodyDecoder {
    /// Appends the payload bytes of `input` to `out`; returns true once the body is complete
    /// (last chunk and trailers read, or the length reached). Bytes after the end are an error
    /// (a server must not send them before the next request). Chunk-size lines and trailers
    /// are bounded (4 KiB a line); chunk extensions ignored; errors as `String`.
    ///
    /// The payload before an error has been appended already. Appends at
    /// most `input.len()` bytes, so `out` grows only as fast as reads.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<bool, String> {
        match &mut self.framing {
            Framing::UntilClose => {
                out.extend_from_slice(input);
                Ok(false)
            }
            Framing::Length(remaining) => {
                let take = input
                    .len()
                    .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                out.extend_from_slice(&input[..take]);
                *remaining -= take as u64;
                if take < input.len() {
                    return Err(format!(
                        "{} bytes came after the end of the body",
                        input.len() - take
                    ));
                }
                Ok(*remaining == 0)
            }
            Framing::Chunked(chunked) => chunked.decode(input, out),
        }
    }

    /// True when the body ends only at EOF (then EOF is its normal end).
    pub fn until_close(&self) -> bool {
        matches!(self.framing, Framing::UntilClose)
    }

    /// True once complete.
    pub fn is_complete(&self) -> bool {
        match &self.framing {
            Framing::Length(remaining) => *remaining == 0,
            Framing::Chunked(chunked) => chunked.state == ChunkState::Done,
            Framing::UntilClose => false,
        }
    }
}

impl Chunked {
    fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<bool, String> {
        let mut at = 0;
        while at < input.len() {
            match self.state {
                ChunkState::Data(remaining) => {
                    let rest = &input[at..];
                    let take = rest
                        .len()
                        .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    out.extend_from_slice(&rest[..take]);
                    at += take;
                    let left = remaining - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                }
                ChunkState::Done => {
                    return Err(format!(
                        "{} bytes came after the end of the body",
                        input.len() - at
                    ))
                }
                ChunkState::Size | ChunkState::DataEnd | ChunkState::Trailer => {
                    if !self.take_line(input, &mut at)? {
                        break;
                    }
                    self.end_line()?;
                    self.line.clear();
                }
            }
        }
        Ok(self.state == ChunkState::Done)
    }

    /// Adds `input[at..]` up to the next LF to the line; true when the LF
    /// was found (and `at` moved past it).
    fn take_line(&mut self, input: &[u8], at: &mut usize) -> Result<bool, String> {
        let rest = &input[*at..];
        let (piece, found) = match rest.iter().position(|&b| b == b'\n') {
            Some(lf) => (&rest[..lf], true),
            None => (rest, false),
        };
        if self.line.len() + piece.len() > MAX_LINE {
            return Err(format!(
                "a chunk-size or trailer line is over {} KiB",
                MAX_LINE / 1024
            ));
        }
        self.line.extend_from_slice(piece);
        *at += piece.len() + usize::from(found);
        Ok(found)
    }

    /// Acts on the complete line in `self.line`. A bare LF is accepted as a
    /// line end, as most clients do.
    fn end_line(&mut self) -> Result<(), String> {
        let line = self.line.strip_suffix(b"\r").unwrap_or(&self.line);
        self.state = match self.state {
            ChunkState::Size => match chunk_size(line)? {
                0 => ChunkState::Trailer,
                size => ChunkState::Data(size),
            },
            ChunkState::DataEnd if line.is_empty() => ChunkState::Size,
            ChunkState::DataEnd => return Err("a chunk is longer than its size".into()),
            ChunkState::Trailer if line.is_empty() => ChunkState::Done,
            ChunkState::Trailer => {
                self.trailer_bytes += line.len();
                if self.trailer_bytes > MAX_TRAILERS {
                    return Err(format!("trailers over {} KiB", MAX_TRAILERS / 1024));
                }
                ChunkState::Trailer
            }
            other => other,
        };
        Ok(())
    }
}

/// The size on a chunk-size line: hex digits, then optional whitespace
/// and `;extensions`, which are ignored.
fn chunk_size(line: &[u8]) -> Result<u64, String> {
    let digits = line.split(|&b| b == b';').next().unwrap_or(line);
    let digits = digits.trim_ascii_end();
    let bad = || format!("bad chunk size line: {:?}", String::from_utf8_lossy(line));
    if digits.is_empty() {
        return Err(bad());
    }
    digits.iter().try_fold(0u64, |size, &b| {
        let digit = char::from(b).to_digit(16).ok_or_else(bad)?;
        size.checked_mul(16)
            .and_then(|s| s.checked_add(u64::from(digit)))
            .ok_or_else(bad)
    })
}

#[cfg(test)]
mod tests;
