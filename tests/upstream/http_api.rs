//! The OpenAI-compatible HTTP API and the WebSocket protocol as one
//! gateway: the real chorus binary, with default settings, in front of the
//! loopback OpenAI-compatible server of `common::upstream`.
//!
//! What it proves: an HTTP request and a WebSocket chat that would send
//! the upstream the same input (system prompt, history, message, options)
//! share one generation, whichever comes first: one upstream call, one
//! leader, the other a follower with the same text; and one cache entry,
//! which a later request of either transport is served from. An HTTP
//! request that differs in an option the model sees makes its own call.
//! The usage the upstream reported reaches the HTTP answer whatever the
//! role.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::common::upstream::{Reply, Upstream};
use crate::common::{Client, Server, WAIT};
use serde_json::{json, Value};

/// The system prompt and token limit a chat gets by default.
const SYSTEM_PROMPT: &str = "You are a helpful assistant.";
const MAX_TOKENS: u32 = 1024;
const MODEL: &str = "test-model";

/// A chorus at its defaults whose upstream is `upstream`.
fn chorus(upstream: &Upstream) -> Server {
    Server::start(&format!(
        "[llm]\nprovider = \"openai\"\nmodel = \"{MODEL}\"\nbase_url = \"{}\"\n",
        upstream.base_url()
    ))
}

/// An answer the upstream streams slowly enough for a second request to
/// join it while it runs.
fn slow(words: &[&str]) -> Reply {
    Reply::Stream {
        tokens: words.iter().map(|w| (*w).to_owned()).collect(),
        delay: Duration::from_millis(150),
        finish: "stop",
        usage: Some((17, words.len() as u64)),
    }
}

/// The body an OpenAI client sends for what a chat of `message` in a new
/// conversation sends upstream.
fn as_chat(message: &str, stream: bool) -> Value {
    json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": message},
        ],
        "max_tokens": MAX_TOKENS,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}

/// One HTTP response, read to the end of the connection.
struct Response {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// The body with chunked transfer encoding undone.
    fn dechunked(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = &self.body[..];
        loop {
            let line_end = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("a chunk size line");
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap(), 16)
                .expect("a hex chunk size");
            rest = &rest[line_end + 2..];
            if size == 0 {
                return out;
            }
            out.extend_from_slice(&rest[..size]);
            assert_eq!(&rest[size..size + 2], b"\r\n", "chunk ends with CRLF");
            rest = &rest[size + 2..];
        }
    }

    /// The `data:` payloads of a streamed answer, as JSON (`[DONE]` as a string).
    fn events(&self) -> Vec<Value> {
        let text = String::from_utf8(self.dechunked()).expect("UTF-8 events");
        text.split("\n\n")
            .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ")))
            .map(|data| serde_json::from_str(data).unwrap_or(Value::String(data.to_owned())))
            .collect()
    }

    /// The text of a streamed answer.
    fn streamed_text(&self) -> String {
        self.events()
            .iter()
            .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
            .collect()
    }
}

/// Sends `body` to `POST /v1/chat/completions` and reads the response.
fn post(addr: SocketAddr, body: &Value) -> Response {
    let body = body.to_string();
    let mut tcp = TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        tcp,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut bytes = Vec::new();
    tcp.read_to_end(&mut bytes).expect("read the response");
    let split = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&bytes[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    Response {
        status,
        head,
        body: bytes[split + 4..].to_vec(),
    }
}

/// Waits for `start` of `request` and returns its role.
fn role_of(ws: &mut Client, request: &str) -> String {
    let start = ws.recv_matching(|f| f["type"] == "start" && f["request"] == request);
    start["role"].as_str().unwrap().to_owned()
}

#[test]
fn a_chat_first_and_an_http_request_after_share_one_generation() {
    let upstream = Upstream::start();
    upstream.push(slow(&["Shared", " by", " both", " transports."]));
    let server = chorus(&upstream);
    let mut ws = server.client();
    let (request, _) = ws.ask(None, "What does chorus share?");
    assert_eq!(role_of(&mut ws, &request), "leader");
    assert!(upstream.wait_requests(1, WAIT));
    let http = post(server.addr, &as_chat("What does chorus share?", true));
    assert_eq!(http.status, 200, "{}", http.head);
    assert_eq!(http.header("x-chorus-role"), Some("follower"));
    let chat = ws.answer(&request);
    assert!(chat.is_done());
    assert_eq!(http.streamed_text(), chat.text);
    assert_eq!(chat.text, "Shared by both transports.");
    // One call, and it carried what the HTTP request would have sent.
    let calls = upstream.requests();
    assert_eq!(calls.len(), 1);
    let sent = &calls[0].body;
    assert_eq!(
        sent["messages"],
        as_chat("What does chorus share?", true)["messages"]
    );
    assert_eq!(sent["max_tokens"], MAX_TOKENS);
    // The usage the upstream reported, though this request was a follower.
    let usage = http
        .events()
        .into_iter()
        .find(|e| e["usage"].is_object())
        .expect("a usage chunk");
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 17, "completion_tokens": 4, "total_tokens": 21})
    );
}

#[test]
fn an_http_request_first_and_a_chat_after_share_one_generation() {
    let upstream = Upstream::start();
    upstream.push(slow(&["Either", " order", " works."]));
    let server = chorus(&upstream);
    let addr = server.addr;
    let first = std::thread::spawn(move || post(addr, &as_chat("Does the order matter?", false)));
    assert!(upstream.wait_requests(1, WAIT));
    let mut ws = server.client();
    let (request, _) = ws.ask(None, "Does the order matter?");
    assert_eq!(role_of(&mut ws, &request), "follower");
    let chat = ws.answer(&request);
    let http = first.join().unwrap();
    assert_eq!(http.status, 200, "{}", http.head);
    assert_eq!(http.header("x-chorus-role"), Some("leader"));
    let completion: Value = serde_json::from_slice(&http.body).expect("a chat.completion");
    assert_eq!(
        completion["choices"][0]["message"]["content"],
        chat.text.as_str()
    );
    assert_eq!(chat.text, "Either order works.");
    assert_eq!(completion["usage"]["prompt_tokens"], 17);
    assert_eq!(upstream.requests().len(), 1);
}

#[test]
fn both_transports_are_served_from_one_cache_entry() {
    let upstream = Upstream::start();
    upstream.push(slow(&["Cached", " once."]));
    let server = chorus(&upstream);
    let mut ws = server.client();
    let first = ws.ask_and_wait(None, "Is it cached?");
    assert!(first.is_done());
    // Asked again over HTTP, then over a WebSocket in a new conversation.
    let http = post(server.addr, &as_chat("Is it cached?", true));
    assert_eq!(http.header("x-chorus-role"), Some("cache"));
    assert_eq!(http.streamed_text(), "Cached once.");
    let again = ws.ask_and_wait(None, "Is it cached?");
    assert_eq!(again.role.as_deref(), Some("cache"));
    assert_eq!(upstream.requests().len(), 1);
    // The SSE ids are the token numbers, and the stream ends with [DONE].
    let text = String::from_utf8(http.dechunked()).unwrap();
    let ids: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .collect();
    assert_eq!(ids, ["0", "1"]);
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
}

#[test]
fn an_option_the_model_sees_makes_its_own_generation() {
    let upstream = Upstream::start();
    let server = chorus(&upstream);
    let mut ws = server.client();
    assert!(ws.ask_and_wait(None, "Same words?").is_done());
    let mut body = as_chat("Same words?", false);
    body["max_tokens"] = json!(MAX_TOKENS - 1);
    let http = post(server.addr, &body);
    assert_eq!(http.header("x-chorus-role"), Some("leader"));
    // Without the system prompt and the limit it is another input too.
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Same words?"}],
    });
    let http = post(server.addr, &body);
    assert_eq!(http.header("x-chorus-role"), Some("leader"));
    assert_eq!(upstream.requests().len(), 3);
    // chorus adds nothing the client did not send.
    let sent = &upstream.requests()[2].body;
    assert_eq!(
        sent["messages"],
        json!([{"role": "user", "content": "Same words?"}])
    );
    assert!(
        sent.get("max_tokens").is_none() && sent.get("tools").is_none(),
        "{sent}"
    );
}

/// 4,000 tokens of 4 KiB streamed to an HTTP client that does not read
/// and to a WebSocket client that does: the HTTP stream is cut off by the
/// byte bound with the `slow_consumer` error event (and no `[DONE]`), and
/// the reader gets every token.
#[test]
fn an_http_client_that_does_not_read_is_cut_off_and_the_others_go_on() {
    let server = Server::start(crate::common::BIG_TOKENS);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let mut idle: TcpStream = socket.into();
    let body = json!({
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": "big tokens please"},
        ],
        "max_tokens": 10000,
        "stream": true,
    })
    .to_string();
    write!(
        idle,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        server.addr,
        body.len()
    )
    .unwrap();
    let mut reader = server.client();
    let (request, _) = reader.ask(None, "big tokens please");
    let a = reader.answer(&request);
    assert!(a.is_done(), "{:?}", a.end);
    assert_eq!(a.seqs.len(), 4000);
    // Only now does the HTTP client read.
    idle.set_read_timeout(Some(WAIT)).unwrap();
    let mut bytes = Vec::new();
    idle.read_to_end(&mut bytes).expect("read the response");
    let split = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let response = Response {
        status: 200,
        head: String::from_utf8_lossy(&bytes[..split]).into_owned(),
        body: bytes[split + 4..].to_vec(),
    };
    // One generation: whichever came first leads, the other follows.
    let roles = [a.role.as_deref(), response.header("x-chorus-role")];
    assert!(
        roles == [Some("follower"), Some("leader")] || roles == [Some("leader"), Some("follower")],
        "{roles:?}"
    );
    let events = response.events();
    let last = events.last().expect("events");
    assert_eq!(last["error"]["code"], "slow_consumer", "{last}");
    let tokens = events
        .iter()
        .filter(|e| e["choices"][0]["delta"]["content"].is_string())
        .count();
    assert!(tokens < 4000, "{tokens} tokens");
    assert!(!events.contains(&Value::String("[DONE]".into())));
}

/// Reads one chunked SSE response from `tcp` until `stop` says so, and
/// returns the events read (their `id` and JSON data).
fn read_events(
    tcp: &mut TcpStream,
    stop: impl Fn(&[(Option<u64>, Value)]) -> bool,
) -> Vec<(Option<u64>, Value)> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tcp.read(&mut buf).expect("read");
        assert!(n > 0, "closed early");
        raw.extend_from_slice(&buf[..n]);
        let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        // Chunk size lines are left in: they start with neither `id: `
        // nor `data: `, so they are skipped with the empty lines.
        let text = String::from_utf8_lossy(&raw[split + 4..]).into_owned();
        let mut events = Vec::new();
        for event in text.split("\n\n") {
            let mut id = None;
            let mut data = None;
            for line in event.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = v.trim().parse().ok();
                }
                if let Some(v) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(v)
                        .ok()
                        .or(Some(Value::String(v.to_owned())));
                }
            }
            if let Some(data) = data {
                events.push((id, data));
            }
        }
        if stop(&events) {
            return events;
        }
    }
}

#[test]
fn a_stream_resumes_from_the_token_after_last_event_id() {
    let server = Server::start(
        "[llm]\nallowed_models = [\"other\"]\n[llm.simulated]\nfirst_token_ms = 50\ntoken_interval_ms = 20\ntokens = 30\n",
    );
    let body = json!({
        "model": "other",
        "messages": [{"role": "user", "content": "count for me"}],
        "stream": true,
    })
    .to_string();
    let mut first = TcpStream::connect(server.addr).unwrap();
    first.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        first,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\r\n{body}",
        server.addr,
        body.len()
    )
    .unwrap();
    let seen = read_events(&mut first, |e| e.iter().any(|(id, _)| *id == Some(4)));
    // The client goes away mid-stream, and comes back on a new connection.
    drop(first);
    let mut ids = Vec::new();
    // The request id, from the events' completion id.
    let id = seen
        .iter()
        .find_map(|(_, d)| d["id"].as_str())
        .and_then(|c| c.strip_prefix("chatcmpl-"))
        .expect("a completion id")
        .to_owned();
    let before: String = seen
        .iter()
        .filter(|(id, _)| id.is_some_and(|n| n <= 4))
        .filter_map(|(_, d)| d["choices"][0]["delta"]["content"].as_str())
        .collect();
    let mut again = TcpStream::connect(server.addr).unwrap();
    again.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        again,
        "GET /v1/chorus/streams/{id} HTTP/1.1\r\nHost: {}\r\nLast-Event-ID: 4\r\n\r\n",
        server.addr
    )
    .unwrap();
    let rest = read_events(&mut again, |e| e.iter().any(|(_, d)| d == "[DONE]"));
    ids.extend(rest.iter().filter_map(|(id, _)| *id));
    assert_eq!(ids, (5..30).collect::<Vec<u64>>(), "no gap, no duplicate");
    let after: String = rest
        .iter()
        .filter_map(|(_, d)| d["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(rest
        .iter()
        .all(|(_, d)| d == "[DONE]" || d["model"] == "other"));
    // The whole answer, as a request asked again now gets it from the cache.
    let whole = post(
        server.addr,
        &json!({"model": "other", "messages": [{"role": "user", "content": "count for me"}], "stream": true}),
    );
    assert_eq!(whole.header("x-chorus-role"), Some("cache"));
    assert_eq!(before + &after, whole.streamed_text());
    // An unknown stream is 404.
    let mut unknown = TcpStream::connect(server.addr).unwrap();
    write!(
        unknown,
        "GET /v1/chorus/streams/r-unknown HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        server.addr
    )
    .unwrap();
    let mut answer = String::new();
    unknown.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 404 "), "{answer}");
}

/// A whole (not streamed) answer is held until it is written, so it is
/// bounded like a connection's queue: past `server.outbox_bytes` the
/// request fails with `429` `slow_consumer`, and a streamed one gets the
/// whole answer.
#[test]
fn a_whole_answer_larger_than_a_response_may_hold_is_refused() {
    let server = Server::start(
        "[server]\noutbox_bytes = 65536\n[history]\nmax_answer_bytes = 16384\n[llm.simulated]\nfirst_token_ms = 1\ntoken_interval_ms = 0\ntokens = 100\ntoken_bytes = 1024\n",
    );
    let ask = |stream: bool| json!({"messages": [{"role": "user", "content": "a long one"}], "stream": stream});
    let whole = post(server.addr, &ask(false));
    assert_eq!(whole.status, 429, "{}", whole.head);
    let error: Value = serde_json::from_slice(&whole.body).unwrap();
    assert_eq!(error["error"]["code"], "slow_consumer");
    let streamed = post(server.addr, &ask(true));
    assert_eq!(streamed.status, 200);
    assert_eq!(streamed.streamed_text().len(), 100 * 1024);
}

/// A streamed request that fails before its first token is told with an
/// HTTP status, as a whole answer would be; one that fails after it with
/// an error event and no `[DONE]`.
#[test]
fn a_stream_that_fails_before_its_first_token_gets_a_status_and_after_it_an_event() {
    let upstream = Upstream::start();
    // Refused by the upstream (no retry, no fallback: a 400 is final).
    upstream.push(Reply::Error {
        status: 400,
        message: "bad prompt".into(),
        retry_after: None,
    });
    let server = chorus(&upstream);
    let before = post(server.addr, &as_chat("Refused upstream?", true));
    assert_eq!(before.status, 502, "{}", before.head);
    let error: Value = serde_json::from_slice(&before.body).unwrap();
    assert_eq!(error["error"]["code"], "upstream_error");
    // Broken after two tokens: the stream has begun.
    upstream.push(Reply::ResetAfter {
        tokens: vec!["Half".into(), " an".into()],
        delay: Duration::ZERO,
    });
    let after = post(server.addr, &as_chat("Broken midway?", true));
    assert_eq!(after.status, 200);
    let events = after.events();
    assert_eq!(after.streamed_text(), "Half an");
    assert_eq!(events.last().unwrap()["error"]["code"], "upstream_error");
    assert!(!events.contains(&Value::String("[DONE]".into())));
}
