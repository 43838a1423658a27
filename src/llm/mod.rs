//! Model providers: the seam between the pipeline and whatever produces tokens.
//!
//! One call to a provider is one *round*: a streamed request that offers the
//! model some tools and ends either with an answer or with the tool calls
//! the model made (see [`Turn`]). The pipeline runs the tools and asks again;
//! a provider never runs tools itself.
//!
//! Threads: a provider is shared (`Arc<dyn Provider>`) by every streaming
//! worker; each call to [`Provider::stream`] runs entirely on the calling
//! streaming worker and blocks it until the round ends. A call must
//! notice [`AbortSignal::abort`] within one token interval, which is how the
//! janitor, cancellation and shutdown stop an upstream call that nobody needs.

mod direct;
pub(crate) mod http1;
mod openai;
mod reader;
mod simulated;
pub mod sse;
mod stream;
mod tool_calls;

use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

pub use crate::protocol::Finish;

pub use openai::{Endpoint, OpenAi, RetryPolicy};
pub use simulated::Simulated;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use stream::{Fed, StreamState};
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use tool_calls::MAX_NAME_BYTES;
pub use tool_calls::{CallAssembler, CallLimits};

/// What the model is asked: the assembled conversation and the options.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// Model name sent upstream.
    pub model: String,
    /// System prompt, history (oldest first) and the new user message.
    pub messages: Vec<PromptMessage>,
    /// Sampling temperature, when the client gave one.
    pub temperature: Option<f64>,
    /// Nucleus sampling, when the client gave one.
    pub top_p: Option<f64>,
    /// Upper bound of tokens to generate; `None` leaves it to the upstream
    /// (an HTTP API request that gave none).
    pub max_tokens: Option<u32>,
    /// Sequences that end the answer when the model writes them; empty
    /// sends none.
    pub stop: Vec<String>,
    /// Sampling seed, when the client gave one.
    pub seed: Option<i64>,
    /// The end user's id for the upstream's abuse tracking, when the
    /// client gave one.
    pub user: Option<String>,
}

/// One message of a prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: &'static str,
    /// The text (for a `tool` message, the tool's result).
    pub content: String,
    /// The calls an `assistant` message made; empty otherwise.
    pub tool_calls: Vec<ToolCall>,
    /// The call a `tool` message answers.
    pub tool_call_id: Option<String>,
}

impl PromptMessage {
    /// A plain message with no tool calls.
    pub fn new(role: &'static str, content: impl Into<String>) -> PromptMessage {
        PromptMessage {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

/// What one round asks of a provider.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// The conversation so far, with the tool rounds already made.
    pub prompt: &'a Prompt,
    /// The tools offered; empty offers none (the request then has no
    /// `tools` field at all).
    pub tools: &'a [ToolSpec],
    /// Bounds on the tool calls the model may make in this round.
    pub limits: CallLimits,
    /// Something of this answer (a token or a tool frame) already reached a
    /// client: a failure may then be neither retried nor handed to a
    /// fallback endpoint, or the client would see the answer start twice.
    pub committed: bool,
    /// The endpoint that served the previous round ([`Turn::endpoint`]):
    /// a later round goes to the same one, which knows the tool calls it
    /// made, rather than to one that failed before.
    pub endpoint: Option<usize>,
}

/// How one round ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    /// Why the stream ended: the model finished (`stop`), hit
    /// `max_tokens` (`length`), or was stopped ([`AbortSignal::abort`], the
    /// token callback): `cancelled`.
    pub end: Finish,
    /// The tool calls the model made, in the order it started them; the
    /// pipeline runs them and asks again. Empty for a final answer.
    pub tool_calls: Vec<ToolCall>,
    /// Which of the provider's endpoints served the round (0 for a
    /// provider with one).
    pub endpoint: usize,
    /// What the model said in a round that offered tools (it goes back to
    /// the model with the round's tool calls); empty otherwise.
    pub said: String,
    /// The token counts the model reported for the round, if it did.
    pub usage: Option<crate::protocol::Usage>,
}

impl Turn {
    /// A round that ended with `end` and made no tool call.
    pub fn answer(end: Finish) -> Turn {
        Turn {
            end,
            tool_calls: Vec::new(),
            endpoint: 0,
            said: String::new(),
            usage: None,
        }
    }
}

/// Where a round's content goes, token by token: the generation's
/// broadcast. Owned and `Sync`, because a provider may call it from a
/// thread of its own (the upstream reader) rather than the calling worker.
pub type TokenSink = Arc<dyn Fn(&str) -> Flow + Send + Sync>;

/// Whether the provider should go on after a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Produce the next token.
    Continue,
    /// Stop now; the call returns [`Finish::Cancelled`].
    Stop,
}

/// Failures of a provider call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LlmError {
    /// The upstream answered with an error, could not be reached, or broke
    /// the stream.
    #[error("upstream failed: {detail}")]
    Upstream {
        /// The configured name of the endpoint that failed.
        endpoint: String,
        /// What happened, with the upstream's own words: for the log only.
        detail: String,
    },
    /// The upstream did not answer in time.
    #[error("upstream timed out: {detail}")]
    Timeout {
        /// The configured name of the endpoint that failed.
        endpoint: String,
        /// What happened: for the log only.
        detail: String,
    },
}

impl LlmError {
    /// A failure of the endpoint named `endpoint`; `detail` goes to the log.
    pub fn upstream(endpoint: &str, detail: impl Into<String>) -> Self {
        LlmError::Upstream {
            endpoint: endpoint.to_owned(),
            detail: detail.into(),
        }
    }

    /// A timeout of the endpoint named `endpoint`; `detail` goes to the log.
    pub fn timeout(endpoint: &str, detail: impl Into<String>) -> Self {
        LlmError::Timeout {
            endpoint: endpoint.to_owned(),
            detail: detail.into(),
        }
    }

    /// What clients are told: a generic sentence naming the endpoint's
    /// configured name. Upstream error bodies can carry anything (hosts,
    /// user names, echoed headers), so they stay in the server's log.
    pub fn client_message(&self) -> String {
        match self {
            LlmError::Upstream { endpoint, .. } => {
                format!("the upstream model \"{endpoint}\" failed; the server log has the details")
            }
            LlmError::Timeout { endpoint, .. } => {
                format!("the upstream model \"{endpoint}\" did not answer in time")
            }
        }
    }
}

/// A tool the model may call, in the shape of OpenAI's function calling.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    /// The function name, e.g. `calculator`.
    pub name: &'static str,
    /// What it does, for the model.
    pub description: &'static str,
    /// JSON Schema of its arguments.
    pub parameters: serde_json::Value,
}

/// A call the model asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// The model's id for the call (made up when the upstream sent none).
    pub id: String,
    /// Which tool.
    pub name: String,
    /// The arguments as JSON text, exactly as the model wrote them (they
    /// may be malformed; the tool reports that as its result).
    pub arguments: String,
    /// Why the call must not run, when the upstream sent it malformed (see
    /// [`CallAssembler`]); the model gets this as the call's error result.
    pub refused: Option<String>,
}

/// Counters of one upstream endpoint, for `/api/stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct EndpointStats {
    /// The endpoint's name.
    pub name: String,
    /// HTTP calls made, retries included.
    pub calls: u64,
    /// Calls that failed (connect error, HTTP error, broken or stalled stream).
    pub failures: u64,
    /// Calls that were retries of a failed one.
    pub retries: u64,
    /// Prompt tokens the endpoint reported using (`usage`).
    pub prompt_tokens: u64,
    /// Completion tokens the endpoint reported using (`usage`).
    pub completion_tokens: u64,
    /// The endpoint refused the `tools` field once and is called without
    /// tools since.
    pub tools_refused: bool,
}

/// A source of tokens.
pub trait Provider: Send + Sync {
    /// A short name for logs and stats.
    fn name(&self) -> &str;

    /// Counters per upstream endpoint; empty for providers without any.
    fn endpoint_stats(&self) -> Vec<EndpointStats> {
        Vec::new()
    }

    /// Runs one round: streams the answer to `ask.prompt`, handing each
    /// piece of content to `sink` as soon as it exists, and returns the
    /// tool calls the model made, if any. Blocks the calling worker until
    /// the round ends. Must return within one token interval after `abort`
    /// fires.
    fn stream(
        &self,
        ask: &Ask<'_>,
        abort: &AbortSignal,
        sink: &TokenSink,
    ) -> Result<Turn, LlmError>;
}

/// A one-way "stop now" flag that a sleeping provider wakes up for, and
/// that runs registered hooks (closing an upstream connection a thread is
/// blocked reading) when it fires.
///
/// Cloning shares the flag.
///
/// ```
/// use std::time::Duration;
/// use chorus::llm::AbortSignal;
/// let signal = AbortSignal::new();
/// let other = signal.clone();
/// std::thread::spawn(move || other.abort());
/// // Returns early (true) once the other thread aborts.
/// assert!(signal.sleep(Duration::from_secs(10)));
/// ```
#[derive(Clone, Default)]
pub struct AbortSignal {
    inner: Arc<(Mutex<AbortState>, Condvar)>,
}

type Hook = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct AbortState {
    aborted: bool,
    hooks: Vec<(u64, Hook)>,
    next_hook: u64,
}

/// A hook registered with [`AbortSignal::on_abort`]; pass it to
/// [`AbortSignal::forget`] once it is no longer needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HookId(u64);

impl AbortSignal {
    /// A signal that has not fired.
    pub fn new() -> AbortSignal {
        AbortSignal::default()
    }

    /// Fires the signal, wakes every sleeper and runs the hooks (on this
    /// thread, after the lock is released). Idempotent.
    pub fn abort(&self) {
        let (state, cond) = &*self.inner;
        let hooks = {
            let mut st = state.lock();
            st.aborted = true;
            std::mem::take(&mut st.hooks)
        };
        cond.notify_all();
        for (_, hook) in hooks {
            hook();
        }
    }

    /// True once fired.
    pub fn is_aborted(&self) -> bool {
        self.inner.0.lock().aborted
    }

    /// Runs `hook` when the signal fires, or at once if it already has.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicBool, Ordering};
    /// use std::sync::Arc;
    /// use chorus::llm::AbortSignal;
    /// let signal = AbortSignal::new();
    /// let ran = Arc::new(AtomicBool::new(false));
    /// let flag = ran.clone();
    /// signal.on_abort(move || flag.store(true, Ordering::SeqCst));
    /// signal.abort();
    /// assert!(ran.load(Ordering::SeqCst));
    /// ```
    pub fn on_abort(&self, hook: impl FnOnce() + Send + 'static) -> HookId {
        let mut st = self.inner.0.lock();
        let id = st.next_hook;
        st.next_hook += 1;
        if st.aborted {
            drop(st);
            hook();
        } else {
            st.hooks.push((id, Box::new(hook)));
        }
        HookId(id)
    }

    /// Drops a hook that has not run, so what it holds is freed now.
    pub fn forget(&self, id: HookId) {
        self.inner.0.lock().hooks.retain(|(h, _)| *h != id.0);
    }

    /// Sleeps for `duration` or until the signal fires; true when it fired.
    pub fn sleep(&self, duration: Duration) -> bool {
        let (state, cond) = &*self.inner;
        let deadline = std::time::Instant::now() + duration;
        let mut st = state.lock();
        while !st.aborted {
            if cond.wait_until(&mut st, deadline).timed_out() {
                break;
            }
        }
        st.aborted
    }
}

impl std::fmt::Debug for AbortSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AbortSignal")
            .field("aborted", &self.is_aborted())
            .finish()
    }
}
