//! Tests of the provider: backoff, key scrubbing, request bodies, and
//! calls through ureq against a raw server on loopback.

use super::*;
use std::io::Write;
use std::net::TcpListener;

/// A provider over one endpoint that is always called through ureq,
/// as an `https://` or proxied one would be.
fn over_ureq(base_url: String) -> OpenAi {
    let mut provider = OpenAi::new(
        vec![Endpoint {
            name: "up".into(),
            base_url,
            model: None,
            api_key: None,
        }],
        RetryPolicy {
            max_retries: 0,
            base: Duration::from_millis(10),
            max: Duration::from_millis(10),
        },
        Duration::from_secs(2),
        Duration::from_secs(2),
    );
    provider.direct = None;
    provider
}

/// A chunked streamed answer: `events` as SSE data, then `[DONE]`.
fn chunked(events: &[&str]) -> Vec<u8> {
    let mut out = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
        Transfer-Encoding: chunked\r\n\r\n"
        .to_vec();
    for data in events.iter().copied().chain(["[DONE]"]) {
        let event = format!("data: {data}\n\n");
        out.extend(format!("{:x}\r\n{event}\r\n", event.len()).bytes());
    }
    out.extend(b"0\r\n\r\n");
    out
}

/// Reads one request (head and `Content-Length` body) from `conn`.
fn read_request(conn: &mut std::net::TcpStream) -> bool {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return true;
            }
        }
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

fn ask(prompt: &Prompt) -> Ask<'_> {
    Ask {
        prompt,
        tools: &[],
        limits: Default::default(),
        committed: false,
        endpoint: None,
    }
}

fn prompt() -> Prompt {
    Prompt {
        model: "m".into(),
        messages: vec![PromptMessage::new("user", "hi")],
        temperature: None,
        top_p: None,
        max_tokens: Some(7),
        stop: Vec::new(),
        seed: None,
        user: None,
    }
}

fn collecting() -> (TokenSink, std::sync::Arc<parking_lot::Mutex<String>>) {
    let got = std::sync::Arc::new(parking_lot::Mutex::new(String::new()));
    let kept = got.clone();
    let sink: TokenSink = std::sync::Arc::new(move |t: &str| {
        kept.lock().push_str(t);
        super::super::Flow::Continue
    });
    (sink, got)
}

#[test]
fn over_ureq_a_round_streams_its_content_and_its_tool_calls() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        assert!(read_request(&mut conn));
        let call = r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"c1","function":{"name":"calculator","arguments":"{}"}}]}}]}"#;
        conn.write_all(&chunked(&[
            r#"{"choices":[{"delta":{"content":"Let me"}}]}"#,
            r#"{"choices":[{"delta":{"content":" see."}}]}"#,
            call,
            r#"{"choices":[{"delta":{},"finish_reason":"tool_calls"}]}"#,
        ]))
        .unwrap();
    });
    let provider = over_ureq(base);
    let (sink, got) = collecting();
    let prompt = prompt();
    let spec = ToolSpec {
        name: "calculator",
        description: "adds",
        parameters: json!({"type": "object"}),
    };
    let tools = [spec];
    let turn = provider
        .stream(
            &Ask {
                tools: &tools,
                ..ask(&prompt)
            },
            &AbortSignal::new(),
            &sink,
        )
        .unwrap();
    server.join().unwrap();
    assert_eq!(got.lock().as_str(), "Let me see.");
    assert_eq!(turn.said, "Let me see.");
    assert_eq!(turn.tool_calls.len(), 1);
    assert_eq!(turn.tool_calls[0].name, "calculator");
    assert_eq!(provider.endpoint_stats()[0].calls, 1);
}

#[test]
fn over_ureq_a_kept_connection_closed_by_the_upstream_is_replaced() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let server = std::thread::spawn(move || {
        // First connection: one answer, then closed when the next
        // request arrives on it, unanswered, as servers that close kept
        // connections do at the worst moment.
        let (mut conn, _) = listener.accept().unwrap();
        assert!(read_request(&mut conn));
        conn.write_all(&chunked(&[r#"{"choices":[{"delta":{"content":"one"}}]}"#]))
            .unwrap();
        let mut byte = [0u8; 1];
        let _ = conn.read(&mut byte);
        drop(conn);
        // Second connection: the resent request.
        let (mut conn, _) = listener.accept().unwrap();
        assert!(read_request(&mut conn));
        conn.write_all(&chunked(&[r#"{"choices":[{"delta":{"content":"two"}}]}"#]))
            .unwrap();
    });
    let provider = over_ureq(base);
    let prompt = prompt();
    // Both calls on this thread: the second reuses the kept connection.
    for expected in ["one", "two"] {
        let (sink, got) = collecting();
        let turn = provider
            .stream(&ask(&prompt), &AbortSignal::new(), &sink)
            .unwrap();
        assert_eq!(turn.end, Finish::Stop);
        assert_eq!(got.lock().as_str(), expected);
    }
    server.join().unwrap();
    let stats = &provider.endpoint_stats()[0];
    assert_eq!((stats.calls, stats.failures, stats.retries), (2, 0, 0));
}

#[test]
fn backoff_doubles_within_jitter_and_stops_at_the_cap() {
    let policy = RetryPolicy {
        max_retries: 5,
        base: Duration::from_millis(100),
        max: Duration::from_millis(1000),
    };
    for _ in 0..50 {
        let first = policy.delay(0);
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        let third = policy.delay(2);
        assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
        let late = policy.delay(30);
        assert!(late >= Duration::from_millis(500) && late <= Duration::from_millis(1000));
    }
}

#[test]
fn the_key_never_survives_in_an_error_or_a_debug_print() {
    let endpoint = Endpoint {
        name: "e".into(),
        base_url: "http://x".into(),
        model: None,
        api_key: Some("sk-secret-123".into()),
    };
    let e = scrub(
        LlmError::upstream("e", "bad header: Bearer sk-secret-123"),
        &endpoint,
    );
    assert!(!e.to_string().contains("sk-secret-123"), "{e}");
    assert!(!format!("{endpoint:?}").contains("sk-secret-123"));
}

#[test]
fn the_request_carries_the_prompt_and_asks_for_a_stream() {
    let prompt = Prompt {
        model: "m".into(),
        messages: vec![PromptMessage::new("user", "hi")],
        temperature: Some(0.5),
        top_p: None,
        max_tokens: Some(7),
        stop: Vec::new(),
        seed: None,
        user: None,
    };
    let body = request_body(&prompt, "other", &[]);
    assert_eq!(body["model"], "other");
    assert_eq!(body["stream"], true);
    assert_eq!(body["max_tokens"], 7);
    assert_eq!(body["temperature"], 0.5);
    assert!(body.get("top_p").is_none());
    assert!(body.get("tools").is_none() && body.get("tool_choice").is_none());
    assert_eq!(body["messages"][0]["content"], "hi");
    for absent in ["stop", "seed", "user"] {
        assert!(body.get(absent).is_none(), "{absent} sent unasked");
    }
}

#[test]
fn stop_seed_user_and_max_tokens_go_upstream_only_when_given() {
    let given = Prompt {
        stop: vec!["\n\n".into(), "END".into()],
        seed: Some(-42),
        user: Some("user-7".into()),
        ..prompt()
    };
    let body = request_body(&given, "m", &[]);
    assert_eq!(body["stop"], json!(["\n\n", "END"]));
    assert_eq!(body["seed"], -42);
    assert_eq!(body["user"], "user-7");
    assert_eq!(body["max_tokens"], 7);

    let bare = Prompt {
        max_tokens: None,
        ..prompt()
    };
    let body = request_body(&bare, "m", &[]);
    for absent in ["max_tokens", "stop", "seed", "user", "temperature", "top_p"] {
        assert!(body.get(absent).is_none(), "{absent} sent unasked");
    }
}

#[test]
fn tools_and_tool_rounds_take_openai_shapes() {
    let call = crate::llm::ToolCall {
        id: "call_1".into(),
        name: "calculator".into(),
        arguments: r#"{"expression":"1+1"}"#.into(),
        refused: None,
    };
    let prompt = Prompt {
        model: "m".into(),
        messages: vec![
            PromptMessage::new("user", "add"),
            PromptMessage {
                tool_calls: vec![call],
                ..PromptMessage::new("assistant", "")
            },
            PromptMessage {
                tool_call_id: Some("call_1".into()),
                ..PromptMessage::new("tool", "2")
            },
        ],
        temperature: None,
        top_p: None,
        max_tokens: Some(7),
        stop: Vec::new(),
        seed: None,
        user: None,
    };
    let spec = ToolSpec {
        name: "calculator",
        description: "adds",
        parameters: json!({"type": "object"}),
    };
    let body = request_body(&prompt, "m", &[spec]);
    assert_eq!(body["tool_choice"], "auto");
    assert_eq!(body["tools"][0]["function"]["name"], "calculator");
    let assistant = &body["messages"][1];
    assert!(assistant["content"].is_null());
    assert_eq!(assistant["tool_calls"][0]["id"], "call_1");
    assert_eq!(
        assistant["tool_calls"][0]["function"]["arguments"],
        r#"{"expression":"1+1"}"#
    );
    assert_eq!(body["messages"][2]["tool_call_id"], "call_1");
    assert_eq!(body["messages"][2]["content"], "2");
    assert!(body["messages"][0].get("tool_calls").is_none());
}
