//! The HTTP client side, for the OpenAI-compatible API (`POST
//! /v1/chat/completions` with `"stream": true`): the request, an
//! incremental parser of the responses of a kept-alive connection (head,
//! chunked transfer encoding, server-sent events), a minimal blocking
//! client, and a reactor that drives many connections from one thread on
//! the WebSocket reactor's [`Sockets`] (epoll, kernel receive timestamps).
//!
//! Token events are not parsed as JSON: an event with an `id:` line is a
//! token, and only its number is kept, so the client spends little CPU of
//! its own on the cores it shares with the server.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use serde_json::json;

use crate::client::{Arrival, Sockets, READ_TIMEOUT};

/// Largest response head accepted.
const MAX_HEAD: usize = 16 * 1024;

/// `POST /v1/chat/completions` asking `question` as a streamed answer, on a
/// kept-alive connection. Keyed by the server like a WebSocket chat of
/// `question` in a new conversation when `system_prompt` and `max_tokens`
/// are the server's `llm.system_prompt` and `llm.max_tokens` (no system
/// message when the prompt is empty, as a chat sends none then); `fresh`
/// adds `Cache-Control: no-cache`.
pub fn chat_request(
    host: SocketAddr,
    question: &str,
    system_prompt: &str,
    max_tokens: u32,
    fresh: bool,
) -> Vec<u8> {
    let mut messages = Vec::with_capacity(2);
    if !system_prompt.is_empty() {
        messages.push(json!({"role": "system", "content": system_prompt}));
    }
    messages.push(json!({"role": "user", "content": question}));
    let body = json!({"stream": true, "max_tokens": max_tokens, "messages": messages}).to_string();
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{}Content-Length: {}\r\n\r\n{body}",
        if fresh { "Cache-Control: no-cache\r\n" } else { "" },
        body.len()
    )
    .into_bytes()
}

/// A response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    /// `X-Chorus-Role`: `leader`, `follower` or `cache` (empty if absent).
    pub role: String,
    /// `X-Chorus-Request` (empty if absent).
    pub request: String,
}

/// What the parser found in the bytes of a connection, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpEvent {
    /// A response began.
    Head(Head),
    /// A server-sent event with an `id:` line: a token, by its number.
    Token(u64),
    /// Any other event's `data` (the role chunk, the finish chunk, an
    /// error event `{"error":…}`), except `[DONE]`.
    Data(Vec<u8>),
    /// `data: [DONE]`.
    Done,
    /// The whole body of a response with a `Content-Length` (an error
    /// answer, or a non-streamed one).
    Body(Vec<u8>),
    /// The response is complete; the connection can carry the next one.
    End,
}

impl HttpEvent {
    /// An error event (`data: {"error":…}`).
    pub fn is_error(&self) -> bool {
        matches!(self, HttpEvent::Data(d) if d.starts_with(br#"{"error""#))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a response head.
    Head,
    /// Reading a chunk-size line.
    ChunkSize,
    /// Inside a chunk, with this many bytes to go.
    ChunkData(usize),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// Trailer lines after the last chunk, up to an empty line.
    Trailer,
    /// A `Content-Length` body, with this many bytes to go.
    Body(usize),
}

/// Server-sent events from the de-chunked body, a line at a time.
#[derive(Debug, Default)]
struct Events {
    /// The current line so far (a line may span chunks and reads).
    line: Vec<u8>,
    id: Option<u64>,
    data: Vec<u8>,
    has_data: bool,
}

impl Events {
    fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<HttpEvent>) {
        while let Some(at) = bytes.iter().position(|&b| b == b'\n') {
            if self.line.is_empty() {
                self.line_done(&bytes[..at], out);
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&bytes[..at]);
                self.line_done(&line, out);
                line.clear();
                self.line = line;
            }
            bytes = &bytes[at + 1..];
        }
        self.line.extend_from_slice(bytes);
    }

    fn line_done(&mut self, line: &[u8], out: &mut Vec<HttpEvent>) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(at) => (&line[..at], &line[at + 1..]),
            None => (line, &b""[..]),
        };
        let value = value.strip_prefix(b" ").unwrap_or(value);
        match field {
            b"id" => {
                self.id = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
            }
            // A token's text is not needed: only its number.
            b"data" if self.id.is_none() => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"data" => self.has_data = true,
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<HttpEvent>) {
        if let Some(id) = self.id.take() {
            out.push(HttpEvent::Token(id));
        } else if self.data == b"[DONE]" {
            out.push(HttpEvent::Done);
        } else if self.has_data {
            out.push(HttpEvent::Data(self.data.clone()));
        }
        self.data.clear();
        self.has_data = false;
    }
}

/// The responses of one connection, parsed as their bytes arrive, split
/// anywhere.
#[derive(Debug)]
pub struct Parser {
    state: State,
    /// Bytes read and not yet parsed.
    buf: Vec<u8>,
    events: Events,
    body: Vec<u8>,
}

impl Default for Parser {
    fn default() -> Self {
        Parser {
            state: State::Head,
            buf: Vec::new(),
            events: Events::default(),
            body: Vec::new(),
        }
    }
}

impl Parser {
    /// Parses `bytes`, the next the connection delivered, appending what
    /// they complete to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<HttpEvent>) -> Result<(), String> {
        self.buf.extend_from_slice(bytes);
        let mut at = 0;
        let result = self.parse(&mut at, out);
        self.buf.drain(..at);
        result
    }

    fn parse(&mut self, at: &mut usize, out: &mut Vec<HttpEvent>) -> Result<(), String> {
        loop {
            let rest = &self.buf[*at..];
            match self.state {
                State::Head => {
                    let Some(end) = find(rest, b"\r\n\r\n") else {
                        if rest.len() > MAX_HEAD {
                            return Err("response head too large".into());
                        }
                        return Ok(());
                    };
                    let (head, length) = parse_head(&rest[..end + 4])?;
                    *at += end + 4;
                    out.push(HttpEvent::Head(head));
                    self.state = match length {
                        Length::Chunked => State::ChunkSize,
                        Length::Bytes(n) => State::Body(n),
                    };
                }
                State::ChunkSize => {
                    let Some(end) = find(rest, b"\r\n") else {
                        return Ok(());
                    };
                    let line = std::str::from_utf8(&rest[..end]).map_err(|e| e.to_string())?;
                    let hex = line.split(';').next().unwrap_or("").trim();
                    let n = usize::from_str_radix(hex, 16)
                        .map_err(|e| format!("bad chunk size {line:?}: {e}"))?;
                    *at += end + 2;
                    self.state = if n == 0 {
                        State::Trailer
                    } else {
                        State::ChunkData(n)
                    };
                }
                State::ChunkData(n) => {
                    if rest.is_empty() {
                        return Ok(());
                    }
                    let take = n.min(rest.len());
                    self.events.feed(&rest[..take], out);
                    *at += take;
                    self.state = if take == n {
                        State::ChunkEnd
                    } else {
                        State::ChunkData(n - take)
                    };
                }
                State::ChunkEnd => {
                    if rest.len() < 2 {
                        return Ok(());
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err("a chunk does not end with CRLF".into());
                    }
                    *at += 2;
                    self.state = State::ChunkSize;
                }
                State::Trailer => {
                    let Some(end) = find(rest, b"\r\n") else {
                        return Ok(());
                    };
                    *at += end + 2;
                    if end == 0 {
                        self.events = Events::default();
                        out.push(HttpEvent::End);
                        self.state = State::Head;
                    }
                }
                State::Body(n) => {
                    let take = n.min(rest.len());
                    self.body.extend_from_slice(&rest[..take]);
                    *at += take;
                    if take < n {
                        self.state = State::Body(n - take);
                        return Ok(());
                    }
                    out.push(HttpEvent::Body(std::mem::take(&mut self.body)));
                    out.push(HttpEvent::End);
                    self.state = State::Head;
                }
            }
        }
    }
}

enum Length {
    Chunked,
    Bytes(usize),
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_head(bytes: &[u8]) -> Result<(Head, Length), String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("incomplete response head".into()),
        Err(e) => return Err(format!("bad response head: {e}")),
    }
    let mut head = Head {
        status: response.code.unwrap_or(0),
        role: String::new(),
        request: String::new(),
    };
    let mut length = None;
    for h in response.headers.iter() {
        let value = String::from_utf8_lossy(h.value);
        if h.name.eq_ignore_ascii_case("x-chorus-role") {
            head.role = value.into_owned();
        } else if h.name.eq_ignore_ascii_case("x-chorus-request") {
            head.request = value.into_owned();
        } else if h.name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            length = Some(Length::Chunked);
        } else if h.name.eq_ignore_ascii_case("content-length") && length.is_none() {
            let n = value
                .trim()
                .parse()
                .map_err(|e| format!("bad Content-Length {value:?}: {e}"))?;
            length = Some(Length::Bytes(n));
        }
    }
    let length = length.ok_or("a response with neither Content-Length nor chunks")?;
    Ok((head, length))
}

/// Writes all of `bytes` to a socket that may be non-blocking, waiting for
/// room when it is full.
pub fn write_all(mut socket: &TcpStream, mut bytes: &[u8]) -> Result<(), String> {
    use std::os::fd::AsFd;
    while !bytes.is_empty() {
        match socket.write(bytes) {
            Ok(0) => return Err("send: the connection is closed".into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                use rustix::event::{poll, PollFd, PollFlags, Timespec};
                let fd = socket.as_fd();
                let mut fds = [PollFd::new(&fd, PollFlags::OUT)];
                let timeout = Timespec {
                    tv_sec: READ_TIMEOUT.as_secs() as i64,
                    tv_nsec: 0,
                };
                match poll(&mut fds, Some(&timeout)) {
                    Ok(0) => return Err(format!("send: no room for {READ_TIMEOUT:?}")),
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(format!("send: {e}")),
                }
            }
            Err(e) => return Err(format!("send: {e}")),
        }
    }
    Ok(())
}

/// One streamed answer as a blocking client saw it.
pub struct Answer {
    pub head: Head,
    pub tokens: usize,
}

/// A minimal blocking client on one kept-alive connection.
pub struct HttpConn {
    tcp: TcpStream,
    parser: Parser,
}

impl HttpConn {
    pub fn connect(addr: SocketAddr) -> Result<HttpConn, String> {
        let tcp = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
        tcp.set_read_timeout(Some(READ_TIMEOUT))
            .map_err(|e| e.to_string())?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(HttpConn {
            tcp,
            parser: Parser::default(),
        })
    }

    /// Sends `request` and reads its whole response, which must be a
    /// successful stream that ends with `[DONE]`.
    pub fn ask(&mut self, request: &[u8]) -> Result<Answer, String> {
        write_all(&self.tcp, request)?;
        let mut head = None;
        let mut tokens = 0;
        let mut done = false;
        let mut events = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self.tcp.read(&mut buf).map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("server closed the connection".into());
            }
            events.clear();
            self.parser.feed(&buf[..n], &mut events)?;
            for event in events.drain(..) {
                match event {
                    HttpEvent::Head(h) => head = Some(h),
                    HttpEvent::Token(_) => tokens += 1,
                    HttpEvent::Done => done = true,
                    e if e.is_error() => {
                        return Err(failure(head.as_ref().map_or(0, |h| h.status), &e))
                    }
                    HttpEvent::Data(_) => {}
                    e @ HttpEvent::Body(_) => {
                        return Err(failure(head.as_ref().map_or(0, |h| h.status), &e))
                    }
                    HttpEvent::End => {
                        let head = head.ok_or("a response without a head")?;
                        if !done {
                            return Err("a stream ended without [DONE]".into());
                        }
                        return Ok(Answer { head, tokens });
                    }
                }
            }
        }
    }
}

/// What to tell of a response that is not a successful stream.
pub fn failure(status: u16, event: &HttpEvent) -> String {
    match event {
        HttpEvent::Body(b) | HttpEvent::Data(b) => {
            format!("HTTP {status}: {}", String::from_utf8_lossy(b))
        }
        e => format!("HTTP {status}: unexpected {e:?}"),
    }
}

/// What an [`HttpReactor`] does with a connection after one of its events.
pub enum Step {
    Read,
    /// Send the reactor's request again on this connection.
    Ask,
    Finished,
}

/// Many kept-alive HTTP connections on one thread, every one of them
/// sending the same request (see [`crate::client::Reactor`] for why one
/// thread).
pub struct HttpReactor {
    sockets: Sockets,
    parsers: Vec<Parser>,
    request: Vec<u8>,
    refused: usize,
}

/// Connects to `addr`, trying again (up to 5 times, 100 ms apart) when the
/// attempt is refused, and counting those in `refused`. Opening 2,000
/// sockets in a tight loop, with no handshake to pace them as a WebSocket
/// has, once in a while meets a refusal on this machine (see
/// docs/benchmarks.md); the count says how often.
fn connect_retrying(addr: SocketAddr, refused: &mut usize) -> Result<TcpStream, String> {
    let mut tries = 0;
    loop {
        match TcpStream::connect(addr) {
            Ok(tcp) => return Ok(tcp),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && tries < 5 => {
                tries += 1;
                *refused += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => return Err(format!("connect: {e}")),
        }
    }
}

impl HttpReactor {
    /// Connects to `addrs` (one connection each) to send `request`.
    pub fn connect(
        addrs: impl IntoIterator<Item = SocketAddr>,
        request: Vec<u8>,
    ) -> Result<HttpReactor, String> {
        let mut refused = 0;
        let sockets = addrs
            .into_iter()
            .map(|addr| {
                let tcp = connect_retrying(addr, &mut refused)?;
                tcp.set_nodelay(true).map_err(|e| e.to_string())?;
                Ok(tcp)
            })
            .collect::<Result<Vec<_>, String>>()?;
        let parsers = sockets.iter().map(|_| Parser::default()).collect();
        Ok(HttpReactor {
            sockets: Sockets::new(sockets)?,
            parsers,
            request,
            refused,
        })
    }

    /// Connection attempts refused (and tried again) while connecting.
    pub fn refused(&self) -> usize {
        self.refused
    }

    /// Sends the request on connection `i`.
    pub fn ask(&self, i: usize) -> Result<(), String> {
        write_all(self.sockets.socket(i), &self.request)
    }

    /// Reads every connection until `on_event` has said `Finished` for
    /// each. `on_event` gets the connection's index, when the bytes of the
    /// event arrived, and the event.
    pub fn run(
        &mut self,
        mut on_event: impl FnMut(usize, Arrival, &HttpEvent) -> Result<Step, String>,
    ) -> Result<(), String> {
        let parsers = &mut self.parsers;
        let sockets = &self.sockets;
        let request = &self.request;
        let mut events = Vec::with_capacity(128);
        sockets.run(|i, arrival, bytes| {
            events.clear();
            parsers[i].feed(bytes, &mut events)?;
            for event in &events {
                match on_event(i, arrival, event)? {
                    Step::Read => {}
                    Step::Ask => write_all(sockets.socket(i), request)?,
                    Step::Finished => return Ok(true),
                }
            }
            Ok(false)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two responses of one kept-alive connection as chorus writes them (a
    /// stream, with the finish chunk and `[DONE]` in one chunk), then an
    /// error answer with a length, and a stream with a chunk extension,
    /// CRLF event lines, a trailer and an error event.
    fn connection_bytes() -> Vec<u8> {
        let mut out = Vec::new();
        let chunk = |out: &mut Vec<u8>, data: &str| {
            out.extend_from_slice(format!("{:x}\r\n{data}\r\n", data.len()).as_bytes());
        };
        for role in ["leader", "cache"] {
            out.extend_from_slice(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
                     Transfer-Encoding: chunked\r\nX-Chorus-Request: r-{role}\r\nX-Chorus-Role: {role}\r\n\
                     X-Content-Type-Options: nosniff\r\n\r\n"
                )
                .as_bytes(),
            );
            chunk(
                &mut out,
                "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
            );
            for seq in 0..3 {
                chunk(
                    &mut out,
                    &format!("id: {seq}\ndata: {{\"choices\":[{{\"delta\":{{\"content\":\" w{seq}\"}}}}]}}\n\n"),
                );
            }
            chunk(
                &mut out,
                "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n",
            );
            out.extend_from_slice(b"0\r\n\r\n");
        }
        let body = r#"{"error":{"message":"full","type":"overloaded","code":"overloaded"}}"#;
        out.extend_from_slice(
            format!(
                "HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nContent-Length: {}\r\nRetry-After: 1\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Chorus-Role: follower\r\n\r\n",
        );
        let events = "id: 7\r\ndata: {\"x\":1}\r\n\r\n: a comment\n\ndata: {\"error\":{\"code\":\"upstream_error\"}}\n\n";
        out.extend_from_slice(format!("{:x};ext=1\r\n{events}\r\n", events.len()).as_bytes());
        out.extend_from_slice(b"0\r\nX-Trailer: yes\r\n\r\n");
        out
    }

    fn expected() -> Vec<HttpEvent> {
        let head = |status, role: &str, request: &str| {
            HttpEvent::Head(Head {
                status,
                role: role.to_owned(),
                request: request.to_owned(),
            })
        };
        let mut want = Vec::new();
        for role in ["leader", "cache"] {
            want.push(head(200, role, &format!("r-{role}")));
            want.push(HttpEvent::Data(
                br#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#.to_vec(),
            ));
            want.extend((0..3).map(HttpEvent::Token));
            want.push(HttpEvent::Data(
                br#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#.to_vec(),
            ));
            want.push(HttpEvent::Done);
            want.push(HttpEvent::End);
        }
        want.push(head(429, "", ""));
        want.push(HttpEvent::Body(
            br#"{"error":{"message":"full","type":"overloaded","code":"overloaded"}}"#.to_vec(),
        ));
        want.push(HttpEvent::End);
        want.push(head(200, "follower", ""));
        want.push(HttpEvent::Token(7));
        want.push(HttpEvent::Data(
            br#"{"error":{"code":"upstream_error"}}"#.to_vec(),
        ));
        want.push(HttpEvent::End);
        want
    }

    fn parse_in(pieces: &[&[u8]]) -> Vec<HttpEvent> {
        let mut parser = Parser::default();
        let mut out = Vec::new();
        for piece in pieces {
            parser.feed(piece, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn a_connection_parses_whole() {
        let events = parse_in(&[&connection_bytes()]);
        assert_eq!(events, expected());
        assert!(events[events.len() - 2].is_error());
    }

    #[test]
    fn a_split_at_every_byte_gives_the_same_events() {
        let bytes = connection_bytes();
        let want = expected();
        for at in 0..=bytes.len() {
            let (a, b) = bytes.split_at(at);
            assert_eq!(parse_in(&[a, b]), want, "split at {at}");
        }
        let one_by_one: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(parse_in(&one_by_one), want, "a byte at a time");
    }

    #[test]
    fn malformed_chunks_are_errors() {
        let mut parser = Parser::default();
        let mut out = Vec::new();
        let bytes = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert!(parser.feed(bytes, &mut out).is_err());
        let mut parser = Parser::default();
        let bytes = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY";
        assert!(parser.feed(bytes, &mut out).is_err());
    }

    #[test]
    fn the_request_is_a_chat_turn_with_its_length() {
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let bytes = chat_request(addr, "Why?", "Be brief.", 1024, true);
        let text = String::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"));
        assert!(head.contains("\r\nCache-Control: no-cache\r\n"));
        assert!(head.contains(&format!("\r\nContent-Length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["stream"], true);
        assert_eq!(v["max_tokens"], 1024);
        assert_eq!(v["messages"][0]["role"], "system");
        assert_eq!(v["messages"][1]["content"], "Why?");
        let plain = chat_request(addr, "Why?", "", 1024, false);
        let text = String::from_utf8(plain).unwrap();
        assert!(!text.contains("no-cache"));
        let body = text.split_once("\r\n\r\n").unwrap().1;
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["messages"].as_array().unwrap().len(), 1);
    }
}
