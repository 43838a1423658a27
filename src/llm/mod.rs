//! Model providers: the seam between the pipeline and whatever produces tokens.
//!
//! Threads: a provider is shared (`Arc<dyn Provider>`) by every streaming
//! worker; each call to [`Provider::stream`] runs entirely on the calling
//! streaming worker and blocks it until the generation ends. A call must
//! notice [`AbortSignal::abort`] within one token interval, which is how the
//! janitor, cancellation and shutdown stop an upstream call that nobody needs.

mod openai;
mod simulated;
pub mod sse;

use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

pub use openai::{Endpoint, OpenAi, RetryPolicy};
pub use simulated::Simulated;

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
    /// Upper bound of tokens to generate.
    pub max_tokens: u32,
}

/// One message of a prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptMessage {
    /// `system`, `user` or `assistant`.
    pub role: &'static str,
    /// The text.
    pub content: String,
}

/// Why a generation ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// The model finished.
    Stop,
    /// `max_tokens` was reached.
    Length,
    /// [`AbortSignal::abort`] or the token callback stopped it.
    Aborted,
}

/// Whether the provider should go on after a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Produce the next token.
    Continue,
    /// Stop now; the call returns [`StreamEnd::Aborted`].
    Stop,
}

/// Failures of a provider call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LlmError {
    /// The upstream answered with an error or broke the stream.
    #[error("upstream failed: {0}")]
    Upstream(String),
    /// The upstream did not answer in time.
    #[error("upstream timed out: {0}")]
    Timeout(String),
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
    /// The model's id for the call.
    pub id: String,
    /// Which tool.
    pub name: String,
    /// The arguments as JSON text, exactly as the model wrote them (they
    /// may be malformed; the tool reports that as its result).
    pub arguments: String,
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
}

/// A source of tokens.
pub trait Provider: Send + Sync {
    /// A short name for logs and stats.
    fn name(&self) -> &str;

    /// Counters per upstream endpoint; empty for providers without any.
    fn endpoint_stats(&self) -> Vec<EndpointStats> {
        Vec::new()
    }

    /// Asks the model, without streaming, which of `tools` to call before
    /// it answers `prompt`. Runs on a preparation worker. An empty list
    /// means no tool.
    fn select_tools(
        &self,
        prompt: &Prompt,
        tools: &[ToolSpec],
        abort: &AbortSignal,
    ) -> Result<Vec<ToolCall>, LlmError> {
        let _ = (prompt, tools, abort);
        Ok(Vec::new())
    }

    /// Generates an answer to `prompt`, calling `on_token` with each token as
    /// soon as it exists. Blocks until the end. Must return within one token
    /// interval after `abort` fires.
    fn stream(
        &self,
        prompt: &Prompt,
        abort: &AbortSignal,
        on_token: &mut dyn FnMut(&str) -> Flow,
    ) -> Result<StreamEnd, LlmError>;
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
