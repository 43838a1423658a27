//! The client side of the fake upstream's self-checks
//! (`tests/upstream/upstream_selfcheck.rs` and
//! `tests/upstream/upstream_selfcheck_connections.rs`): raw requests over
//! plain sockets, and the response, its head and its event stream taken
//! apart by hand, so the checks trust no HTTP client.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

pub const SECOND: Duration = Duration::from_secs(1);

pub fn tokens(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| (*w).to_owned()).collect()
}

/// Connects and sends a `POST path` with `body` as JSON and `extra` headers.
pub fn post(addr: SocketAddr, path: &str, body: &Value, extra: &str) -> TcpStream {
    let body = body.to_string();
    let mut tcp = TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         {extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).unwrap();
    tcp
}

/// Reads to EOF: (status, head, body).
pub fn response(mut tcp: TcpStream) -> (u16, String, String) {
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).expect("read the response");
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

/// The `data:` payloads of an event-stream body, checking the framing.
pub fn events(body: &str) -> Vec<String> {
    assert!(body.is_empty() || body.ends_with("\n\n"), "{body:?}");
    body.split_terminator("\n\n")
        .map(|e| e.strip_prefix("data: ").expect("a data line").to_owned())
        .collect()
}

/// The content token of a chunk, if it carries one.
pub fn content(event: &str) -> Option<String> {
    let v: Value = serde_json::from_str(event).ok()?;
    v["choices"][0]["delta"]["content"]
        .as_str()
        .map(str::to_owned)
}

/// Reads until `needle` has arrived; returns everything read.
pub fn read_until(tcp: &mut TcpStream, needle: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let n = tcp.read(&mut buf).expect("read");
        assert!(
            n > 0,
            "closed before {needle:?}: {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}
