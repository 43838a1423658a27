//! Entry points of the fuzz targets in `fuzz/`: the parsers that read bytes
//! a client or an upstream controls, each behind one function taking raw
//! bytes.
//!
//! The same functions replay every committed corpus file on the stable
//! toolchain (the test at the bottom, part of the test command), so a crash
//! the fuzzer once found stays fixed. Each entry checks more than "does not
//! panic" where the parser has a property to keep: a stream split anywhere
//! parses as the whole one, bounds hold whatever the input.
//!
//! Built only for tests and with the `fuzzing` feature (which `fuzz/`
//! turns on), so it is not part of the library's API.
//!
//! Threads: none of its own; each call runs on the caller's thread.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::authority::HostPolicy;
use crate::llm::sse::{Event, SseParser};
use crate::llm::{CallAssembler, CallLimits, Flow, StreamState, TokenSink};
use crate::net::http;
use crate::protocol::{self, FrameLimits};

/// `data` as the bytes a client sends before its request head is complete:
/// the first byte picks where the first read ends. A head complete in the
/// first read is the head of the whole, and what the server then asks of
/// a head (its host, origin, token, static path) never panics.
pub fn http_head(data: &[u8]) {
    let Some((&cut, bytes)) = data.split_first() else {
        return;
    };
    let cut = (usize::from(cut) * bytes.len() / 255).min(bytes.len());
    let whole = http::parse_head(bytes);
    if let Ok(Some(first)) = http::parse_head(&bytes[..cut]) {
        let Ok(Some(whole)) = &whole else {
            panic!("a complete prefix, but the whole is {whole:?}");
        };
        assert_eq!(
            (&first.method, &first.path, &first.query, &first.headers),
            (&whole.method, &whole.path, &whole.query, &whole.headers)
        );
    }
    match whole {
        Ok(Some(request)) => {
            assert!(request.leftover.len() < bytes.len());
            let bound = std::net::SocketAddr::from(([127, 0, 0, 1], 8080));
            HostPolicy::new(&[], bound).allows(request.header("host"));
            crate::authority::origin_allowed(request.header("origin"), request.header("host"), &[]);
            http::authorized(&request, &["token".to_owned()]);
            request.header_has_token("connection", "upgrade");
            request.query_param("token");
            if let Some(file) = request.path.strip_prefix("/static/") {
                if let Some(safe) = crate::net::static_files::safe_relative_path(file) {
                    assert!(
                        safe.split('/').all(|s| !s.is_empty() && s != ".."),
                        "{safe}"
                    );
                }
            }
        }
        // Incomplete: only while within the head's bound.
        Ok(None) => assert!(bytes.len() < 16 * 1024),
        Err(_) => {}
    }
}

/// `data` as a WebSocket text frame from a client. Whatever it is, the
/// answer is a frame or an error with a code clients know, never a panic.
pub fn client_frame(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let limits = FrameLimits {
        max_message_chars: 16_000,
    };
    if let Err(e) = protocol::parse_client_frame(text, limits) {
        assert!(!e.message.is_empty());
        assert!(protocol::ErrorCode::ALL.contains(&e.code));
    }
}

/// `data` as the body of `POST /v1/chat/completions`. A refusal names the
/// field it blames; an accepted request keeps every documented bound, and
/// each of its texts, sent back as a token event, reads back as itself.
pub fn openai_request(data: &[u8]) {
    use crate::openai::{self, Completion};
    let request = match openai::parse_chat_request(data) {
        Ok(request) => request,
        Err(e) => {
            assert!(!e.message.is_empty());
            if let Some(param) = &e.param {
                assert!(e.message.contains(&format!("`{param}`")), "{e:?}");
            }
            return;
        }
    };
    assert!(!request.messages.is_empty());
    if let Some(model) = &request.model {
        assert!(!model.is_empty() && model.chars().count() <= openai::MAX_MODEL_CHARS);
    }
    assert!(request.temperature.is_none_or(|t| (0.0..=2.0).contains(&t)));
    assert!(request.top_p.is_none_or(|p| (0.0..=1.0).contains(&p)));
    assert!(request.max_tokens.is_none_or(|n| n >= 1));
    assert!(request.stop.len() <= openai::MAX_STOP_SEQUENCES);
    for stop in &request.stop {
        assert!(!stop.is_empty() && stop.chars().count() <= openai::MAX_STOP_CHARS);
    }
    for m in &request.messages {
        assert!(["system", "user", "assistant", "tool"].contains(&m.role));
        assert_eq!(m.role == "tool", m.tool_call_id.is_some());
        assert!(m.tool_calls.is_empty() || m.role == "assistant");
    }
    let model = request.model.as_deref().unwrap_or("default");
    let frame = Completion {
        request: "r-fuzz",
        created: 0,
        model,
    }
    .chunks();
    for m in &request.messages {
        let token = crate::broadcast::Token::new(7, &m.content);
        let mut event = Vec::new();
        frame.token(&mut event, 7, token.json.as_bytes());
        let text = std::str::from_utf8(&event).expect("utf-8");
        let data = text
            .strip_prefix("id: 7\ndata: ")
            .and_then(|t| t.strip_suffix("\n\n"))
            .expect("one event");
        let chunk: serde_json::Value = serde_json::from_str(data).expect("chunk JSON");
        assert_eq!(chunk["model"], model);
        assert_eq!(chunk["choices"][0]["delta"]["content"], m.content.as_str());
    }
}

/// `data` as an upstream's streamed response body: the first byte picks a
/// place to cut it, and the body read in two pieces must give the same
/// events, tokens and ending as read whole.
pub fn upstream_stream(data: &[u8]) {
    let Some((&cut, body)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut) * body.len() / 255;
    let (head, tail) = body.split_at(cut.min(body.len()));

    assert_eq!(sse_events(&[body]), sse_events(&[head, tail]));
    assert_eq!(stream_outcome(&[body]), stream_outcome(&[head, tail]));
}

/// The events of a stream fed in `pieces`, up to the first error.
fn sse_events(pieces: &[&[u8]]) -> (Vec<Event>, Option<String>) {
    // Small enough that the fuzzer reaches the bound.
    let mut parser = SseParser::new(4096);
    let mut events = Vec::new();
    for piece in pieces {
        if let Err(e) = parser.feed(piece, &mut |e| events.push(e)) {
            return (events, Some(e.to_string()));
        }
    }
    (events, None)
}

/// What a round's stream reading makes of `pieces`: the tokens sent, and
/// how it ended (a failure, or the end with its tool calls).
fn stream_outcome(pieces: &[&[u8]]) -> (Vec<String>, String) {
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let sink: TokenSink = {
        let tokens = tokens.clone();
        Arc::new(move |t: &str| {
            tokens.lock().push(t.to_owned());
            Flow::Continue
        })
    };
    let mut state = StreamState::new("fuzz", CallLimits::default(), sink, false, true);
    let mut failed = None;
    for piece in pieces {
        match state.feed(piece) {
            Ok(crate::llm::Fed::More) => {}
            Ok(_) => break,
            Err(e) => {
                failed = Some(e.error.to_string());
                break;
            }
        }
    }
    let ending = match failed {
        Some(e) => e,
        None => match state.end() {
            Ok(turn) => {
                for call in &turn.tool_calls {
                    assert!(call.arguments.len() <= CallLimits::default().max_argument_bytes);
                }
                format!("{:?} {:?} {:?}", turn.end, turn.tool_calls, turn.said)
            }
            Err(e) => e.error.to_string(),
        },
    };
    let tokens = tokens.lock().clone();
    (tokens, ending)
}

/// `data` as a sequence of tool-call deltas (each: a flag byte, an index
/// byte and three length-prefixed strings). Whatever the model sends, the
/// assembler keeps its bounds.
pub fn tool_calls(data: &[u8]) {
    let limits = CallLimits {
        max_calls: 3,
        max_argument_bytes: 64,
    };
    let mut calls = CallAssembler::new(limits);
    let mut rest = data;
    while let [flags, index, tail @ ..] = rest {
        rest = tail;
        let mut field = |present: bool| -> Option<String> {
            let (&len, tail) = rest.split_first()?;
            let len = usize::from(len % 32).min(tail.len());
            let (text, tail) = tail.split_at(len);
            rest = tail;
            present.then(|| String::from_utf8_lossy(text).into_owned())
        };
        let id = field(flags & 2 != 0);
        let name = field(flags & 4 != 0);
        let arguments = field(flags & 8 != 0);
        calls.push(
            (flags & 1 != 0).then_some(u64::from(*index)),
            id.as_deref(),
            name.as_deref(),
            arguments.as_deref(),
        );
    }
    let calls = calls.finish();
    assert!(calls.len() <= 2 * limits.max_calls, "{}", calls.len());
    for (i, call) in calls.iter().enumerate() {
        assert!(call.arguments.len() <= limits.max_argument_bytes);
        assert!(call.name.len() <= crate::llm::MAX_NAME_BYTES);
        assert!(!call.id.is_empty());
        assert!(calls[..i].iter().all(|c| c.id != call.id), "ids are unique");
    }
}

/// `data` as what Redis answers to a read of a token stream (`XREAD` or
/// `XRANGE`), in Redis's wire format. Whatever a stream holds (entries
/// another version wrote, a key someone overwrote), each entry decodes to
/// an event or to a `Corrupt` error, never a panic; and an event written
/// back the way a node writes it decodes to itself.
pub fn redis_stream(data: &[u8]) {
    use crate::cluster::stream::{decode, end_fields, StreamEvent, TOKEN_FIELD};
    use redis::streams::{StreamId, StreamRangeReply, StreamReadReply};
    use redis::FromRedisValue;

    let Ok(value) = redis::parse_redis_value(data) else {
        return;
    };
    let mut entries = Vec::new();
    if let Ok(reply) = StreamReadReply::from_redis_value_ref(&value) {
        entries.extend(reply.keys.into_iter().flat_map(|k| k.ids));
    }
    if let Ok(reply) = StreamRangeReply::from_redis_value(value) {
        entries.extend(reply.ids);
    }
    for entry in &entries {
        let event = match decode("fuzz", entry) {
            Ok(event) => event,
            Err(crate::cluster::ClusterError::Corrupt(why)) => {
                assert!(why.contains(&entry.id), "{why}");
                continue;
            }
            Err(other) => panic!("not a decoding error: {other}"),
        };
        let fields: Vec<(&str, &str)> = match &event {
            StreamEvent::Token(text) => vec![(TOKEN_FIELD, text)],
            StreamEvent::End(end) => end_fields(end),
        };
        let written = StreamId {
            id: entry.id.clone(),
            map: fields
                .into_iter()
                .map(|(k, v)| {
                    (
                        k.to_owned(),
                        redis::Value::BulkString(v.as_bytes().to_vec()),
                    )
                })
                .collect(),
            ..StreamId::default()
        };
        assert_eq!(decode("fuzz", &written).ok(), Some(event));
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Runs every committed corpus file of `target` through `entry`.
    fn replay(target: &str, entry: fn(&[u8])) -> usize {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        let mut files = 0;
        for file in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir:?}: {e}")) {
            let path = file.expect("corpus entry").path();
            let data = std::fs::read(&path).expect("corpus file");
            entry(&data);
            files += 1;
        }
        files
    }

    #[test]
    fn every_committed_corpus_file_replays_cleanly() {
        for (target, entry) in [
            ("http_head", super::http_head as fn(&[u8])),
            ("client_frame", super::client_frame),
            ("upstream_stream", super::upstream_stream),
            ("tool_calls", super::tool_calls),
            ("redis_stream", super::redis_stream),
            ("openai_request", super::openai_request),
        ] {
            assert!(replay(target, entry) > 0, "the {target} corpus is empty");
        }
    }
}
