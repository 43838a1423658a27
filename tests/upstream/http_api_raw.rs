//! The OpenAI-compatible HTTP API's bytes on the wire, with a plain
//! HTTP/1.1 client on a TcpStream (`common::http1`), in front of the
//! loopback OpenAI-compatible upstream of `common::upstream`: the
//! event-stream bytes (`id:` equal to `seq`, `data: [DONE]`, chunked
//! encoding, the error event after the stream began) and every refusal of
//! the contract (400 naming the field, 401, 404, 405, 413).

use std::time::Duration;

use crate::common;
use crate::common::http1::{Conn, Event, Response};
use crate::common::openai_api::{answer, assert_names_field, chorus, strings, MODEL, TOKEN};
use crate::common::upstream::{Reply, Upstream};

use serde_json::{json, Value};

/// A chat completion request body.
fn chat_body(question: &str, stream: bool) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": question}], "stream": stream})
}

/// The events of a stream that carry an `id:` (the tokens) and the others.
fn split_tokens(events: &[Event]) -> (Vec<&Event>, Vec<&Event>) {
    events.iter().partition(|e| e.id.is_some())
}

/// The `finish_reason` of an event's chunk, if it has one.
fn finish_of(event: &Event) -> Option<String> {
    if event.data == "[DONE]" {
        return None;
    }
    event.json()["choices"][0]["finish_reason"]
        .as_str()
        .map(str::to_owned)
}

/// Asserts status `status`, showing the head and the body when not.
fn assert_status(response: &Response, status: u16) {
    assert_eq!(
        response.status,
        status,
        "{}\n{}",
        response.head,
        response.text()
    );
}

/// Asserts a 200 event stream with chorus's headers; returns the request.
fn assert_stream_head(response: &Response) -> String {
    assert_status(response, 200);
    assert!(
        response
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/event-stream")),
        "{}",
        response.head
    );
    let request = response
        .header("x-chorus-request")
        .unwrap_or_else(|| panic!("no X-Chorus-Request: {}", response.head));
    assert!(request.starts_with("r-"), "{}", response.head);
    request.to_owned()
}

/// Asserts an OpenAI error body with `status` and, if given, `code`.
fn assert_error(response: &Response, status: u16, code: Option<&str>) -> Value {
    assert_status(response, status);
    let body = response.json();
    let error = &body["error"];
    assert!(error["message"].is_string(), "no error.message: {body}");
    assert!(error["type"].is_string(), "no error.type: {body}");
    if let Some(code) = code {
        assert_eq!(error["code"], code, "{body}");
    }
    error.clone()
}

#[test]
fn raw_stream_is_chunked_sse_with_ids_equal_to_seq_and_ends_with_done() {
    let upstream = Upstream::start();
    let words = ["a", "b", "c", "d", "e"];
    upstream.push(answer(&words, Duration::from_millis(2), 3));
    let server = chorus(&upstream, "");
    let mut conn = Conn::connect(server.addr);
    let mut body = chat_body("Spell it", true);
    body["stream_options"] = json!({"include_usage": true});
    let response = conn.post_json("/v1/chat/completions", &[], &body);

    let request = assert_stream_head(&response);
    assert_eq!(
        response.header("x-chorus-role"),
        Some("leader"),
        "{}",
        response.head
    );
    assert!(
        response.chunked,
        "streamed responses use chunked encoding: {}",
        response.head
    );
    assert!(
        response.header("content-length").is_none(),
        "{}",
        response.head
    );
    let events = response.events();
    let (tokens, others) = split_tokens(&events);

    let ids: Vec<&str> = tokens.iter().filter_map(|e| e.id.as_deref()).collect();
    assert_eq!(ids, ["0", "1", "2", "3", "4"], "id: is the token's seq");
    for (event, word) in tokens.iter().zip(words) {
        let chunk = event.json();
        assert_eq!(chunk["object"], "chat.completion.chunk", "{chunk}");
        assert_eq!(chunk["id"], format!("chatcmpl-{request}"), "{chunk}");
        assert_eq!(chunk["choices"][0]["delta"]["content"], word, "{chunk}");
    }
    // Events without an id carry no text: the opening role chunk, the
    // finish, the usage and the terminator.
    let last = events.last().expect("events");
    assert_eq!(last.data, "[DONE]", "the stream ends with data: [DONE]");
    assert_eq!(
        events.iter().filter(|e| e.data == "[DONE]").count(),
        1,
        "one [DONE]"
    );
    let chunks: Vec<Value> = others
        .iter()
        .filter(|e| e.data != "[DONE]")
        .map(|e| e.json())
        .collect();
    for chunk in &chunks {
        let content = chunk["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap_or("");
        assert!(content.is_empty(), "text in an event without id: {chunk}");
    }
    let finish_at = events
        .iter()
        .position(|e| e.id.is_none() && finish_of(e).as_deref() == Some("stop"))
        .unwrap_or_else(|| panic!("no finish_reason stop: {events:?}"));
    let last_token_at = events.iter().rposition(|e| e.id.is_some()).unwrap_or(0);
    assert!(
        finish_at > last_token_at,
        "the finish comes after the tokens"
    );
    let usage_chunk = chunks
        .iter()
        .find(|c| c["usage"].is_object())
        .unwrap_or_else(|| panic!("no usage chunk: {events:?}"));
    assert_eq!(usage_chunk["choices"], json!([]), "{usage_chunk}");
    assert_eq!(
        usage_chunk["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}),
        "{usage_chunk}"
    );

    // The connection is kept for the next request.
    let models = conn.get("/v1/models", &[]);
    assert_eq!(models.status, 200, "{}", models.head);
}

#[test]
fn raw_an_error_after_the_stream_began_is_a_last_data_event_without_done() {
    let upstream = Upstream::start();
    upstream.push(Reply::ResetAfter {
        tokens: strings(&["half", " an"]),
        delay: Duration::from_millis(20),
    });
    let server = chorus(&upstream, "");
    let mut conn = Conn::connect(server.addr);
    let response = conn.post_json("/v1/chat/completions", &[], &chat_body("Break", true));

    assert_stream_head(&response);
    assert!(response.chunked, "{}", response.head);
    let events = response.events();
    let (tokens, _) = split_tokens(&events);
    let ids: Vec<&str> = tokens.iter().filter_map(|e| e.id.as_deref()).collect();
    assert_eq!(ids, ["0", "1"], "{events:?}");
    let last = events.last().expect("events").json();
    let error = &last["error"];
    assert_eq!(error["code"], "upstream_error", "the last event: {last}");
    assert!(error["message"].is_string(), "{last}");
    assert!(error["type"].is_string(), "{last}");
    assert!(
        events.iter().all(|e| e.data != "[DONE]"),
        "no [DONE] after an error: {events:?}"
    );
}

#[test]
fn raw_refusals_are_400_naming_the_field_and_n_1_is_fine() {
    let upstream = Upstream::start();
    let server = chorus(&upstream, "");
    let user = |content: Value| json!([{"role": "user", "content": content}]);
    let tool =
        json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    let image = json!([
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
    ]);
    let cases = [
        (
            "n",
            json!({"model": MODEL, "messages": user(json!("Hi")), "n": 2}),
        ),
        (
            "n",
            json!({"model": MODEL, "messages": user(json!("Hi")), "n": 0}),
        ),
        ("content", json!({"model": MODEL, "messages": user(image)})),
        (
            "tools",
            json!({"model": MODEL, "messages": user(json!("Hi")), "tools": tool}),
        ),
    ];
    for (field, body) in &cases {
        let response = Conn::connect(server.addr).post_json("/v1/chat/completions", &[], body);
        let error = assert_error(&response, 400, Some("bad_request"));
        assert_names_field(&error, "bad_request", field);
    }
    assert!(
        upstream.requests().is_empty(),
        "a refusal reached the upstream"
    );

    // Text parts and `n: 1` are fine, and unknown fields are ignored.
    let parts = json!([{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]);
    let body = json!({"model": MODEL, "messages": user(parts), "n": 1, "logprobs": false, "x_unknown": {"a": 1}});
    let response = Conn::connect(server.addr).post_json("/v1/chat/completions", &[], &body);
    assert_status(&response, 200);
    let completion = response.json();
    assert_eq!(completion["object"], "chat.completion", "{completion}");
    assert_eq!(
        completion["choices"][0]["message"]["content"],
        "Hello from upstream"
    );
    assert_eq!(upstream.requests().len(), 1);
}

#[test]
fn raw_a_body_over_one_mib_is_413_and_one_under_it_is_served() {
    let upstream = Upstream::start();
    let server = chorus(&upstream, "");

    // Just under the default limit (1 MiB), the bulk in an unknown field.
    let mut body = chat_body("Small question", false);
    body["padding"] = json!("p".repeat((1 << 20) - 1024));
    let mut conn = Conn::connect(server.addr);
    let response = conn.post_json("/v1/chat/completions", &[], &body);
    assert_status(&response, 200);

    // Over it: the client may still be sending when the answer comes.
    let mut body = chat_body("Big question", false);
    body["padding"] = json!("p".repeat(2 << 20));
    let bytes = common::http1::request_bytes(
        server.addr,
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        Some(body.to_string().as_bytes()),
    );
    let mut conn = Conn::connect(server.addr);
    let mut writer = conn.tcp.try_clone().expect("clone the socket");
    let sender = std::thread::spawn(move || {
        use std::io::Write;
        // The server may stop reading once it has refused: not an error.
        let _ = writer.write_all(&bytes);
    });
    let response = conn.read_response();
    assert_error(&response, 413, Some("too_large"));
    drop(conn);
    let _ = sender.join();
    assert_eq!(
        upstream.requests().len(),
        1,
        "only the small body went upstream"
    );
}

#[test]
fn raw_unknown_paths_are_404_and_wrong_methods_405() {
    let upstream = Upstream::start();
    let server = chorus(&upstream, "");
    // A connection per request: these check the answers, not keep-alive.
    let conn = || Conn::connect(server.addr);

    for path in ["/v1/nope", "/v1/embeddings", "/v1/chat"] {
        let response = conn().post_json(path, &[], &chat_body("Hi", false));
        assert_eq!(response.status, 404, "POST {path}: {}", response.head);
    }
    let response = conn().get("/v1/chorus/streams/r-unknown", &[]);
    assert_error(&response, 404, Some("not_found"));

    let wrong = [
        ("GET", "/v1/chat/completions", "POST"),
        ("DELETE", "/v1/chat/completions", "POST"),
        ("POST", "/v1/models", "GET"),
    ];
    for (method, path, allowed) in wrong {
        let body = chat_body("Hi", false).to_string();
        let with_body = (method != "GET").then_some(body.as_bytes());
        let response = conn().request(method, path, &[], with_body);
        assert_eq!(response.status, 405, "{method} {path}: {}", response.head);
        assert!(
            response
                .header("allow")
                .is_some_and(|a| a.contains(allowed)),
            "{method} {path}: a 405 says what is allowed: {}",
            response.head
        );
    }
    assert!(upstream.requests().is_empty());
}

#[test]
fn raw_auth_tokens_guard_every_v1_path_and_nothing_else() {
    let upstream = Upstream::start();
    let server = chorus(
        &upstream,
        &format!("[server]\nauth_tokens = [\"{TOKEN}\"]\n"),
    );
    let conn = || Conn::connect(server.addr);
    let right = format!("Bearer {TOKEN}");
    let wrong = "Bearer sk-wrong".to_owned();
    let refused: [(&str, &str, Option<&str>); 6] = [
        ("POST", "/v1/chat/completions", None),
        ("POST", "/v1/chat/completions", Some(&wrong)),
        ("GET", "/v1/models", None),
        ("GET", "/v1/models", Some(&wrong)),
        ("GET", "/v1/chorus/streams/r-unknown", None),
        ("GET", "/v1/nope", None),
    ];
    for (method, path, auth) in refused {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let response = if method == "POST" {
            conn().post_json(path, &headers, &chat_body("Hi", false))
        } else {
            conn().get(path, &headers)
        };
        assert_error(&response, 401, None);
    }
    assert!(upstream.requests().is_empty());

    let headers = [("Authorization", right.as_str())];
    let response = conn().get("/v1/models", &headers);
    assert_eq!(response.status, 200, "{}", response.head);
    let response = conn().post_json("/v1/chat/completions", &headers, &chat_body("Hi", false));
    assert_status(&response, 200);
    // The page and the operators' endpoints stay open.
    for path in ["/healthz", "/api/stats", "/metrics", "/"] {
        let (status, head, _) = server.get(path);
        assert_eq!(status, 200, "{path} needs no token: {head}");
    }
}

#[test]
fn raw_streams_endpoint_replays_a_finished_request_from_a_given_token() {
    let upstream = Upstream::start();
    let words = ["r0", "r1", "r2", "r3", "r4", "r5"];
    upstream.push(answer(&words, Duration::ZERO, 2));
    let server = chorus(&upstream, "");
    let mut conn = Conn::connect(server.addr);
    let first = conn.post_json("/v1/chat/completions", &[], &chat_body("Replay", true));
    let request = assert_stream_head(&first);
    assert_eq!(split_tokens(&first.events()).0.len(), words.len());

    let path = format!("/v1/chorus/streams/{request}");
    let replays = [
        (format!("{path}?from=2"), None, 2),
        (path.clone(), Some("3"), 4),
        (path.clone(), Some("5"), 6),
    ];
    for (target, last_event_id, from) in replays {
        let headers: Vec<(&str, &str)> = last_event_id
            .map(|id| ("Last-Event-ID", id))
            .into_iter()
            .collect();
        let response = Conn::connect(server.addr).get(&target, &headers);
        assert_stream_head(&response);
        let events = response.events();
        let (tokens, _) = split_tokens(&events);
        let ids: Vec<String> = tokens.iter().filter_map(|e| e.id.clone()).collect();
        let expected: Vec<String> = (from..words.len()).map(|i| i.to_string()).collect();
        assert_eq!(ids, expected, "{target} {last_event_id:?}");
        for event in &tokens {
            let seq: usize = event
                .id
                .as_deref()
                .unwrap_or("")
                .parse()
                .expect("numeric id");
            let chunk = event.json();
            assert_eq!(
                chunk["choices"][0]["delta"]["content"], words[seq],
                "{chunk}"
            );
            assert_eq!(chunk["id"], format!("chatcmpl-{request}"), "{chunk}");
        }
        assert!(
            events
                .iter()
                .any(|e| finish_of(e).as_deref() == Some("stop")),
            "{target}: no finish: {events:?}"
        );
        assert_eq!(
            events.last().map(|e| e.data.as_str()),
            Some("[DONE]"),
            "{target}"
        );
    }
    assert_eq!(upstream.requests().len(), 1, "a replay is no new call");
}

#[test]
fn raw_models_lists_the_configured_model() {
    let upstream = Upstream::start();
    let server = chorus(&upstream, "");
    let response = Conn::connect(server.addr).get("/v1/models", &[]);
    assert_eq!(response.status, 200, "{}", response.head);
    assert!(
        response
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{}",
        response.head
    );
    let list = response.json();
    assert_eq!(list["object"], "list", "{list}");
    let entry = list["data"]
        .as_array()
        .and_then(|d| d.iter().find(|m| m["id"] == MODEL))
        .unwrap_or_else(|| panic!("{MODEL} is not listed: {list}"));
    assert_eq!(
        entry,
        &json!({"id": MODEL, "object": "model", "created": 0, "owned_by": "chorus"})
    );
}
