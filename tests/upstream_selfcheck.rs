//! The fake OpenAI upstream (`common::upstream`) checked on its own, over
//! raw sockets and with ureq (the client chorus uses), so a failure in the
//! provider tests can be trusted to be chorus's and not the fake's: its
//! replies, how it reads requests, and how it treats connections in each
//! of its modes (down to the bytes of a chunked stream).

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::upstream::{Connections, Reply, Script, ScriptedCall, Upstream};
use serde_json::{json, Value};

const SECOND: Duration = Duration::from_secs(1);

fn tokens(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| (*w).to_owned()).collect()
}

/// Connects and sends a `POST path` with `body` as JSON and `extra` headers.
fn post(addr: SocketAddr, path: &str, body: &Value, extra: &str) -> TcpStream {
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
fn response(mut tcp: TcpStream) -> (u16, String, String) {
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).expect("read the response");
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

/// The `data:` payloads of an event-stream body, checking the framing.
fn events(body: &str) -> Vec<String> {
    assert!(body.is_empty() || body.ends_with("\n\n"), "{body:?}");
    body.split_terminator("\n\n")
        .map(|e| e.strip_prefix("data: ").expect("a data line").to_owned())
        .collect()
}

/// The content token of a chunk, if it carries one.
fn content(event: &str) -> Option<String> {
    let v: Value = serde_json::from_str(event).ok()?;
    v["choices"][0]["delta"]["content"]
        .as_str()
        .map(str::to_owned)
}

/// Reads until `needle` has arrived; returns everything read.
fn read_until(tcp: &mut TcpStream, needle: &str) -> String {
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

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[test]
fn the_default_reply_is_an_openai_stream_and_the_request_is_recorded() {
    let upstream = Upstream::start();
    assert!(upstream.base_url().starts_with("http://127.0.0.1:"));
    assert!(upstream.base_url().ends_with("/v1"));
    let before = Instant::now();
    let tcp = post(
        upstream.addr(),
        "/v1/chat/completions",
        &json!({"model": "m", "stream": true}),
        "Authorization: Bearer k\r\nX-Mixed-Case: Yes\r\n",
    );
    let (status, head, body) = response(tcp);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(header(&head, "content-type"), Some("text/event-stream"));
    assert_eq!(header(&head, "connection"), Some("close"));
    assert_eq!(header(&head, "content-length"), None);
    assert_eq!(status, 200);

    let events = events(&body);
    assert_eq!(events.len(), 4 + 1 + 1 + 1, "{events:#?}");
    let words: Vec<String> = events[..4].iter().filter_map(|e| content(e)).collect();
    assert_eq!(words, ["Hello", " from", " up", "stream"]);
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(
        first,
        json!({"id": "chatcmpl-test", "object": "chat.completion.chunk",
               "choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": null}]})
    );
    let finish: Value = serde_json::from_str(&events[4]).unwrap();
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let usage: Value = serde_json::from_str(&events[5]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14})
    );
    assert_eq!(events[6], "[DONE]");

    let requests = upstream.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(r.body, json!({"model": "m", "stream": true}));
    assert_eq!(r.header("authorization"), Some("Bearer k"));
    assert!(r.headers.contains(&("x-mixed-case".into(), "Yes".into())));
    assert!(r.at >= before && r.at <= Instant::now());
    // A response read to the end was not abandoned.
    assert!(!upstream.wait_disconnects(1, Duration::from_millis(100)));
}

#[test]
fn queued_replies_are_used_in_order_then_the_default() {
    let upstream = Upstream::start();
    upstream.push(Reply::Stream {
        tokens: tokens(&["cut", " short"]),
        delay: Duration::ZERO,
        finish: "length",
        usage: None,
    });
    upstream.push(Reply::Error {
        status: 429,
        message: "slow down".into(),
        retry_after: Some(7),
    });
    upstream.push(Reply::Error {
        status: 503,
        message: "warming up".into(),
        retry_after: None,
    });
    upstream.push(Reply::Json {
        status: 201,
        body: json!({"choices": [{"message": {"content": "tool!"}}]}),
    });
    let addr = upstream.addr();
    let ask = |path: &str| response(post(addr, path, &json!({}), ""));

    let (status, _, body) = ask("/v1/chat/completions");
    assert_eq!(status, 200);
    let chunks = events(&body);
    assert_eq!(chunks.len(), 2 + 1 + 1, "no usage chunk: {chunks:#?}");
    assert_eq!(content(&chunks[1]).as_deref(), Some(" short"));
    let finish: Value = serde_json::from_str(&chunks[2]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[3], "[DONE]");

    let (status, head, body) = ask("/anything/at/all?x=1");
    assert_eq!(status, 429);
    assert!(
        head.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
        "{head}"
    );
    assert_eq!(header(&head, "retry-after"), Some("7"));
    assert_eq!(header(&head, "content-type"), Some("application/json"));
    assert_eq!(
        header(&head, "content-length"),
        Some(body.len().to_string().as_str())
    );
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        error,
        json!({"error": {"message": "slow down", "type": "test_error"}})
    );

    let (status, head, _) = ask("/v1/chat/completions");
    assert_eq!(status, 503);
    assert!(
        head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{head}"
    );
    assert_eq!(header(&head, "retry-after"), None);

    let (status, head, body) = ask("/v1/chat/completions");
    assert_eq!(status, 201);
    assert_eq!(
        header(&head, "content-length"),
        Some(body.len().to_string().as_str())
    );
    let parsed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(parsed["choices"][0]["message"]["content"], "tool!");

    let (status, _, body) = ask("/v1/chat/completions");
    assert_eq!(status, 200);
    assert_eq!(content(&events(&body)[0]).as_deref(), Some("Hello"));

    let paths: Vec<String> = upstream.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths[1], "/anything/at/all?x=1");
    assert_eq!(paths.len(), 5);
    assert_eq!(upstream.disconnects(), 0);
}

#[test]
fn reset_after_ends_the_stream_without_a_finish_or_done() {
    let upstream = Upstream::start();
    upstream.push(Reply::ResetAfter {
        tokens: tokens(&["half", " an"]),
        delay: Duration::from_millis(10),
    });
    let (status, _, body) = response(post(
        upstream.addr(),
        "/v1/chat/completions",
        &json!({}),
        "",
    ));
    assert_eq!(status, 200);
    let events = events(&body);
    let words: Vec<String> = events.iter().filter_map(|e| content(e)).collect();
    assert_eq!(words, ["half", " an"]);
    assert_eq!(events.len(), 2, "nothing after the tokens: {events:#?}");
    assert!(!body.contains("[DONE]") && !body.contains("\"finish_reason\":\"stop\""));
    assert_eq!(
        upstream.disconnects(),
        0,
        "the server cut it, not the client"
    );
}

#[test]
fn a_client_leaving_a_stalled_stream_is_one_disconnect() {
    let upstream = Upstream::start();
    upstream.push(Reply::StallAfter {
        tokens: tokens(&["and", " then"]),
    });
    let mut tcp = post(upstream.addr(), "/v1/chat/completions", &json!({}), "");
    let seen = read_until(&mut tcp, "\" then\"");
    assert!(seen.starts_with("HTTP/1.1 200 OK\r\n"));
    // Then silence, on an open socket.
    tcp.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 64];
    let err = tcp.read(&mut buf).expect_err("the stream should stall");
    assert!(matches!(
        err.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut
    ));
    assert_eq!(upstream.disconnects(), 0);

    let left = Instant::now();
    drop(tcp);
    assert!(
        upstream.wait_disconnects(1, SECOND),
        "the leave went unnoticed"
    );
    assert!(left.elapsed() < SECOND);
    assert!(!upstream.wait_disconnects(2, Duration::from_millis(100)));
}

#[test]
fn a_client_leaving_mid_stream_is_one_disconnect() {
    let upstream = Upstream::start();
    upstream.push(Reply::Stream {
        tokens: (0..30).map(|i| format!("t{i}")).collect(),
        delay: Duration::from_millis(20),
        finish: "stop",
        usage: Some((1, 30)),
    });
    let mut tcp = post(upstream.addr(), "/v1/chat/completions", &json!({}), "");
    read_until(&mut tcp, "\"t0\"");
    drop(tcp);
    // The first write after the close may still succeed; one of the next
    // fails, long before the 30 tokens would have been sent.
    assert!(
        upstream.wait_disconnects(1, SECOND),
        "the leave went unnoticed"
    );
    assert!(!upstream.wait_disconnects(2, Duration::from_millis(100)));
}

#[test]
fn requests_are_read_however_they_are_framed_and_garbage_gets_a_400() {
    let upstream = Upstream::start();
    let addr = upstream.addr();

    // The head split mid-line and mid-terminator, the body in pieces.
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for piece in [
        "POST /v1/a HTTP/1.1\r\nHo",
        "st: x\r\nContent-Length: 13\r\n\r",
        "\n{\"a\":",
        " [1, 2]}",
    ] {
        tcp.write_all(piece.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(response(tcp).0, 200);

    // Chunked, with an Expect: 100-continue the server must answer first.
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.write_all(
        b"POST /v1/b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
          Expect: 100-continue\r\n\r\n",
    )
    .unwrap();
    let interim = read_until(&mut tcp, "\r\n\r\n");
    assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
    tcp.write_all(b"5;ext=1\r\n{\"b\":\r\n3\r\n 2}\r\n0\r\nTrailer: t\r\n\r\n")
        .unwrap();
    assert_eq!(response(tcp).0, 200);

    // Not HTTP: a 400, and nothing recorded or consumed.
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.write_all(b"hello there\r\n\r\n").unwrap();
    assert_eq!(response(tcp).0, 400);
    // A connection that closes without a word is no request either.
    drop(TcpStream::connect(addr).unwrap());

    // A GET without a body is recorded with a Null body.
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(response(tcp).0, 200);

    assert!(upstream.wait_requests(3, SECOND));
    let requests = upstream.requests();
    assert_eq!(requests.len(), 3, "{requests:#?}");
    assert_eq!(requests[0].body, json!({"a": [1, 2]}));
    assert_eq!(requests[1].path, "/v1/b");
    assert_eq!(requests[1].body, json!({"b": 2}));
    assert_eq!(requests[2].method, "GET");
    assert_eq!(requests[2].body, Value::Null);
    assert_eq!(upstream.disconnects(), 0);
}

#[test]
fn ureq_sees_each_token_as_it_is_produced() {
    let upstream = Upstream::start();
    upstream.push(Reply::Stream {
        tokens: tokens(&["a", "b", "c"]),
        delay: Duration::from_millis(200),
        finish: "stop",
        usage: None,
    });
    upstream.push(Reply::Error {
        status: 429,
        message: "later".into(),
        retry_after: Some(1),
    });
    // As chorus does: a 4xx/5xx is a response to read, not an error.
    let ureq_post = |url: &str, body: Value| {
        ureq::post(url)
            .config()
            .http_status_as_error(false)
            .build()
            .send_json(body)
    };
    let url = format!("{}/chat/completions", upstream.base_url());

    let response = ureq_post(&url, json!({"stream": true})).expect("stream");
    assert_eq!(response.status().as_u16(), 200);
    let reader = BufReader::new(response.into_body().into_reader());
    let mut arrivals = Vec::new();
    let mut lines = Vec::new();
    for line in reader.lines() {
        let line = line.expect("read a line");
        if let Some(data) = line.strip_prefix("data: ") {
            arrivals.push(Instant::now());
            lines.push(data.to_owned());
        }
    }
    let words: Vec<String> = lines.iter().filter_map(|e| content(e)).collect();
    assert_eq!(words, ["a", "b", "c"]);
    assert_eq!(lines.last().map(String::as_str), Some("[DONE]"));
    // Read incrementally: the first token was in hand before the last one
    // was even produced (3 delays after the request arrived). A client that
    // buffered to the end could not pass this, however slow the machine.
    let last_produced = upstream.requests()[0].at + 3 * Duration::from_millis(200);
    assert!(
        arrivals[0] < last_produced,
        "first token seen {:?} after the last one was produced",
        arrivals[0] - last_produced
    );

    let mut response = ureq_post(&url, json!({})).expect("error reply");
    assert_eq!(response.status().as_u16(), 429);
    let retry_after = response
        .headers()
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(retry_after, "1");
    let body = response.body_mut().read_to_string().unwrap();
    assert!(body.contains("\"later\""), "{body}");

    assert_eq!(upstream.requests()[0].body, json!({"stream": true}));
    assert!(!upstream.wait_disconnects(1, Duration::from_millis(50)));
}

#[test]
fn dropping_the_upstream_is_quick_and_ends_a_stalled_stream() {
    let upstream = Upstream::start();
    upstream.push(Reply::StallAfter {
        tokens: tokens(&["x"]),
    });
    let mut tcp = post(upstream.addr(), "/v1/chat/completions", &json!({}), "");
    read_until(&mut tcp, "\"x\"");
    let addr = upstream.addr();
    let dropping = Instant::now();
    drop(upstream);
    assert!(dropping.elapsed() < Duration::from_millis(500));
    // The stalled connection ends instead of lingering for a minute.
    tcp.set_read_timeout(Some(SECOND)).unwrap();
    let mut rest = Vec::new();
    let ended = Instant::now();
    let _ = tcp.read_to_end(&mut rest);
    assert!(ended.elapsed() < SECOND, "the stall outlived its server");
    // Nobody accepts any more.
    assert!(TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err());
}

/// A chunk as OpenAI streams it, with one choice carrying `delta`.
fn openai_chunk(delta: Value, finish_reason: Value) -> Value {
    json!({"id": "chatcmpl-test", "object": "chat.completion.chunk",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})
}

fn head_delta(index: u64, id: &str, name: &str) -> Value {
    json!({"tool_calls": [{"index": index, "id": id, "type": "function",
                           "function": {"name": name, "arguments": ""}}]})
}

fn piece_delta(index: u64, piece: &str) -> Value {
    json!({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
}

#[test]
fn scripted_events_are_sent_exactly_as_openai_chunks_in_order() {
    let upstream = Upstream::start();
    let usage = json!({"id": "chatcmpl-test", "object": "chat.completion.chunk",
                       "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}});
    let delay = Duration::from_millis(10);
    upstream.push(
        Script::new()
            .content("Hi")
            .calls(
                &[
                    ScriptedCall::new(0, "call_a", "calculator", r#"{"e":1}"#),
                    ScriptedCall::new(1, "call_b", "clock", "{}"),
                ],
                2,
            )
            .content("!")
            .call_head(5, "call_c", "teleport", "{}")
            .arguments(5, " ")
            .raw(usage.clone())
            .reply_with_delay("tool_calls", delay),
    );
    let sent = Instant::now();
    let (status, head, body) = response(post(
        upstream.addr(),
        "/v1/chat/completions",
        &json!({"stream": true}),
        "",
    ));
    assert_eq!(status, 200);
    assert_eq!(header(&head, "content-type"), Some("text/event-stream"));
    assert_eq!(header(&head, "connection"), Some("close"));
    let events = events(&body);
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("a JSON chunk"))
        .collect();
    let delta = |d: Value| openai_chunk(d, Value::Null);
    let expected = vec![
        delta(json!({"content": "Hi"})),
        // Both heads, then the arguments two bytes at a time, interleaved.
        delta(head_delta(0, "call_a", "calculator")),
        delta(head_delta(1, "call_b", "clock")),
        delta(piece_delta(0, "{\"")),
        delta(piece_delta(1, "{}")),
        delta(piece_delta(0, "e\"")),
        delta(piece_delta(0, ":1")),
        delta(piece_delta(0, "}")),
        delta(json!({"content": "!"})),
        delta(
            json!({"tool_calls": [{"index": 5, "id": "call_c", "type": "function",
                                     "function": {"name": "teleport", "arguments": "{}"}}]}),
        ),
        delta(piece_delta(5, " ")),
        // A whole chunk goes out untouched.
        usage,
        openai_chunk(json!({}), json!("tool_calls")),
    ];
    assert_eq!(chunks, expected);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    // `delay` came before each of the 12 scripted events.
    assert!(sent.elapsed() >= 12 * delay, "{:?}", sent.elapsed());

    // Assembled by index, as a client must, the pieces give the arguments back.
    let mut arguments = std::collections::BTreeMap::<u64, String>::new();
    for chunk in &chunks {
        for call in chunk["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            arguments
                .entry(call["index"].as_u64().unwrap())
                .or_default()
                .push_str(call["function"]["arguments"].as_str().unwrap());
        }
    }
    let arguments: Vec<(u64, &str)> = arguments.iter().map(|(i, a)| (*i, a.as_str())).collect();
    assert_eq!(arguments, [(0, r#"{"e":1}"#), (1, "{}"), (5, "{} ")]);
    assert_eq!(upstream.requests()[0].body, json!({"stream": true}));
    assert_eq!(upstream.disconnects(), 0);
}

#[test]
fn script_pieces_cover_the_arguments_and_never_split_a_character() {
    let call = ScriptedCall::new(0, "id", "calculator", "{\"a\":\"é\"}");
    let pieces = |size: usize| -> Vec<String> {
        Script::new().call(&call, size).events()[1..]
            .iter()
            .map(|e| {
                assert_eq!(e["tool_calls"][0]["index"], 0);
                e["tool_calls"][0]["function"]["arguments"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    };
    // 1 byte each, except the two-byte "é", which stays whole.
    let ones = pieces(1);
    assert_eq!(ones.len(), call.arguments.chars().count());
    assert!(ones.contains(&"é".to_owned()), "{ones:?}");
    assert_eq!(ones.concat(), call.arguments);
    assert_eq!(pieces(0), ones, "a size of 0 counts as 1");
    assert_eq!(pieces(4), ["{\"a\"", ":\"é", "\"}"]);
    assert_eq!(pieces(100), [call.arguments.as_str()]);
    // No arguments: the head alone.
    let bare = ScriptedCall::new(2, "id2", "clock", "");
    assert_eq!(
        Script::new().call(&bare, 1).events(),
        [head_delta(2, "id2", "clock")]
    );
    assert_eq!(
        Script::new().contents(&["a", "b"]).events(),
        [json!({"content": "a"}), json!({"content": "b"})]
    );
}

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
