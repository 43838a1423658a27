use serde_json::{json, Value};

use crate::broadcast::Token;
use crate::openai::{
    error_body, error_event, error_status, escape_json_str, models_body, ApiError, ChunkFrame,
    Completion, FinishReason, Usage, DONE,
};
use crate::protocol::{ErrorCode, Finish};

/// Strings that break naive JSON or SSE encoders.
fn tricky() -> Vec<String> {
    let mut all: Vec<String> = [
        "",
        "plain",
        " leading and trailing ",
        "\"quoted\"",
        "back\\slash\\",
        "\\\"",
        "line\nbreak",
        "\r\n\r\n",
        "data: [DONE]\n\n",
        "\"},\"finish_reason\":\"stop\"}]}",
        ",\"text\":\"",
        "tab\there",
        "\u{0}\u{1}\u{1f}\u{7f}",
        "\u{2028}\u{2029}",
        "é中文🦀",
        "\u{fffd}",
        "</script>",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    all.extend((0u8..0x20).map(|b| format!("x{}y", char::from(b))));
    all.push("🦀".repeat(1000));
    all
}

fn completion() -> Completion<'static> {
    Completion {
        request: "r-0123456789abcdef",
        created: 1_700_000_000,
        model: "m",
    }
}

/// One SSE event: its `id:` if any, and its `data:`.
#[derive(Debug)]
struct Event {
    id: Option<String>,
    data: String,
}

/// Splits a stream into events, checking the framing on the way.
fn events(out: &[u8]) -> Vec<Event> {
    let text = std::str::from_utf8(out).expect("utf-8");
    assert!(text.ends_with("\n\n"), "{text:?}");
    text.strip_suffix("\n\n")
        .unwrap_or_default()
        .split("\n\n")
        .map(|event| {
            let mut id = None;
            let mut data = None;
            for line in event.split('\n') {
                if let Some(v) = line.strip_prefix("id: ") {
                    assert!(id.replace(v.to_owned()).is_none(), "{event:?}");
                } else if let Some(v) = line.strip_prefix("data: ") {
                    assert!(data.replace(v.to_owned()).is_none(), "{event:?}");
                } else {
                    panic!("stray line {line:?} in {event:?}");
                }
            }
            Event {
                id,
                data: data.expect("data line"),
            }
        })
        .collect()
}

fn keys(v: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = v
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

/// Checks the fields every chunk repeats and returns its `choices`.
#[track_caller]
fn chunk<'a>(v: &'a Value, c: &Completion<'_>) -> &'a Value {
    assert_eq!(v["id"], format!("chatcmpl-{}", c.request));
    assert_eq!(v["object"], "chat.completion.chunk");
    assert_eq!(v["created"], c.created);
    assert_eq!(v["model"], c.model);
    &v["choices"]
}

#[test]
fn escaping_is_serde_jsons_without_the_quotes() {
    for s in tricky() {
        let mut out = b"kept".to_vec();
        escape_json_str(&mut out, &s);
        let quoted = serde_json::to_string(&s).unwrap();
        assert_eq!(&out[4..], &quoted.as_bytes()[1..quoted.len() - 1], "{s:?}");
        assert!(out.starts_with(b"kept"));
        // No raw line break can end an SSE line early.
        assert!(!out.contains(&b'\n') && !out.contains(&b'\r'), "{s:?}");
    }
}

#[test]
fn token_events_parse_as_their_chunk_for_any_text() {
    let requests = ["r-1", "r-\"odd\\id\n"];
    let models = ["m", "", "model \"quoted\" \\ é\u{1}"];
    for (request, model) in requests
        .iter()
        .flat_map(|r| models.iter().map(move |m| (r, m)))
    {
        let c = Completion {
            request,
            created: 1_700_000_000,
            model,
        };
        let frame = c.chunks();
        for (i, s) in tricky().iter().enumerate() {
            let seq = [0, 1, 42, u64::MAX][i % 4];
            let token = Token::new(seq, s);
            let escaped = token.json.as_bytes();
            // By hand, as the transport assembles it...
            let mut by_hand = Vec::new();
            by_hand.extend_from_slice(ChunkFrame::HEAD);
            by_hand.extend_from_slice(seq.to_string().as_bytes());
            by_hand.extend_from_slice(frame.mid());
            by_hand.extend_from_slice(escaped);
            by_hand.extend_from_slice(ChunkFrame::TAIL);
            // ...with the helper, and with the layout a transport uses.
            let mut out = b"before".to_vec();
            frame.token(&mut out, seq, escaped);
            assert_eq!(&out[6..], &by_hand[..]);
            assert_eq!(frame.layout().with_parts(&token, |p| p.concat()), by_hand);

            let events = events(&by_hand);
            assert_eq!(events.len(), 1, "{s:?}");
            assert_eq!(events[0].id.as_deref(), Some(seq.to_string().as_str()));
            let v: Value = serde_json::from_str(&events[0].data).expect("chunk JSON");
            assert_eq!(keys(&v), ["choices", "created", "id", "model", "object"]);
            let choices = chunk(&v, &c);
            assert_eq!(choices.as_array().map(Vec::len), Some(1));
            assert_eq!(choices[0]["index"], 0);
            assert_eq!(choices[0]["delta"], json!({ "content": s }));
            assert_eq!(choices[0]["finish_reason"], Value::Null);
            assert_eq!(keys(&choices[0]), ["delta", "finish_reason", "index"]);
        }
    }
}

#[test]
fn the_stream_opens_with_the_role_like_openai() {
    let c = completion();
    let mut out = Vec::new();
    c.chunks().role(&mut out);
    let events = events(&out);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].id, None);
    let v: Value = serde_json::from_str(&events[0].data).unwrap();
    let choices = chunk(&v, &c);
    assert_eq!(
        choices,
        &json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}])
    );
}

#[test]
fn the_end_gives_the_reason_then_usage_then_done() {
    let c = completion();
    let frame = c.chunks();
    let usage = Usage {
        prompt_tokens: 11,
        completion_tokens: 31,
    };
    for reason in [FinishReason::Stop, FinishReason::Length] {
        for with_usage in [false, true] {
            let mut out = Vec::new();
            frame.end(&mut out, reason, with_usage.then_some(&usage));
            assert!(out.ends_with(DONE));
            let events = events(&out);
            assert_eq!(events.len(), if with_usage { 3 } else { 2 });
            assert!(events.iter().all(|e| e.id.is_none()));

            let last: Value = serde_json::from_str(&events[0].data).unwrap();
            assert_eq!(
                chunk(&last, &c),
                &json!([{"index": 0, "delta": {}, "finish_reason": reason.as_str()}])
            );
            assert!(last.get("usage").is_none());
            if with_usage {
                let u: Value = serde_json::from_str(&events[1].data).unwrap();
                assert_eq!(chunk(&u, &c), &json!([]));
                assert_eq!(
                    u["usage"],
                    json!({"prompt_tokens": 11, "completion_tokens": 31, "total_tokens": 42})
                );
            }
            assert_eq!(events.last().map(|e| e.data.as_str()), Some("[DONE]"));
        }
    }
}

#[test]
fn finishes_map_to_openai_reasons_and_cancelled_to_none() {
    assert_eq!(
        FinishReason::from_finish(Finish::Stop),
        Some(FinishReason::Stop)
    );
    assert_eq!(
        FinishReason::from_finish(Finish::Length),
        Some(FinishReason::Length)
    );
    assert_eq!(FinishReason::from_finish(Finish::Cancelled), None);
    assert_eq!(FinishReason::Stop.as_str(), "stop");
    assert_eq!(FinishReason::Length.as_str(), "length");
}

#[test]
fn the_completion_object_has_openais_shape() {
    let c = Completion {
        request: "r-\"x\"",
        created: 5,
        model: "m\u{1}",
    };
    for s in tricky() {
        let mut out = Vec::new();
        let usage = Usage {
            prompt_tokens: 3,
            completion_tokens: u64::MAX,
        };
        c.write_object(&mut out, &s, FinishReason::Length, &usage);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            keys(&v),
            ["choices", "created", "id", "model", "object", "usage"]
        );
        assert_eq!(v["id"], "chatcmpl-r-\"x\"");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["created"], 5);
        assert_eq!(v["model"], "m\u{1}");
        assert_eq!(
            v["choices"],
            json!([{"index": 0, "message": {"role": "assistant", "content": s}, "finish_reason": "length"}])
        );
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": u64::MAX, "total_tokens": u64::MAX})
        );
    }
}

#[test]
fn every_error_code_has_the_documented_status() {
    let expected = |code: ErrorCode| match code {
        ErrorCode::BadRequest => (400, "invalid_request_error"),
        ErrorCode::NotFound => (404, "invalid_request_error"),
        ErrorCode::ConversationBusy => (409, "invalid_request_error"),
        ErrorCode::TooLarge => (413, "invalid_request_error"),
        ErrorCode::Overloaded | ErrorCode::RateLimited | ErrorCode::SlowConsumer => {
            (429, "rate_limit_error")
        }
        ErrorCode::Cancelled => (499, "invalid_request_error"),
        ErrorCode::Internal => (500, "server_error"),
        ErrorCode::UpstreamError => (502, "server_error"),
        ErrorCode::ShuttingDown => (503, "server_error"),
        ErrorCode::QueueTimeout | ErrorCode::ProcessingTimeout => (504, "server_error"),
    };
    for code in ErrorCode::ALL {
        let s = error_status(code.into());
        assert_eq!((s.status, s.kind), expected(code), "{code}");
        assert_eq!(s.code, code.as_str());
        assert_eq!(s.retry_after, s.status == 429, "{code}");
    }
    let s = error_status(ApiError::Unauthorized);
    assert_eq!(
        (s.status, s.kind, s.code),
        (401, "authentication_error", "unauthorized")
    );
    let s = error_status(ApiError::MethodNotAllowed);
    assert_eq!(
        (s.status, s.kind, s.code),
        (405, "invalid_request_error", "method_not_allowed")
    );
}

#[test]
fn error_bodies_have_openais_shape() {
    let mut errors: Vec<ApiError> = ErrorCode::ALL.iter().map(|&c| c.into()).collect();
    errors.extend([ApiError::Unauthorized, ApiError::MethodNotAllowed]);
    for error in errors {
        for (message, param) in [
            ("plain", None),
            ("\"quoted\"\n\\", Some("messages[0].role")),
        ] {
            let mut out = Vec::new();
            let status = error_body(&mut out, error, message, param);
            assert_eq!(status, error_status(error));
            let v: Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(keys(&v), ["error"]);
            assert_eq!(
                v["error"],
                json!({"message": message, "type": status.kind, "param": param, "code": status.code})
            );
        }
    }
}

#[test]
fn an_error_after_the_stream_began_is_one_event_without_done() {
    let mut out = Vec::new();
    error_event(
        &mut out,
        ErrorCode::UpstreamError.into(),
        "the upstream\nfailed",
    );
    let events = events(&out);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].id, None);
    let v: Value = serde_json::from_str(&events[0].data).unwrap();
    assert_eq!(
        v,
        json!({"error": {"message": "the upstream\nfailed", "type": "server_error", "param": null, "code": "upstream_error"}})
    );
    assert!(!out.ends_with(DONE));
}

#[test]
fn the_model_list_has_openais_shape() {
    let mut out = Vec::new();
    models_body(&mut out, Vec::<String>::new());
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v, json!({"object": "list", "data": []}));

    let mut out = Vec::new();
    models_body(&mut out, ["default", "other \"one\""]);
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        v,
        json!({"object": "list", "data": [
            {"id": "default", "object": "model", "created": 0, "owned_by": "chorus"},
            {"id": "other \"one\"", "object": "model", "created": 0, "owned_by": "chorus"}
        ]})
    );
}

#[test]
fn a_whole_stream_concatenates_to_the_answer() {
    let c = completion();
    let frame = c.chunks();
    let mut out = Vec::new();
    frame.role(&mut out);
    let words = tricky();
    for (seq, word) in words.iter().enumerate() {
        let token = Token::new(seq as u64, word);
        frame.token(&mut out, seq as u64, token.json.as_bytes());
    }
    frame.end(&mut out, FinishReason::Stop, None);
    let events = events(&out);
    assert_eq!(events.len(), words.len() + 3);
    let mut answer = String::new();
    let mut ids = Vec::new();
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(&e.data).unwrap();
        if let Some(text) = v["choices"][0]["delta"]["content"].as_str() {
            answer.push_str(text);
        }
        ids.extend(e.id.clone());
    }
    assert_eq!(answer, words.concat());
    let expected: Vec<String> = (0..words.len()).map(|i| i.to_string()).collect();
    assert_eq!(ids, expected);
}
