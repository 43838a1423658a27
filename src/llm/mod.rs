//! Model providers: the seam between the pipeline and whatever produces tokens.
//!
//! Threads: a provider is shared (`Arc<dyn Provider>`) by every streaming
//! worker; each call to [`Provider::stream`] runs entirely on the calling
//! streaming worker and blocks it until the generation ends. A call must
//! notice [`AbortSignal::abort`] within one token interval, which is how the
//! janitor, cancellation and shutdown stop an upstream call that nobody needs.

mod simulated;

use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

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

/// A source of tokens.
pub trait Provider: Send + Sync {
    /// A short name for logs and stats.
    fn name(&self) -> &str;

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

/// A one-way "stop now" flag that a sleeping provider wakes up for.
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
    inner: Arc<(Mutex<bool>, Condvar)>,
}

impl AbortSignal {
    /// A signal that has not fired.
    pub fn new() -> AbortSignal {
        AbortSignal::default()
    }

    /// Fires the signal and wakes every sleeper. Idempotent.
    pub fn abort(&self) {
        let (flag, cond) = &*self.inner;
        *flag.lock() = true;
        cond.notify_all();
    }

    /// True once fired.
    pub fn is_aborted(&self) -> bool {
        *self.inner.0.lock()
    }

    /// Sleeps for `duration` or until the signal fires; true when it fired.
    pub fn sleep(&self, duration: Duration) -> bool {
        let (flag, cond) = &*self.inner;
        let deadline = std::time::Instant::now() + duration;
        let mut aborted = flag.lock();
        while !*aborted {
            if cond.wait_until(&mut aborted, deadline).timed_out() {
                break;
            }
        }
        *aborted
    }
}

impl std::fmt::Debug for AbortSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AbortSignal")
            .field("aborted", &self.is_aborted())
            .finish()
    }
}
