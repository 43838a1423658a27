//! A plain HTTP/1.1 client on one `TcpStream`, for tests of the exact bytes
//! the OpenAI-compatible API sends: it keeps the connection for the next
//! request (keep-alive), reads a body by its `Content-Length`, as chunks
//! (`Transfer-Encoding: chunked`, counting them and checking the last one)
//! or up to the close, and splits an event-stream body into server-sent
//! events. Nothing here is lenient: bytes that are not HTTP fail the test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use serde_json::Value;

use super::WAIT;

/// One connection; requests on it go one after the other.
pub struct Conn {
    pub tcp: TcpStream,
    /// Bytes read past the end of the last response.
    buf: Vec<u8>,
    addr: SocketAddr,
}

/// A response as it came.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// The status line and headers, as text.
    pub head: String,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
    /// Whether the body came chunked, ended by the zero-length chunk.
    pub chunked: bool,
    /// How many chunks carried data.
    pub chunks: usize,
}

/// One server-sent event: its `id:` (None without one) and its `data:`
/// lines joined with `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: Option<String>,
    pub data: String,
}

impl Event {
    /// `data` as JSON; fails the test when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {:?}", self.data))
    }
}

impl Response {
    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; fails the test when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}):\n{}\n{}",
                self.head,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as server-sent events, in order. Events are separated by a
    /// blank line; `\r\n` line ends are taken as `\n`.
    pub fn events(&self) -> Vec<Event> {
        parse_events(&self.text())
    }
}

/// Server-sent events in `text` (see [`Response::events`]).
pub fn parse_events(text: &str) -> Vec<Event> {
    let text = text.replace("\r\n", "\n");
    let mut events = Vec::new();
    for block in text.split("\n\n") {
        let mut id = None;
        let mut data: Option<String> = None;
        for line in block.lines() {
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => id = Some(value.to_owned()),
                "data" => match &mut data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => data = Some(value.to_owned()),
                },
                _ => {}
            }
        }
        if let Some(data) = data {
            events.push(Event { id, data });
        }
    }
    events
}

impl Conn {
    pub fn connect(addr: SocketAddr) -> Conn {
        let tcp = TcpStream::connect(addr).expect("connect to chorus");
        tcp.set_read_timeout(Some(WAIT)).expect("read timeout");
        tcp.set_write_timeout(Some(WAIT)).expect("write timeout");
        Conn {
            tcp,
            buf: Vec::new(),
            addr,
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).expect("send to chorus");
    }

    /// Sends `METHOD path` with `Host`, the `headers` given and, when there
    /// is a `body`, its `Content-Length`; reads the response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Response {
        self.send(&request_bytes(self.addr, method, path, headers, body));
        self.read_response()
    }

    /// `POST path` with a JSON body.
    pub fn post_json(&mut self, path: &str, headers: &[(&str, &str)], body: &Value) -> Response {
        let mut all = vec![("Content-Type", "application/json")];
        all.extend_from_slice(headers);
        self.request("POST", path, &all, Some(body.to_string().as_bytes()))
    }

    /// `GET path`.
    pub fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Response {
        self.request("GET", path, headers, None)
    }

    /// More bytes from the socket into the buffer; false at the end of the
    /// stream.
    fn fill(&mut self) -> bool {
        let mut scratch = [0u8; 16 * 1024];
        match self.tcp.read(&mut scratch) {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&scratch[..n]);
                true
            }
            Err(e) => panic!(
                "reading from chorus failed: {e}; read so far:\n{}",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    /// Everything up to and including the next CRLF, without it.
    fn line(&mut self) -> String {
        loop {
            if let Some(at) = find(&self.buf, b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..at + 2).take(at).collect();
                return String::from_utf8(line).expect("a header line that is not UTF-8");
            }
            assert!(
                self.fill(),
                "the connection closed in the middle of a line: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        }
    }

    /// Exactly `n` bytes.
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(
                self.fill(),
                "the connection closed {} bytes short of a {n}-byte body",
                n - self.buf.len()
            );
        }
        self.buf.drain(..n).collect()
    }

    /// Reads one response: the head, then the body as its headers frame it.
    pub fn read_response(&mut self) -> Response {
        if self.buf.is_empty() {
            assert!(
                self.fill(),
                "the connection closed before a response came (was it not kept alive?)"
            );
        }
        let status_line = self.line();
        let status = status_line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP/1.1 status line: {status_line:?}"));
        let mut head = status_line.clone();
        let mut headers = Vec::new();
        loop {
            let line = self.line();
            if line.is_empty() {
                break;
            }
            head.push_str("\r\n");
            head.push_str(&line);
            let (name, value) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("not a header line: {line:?}"));
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        let mut response = Response {
            status,
            head,
            headers,
            body: Vec::new(),
            chunked: false,
            chunks: 0,
        };
        let chunked = response
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        if chunked {
            response.chunked = true;
            loop {
                let size_line = self.line();
                let size =
                    usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                        .unwrap_or_else(|_| panic!("not a chunk size: {size_line:?}"));
                if size == 0 {
                    // Trailers, if any, up to the blank line.
                    while !self.line().is_empty() {}
                    break;
                }
                let data = self.bytes(size);
                response.body.extend_from_slice(&data);
                response.chunks += 1;
                let end = self.line();
                assert!(end.is_empty(), "chunk data longer than its size: {end:?}");
            }
        } else if let Some(length) = response.header("content-length") {
            let length: usize = length.parse().expect("Content-Length");
            response.body = self.bytes(length);
        } else if !(status == 204 || status == 304 || (100..200).contains(&status)) {
            while self.fill() {}
            response.body = std::mem::take(&mut self.buf);
        }
        response
    }
}

/// The bytes of one request (see [`Conn::request`]).
pub fn request_bytes(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    bytes
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
