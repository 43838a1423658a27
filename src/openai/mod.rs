//! OpenAI Chat Completions wire format: reading `POST /v1/chat/completions`
//! bodies and writing every answer of the OpenAI-compatible HTTP API
//! (stream chunks, the `chat.completion` object, errors, the model list).
//!
//! Pure bytes in, bytes out: no sockets, no threads, no clock. Requests are
//! parsed on the connection thread that read the body; chunks are encoded
//! by whichever thread delivers tokens to a subscriber (a pipeline worker or
//! the connection itself). Nothing here holds state, so any thread may call
//! anything.
//!
//! # Where the contract is silent
//!
//! Requests ([`parse_chat_request`]):
//! - `null` is the same as an absent field, as OpenAI's SDKs send it.
//! - `model` may be absent (the configured model applies, as for a
//!   WebSocket chat); if given it must be a non-empty string of at most
//!   [`MAX_MODEL_CHARS`].
//! - `content` parts are joined with nothing in between. An empty string
//!   or empty array is accepted as empty text.
//! - An assistant message may carry `tool_calls` (a client replaying an
//!   earlier tool round, which `tool` messages answer); its `content` may
//!   then be `null` or absent. `tool` messages need a non-empty
//!   `tool_call_id`. Message `name` is ignored, as are `tool_calls` on
//!   other roles; `developer` and `function` roles are refused.
//! - `tools` and `functions` are refused unless empty; `tool_choice` and
//!   `function_call` unless `"none"`: without tools any other choice asks
//!   for something that cannot happen.
//! - `max_completion_tokens` wins over `max_tokens` when both are given
//!   (both are checked): it is OpenAI's current name. Either must be in
//!   `1..=u32::MAX`.
//! - `stop`: a string or at most [`MAX_STOP_SEQUENCES`] strings, each
//!   non-empty and at most [`MAX_STOP_CHARS`] characters; `[]` is none.
//! - `seed` must fit an `i64`; `user` at most [`MAX_USER_CHARS`].
//! - `stream_options` without `stream` is ignored rather than refused.
//! - Unknown fields are ignored, including sampling options chorus does
//!   not honour (`presence_penalty`, `response_format`, `logprobs`, …).
//!
//! Answers:
//! - Chunks carry `id`, `object`, `created`, `model`, `choices` and, for
//!   the usage chunk, `usage`; OpenAI's `system_fingerprint`, `logprobs`
//!   and per-chunk `"usage": null` are left out (absent reads as null in
//!   OpenAI's SDKs).
//! - The stream opens with `delta: {"role":"assistant","content":""}` like
//!   OpenAI's; only token events carry an `id:` line.
//! - A cancelled answer has no OpenAI `finish_reason`: it ends with an
//!   error event, code `cancelled` (see [`FinishReason::from_finish`]).
//! - Error bodies add OpenAI's `param` (the offending field, or `null`) to
//!   `message`, `type` and `code`. 401 has code `unauthorized` and 405
//!   `method_not_allowed`, which the protocol's codes lack; the status and
//!   `type` of each code are in [`error_status`].

mod request;
mod response;
#[cfg(test)]
mod tests;

pub use crate::protocol::Usage;
pub use request::parse_chat_request;
#[cfg(test)]
pub use request::{ChatRequest, RequestError};
#[cfg(any(test, feature = "fuzzing"))]
pub use request::{MAX_MODEL_CHARS, MAX_STOP_CHARS, MAX_STOP_SEQUENCES};
pub use response::{error_body, error_event, models_body, ApiError, Completion, FinishReason};
#[cfg(test)]
pub use response::{error_status, escape_json_str, ChunkFrame, DONE};
