//! The wire protocol, version 1: what clients send, the vocabulary of what
//! the server answers (roles, stages, how a request finished, timings), and
//! the one place where error codes are named. How each transport encodes
//! its answers lives with the transport (`ws::encode` for the WebSocket
//! protocol).
//!
//! Parsing happens on the connection thread that read the frame. Nothing
//! here holds state, so any thread may call anything.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest client correlation id (`id` of a `chat`) the server accepts.
pub const MAX_CLIENT_ID_CHARS: usize = 64;
/// Longest client-chosen conversation id the server accepts.
pub const MAX_CONVERSATION_ID_CHARS: usize = 128;
/// Largest `limit` of a `history` request; larger values are clamped.
pub const MAX_HISTORY_LIMIT: usize = 1000;
/// `limit` of a `history` request that does not give one.
pub const DEFAULT_HISTORY_LIMIT: usize = 50;

/// Every error code of the protocol. `Display` is the wire spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Malformed frame: binary, bad JSON, unknown type, missing or mistyped field.
    BadRequest,
    /// A frame larger than `ws_max_message_bytes`.
    TooLarge,
    /// A bounded queue was full.
    Overloaded,
    /// The client sends faster than allowed.
    RateLimited,
    /// The conversation already has a request in flight.
    ConversationBusy,
    /// The request waited in a queue longer than `queue_ms`.
    QueueTimeout,
    /// Preparation or streaming went past its limits.
    ProcessingTimeout,
    /// The model provider failed.
    UpstreamError,
    /// The request was cancelled before it could produce a `done`.
    Cancelled,
    /// Unknown or expired request or conversation.
    NotFound,
    /// The client did not read its socket fast enough.
    SlowConsumer,
    /// The server is draining.
    ShuttingDown,
    /// A bug or an unexpected failure inside the server.
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::ConversationBusy => "conversation_busy",
            ErrorCode::QueueTimeout => "queue_timeout",
            ErrorCode::ProcessingTimeout => "processing_timeout",
            ErrorCode::UpstreamError => "upstream_error",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::NotFound => "not_found",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
        }
    }

    /// Every code, for documentation checks and metrics labels.
    pub const ALL: [ErrorCode; 13] = [
        ErrorCode::BadRequest,
        ErrorCode::TooLarge,
        ErrorCode::Overloaded,
        ErrorCode::RateLimited,
        ErrorCode::ConversationBusy,
        ErrorCode::QueueTimeout,
        ErrorCode::ProcessingTimeout,
        ErrorCode::UpstreamError,
        ErrorCode::Cancelled,
        ErrorCode::NotFound,
        ErrorCode::SlowConsumer,
        ErrorCode::ShuttingDown,
        ErrorCode::Internal,
    ];
}

/// A wire name that names no value of the type it was parsed as.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {name:?}")]
pub struct UnknownName {
    /// What was parsed, e.g. `error code`.
    pub what: &'static str,
    /// The name that was given.
    pub name: String,
}

/// `FromStr` by the wire names of `all`, for the enums of this module.
fn by_wire_name<T: Copy>(
    what: &'static str,
    all: &[T],
    name: &str,
    as_str: fn(T) -> &'static str,
) -> Result<T, UnknownName> {
    all.iter()
        .copied()
        .find(|v| as_str(*v) == name)
        .ok_or_else(|| UnknownName {
            what,
            name: name.to_owned(),
        })
}

impl std::str::FromStr for ErrorCode {
    type Err = UnknownName;
    fn from_str(name: &str) -> Result<Self, UnknownName> {
        by_wire_name("error code", &ErrorCode::ALL, name, ErrorCode::as_str)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure that ends a request, as the client will see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The protocol error code.
    pub code: ErrorCode,
    /// A readable sentence for humans.
    pub message: String,
}

impl Failure {
    /// A failure with `code` and a human message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

// ---------------------------------------------------------------------------
// Client to server

/// One frame from a client, already checked for shape and limits.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    /// Ask a question.
    Chat(Chat),
    /// Detach from a request.
    Cancel {
        /// The request id from `accepted`.
        request: String,
    },
    /// Re-attach to a request's stream from token `from`.
    Resume {
        /// The request id from `accepted`.
        request: String,
        /// First `seq` to replay.
        from: u64,
    },
    /// Read a conversation's stored messages.
    History {
        /// The conversation id.
        conversation: String,
        /// How many of the latest messages, at most.
        limit: usize,
        /// Only messages before this index (the `before` of an earlier
        /// answer), to page back; `None` for the newest.
        before: Option<u64>,
    },
}

/// A `chat` frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Chat {
    /// The client's correlation id, echoed back.
    pub id: String,
    /// The conversation to continue; `None` starts a new one.
    pub conversation: Option<String>,
    /// The user's message, as sent (trimmed only for the identical-request key).
    pub message: String,
    /// Generation options.
    pub options: ChatOptions,
}

/// The `options` of a `chat`; every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ChatOptions {
    /// Model name; the configured model when absent.
    #[serde(default)]
    pub model: Option<String>,
    /// Sampling temperature, 0 to 2.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Upper bound of generated tokens.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Nucleus sampling, 0 to 1.
    #[serde(default)]
    pub top_p: Option<f64>,
    /// An independent generation: no cache read, no singleflight.
    #[serde(default)]
    pub fresh: bool,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum RawFrame {
    Chat {
        id: String,
        #[serde(default)]
        conversation: Option<String>,
        message: String,
        #[serde(default)]
        options: Option<ChatOptions>,
    },
    Cancel {
        request: String,
    },
    Resume {
        request: String,
        #[serde(default)]
        from: u64,
    },
    History {
        conversation: String,
        #[serde(default)]
        limit: Option<usize>,
        #[serde(default)]
        before: Option<u64>,
    },
}

/// Why a client frame was refused, with the client's `id` when it could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    /// `bad_request` or `too_large`.
    pub code: ErrorCode,
    /// What was wrong, for the human reading the error.
    pub message: String,
    /// The `id` field of the frame, when the frame was a readable object.
    pub id: Option<String>,
}

/// Limits a frame is checked against; they come from `[server]` in the config.
#[derive(Debug, Clone, Copy)]
pub struct FrameLimits {
    /// Largest accepted message in characters.
    pub max_message_chars: usize,
}

/// Parses and validates one text frame.
///
/// Every failure is a [`FrameError`] with code `bad_request` (or `too_large`
/// for a message over the character limit); the caller answers it and keeps
/// the connection open.
pub fn parse_client_frame(text: &str, limits: FrameLimits) -> Result<ClientFrame, FrameError> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| FrameError {
        code: ErrorCode::BadRequest,
        message: format!("malformed JSON: {e}"),
        id: None,
    })?;
    // Read `id` before the typed parse so even a broken chat is answered with it.
    let id = value
        .get("id")
        .and_then(|v| v.as_str())
        .filter(|s| s.chars().count() <= MAX_CLIENT_ID_CHARS)
        .map(str::to_owned);
    let bad = |message: String| FrameError {
        code: ErrorCode::BadRequest,
        message,
        id: id.clone(),
    };
    if !value.is_object() {
        return Err(bad("a frame must be a JSON object".into()));
    }
    let raw: RawFrame = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
    match raw {
        RawFrame::Chat {
            id: chat_id,
            conversation,
            message,
            options,
        } => {
            let id_chars = chat_id.chars().count();
            if id_chars == 0 || id_chars > MAX_CLIENT_ID_CHARS {
                return Err(bad(format!(
                    "`id` must have 1 to {MAX_CLIENT_ID_CHARS} characters"
                )));
            }
            if let Some(conversation) = &conversation {
                check_conversation_id(conversation).map_err(bad)?;
            }
            if message.trim().is_empty() {
                return Err(bad("`message` must not be empty".into()));
            }
            let chars = message.chars().count();
            if chars > limits.max_message_chars {
                return Err(FrameError {
                    code: ErrorCode::TooLarge,
                    message: format!(
                        "`message` has {chars} characters, the limit is {}",
                        limits.max_message_chars
                    ),
                    id: Some(chat_id),
                });
            }
            let options = options.unwrap_or_default();
            if let Some(t) = options.temperature {
                if !(0.0..=2.0).contains(&t) {
                    return Err(bad("`options.temperature` must be between 0 and 2".into()));
                }
            }
            if let Some(p) = options.top_p {
                if !(0.0..=1.0).contains(&p) {
                    return Err(bad("`options.top_p` must be between 0 and 1".into()));
                }
            }
            if options.max_tokens == Some(0) {
                return Err(bad("`options.max_tokens` must be at least 1".into()));
            }
            if let Some(model) = &options.model {
                if model.is_empty() || model.len() > 256 {
                    return Err(bad("`options.model` must have 1 to 256 bytes".into()));
                }
            }
            Ok(ClientFrame::Chat(Chat {
                id: chat_id,
                conversation,
                message,
                options,
            }))
        }
        RawFrame::Cancel { request } => Ok(ClientFrame::Cancel { request }),
        RawFrame::Resume { request, from } => Ok(ClientFrame::Resume { request, from }),
        RawFrame::History {
            conversation,
            limit,
            before,
        } => {
            check_conversation_id(&conversation).map_err(bad)?;
            let limit = limit
                .unwrap_or(DEFAULT_HISTORY_LIMIT)
                .min(MAX_HISTORY_LIMIT);
            Ok(ClientFrame::History {
                conversation,
                limit,
                before,
            })
        }
    }
}

fn check_conversation_id(conversation: &str) -> Result<(), String> {
    let chars = conversation.chars().count();
    if chars == 0 || chars > MAX_CONVERSATION_ID_CHARS {
        return Err(format!(
            "`conversation` must have 1 to {MAX_CONVERSATION_ID_CHARS} characters"
        ));
    }
    if conversation.chars().any(char::is_control) {
        return Err("`conversation` must not contain control characters".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Server to client

/// Who produced the answer a client receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// This request ran the generation.
    Leader,
    /// This request shared another request's generation.
    Follower,
    /// This request was answered from the cache.
    Cache,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 3] = [Role::Leader, Role::Follower, Role::Cache];

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Cache => "cache",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = UnknownName;
    fn from_str(name: &str) -> Result<Self, UnknownName> {
        by_wire_name("role", &Role::ALL, name, Role::as_str)
    }
}

/// How a stream ended, in a `done` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    /// The model finished its answer.
    Stop,
    /// The answer hit `max_tokens`.
    Length,
    /// The client cancelled.
    Cancelled,
}

impl Finish {
    /// Every way to finish.
    pub const ALL: [Finish; 3] = [Finish::Stop, Finish::Length, Finish::Cancelled];

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::Cancelled => "cancelled",
        }
    }
}

impl std::str::FromStr for Finish {
    type Err = UnknownName;
    fn from_str(name: &str) -> Result<Self, UnknownName> {
        by_wire_name("finish", &Finish::ALL, name, Finish::as_str)
    }
}

/// How a generation, and each request it serves, ended: finished (`stop`
/// or `length`), cancelled (its client or every client left, or the
/// upstream call was aborted), or failed with the error every member gets.
/// The one spelling of it, from the provider's stream through the
/// singleflight, the cluster's Redis stream and the cache to `done`.
pub type Outcome = Result<Finish, Failure>;

/// The visible stages of a request, in `state` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Waiting in a queue.
    Queued,
    /// The leader is loading history and assembling the prompt.
    Preparing,
    /// Prepared, waiting for a streaming slot.
    WaitingStream,
    /// The model is producing tokens.
    Streaming,
}

/// Token counts of a generation, as the upstream reported them (summed
/// over its tool rounds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Tokens of the prompt.
    pub prompt_tokens: u64,
    /// Tokens of the answer.
    pub completion_tokens: u64,
}

impl Usage {
    /// `prompt_tokens + completion_tokens`.
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }

    /// Both counts added.
    pub fn plus(self, other: Usage) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens.saturating_add(other.prompt_tokens),
            completion_tokens: self
                .completion_tokens
                .saturating_add(other.completion_tokens),
        }
    }
}

/// Per-request timings reported in `done`, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Timings {
    /// From accept to leaving the queues.
    pub queue_ms: f64,
    /// Preparation time of the generation this request used.
    pub prepare_ms: f64,
    /// From accept to the first token, when there was one.
    pub ttft_ms: Option<f64>,
    /// From accept to the end.
    pub total_ms: f64,
}

/// A fresh unguessable id: `prefix` followed by 128 random bits in hex.
///
/// Ids are capabilities (knowing a request id lets a client resume it), so
/// they come from the operating system's random source, fetched in blocks
/// of `RANDOM_BLOCK` bytes per thread so that an id costs no system call.
pub fn random_id(prefix: &str) -> String {
    let bytes = random_bytes();
    let mut id = String::with_capacity(prefix.len() + 32);
    id.push_str(prefix);
    for b in bytes {
        id.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
        id.push(char::from_digit(u32::from(b & 15), 16).unwrap_or('0'));
    }
    id
}

/// Bytes fetched from the operating system's random source at once.
const RANDOM_BLOCK: usize = 1024;

thread_local! {
    /// Unused random bytes of this thread; the first `used` are spent.
    /// On the heap, allocated on first use: a buffer in the thread-local
    /// block itself would add a page to every thread, idle connections
    /// included.
    static RANDOM: std::cell::RefCell<(Vec<u8>, usize)> =
        const { std::cell::RefCell::new((Vec::new(), 0)) };
}

/// 16 bytes from the operating system's random source, never handed out twice.
fn random_bytes() -> [u8; 16] {
    RANDOM.with_borrow_mut(|(block, used)| {
        if *used + 16 > block.len() {
            block.resize(RANDOM_BLOCK, 0);
            if getrandom::fill(block).is_err() {
                // getrandom only fails on exotic platforms without an entropy
                // source; refusing to run beats handing out guessable ids.
                panic!("the operating system's random source is unavailable");
            }
            *used = 0;
        }
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&block[*used..*used + 16]);
        // Spent bytes are wiped so they cannot leak again later.
        block[*used..*used + 16].fill(0);
        *used += 16;
        bytes
    })
}

/// A new conversation id: `c-`, the creation time in milliseconds (12 hex
/// digits), then 128 random bits.
///
/// The random part makes it unguessable; the time prefix makes new
/// conversations sort after older ones, so their rows land on the last
/// pages of SQLite's B-trees instead of on random ones, which keeps each
/// history commit to a few pages.
pub fn conversation_id() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let random = random_id("");
    format!("c-{:012x}{random}", millis & 0xffff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: FrameLimits = FrameLimits {
        max_message_chars: 10,
    };

    fn parse(s: &str) -> Result<ClientFrame, FrameError> {
        parse_client_frame(s, LIMITS)
    }

    #[test]
    fn every_wire_name_parses_back_and_others_do_not() {
        for code in ErrorCode::ALL {
            assert_eq!(code.as_str().parse::<ErrorCode>(), Ok(code));
        }
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
            // The serde name is the wire name too.
            assert_eq!(serde_json::to_value(role).unwrap(), role.as_str());
        }
        for finish in Finish::ALL {
            assert_eq!(finish.as_str().parse::<Finish>(), Ok(finish));
            assert_eq!(serde_json::to_value(finish).unwrap(), finish.as_str());
        }
        let unknown = "Stop".parse::<Finish>().unwrap_err();
        assert_eq!(unknown.to_string(), "unknown finish \"Stop\"");
        assert!("no_such_code".parse::<ErrorCode>().is_err());
        assert!("".parse::<Role>().is_err());
    }

    #[test]
    fn chat_with_everything() {
        let f = parse(r#"{"type":"chat","id":"c1","conversation":"k","message":"hi","options":{"model":"m","temperature":0,"max_tokens":5,"fresh":true}}"#).unwrap();
        let ClientFrame::Chat(chat) = f else {
            panic!("not a chat")
        };
        assert_eq!(chat.id, "c1");
        assert_eq!(chat.conversation.as_deref(), Some("k"));
        assert_eq!(chat.options.max_tokens, Some(5));
        assert!(chat.options.fresh);
    }

    #[test]
    fn bad_frames_are_bad_request_and_keep_the_id() {
        for (text, id) in [
            ("not json", None),
            ("[1,2]", None),
            (r#"{"type":"nope","id":"x"}"#, Some("x")),
            (r#"{"id":"x","message":"hi"}"#, Some("x")),
            (r#"{"type":"chat","id":"x"}"#, Some("x")),
            (r#"{"type":"chat","id":"x","message":5}"#, Some("x")),
            (r#"{"type":"chat","id":"x","message":"  "}"#, Some("x")),
            (r#"{"type":"chat","id":"","message":"a"}"#, Some("")),
            (
                r#"{"type":"chat","id":"x","message":"a","options":{"fresh":"yes"}}"#,
                Some("x"),
            ),
            (
                r#"{"type":"chat","id":"x","message":"a","options":{"temperature":9}}"#,
                Some("x"),
            ),
            (r#"{"type":"cancel"}"#, None),
            (r#"{"type":"resume","request":"r","from":-1}"#, None),
            (r#"{"type":"history","conversation":""}"#, None),
        ] {
            let err = parse(text).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest, "{text}");
            assert_eq!(err.id.as_deref(), id, "{text}");
        }
    }

    #[test]
    fn long_id_is_refused_without_echo() {
        let long = "x".repeat(65);
        let err = parse(&format!(r#"{{"type":"chat","id":"{long}","message":"a"}}"#)).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
        assert_eq!(err.id, None);
    }

    #[test]
    fn message_over_the_limit_is_too_large() {
        let err = parse(r#"{"type":"chat","id":"x","message":"ééééééééééé"}"#).unwrap_err();
        assert_eq!(err.code, ErrorCode::TooLarge);
        // Ten two-byte characters are within a ten-character limit.
        assert!(parse(r#"{"type":"chat","id":"x","message":"éééééééééé"}"#).is_ok());
    }

    #[test]
    fn history_limit_defaults_and_clamps() {
        assert_eq!(
            parse(r#"{"type":"history","conversation":"k"}"#).unwrap(),
            ClientFrame::History {
                conversation: "k".into(),
                limit: DEFAULT_HISTORY_LIMIT,
                before: None,
            }
        );
        assert_eq!(
            parse(r#"{"type":"history","conversation":"k","limit":999999}"#).unwrap(),
            ClientFrame::History {
                conversation: "k".into(),
                limit: MAX_HISTORY_LIMIT,
                before: None,
            }
        );
        assert_eq!(
            parse(r#"{"type":"history","conversation":"k","before":17}"#).unwrap(),
            ClientFrame::History {
                conversation: "k".into(),
                limit: DEFAULT_HISTORY_LIMIT,
                before: Some(17),
            }
        );
        assert_eq!(
            parse(r#"{"type":"history","conversation":"k","before":-1}"#)
                .unwrap_err()
                .code,
            ErrorCode::BadRequest
        );
    }

    #[test]
    fn ids_are_unique_and_long() {
        let a = random_id("r-");
        let b = random_id("r-");
        assert_ne!(a, b);
        assert_eq!(a.len(), 34);
        let c = conversation_id();
        assert_eq!(c.len(), 2 + 12 + 32);
        assert_ne!(c, conversation_id());
    }

    #[test]
    fn ids_stay_unique_across_refills_and_threads() {
        let draws = 4 * RANDOM_BLOCK / 16;
        let ids: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(move || (0..draws).map(|_| random_id("")).collect::<Vec<_>>()))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        // 16 zero bytes would mean a spent (wiped) slot was handed out.
        assert!(ids.iter().all(|id| id != &"0".repeat(32)));
    }

    #[test]
    fn later_conversations_sort_after_earlier_ones() {
        let a = conversation_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = conversation_id();
        assert!(a[..14] < b[..14], "{a} {b}");
    }
}
