//! The fake OpenAI upstream (`common::upstream`) checked on its own, over
//! raw sockets and with ureq (the client chorus uses), so a failure in the
//! provider tests can be trusted to be chorus's and not the fake's: its
//! replies and the scripted tool-call streams, how it reads requests, how
//! it notices a client leaving, and how it stops. How it treats
//! connections in each of its modes is checked in
//! `upstream_selfcheck_connections.rs`.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::common::upstream::{Reply, Script, ScriptedCall, Upstream};
use crate::common::upstream_probe::{
    content, events, header, post, read_until, response, tokens, SECOND,
};
use serde_json::{json, Value};

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

#[test]
fn held_responses_wait_for_the_release_and_their_requests_are_recorded() {
    let upstream = Upstream::start();
    upstream.hold();
    let body = json!({"model": "m", "stream": true});
    let mut first = post(upstream.addr(), "/v1/chat/completions", &body, "");
    let second = post(upstream.addr(), "/v1/chat/completions", &body, "");
    assert!(
        upstream.wait_requests(2, 5 * SECOND),
        "both recorded while held"
    );
    // Not a byte of a response while held.
    first
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut byte = [0u8; 1];
    match first.read(&mut byte) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("a held response sent something: {other:?}"),
    }
    first.set_read_timeout(Some(5 * SECOND)).unwrap();
    upstream.release();
    for tcp in [first, second] {
        let (status, _, body) = response(tcp);
        assert_eq!(status, 200);
        let words: Vec<String> = events(&body).iter().filter_map(|e| content(e)).collect();
        assert_eq!(words, ["Hello", " from", " up", "stream"]);
    }
}
