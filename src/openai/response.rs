//! Encoding answers: stream chunks, the `chat.completion` object, error
//! bodies and the model list, each appended to a caller's `Vec<u8>`.
//!
//! Token events are the hot path. A generation's token is escaped once as a
//! JSON string by the broadcaster ([`crate::broadcast::Token`]) and shared
//! by every subscriber; each subscriber writes [`ChunkFrame::HEAD`], its
//! `seq`, its own [`ChunkFrame::mid`] (which carries its request id), the
//! shared JSON string and [`ChunkFrame::TAIL`] ([`ChunkFrame::layout`]), so
//! fan-out never serialises JSON per subscriber.

use std::io::Write as _;
use std::sync::Arc;

use serde::Serialize;

use crate::delivery::TokenLayout;
use crate::protocol::{ErrorCode, Finish, Usage};

/// The event that ends a stream that did not fail.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

/// OpenAI's `finish_reason` for an answer that ended normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model finished (`"stop"`).
    Stop,
    /// The answer hit the token limit (`"length"`).
    Length,
}

impl FinishReason {
    /// The reason for a chorus [`Finish`]; `None` for
    /// [`Finish::Cancelled`], which OpenAI has no reason for: a cancelled
    /// answer is incomplete, so it ends with [`error_event`] and
    /// [`ErrorCode::Cancelled`], which every OpenAI client surfaces,
    /// rather than a reason typed clients would fail to read.
    pub fn from_finish(finish: Finish) -> Option<FinishReason> {
        match finish {
            Finish::Stop => Some(FinishReason::Stop),
            Finish::Length => Some(FinishReason::Length),
            Finish::Cancelled => None,
        }
    }

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What every chunk and the `chat.completion` object of one request repeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion<'a> {
    /// The chorus request id (`r-…`); the completion id is
    /// `chatcmpl-<request>`.
    pub request: &'a str,
    /// Unix time in seconds when the request was accepted.
    pub created: u64,
    /// The model the request asked for (or the default it got).
    pub model: &'a str,
}

impl Completion<'_> {
    /// The per-request bytes of this request's stream, built once.
    pub fn chunks(&self) -> ChunkFrame {
        let mut mid = Vec::with_capacity(160 + self.request.len() + self.model.len());
        mid.extend_from_slice(DATA_AFTER_ID);
        mid.extend_from_slice(b"{\"id\":\"chatcmpl-");
        escape_json_str(&mut mid, self.request);
        mid.extend_from_slice(b"\",\"object\":\"chat.completion.chunk\",\"created\":");
        // Writing into a Vec cannot fail.
        let _ = write!(mid, "{}", self.created);
        mid.extend_from_slice(b",\"model\":\"");
        escape_json_str(&mut mid, self.model);
        mid.extend_from_slice(b"\",");
        let prefix_end = mid.len();
        mid.extend_from_slice(b"\"choices\":[{\"index\":0,\"delta\":{\"content\":");
        ChunkFrame {
            mid: mid.into(),
            prefix_end,
        }
    }

    /// Appends the non-streamed answer: one `chat.completion` object.
    pub fn write_object(
        &self,
        out: &mut Vec<u8>,
        content: &str,
        reason: FinishReason,
        usage: &Usage,
    ) {
        #[derive(Serialize)]
        struct Object<'a> {
            id: String,
            object: &'static str,
            created: u64,
            model: &'a str,
            choices: [Choice<'a>; 1],
            usage: UsageJson,
        }
        #[derive(Serialize)]
        struct Choice<'a> {
            index: u32,
            message: Message<'a>,
            finish_reason: &'static str,
        }
        #[derive(Serialize)]
        struct Message<'a> {
            role: &'static str,
            content: &'a str,
        }
        let object = Object {
            id: format!("chatcmpl-{}", self.request),
            object: "chat.completion",
            created: self.created,
            model: self.model,
            choices: [Choice {
                index: 0,
                message: Message {
                    role: "assistant",
                    content,
                },
                finish_reason: reason.as_str(),
            }],
            usage: UsageJson::from(usage),
        };
        // Serialising borrowed strings and numbers into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, &object);
    }
}

/// `usage` as OpenAI spells it.
#[derive(Serialize)]
struct UsageJson {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

impl From<&Usage> for UsageJson {
    fn from(u: &Usage) -> UsageJson {
        UsageJson {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens(),
        }
    }
}

/// What separates a token event's `id:` line from its JSON.
const DATA_AFTER_ID: &[u8] = b"\ndata: ";

/// One request's `chat.completion.chunk` events.
///
/// A token event is `HEAD + seq + mid + text as a JSON string + TAIL`:
///
/// ```text
/// id: 3
/// data: {"id":"chatcmpl-r-…","object":"chat.completion.chunk","created":1700000000,"model":"m","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}
///
/// ```
///
/// Only `mid` depends on the request; cloning shares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkFrame {
    /// `\ndata: ` + prefix + `"choices":[{"index":0,"delta":{"content":`.
    mid: Arc<[u8]>,
    /// Where the prefix (`{"id":…,"model":"…",`) ends in `mid`.
    prefix_end: usize,
}

impl ChunkFrame {
    /// Starts every token event, before its `seq`.
    pub const HEAD: &'static [u8] = b"id: ";
    /// Ends every token event, after its escaped text.
    pub const TAIL: &'static [u8] = b"},\"finish_reason\":null}]}\n\n";

    /// The per-request bytes between a token's `seq` and its escaped text.
    #[cfg(test)]
    pub fn mid(&self) -> &[u8] {
        &self.mid
    }

    /// `data: {"id":…,"model":"…",`: what every chunk starts with.
    fn data_prefix(&self) -> &[u8] {
        self.mid.get(1..self.prefix_end).unwrap_or_default()
    }

    /// How this request's token events are laid out around a shared token.
    pub fn layout(&self) -> TokenLayout {
        TokenLayout {
            head: Self::HEAD.into(),
            mid: self.mid.as_ref().into(),
            tail: Self::TAIL.into(),
        }
    }

    /// Appends token `seq`'s event; `escaped` is its text as a JSON string
    /// (quotes included), as [`crate::broadcast::Token`] keeps it.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn token(&self, out: &mut Vec<u8>, seq: u64, escaped: &[u8]) {
        out.reserve(Self::HEAD.len() + 20 + self.mid.len() + escaped.len() + Self::TAIL.len());
        out.extend_from_slice(Self::HEAD);
        // Writing into a Vec cannot fail.
        let _ = write!(out, "{seq}");
        out.extend_from_slice(&self.mid);
        out.extend_from_slice(escaped);
        out.extend_from_slice(Self::TAIL);
    }

    /// Appends the first chunk, which names the role, as OpenAI's does.
    /// It is no token, so it has no `id:`.
    pub fn role(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.data_prefix());
        out.extend_from_slice(
            b"\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
        );
    }

    /// Appends everything after the last token of an answer that ended
    /// normally: the chunk with `finish_reason`, the usage chunk when
    /// `usage` is given (the client asked for `include_usage`), and
    /// [`DONE`].
    pub fn end(&self, out: &mut Vec<u8>, reason: FinishReason, usage: Option<&Usage>) {
        out.extend_from_slice(self.data_prefix());
        out.extend_from_slice(b"\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"");
        out.extend_from_slice(reason.as_str().as_bytes());
        out.extend_from_slice(b"\"}]}\n\n");
        if let Some(usage) = usage {
            out.extend_from_slice(self.data_prefix());
            out.extend_from_slice(b"\"choices\":[],\"usage\":");
            let _ = serde_json::to_writer(&mut *out, &UsageJson::from(usage));
            out.extend_from_slice(b"}\n\n");
        }
        out.extend_from_slice(DONE);
    }
}

/// Appends `text` JSON-escaped, without the surrounding quotes, exactly as
/// serde_json (and so the WebSocket token frames) escapes it.
pub fn escape_json_str(out: &mut Vec<u8>, text: &str) {
    /// serde_json's compact output minus the quotes around strings, so the
    /// escaping itself stays serde_json's.
    struct Unquoted;
    impl serde_json::ser::Formatter for Unquoted {
        fn begin_string<W: ?Sized + std::io::Write>(&mut self, _: &mut W) -> std::io::Result<()> {
            Ok(())
        }
        fn end_string<W: ?Sized + std::io::Write>(&mut self, _: &mut W) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut ser = serde_json::Serializer::with_formatter(out, Unquoted);
    // Writing a &str into a Vec cannot fail.
    let _ = text.serialize(&mut ser);
}

// ---------------------------------------------------------------------------
// Errors

/// Something the HTTP API refuses or fails with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApiError {
    /// A failure with a chorus error code, as on the WebSocket.
    Code(ErrorCode),
    /// `/v1/...` without the right bearer token while `server.auth_tokens`
    /// is set (the protocol has no error code for it: WebSocket
    /// handshakes are refused before any frame).
    Unauthorized,
    /// A `/v1/...` path that exists, asked with the wrong method.
    MethodNotAllowed,
}

impl From<ErrorCode> for ApiError {
    fn from(code: ErrorCode) -> ApiError {
        ApiError::Code(code)
    }
}

/// How an [`ApiError`] is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorStatus {
    /// The HTTP status.
    pub status: u16,
    /// OpenAI's `type`: who has to act. `invalid_request_error` (fix the
    /// request), `authentication_error` (fix the token), `rate_limit_error`
    /// (slow down and retry), `server_error` (chorus or its upstream
    /// failed; retrying may help).
    pub kind: &'static str,
    /// OpenAI's `code`: the chorus error code.
    pub code: &'static str,
    /// The answer carries a `Retry-After` header.
    pub retry_after: bool,
}

/// The HTTP status, `type` and `code` of every error: the one place they
/// are decided.
pub fn error_status(error: ApiError) -> ErrorStatus {
    const INVALID: &str = "invalid_request_error";
    const RATE: &str = "rate_limit_error";
    const SERVER: &str = "server_error";
    let (status, kind, code) = match error {
        ApiError::Unauthorized => (401, "authentication_error", "unauthorized"),
        ApiError::MethodNotAllowed => (405, INVALID, "method_not_allowed"),
        ApiError::Code(code) => {
            let (status, kind) = match code {
                ErrorCode::BadRequest => (400, INVALID),
                ErrorCode::NotFound => (404, INVALID),
                // The HTTP API keeps no conversations, so this only
                // happens if that changes; 409 says "not now, not wrong".
                ErrorCode::ConversationBusy => (409, INVALID),
                ErrorCode::TooLarge => (413, INVALID),
                ErrorCode::Overloaded | ErrorCode::RateLimited => (429, RATE),
                // Only ever an event after the status line is gone: a
                // client too slow to read is told to slow down.
                ErrorCode::SlowConsumer => (429, RATE),
                // nginx's "client closed request": a cancel comes from a
                // client, so the request, not the server, ended it.
                ErrorCode::Cancelled => (499, INVALID),
                ErrorCode::Internal => (500, SERVER),
                ErrorCode::UpstreamError => (502, SERVER),
                ErrorCode::ShuttingDown => (503, SERVER),
                ErrorCode::QueueTimeout | ErrorCode::ProcessingTimeout => (504, SERVER),
            };
            (status, kind, code.as_str())
        }
    };
    ErrorStatus {
        status,
        kind,
        code,
        retry_after: status == 429,
    }
}

/// `{"message":…,"type":…,"param":…,"code":…}`: the inside of `error`.
#[derive(Serialize)]
struct ErrorJson<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: &'static str,
}

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    error: ErrorJson<'a>,
}

fn write_error(out: &mut Vec<u8>, status: &ErrorStatus, message: &str, param: Option<&str>) {
    let body = ErrorEnvelope {
        error: ErrorJson {
            message,
            kind: status.kind,
            param,
            code: status.code,
        },
    };
    // Serialising borrowed strings into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &body);
}

/// Appends the error body `{"error":{"message","type","param","code"}}`
/// and returns the status (and `Retry-After` need) to answer it with.
/// `param` names the offending request field, as OpenAI's does.
pub fn error_body(
    out: &mut Vec<u8>,
    error: ApiError,
    message: &str,
    param: Option<&str>,
) -> ErrorStatus {
    let status = error_status(error);
    write_error(out, &status, message, param);
    status
}

/// Appends the event that ends a stream that has begun and then failed
/// (or was cancelled): `data: {"error":{…}}`. No [`DONE`] follows.
pub fn error_event(out: &mut Vec<u8>, error: ApiError, message: &str) {
    out.extend_from_slice(b"data: ");
    write_error(out, &error_status(error), message, None);
    out.extend_from_slice(b"\n\n");
}

// ---------------------------------------------------------------------------
// Models

/// Appends the body of `GET /v1/models` listing `ids`.
pub fn models_body<I, S>(out: &mut Vec<u8>, ids: I)
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    #[derive(Serialize)]
    struct Model<'a> {
        id: &'a str,
        object: &'static str,
        created: u64,
        owned_by: &'static str,
    }
    out.extend_from_slice(b"{\"object\":\"list\",\"data\":[");
    for (i, id) in ids.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let model = Model {
            id: id.as_ref(),
            object: "model",
            created: 0,
            owned_by: "chorus",
        };
        let _ = serde_json::to_writer(&mut *out, &model);
    }
    out.extend_from_slice(b"]}");
}
