//! What a chat asks for, as the pipeline carries it from admission to the
//! upstream call: [`Work`], and [`GivenPrompt`] for a request that brings
//! its whole prompt. Plain data, imported by the stages and the jobs.
//!
//! Threads: moved from stage to stage with its job, never shared.

use crate::llm::Prompt;
use crate::request_key::Key;

/// What the leader of a generation needs to prepare it.
pub(super) struct Work {
    pub(super) key: Key,
    pub(super) fresh: bool,
    /// Stored messages before this one.
    pub(super) history_len: u64,
    /// The count of cache writes (`Answers::writes_seen`) just before the
    /// cache lane's lookup: if it moved by the time this request would
    /// lead, an identical answer may have been cached in between, so the
    /// cache is asked again.
    pub(super) cache_writes_seen: u64,
    pub(super) message: String,
    pub(super) model: String,
    pub(super) temperature: Option<f64>,
    pub(super) top_p: Option<f64>,
    pub(super) max_tokens: u32,
    /// The whole prompt, when the client brought it (the HTTP API):
    /// preparation then reads no history, and the model gets no tools.
    pub(super) given: Option<Box<Prompt>>,
}

/// A request that brings its whole prompt, as an OpenAI client does: no
/// conversation, no stored history, no system prompt or option added, and
/// none of chorus's own tools.
#[derive(Debug, Clone)]
pub struct GivenPrompt {
    /// The client's id for it (may be empty).
    pub id: String,
    /// What goes upstream, as given; an empty model means the configured one.
    pub prompt: Prompt,
    /// No cache read and no joining a generation in flight.
    pub fresh: bool,
}
