//! The WebSocket protocol's server-to-client messages as JSON: what each
//! pipeline [`Event`] looks like on a WebSocket, the `history` answer, and
//! the layout of token frames.
//!
//! Called on whichever thread sends an event to a WebSocket client (a
//! pipeline worker, the history writer, the janitor, the connection
//! itself). Nothing here holds state.

use serde::Serialize;

use crate::delivery::{Event, TokenLayout};
use crate::protocol::{Failure, Finish, Role, Stage, Timings};

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Out<'a> {
    Accepted {
        id: &'a str,
        request: &'a str,
        conversation: &'a str,
    },
    State {
        request: &'a str,
        state: Stage,
        #[serde(skip_serializing_if = "Option::is_none")]
        position: Option<usize>,
    },
    Start {
        request: &'a str,
        role: Role,
    },
    Tool {
        request: &'a str,
        name: &'a str,
        phase: &'a str,
        text: &'a str,
    },
    Done {
        request: &'a str,
        finish: Finish,
        tokens: u64,
        role: Role,
        timings: Timings,
    },
    Error {
        request: Option<&'a str>,
        id: Option<&'a str>,
        code: &'a str,
        message: &'a str,
    },
    History {
        conversation: &'a str,
        messages: &'a [HistoryMessage<'a>],
        more: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        before: Option<u64>,
    },
}

/// One stored message in a `history` frame.
#[derive(Debug, Serialize)]
pub struct HistoryMessage<'a> {
    /// `user` or `assistant`.
    pub role: &'a str,
    /// The message text.
    pub content: &'a str,
    /// When it was stored, RFC 3339 UTC.
    pub at: String,
    /// Set when `content` was cut to fit the answer's byte bound.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// Set on an answer that was cut short (cancelled, failed, timed out).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
}

fn encode(out: &Out<'_>) -> Vec<u8> {
    // Serialising these plain structs into a Vec cannot fail.
    serde_json::to_vec(out).unwrap_or_default()
}

/// `accepted`: the request exists; always the first frame about it.
pub fn accepted(id: &str, request: &str, conversation: &str) -> Vec<u8> {
    encode(&Out::Accepted {
        id,
        request,
        conversation,
    })
}

/// `state`: the request moved to another stage.
pub fn state(request: &str, stage: Stage, position: Option<usize>) -> Vec<u8> {
    encode(&Out::State {
        request,
        state: stage,
        position,
    })
}

/// `start`: tokens follow, produced in this role.
pub fn start(request: &str, role: Role) -> Vec<u8> {
    encode(&Out::Start { request, role })
}

/// `tool`: a tool call, its streamed output or its result.
pub fn tool(request: &str, name: &str, phase: &str, text: &str) -> Vec<u8> {
    encode(&Out::Tool {
        request,
        name,
        phase,
        text,
    })
}

/// `done`: the request ended normally (or was cancelled by its client).
pub fn done(request: &str, finish: Finish, tokens: u64, role: Role, timings: Timings) -> Vec<u8> {
    encode(&Out::Done {
        request,
        finish,
        tokens,
        role,
        timings,
    })
}

/// `error`: about a request, a client frame, or the connection.
pub fn error(request: Option<&str>, id: Option<&str>, failure: &Failure) -> Vec<u8> {
    encode(&Out::Error {
        request,
        id,
        code: failure.code.as_str(),
        message: &failure.message,
    })
}

/// `history`: a page of a conversation's stored messages, oldest first.
/// `before` is the cursor for the next older page: `Some` exactly when
/// older messages were left out (`"more": true`).
pub fn history(
    conversation: &str,
    messages: &[HistoryMessage<'_>],
    before: Option<u64>,
) -> Vec<u8> {
    encode(&Out::History {
        conversation,
        messages,
        more: before.is_some(),
        before,
    })
}

/// The JSON message for `event` about `request`, or `None` for
/// [`Event::Tokens`], which is not one message.
pub fn event(request: &str, event: &Event<'_>) -> Option<Vec<u8>> {
    Some(match event {
        Event::Accepted { id, conversation } => accepted(id, request, conversation),
        Event::State { stage, position } => state(request, *stage, *position),
        Event::Start { role } => start(request, *role),
        Event::Tool { name, phase, text } => tool(request, name, phase, text),
        Event::Done {
            finish,
            tokens,
            role,
            timings,
            // Not in the WebSocket protocol's `done`.
            usage: _,
        } => done(request, *finish, *tokens, *role, *timings),
        Event::Error { id, failure } => error(Some(request), *id, failure),
        Event::Refused { id, failure } => error(None, Some(id), failure),
        Event::Tokens { .. } => return None,
    })
}

/// How a WebSocket token frame is laid out around the shared token:
/// `{"type":"token","request":"r-…","seq":N,"text":"…"}`.
pub fn token_layout(request: &str) -> TokenLayout {
    let mut head = Vec::with_capacity(40 + request.len());
    head.extend_from_slice(b"{\"type\":\"token\",\"request\":");
    // A request id is plain ASCII we generated, but escape anyway so a
    // future id format cannot break the JSON.
    head.extend_from_slice(&serde_json::to_vec(request).unwrap_or_default());
    head.extend_from_slice(b",\"seq\":");
    TokenLayout {
        head: head.into(),
        mid: b",\"text\":".as_slice().into(),
        tail: b"}".as_slice().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broadcast::Token;
    use crate::protocol::ErrorCode;

    #[test]
    fn token_frame_is_the_layout_around_the_shared_token() {
        let bytes = token_layout("r-1").with_parts(&Token::new(7, "a \"q\"\n"), |p| p.concat());
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["type"], "token");
        assert_eq!(v["request"], "r-1");
        assert_eq!(v["seq"], 7);
        assert_eq!(v["text"], "a \"q\"\n");
        assert_eq!(v.as_object().unwrap().len(), 4);
    }

    #[test]
    fn events_become_the_documented_messages() {
        let failure = Failure::new(ErrorCode::UpstreamError, "x");
        let refused = Failure::new(ErrorCode::ConversationBusy, "busy");
        let cases: [(Event<'_>, serde_json::Value); 6] = [
            (
                Event::Accepted {
                    id: "c1",
                    conversation: "k",
                },
                serde_json::json!({"type":"accepted","id":"c1","request":"r","conversation":"k"}),
            ),
            (
                Event::State {
                    stage: Stage::Queued,
                    position: Some(3),
                },
                serde_json::json!({"type":"state","request":"r","state":"queued","position":3}),
            ),
            (
                Event::Start { role: Role::Leader },
                serde_json::json!({"type":"start","request":"r","role":"leader"}),
            ),
            (
                Event::Tool {
                    name: "clock",
                    phase: "result",
                    text: "noon",
                },
                serde_json::json!({"type":"tool","request":"r","name":"clock","phase":"result","text":"noon"}),
            ),
            (
                Event::Error {
                    id: Some("c1"),
                    failure: &failure,
                },
                serde_json::json!({"type":"error","request":"r","id":"c1","code":"upstream_error","message":"x"}),
            ),
            (
                Event::Refused {
                    id: "c1",
                    failure: &refused,
                },
                serde_json::json!({"type":"error","request":null,"id":"c1","code":"conversation_busy","message":"busy"}),
            ),
        ];
        for (e, want) in cases {
            let got: serde_json::Value = serde_json::from_slice(&event("r", &e).unwrap()).unwrap();
            assert_eq!(got, want, "{e:?}");
        }
        let tokens = Event::Tokens {
            source: std::sync::Arc::new(Vec::<Token>::new()),
            from: 0,
            to: 0,
        };
        assert!(event("r", &tokens).is_none());
    }

    #[test]
    fn server_frames_have_the_documented_shape() {
        let v: serde_json::Value = serde_json::from_slice(&done(
            "r",
            Finish::Stop,
            3,
            Role::Cache,
            Timings {
                ttft_ms: Some(1.5),
                ..Timings::default()
            },
        ))
        .unwrap();
        assert_eq!(v["finish"], "stop");
        assert_eq!(v["role"], "cache");
        assert_eq!(v["timings"]["ttft_ms"], 1.5);
        let v: serde_json::Value = serde_json::from_slice(&error(
            None,
            Some("c1"),
            &Failure::new(ErrorCode::ConversationBusy, "busy"),
        ))
        .unwrap();
        assert_eq!(v["request"], serde_json::Value::Null);
        assert_eq!(v["code"], "conversation_busy");
        let v: serde_json::Value =
            serde_json::from_slice(&state("r", Stage::WaitingStream, Some(2))).unwrap();
        assert_eq!(v["state"], "waiting_stream");
        assert_eq!(v["position"], 2);
    }
}
