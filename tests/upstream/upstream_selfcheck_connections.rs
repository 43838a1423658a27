//! The fake OpenAI upstream (`common::upstream`) checked on its own: how
//! it treats connections in each of its modes ([`Connections`]), down to
//! the bytes of a chunked stream, over raw sockets and with ureq (the
//! client chorus uses), so a failure in the tests of kept connections can
//! be trusted to be chorus's and not the fake's. Its replies and how it
//! reads requests are checked in `upstream_selfcheck.rs`.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::common;
use crate::common::upstream::{Connections, Reply, Script, ScriptedCall, Upstream};
use crate::common::upstream_probe::{content, events, post, response, tokens, SECOND};
use serde_json::{json, Value};

/// A client end of one connection that reads a response the way the
/// server framed it, checking the framing byte by byte.
struct Wire {
    reader: BufReader<TcpStream>,
}

impl Wire {
    fn connect(addr: SocketAddr) -> Wire {
        let tcp = TcpStream::connect(addr).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Wire {
            reader: BufReader::new(tcp),
        }
    }

    /// Sends a `POST path` with `body` as JSON and `extra` headers.
    fn post(&mut self, path: &str, body: &Value, extra: &str) {
        let body = body.to_string();
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             {extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.reader
            .get_mut()
            .write_all(request.as_bytes())
            .expect("send the request");
    }

    /// One CRLF-terminated line, without the CRLF.
    fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read a line");
        assert!(n > 0, "the connection closed mid-response");
        line.strip_suffix("\r\n")
            .unwrap_or_else(|| panic!("a line without its CRLF: {line:?}"))
            .to_owned()
    }

    /// The response head: (status, header lines).
    fn head(&mut self) -> (u16, Vec<String>) {
        let status_line = self.line();
        let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut headers = Vec::new();
        loop {
            let line = self.line();
            if line.is_empty() {
                return (status, headers);
            }
            headers.push(line);
        }
    }

    /// A chunked body: the data of each chunk up to the last (empty) one,
    /// which must have no trailers.
    fn chunks(&mut self) -> Vec<String> {
        let mut chunks = Vec::new();
        loop {
            let size_line = self.line();
            let size = usize::from_str_radix(&size_line, 16)
                .unwrap_or_else(|_| panic!("not a chunk size: {size_line:?}"));
            if size == 0 {
                assert_eq!(self.line(), "", "no trailers after the last chunk");
                return chunks;
            }
            let mut data = vec![0u8; size + 2];
            self.reader.read_exact(&mut data).expect("a whole chunk");
            assert_eq!(&data[size..], b"\r\n", "a chunk ends with CRLF");
            data.truncate(size);
            chunks.push(String::from_utf8(data).expect("UTF-8 chunk"));
        }
    }

    /// Exactly `n` body bytes.
    fn body(&mut self, n: usize) -> String {
        let mut body = vec![0u8; n];
        self.reader.read_exact(&mut body).expect("the whole body");
        String::from_utf8(body).expect("UTF-8 body")
    }

    /// Whether the server closed the connection: the next read is the end
    /// of the stream (or a reset), with not one byte more.
    fn closed(&mut self) -> bool {
        let mut rest = [0u8; 64];
        match self.reader.read(&mut rest) {
            Ok(0) => true,
            Ok(n) => panic!(
                "bytes after the response: {:?}",
                String::from_utf8_lossy(&rest[..n])
            ),
            Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        }
    }

    /// Whether the connection is open and silent for `quiet`.
    fn silent_for(&mut self, quiet: Duration) -> bool {
        self.reader.get_ref().set_read_timeout(Some(quiet)).unwrap();
        let mut probe = [0u8; 1];
        let silent = matches!(
            self.reader.read(&mut probe),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
        );
        self.reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        silent
    }
}

/// The header lines called `name`, their values.
fn header_values<'a>(headers: &'a [String], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
        .collect()
}

/// Asserts a head that keeps the connection and announces a chunked
/// event stream.
fn assert_chunked_stream_head(status: u16, headers: &[String]) {
    assert_eq!(status, 200);
    assert_eq!(
        header_values(headers, "content-type"),
        ["text/event-stream"]
    );
    assert_eq!(header_values(headers, "transfer-encoding"), ["chunked"]);
    assert!(
        header_values(headers, "content-length").is_empty(),
        "{headers:?}"
    );
    assert!(
        header_values(headers, "connection").is_empty(),
        "no Connection header, so HTTP/1.1 keeps the connection: {headers:?}"
    );
}

/// Asserts every chunk holds exactly one whole event; returns the events'
/// `data:` payloads.
fn one_event_per_chunk(chunks: &[String]) -> Vec<String> {
    chunks
        .iter()
        .map(|chunk| {
            let data = chunk
                .strip_prefix("data: ")
                .and_then(|c| c.strip_suffix("\n\n"))
                .unwrap_or_else(|| panic!("not one event: {chunk:?}"));
            assert!(!data.contains("\n\n"), "two events in a chunk: {chunk:?}");
            data.to_owned()
        })
        .collect()
}

#[test]
fn closing_kept_connections_sends_one_chunk_per_event_and_closes_after_the_last() {
    let upstream = Upstream::start_with(Connections::CloseAfterResponse);
    let mut wire = Wire::connect(upstream.addr());
    wire.post("/v1/chat/completions", &json!({"stream": true}), "");
    let (status, headers) = wire.head();
    assert_chunked_stream_head(status, &headers);
    let events = one_event_per_chunk(&wire.chunks());
    let words: Vec<String> = events.iter().filter_map(|e| content(e)).collect();
    assert_eq!(words, ["Hello", " from", " up", "stream"]);
    assert_eq!(events.len(), 4 + 1 + 1 + 1, "{events:#?}");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    // Right after the last chunk the server closes, though the client
    // never said it would not send another request.
    let last_chunk = Instant::now();
    assert!(wire.closed(), "the server kept the connection open");
    assert!(last_chunk.elapsed() < SECOND);
    // A second request on it reaches nobody.
    let _ = wire
        .reader
        .get_mut()
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert!(wire.closed());
    assert!(!upstream.wait_requests(2, Duration::from_millis(100)));
    assert_eq!(upstream.connections(), 1);
    assert_eq!(upstream.disconnects(), 0);
}

#[test]
fn closing_on_the_next_request_keeps_the_connection_until_that_request_arrives() {
    let upstream = Upstream::start_with(Connections::CloseOnNextRequest);
    upstream.push(
        Script::new()
            .call(&ScriptedCall::new(0, "call_1", "calculator", "{}"), 1)
            .reply("tool_calls"),
    );
    let mut wire = Wire::connect(upstream.addr());
    wire.post("/v1/chat/completions", &json!({"n": 1}), "");
    let (status, headers) = wire.head();
    assert_chunked_stream_head(status, &headers);
    let events = one_event_per_chunk(&wire.chunks());
    assert_eq!(
        events.len(),
        1 + 2 + 1 + 1,
        "head, 2 pieces, finish, [DONE]"
    );
    // Open and quiet, so a client checking it before reuse finds it alive,
    assert!(wire.silent_for(Duration::from_millis(150)));
    // until the next request is on it: then closed, with no answer.
    wire.post("/v1/chat/completions", &json!({"n": 2}), "");
    assert!(wire.closed(), "the second request got an answer");
    assert!(!upstream.wait_requests(2, Duration::from_millis(100)));
    // A new connection is served as the first was.
    let mut fresh = Wire::connect(upstream.addr());
    fresh.post("/v1/chat/completions", &json!({"n": 3}), "");
    let (status, headers) = fresh.head();
    assert_chunked_stream_head(status, &headers);
    let words: Vec<String> = one_event_per_chunk(&fresh.chunks())
        .iter()
        .filter_map(|e| content(e))
        .collect();
    assert_eq!(words, ["Hello", " from", " up", "stream"]);
    let bodies: Vec<Value> = upstream.requests().into_iter().map(|r| r.body).collect();
    assert_eq!(bodies, [json!({"n": 1}), json!({"n": 3})]);
    assert_eq!(upstream.connections(), 2);
}

#[test]
fn keep_alive_serves_every_request_of_a_connection_until_it_says_close() {
    let upstream = Upstream::start_with(Connections::KeepAlive);
    upstream.push(Reply::Stream {
        tokens: tokens(&["one"]),
        delay: Duration::ZERO,
        finish: "stop",
        usage: None,
    });
    upstream.push(Reply::Error {
        status: 429,
        message: "slow down".into(),
        retry_after: Some(1),
    });
    upstream.push(Reply::Stream {
        tokens: tokens(&["three"]),
        delay: Duration::ZERO,
        finish: "stop",
        usage: None,
    });
    let mut wire = Wire::connect(upstream.addr());

    wire.post("/v1/chat/completions", &json!({"n": 1}), "");
    let (status, headers) = wire.head();
    assert_chunked_stream_head(status, &headers);
    let events = one_event_per_chunk(&wire.chunks());
    assert_eq!(content(&events[0]).as_deref(), Some("one"));
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(wire.silent_for(Duration::from_millis(100)), "kept open");

    // A whole response has a length, and keeps the connection too.
    wire.post("/v1/chat/completions", &json!({"n": 2}), "");
    let (status, headers) = wire.head();
    assert_eq!(status, 429);
    assert!(
        header_values(&headers, "connection").is_empty(),
        "{headers:?}"
    );
    assert_eq!(header_values(&headers, "retry-after"), ["1"]);
    let length: usize = header_values(&headers, "content-length")[0]
        .parse()
        .unwrap();
    let error: Value = serde_json::from_str(&wire.body(length)).unwrap();
    assert_eq!(error["error"]["message"], "slow down");
    assert!(wire.silent_for(Duration::from_millis(100)), "kept open");

    // A request that says `Connection: close` is the last.
    wire.post(
        "/v1/chat/completions",
        &json!({"n": 3}),
        "Connection: close\r\n",
    );
    let (status, headers) = wire.head();
    assert_chunked_stream_head(status, &headers);
    let events = one_event_per_chunk(&wire.chunks());
    assert_eq!(content(&events[0]).as_deref(), Some("three"));
    assert!(wire.closed(), "a last request leaves the connection open");

    let bodies: Vec<Value> = upstream.requests().into_iter().map(|r| r.body).collect();
    assert_eq!(bodies, [json!({"n": 1}), json!({"n": 2}), json!({"n": 3})]);
    assert_eq!(upstream.connections(), 1, "three requests, one connection");
    assert_eq!(upstream.disconnects(), 0);
}

#[test]
fn ureq_reads_the_chunked_streams_and_reuses_a_kept_connection() {
    let upstream = Upstream::start_with(Connections::KeepAlive);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("{}/chat/completions", upstream.base_url());
    for i in 0..3 {
        upstream.push(Reply::Stream {
            tokens: tokens(&["call", &format!(" {i}")]),
            delay: Duration::from_millis(5),
            finish: "stop",
            usage: None,
        });
        let response = agent
            .post(&url)
            .send_json(json!({"stream": true}))
            .expect("a response");
        assert_eq!(response.status().as_u16(), 200);
        // Read to its end (the last chunk), so the connection goes back to
        // the agent's pool.
        let body = response
            .into_body()
            .read_to_string()
            .expect("the whole stream");
        let words: Vec<String> = events(&body).iter().filter_map(|e| content(e)).collect();
        assert_eq!(words, ["call", &format!(" {i}")]);
    }
    assert_eq!(upstream.requests().len(), 3);
    assert_eq!(upstream.connections(), 1, "ureq kept its connection");
    assert_eq!(upstream.disconnects(), 0);
}

#[test]
fn connections_are_counted_whether_or_not_a_request_came() {
    let upstream = Upstream::start();
    assert_eq!(upstream.connections(), 0);
    drop(TcpStream::connect(upstream.addr()).unwrap());
    let (status, _, _) = response(post(
        upstream.addr(),
        "/v1/chat/completions",
        &json!({}),
        "",
    ));
    assert_eq!(status, 200);
    assert!(upstream.wait_requests(1, SECOND));
    assert_eq!(upstream.connections(), 2);
    assert_eq!(upstream.requests().len(), 1);
}

#[test]
fn a_stream_cut_short_ends_a_kept_connection_without_its_last_chunk() {
    let upstream = Upstream::start_with(Connections::KeepAlive);
    upstream.push(Reply::ResetAfter {
        tokens: tokens(&["half", " an"]),
        delay: Duration::ZERO,
    });
    let mut wire = Wire::connect(upstream.addr());
    wire.post("/v1/chat/completions", &json!({}), "");
    let (status, headers) = wire.head();
    assert_chunked_stream_head(status, &headers);
    let mut words = Vec::new();
    for _ in 0..2 {
        let size = usize::from_str_radix(&wire.line(), 16).expect("a chunk size");
        let chunk = wire.body(size + 2);
        let events = one_event_per_chunk(&[chunk[..size].to_owned()]);
        words.extend(content(&events[0]));
    }
    assert_eq!(words, ["half", " an"]);
    // No finish, no `[DONE]`, no last chunk: the connection just ends.
    assert!(wire.closed());
    assert_eq!(upstream.connections(), 1);
    assert_eq!(
        upstream.disconnects(),
        0,
        "the server cut it, not the client"
    );
}

/// `common::http1`, the plain client of the HTTP API's tests, against the
/// fake in keep-alive mode: it de-chunks a stream, finds its events and
/// leaves the connection ready for the next response, and reads a body
/// by its length.
#[test]
fn the_http1_test_client_reads_chunked_streams_and_lengths_on_a_kept_connection() {
    let upstream = Upstream::start_with(Connections::KeepAlive);
    upstream.push(Reply::Stream {
        tokens: tokens(&["one", " two"]),
        delay: Duration::ZERO,
        finish: "stop",
        usage: Some((1, 2)),
    });
    upstream.push(Reply::Error {
        status: 429,
        message: "slow down".into(),
        retry_after: Some(3),
    });
    let mut conn = common::http1::Conn::connect(upstream.addr());
    let body = json!({"model": "m", "stream": true});
    let stream = conn.post_json("/v1/chat/completions", &[], &body);
    assert_eq!(stream.status, 200);
    assert!(stream.chunked);
    let events = stream.events();
    assert_eq!(stream.chunks, events.len(), "one event per chunk");
    let words: Vec<String> = events.iter().filter_map(|e| content(&e.data)).collect();
    assert_eq!(words, ["one", " two"]);
    assert!(events.iter().all(|e| e.id.is_none()));
    assert_eq!(events.last().map(|e| e.data.as_str()), Some("[DONE]"));

    let refused = conn.post_json("/v1/chat/completions", &[("Connection", "close")], &body);
    assert_eq!(refused.status, 429);
    assert!(!refused.chunked);
    assert_eq!(refused.header("Retry-After"), Some("3"));
    assert_eq!(refused.json()["error"]["message"], "slow down");
    assert_eq!(upstream.connections(), 1, "both on one connection");
}
