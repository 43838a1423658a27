use serde_json::{json, Value};

use crate::llm::{PromptMessage, ToolCall};
use crate::openai::{parse_chat_request, ChatRequest, RequestError};
use crate::protocol::{ErrorCode, Failure};

fn parse(body: &Value) -> Result<ChatRequest, RequestError> {
    parse_chat_request(body.to_string().as_bytes())
}

/// A valid body with `extra` merged in (a `null` in `extra` removes the
/// field instead, to test absences).
fn with(extra: Value) -> Value {
    let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        body[k] = v;
    }
    body
}

/// Asserts `body` is refused for `param` with a message naming it.
#[track_caller]
fn refused(body: Value, param: &str) {
    let e = parse(&body).expect_err(&format!("accepted {body}"));
    assert_eq!(e.param.as_deref(), Some(param), "{e:?} for {body}");
    assert!(
        e.message.contains(&format!("`{param}`")),
        "message {:?} does not name `{param}`",
        e.message
    );
}

#[test]
fn a_minimal_request_asks_for_nothing_more() {
    let r = parse(&json!({"messages": [{"role": "user", "content": "hi"}]})).unwrap();
    assert_eq!(
        r,
        ChatRequest {
            model: None,
            messages: vec![PromptMessage::new("user", "hi")],
            stream: false,
            include_usage: false,
            max_tokens: None,
            temperature: None,
            top_p: None,
            stop: Vec::new(),
            seed: None,
            user: None,
        }
    );
    let prompt = r.into_prompt("configured");
    assert_eq!(prompt.model, "configured");
    assert_eq!(
        (
            prompt.max_tokens,
            prompt.temperature,
            prompt.top_p,
            prompt.seed
        ),
        (None, None, None, None)
    );
    assert!(prompt.stop.is_empty() && prompt.user.is_none());
}

#[test]
fn every_honoured_field_is_read_and_reaches_the_prompt() {
    let body = json!({
        "model": "gpt-x",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3+3?"}
        ],
        "stream": true,
        "stream_options": {"include_usage": true, "future_option": 1},
        "max_tokens": 64,
        "temperature": 0.7,
        "top_p": 0.9,
        "stop": ["\n\n", "END"],
        "seed": -7,
        "user": "u-1",
        "n": 1
    });
    let r = parse(&body).unwrap();
    assert!(r.stream && r.include_usage);
    let p = r.into_prompt("unused");
    assert_eq!(p.model, "gpt-x");
    let roles: Vec<_> = p.messages.iter().map(|m| m.role).collect();
    assert_eq!(roles, ["system", "user", "assistant", "user"]);
    assert_eq!(p.messages[3].content, "and 3+3?");
    assert_eq!(p.max_tokens, Some(64));
    assert_eq!((p.temperature, p.top_p), (Some(0.7), Some(0.9)));
    assert_eq!(p.stop, ["\n\n", "END"]);
    assert_eq!((p.seed, p.user.as_deref()), (Some(-7), Some("u-1")));
}

#[test]
fn null_is_the_same_as_absent() {
    let r = parse(&with(json!({
        "model": null, "stream": null, "stream_options": null, "max_tokens": null,
        "max_completion_tokens": null, "temperature": null, "top_p": null,
        "stop": null, "seed": null, "user": null, "n": null, "tools": null,
        "tool_choice": null, "functions": null, "function_call": null
    })))
    .unwrap();
    assert_eq!(r.model, None);
    assert!(!r.stream && r.max_tokens.is_none() && r.stop.is_empty());
    let r = parse(&with(json!({"stream_options": {"include_usage": null}}))).unwrap();
    assert!(!r.include_usage);
}

#[test]
fn unknown_fields_are_ignored_whatever_they_hold() {
    let r = parse(&with(json!({
        "presence_penalty": 0.5,
        "response_format": {"type": "json_object"},
        "logit_bias": {"50256": -100},
        "huge": 1e300,
        "nested": [[[{"deep": true}]]],
        "parallel_tool_calls": false
    })))
    .unwrap();
    assert_eq!(r.messages.len(), 1);
    // A number too large for an f64 in a field chorus does not read is
    // skipped unread.
    let body = br#"{"messages":[{"role":"user","content":"hi"}],"unknown":1e999}"#;
    assert!(parse_chat_request(body).is_ok());
}

#[test]
fn content_arrays_of_text_parts_are_joined() {
    let r = parse(&with(json!({"messages": [
        {"role": "system", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": [{"type": "text", "text": "one "}, {"type": "text", "text": "two", "extra": 1}]},
        {"role": "user", "content": []},
        {"role": "user", "content": ""}
    ]})))
    .unwrap();
    let contents: Vec<_> = r.messages.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(contents, ["Ab", "one two", "", ""]);
}

#[test]
fn a_replayed_tool_round_keeps_its_calls_and_answers() {
    let r = parse(&with(json!({"messages": [
        {"role": "user", "content": "add 1 and 1"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{\"a\":1}"}},
            {"id": "call_2", "function": {"name": "add", "arguments": ""}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "2"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "?"}]},
        {"role": "assistant", "tool_calls": [{"id": "c3", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "user", "content": "thanks", "tool_call_id": "ignored", "tool_calls": "ignored", "name": "bob"}
    ]})))
    .unwrap();
    let m = &r.messages;
    assert_eq!(m[1].content, "");
    assert_eq!(
        m[1].tool_calls,
        [
            ToolCall {
                id: "call_1".into(),
                name: "add".into(),
                arguments: "{\"a\":1}".into(),
                refused: None
            },
            ToolCall {
                id: "call_2".into(),
                name: "add".into(),
                arguments: String::new(),
                refused: None
            }
        ]
    );
    assert_eq!(
        (m[2].role, m[2].tool_call_id.as_deref()),
        ("tool", Some("call_1"))
    );
    assert_eq!(
        (m[3].content.as_str(), m[3].tool_call_id.as_deref()),
        ("?", Some("call_2"))
    );
    assert_eq!(m[4].tool_calls.len(), 1);
    assert_eq!(m[5], PromptMessage::new("user", "thanks"));
}

#[test]
fn max_completion_tokens_wins_over_max_tokens() {
    let r = parse(&with(
        json!({"max_tokens": 10, "max_completion_tokens": 20}),
    ))
    .unwrap();
    assert_eq!(r.max_tokens, Some(20));
    let r = parse(&with(json!({"max_tokens": 10}))).unwrap();
    assert_eq!(r.max_tokens, Some(10));
    let r = parse(&with(json!({"max_completion_tokens": 4294967295u64}))).unwrap();
    assert_eq!(r.max_tokens, Some(u32::MAX));
    // The loser is still checked.
    refused(
        with(json!({"max_tokens": 0, "max_completion_tokens": 20})),
        "max_tokens",
    );
}

#[test]
fn stop_takes_a_string_or_a_list() {
    let r = parse(&with(json!({"stop": "END"}))).unwrap();
    assert_eq!(r.stop, ["END"]);
    let r = parse(&with(json!({"stop": []}))).unwrap();
    assert!(r.stop.is_empty());
    let four = json!(["a", "b", "c", "d"]);
    assert_eq!(parse(&with(json!({"stop": four}))).unwrap().stop.len(), 4);
    let longest = "é".repeat(crate::openai::MAX_STOP_CHARS);
    assert!(parse(&with(json!({"stop": longest}))).is_ok());
}

#[test]
fn the_edges_of_the_ranges_are_accepted() {
    for (field, value) in [
        ("temperature", json!(0)),
        ("temperature", json!(2.0)),
        ("top_p", json!(0.0)),
        ("top_p", json!(1)),
        ("seed", json!(i64::MIN)),
        ("seed", json!(i64::MAX)),
        ("max_tokens", json!(1)),
        ("user", json!("")),
        ("tools", json!([])),
        ("functions", json!([])),
        ("tool_choice", json!("none")),
        ("function_call", json!("none")),
    ] {
        let body = with(json!({ field: value }));
        assert!(parse(&body).is_ok(), "{body}");
    }
}

#[test]
fn refusals_of_unsupported_features_name_the_field() {
    refused(with(json!({"n": 2})), "n");
    refused(with(json!({"n": 0})), "n");
    refused(with(json!({"n": "1"})), "n");
    refused(with(json!({"n": 1.5})), "n");
    let tool = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    refused(with(json!({"tools": tool})), "tools");
    refused(with(json!({"tools": "calculator"})), "tools");
    refused(with(json!({"functions": [{"name": "f"}]})), "functions");
    refused(with(json!({"tool_choice": "auto"})), "tool_choice");
    refused(
        with(json!({"tool_choice": {"type": "function", "function": {"name": "f"}}})),
        "tool_choice",
    );
    refused(with(json!({"function_call": "auto"})), "function_call");
    let image = json!({"type": "image_url", "image_url": {"url": "http://x/y.png"}});
    refused(
        with(
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "see"}, image]}]}),
        ),
        "messages[0].content[1].type",
    );
}

#[test]
fn refusals_of_messages_name_the_field() {
    let msgs = |m: Value| with(json!({ "messages": m }));
    refused(json!({"model": "m"}), "messages");
    refused(msgs(json!([])), "messages");
    refused(msgs(json!("hi")), "messages");
    refused(msgs(json!({"role": "user"})), "messages");
    refused(
        msgs(json!([{"role": "user", "content": "a"}, "b"])),
        "messages[1]",
    );
    refused(msgs(json!([{"content": "a"}])), "messages[0].role");
    refused(
        msgs(json!([{"role": 1, "content": "a"}])),
        "messages[0].role",
    );
    for role in ["developer", "function", "User", ""] {
        refused(
            msgs(json!([{"role": role, "content": "a"}])),
            "messages[0].role",
        );
    }
    refused(msgs(json!([{"role": "user"}])), "messages[0].content");
    refused(
        msgs(json!([{"role": "user", "content": null}])),
        "messages[0].content",
    );
    refused(
        msgs(json!([{"role": "user", "content": 5}])),
        "messages[0].content",
    );
    refused(
        msgs(json!([{"role": "user", "content": {"text": "a"}}])),
        "messages[0].content",
    );
    refused(
        msgs(json!([{"role": "assistant", "content": null}])),
        "messages[0].content",
    );
    refused(
        msgs(json!([{"role": "assistant", "content": null, "tool_calls": []}])),
        "messages[0].content",
    );
    refused(
        msgs(json!([{"role": "user", "content": ["a"]}])),
        "messages[0].content[0]",
    );
    refused(
        msgs(json!([{"role": "user", "content": [{"text": "a"}]}])),
        "messages[0].content[0].type",
    );
    refused(
        msgs(json!([{"role": "user", "content": [{"type": 1, "text": "a"}]}])),
        "messages[0].content[0].type",
    );
    refused(
        msgs(json!([{"role": "user", "content": [{"type": "text"}]}])),
        "messages[0].content[0].text",
    );
    refused(
        msgs(json!([{"role": "user", "content": [{"type": "text", "text": 1}]}])),
        "messages[0].content[0].text",
    );
    refused(
        msgs(json!([{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}])),
        "messages[0].content[0].type",
    );
}

#[test]
fn refusals_of_tool_rounds_name_the_field() {
    let msgs = |m: Value| with(json!({ "messages": m }));
    refused(
        msgs(json!([{"role": "tool", "content": "2"}])),
        "messages[0].tool_call_id",
    );
    refused(
        msgs(json!([{"role": "tool", "content": "2", "tool_call_id": ""}])),
        "messages[0].tool_call_id",
    );
    refused(
        msgs(json!([{"role": "tool", "content": "2", "tool_call_id": 7}])),
        "messages[0].tool_call_id",
    );
    refused(
        msgs(json!([{"role": "tool", "tool_call_id": "c"}])),
        "messages[0].content",
    );
    let assistant =
        |calls: Value| msgs(json!([{"role": "assistant", "content": null, "tool_calls": calls}]));
    refused(assistant(json!("call")), "messages[0].tool_calls");
    refused(assistant(json!([5])), "messages[0].tool_calls[0]");
    refused(
        assistant(json!([{"function": {"name": "f", "arguments": ""}}])),
        "messages[0].tool_calls[0].id",
    );
    refused(
        assistant(json!([{"id": "", "function": {"name": "f", "arguments": ""}}])),
        "messages[0].tool_calls[0].id",
    );
    refused(
        assistant(json!([{"id": "c", "type": "code", "function": {"name": "f", "arguments": ""}}])),
        "messages[0].tool_calls[0].type",
    );
    refused(
        assistant(json!([{"id": "c"}])),
        "messages[0].tool_calls[0].function",
    );
    refused(
        assistant(json!([{"id": "c", "function": {"arguments": ""}}])),
        "messages[0].tool_calls[0].function.name",
    );
    refused(
        assistant(json!([{"id": "c", "function": {"name": "f"}}])),
        "messages[0].tool_calls[0].function.arguments",
    );
    refused(
        assistant(json!([{"id": "c", "function": {"name": "f", "arguments": {"a": 1}}}])),
        "messages[0].tool_calls[0].function.arguments",
    );
}

#[test]
fn refusals_of_options_name_the_field() {
    let long = "x".repeat(257);
    refused(with(json!({"model": ""})), "model");
    refused(with(json!({"model": 5})), "model");
    refused(with(json!({"model": long})), "model");
    refused(with(json!({"stream": "yes"})), "stream");
    refused(with(json!({"stream": 1})), "stream");
    refused(with(json!({"stream_options": true})), "stream_options");
    refused(
        with(json!({"stream_options": {"include_usage": "yes"}})),
        "stream_options.include_usage",
    );
    for field in ["max_tokens", "max_completion_tokens"] {
        for bad in [
            json!(0),
            json!(-1),
            json!(1.5),
            json!("5"),
            json!(4294967296u64),
        ] {
            refused(with(json!({ field: bad })), field);
        }
    }
    for bad in [
        json!(2.0001),
        json!(-0.1),
        json!("hot"),
        json!(3),
        json!(f64::MAX),
    ] {
        refused(with(json!({ "temperature": bad })), "temperature");
    }
    for bad in [json!(1.5), json!(-1), json!([0.5])] {
        refused(with(json!({ "top_p": bad })), "top_p");
    }
    refused(with(json!({"stop": 5})), "stop");
    refused(with(json!({"stop": ""})), "stop");
    refused(with(json!({"stop": long})), "stop");
    refused(with(json!({"stop": ["a", "b", "c", "d", "e"]})), "stop");
    refused(with(json!({"stop": ["a", 1]})), "stop[1]");
    refused(with(json!({"stop": ["a", ""]})), "stop[1]");
    refused(with(json!({"seed": 1.5})), "seed");
    refused(with(json!({"seed": "7"})), "seed");
    refused(with(json!({"seed": 9223372036854775808u64})), "seed");
    refused(with(json!({"user": 5})), "user");
    refused(with(json!({"user": long})), "user");
}

#[test]
fn numbers_serde_cannot_read_are_refused_by_name() {
    for field in ["temperature", "top_p", "max_tokens", "seed"] {
        let body = format!(r#"{{"messages":[{{"role":"user","content":"hi"}}],"{field}":1e999}}"#);
        let e = parse_chat_request(body.as_bytes()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some(field), "{e:?}");
        assert!(e.message.contains(&format!("`{field}`")), "{e:?}");
    }
}

#[test]
fn a_field_given_twice_is_refused_by_name() {
    let body = br#"{"model":"a","messages":[{"role":"user","content":"hi"}],"model":"b"}"#;
    let e = parse_chat_request(body).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("model"));
    assert!(e.message.contains("`model`"), "{e:?}");
}

#[test]
fn a_body_that_is_not_a_json_object_is_refused() {
    for body in [
        &b""[..],
        b"   ",
        b"null",
        b"[]",
        br#"["m", [{"role":"user","content":"hi"}]]"#,
        b"\"text\"",
        b"42",
        b"{",
        br#"{"messages":[{"role":"user","content":"hi"}]} trailing"#,
        br#"{"messages":[{"role":"user","content":"hi"}]}{}"#,
        b"\xef\xbb\xbf{}",
    ] {
        let e = parse_chat_request(body).expect_err(&String::from_utf8_lossy(body));
        assert_eq!(e.param, None, "{e:?}");
        assert!(
            e.message.starts_with("the body is not a valid JSON object"),
            "{e:?}"
        );
    }
    // Broken JSON inside an honoured field names the field.
    let e = parse_chat_request(b"{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\"}]}")
        .unwrap_err();
    assert_eq!(e.param.as_deref(), Some("messages"), "{e:?}");
    // Whitespace around the object is JSON.
    assert!(
        parse_chat_request(b"\n {\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]} \n")
            .is_ok()
    );
}

#[test]
fn a_refusal_is_a_bad_request_failure() {
    let e = parse(&with(json!({"n": 3}))).unwrap_err();
    let failure = Failure::from(e.clone());
    assert_eq!(failure.code, ErrorCode::BadRequest);
    assert_eq!(failure.message, e.message);
    assert_eq!(e.to_string(), e.message);
}
