//! The OpenAI-compatible provider: `POST {base_url}/chat/completions` with
//! `stream: true`, the event stream parsed as it arrives, with retries and
//! fallback to further endpoints. A plain `http://` endpoint is called
//! through chorus's own client and read by the upstream reader thread
//! ([`super::direct`]); an `https://` one (or one behind a proxy) through
//! ureq, read by the calling worker.
//!
//! Works with OpenAI and with any server that speaks its chat completions
//! API: llama.cpp's server, vLLM, Ollama's `/v1`, LM Studio.
//!
//! Failure handling, in order:
//! - one call: connect timeout and a per-read timeout from config; HTTP
//!   errors become [`LlmError::Upstream`] with the upstream's own message;
//! - retries of the same endpoint, with exponential backoff and jitter, on
//!   connect errors, 429 (honouring `Retry-After`) and 5xx, and on a stream
//!   that broke before its first token — only while no token has reached
//!   anyone, so a client never sees an answer start twice;
//! - fallback: when an endpoint fails before the first token, the next one
//!   in `[[llm.providers]]` is tried;
//! - an endpoint that refuses the `tools` field (a server without tool
//!   support) is remembered, and called without tools from then on.
//!
//! Tools ride in the one streamed request of a round: content deltas are
//! passed on as they arrive, `tool_calls` deltas are assembled by
//! [`crate::llm::CallAssembler`] and returned in the [`Turn`].
//!
//! Cancellation: the generation's [`AbortSignal`] closes the call's socket
//! when it fires (through the upstream reader, or by shutting down the
//! worker's own ureq [`Agent`]), so a blocked read fails at once and the
//! upstream sees the client leave within one chunk interval and can stop
//! generating.
//!
//! The API key is read once from the environment variable the config names
//! and never leaves this module: it is not logged, and every message that
//! comes back from an upstream has it replaced before anyone sees it.
//!
//! Threads: one [`OpenAi`] is shared by every streaming worker; a call is
//! made by the calling worker, which waits until its round ends; the
//! counters are atomics.

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{json, Value};
use ureq::Agent;

use super::direct::Direct;
use super::stream::{status_failure, CallError, Fed, StreamState};
use super::{
    AbortSignal, Ask, EndpointStats, Finish, LlmError, Prompt, PromptMessage, Provider, TokenSink,
    ToolSpec, Turn,
};

/// Most bytes of an error body read to find its message.
const MAX_ERROR_BODY: u64 = 64 * 1024;
/// Largest streamed response read at all.
const MAX_STREAM_BYTES: u64 = 256 << 20;

/// One upstream: where it is and how to authenticate.
#[derive(Clone)]
pub struct Endpoint {
    /// Name for logs and stats.
    pub name: String,
    /// Base URL, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Model sent to this endpoint; `None` sends the prompt's model.
    pub model: Option<String>,
    /// Bearer token, if the endpoint needs one.
    pub api_key: Option<String>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself, so a debug print cannot leak it.
        f.debug_struct("Endpoint")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "[set]"))
            .finish()
    }
}

/// Retry behaviour of one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// First delay; doubled per retry.
    pub base: Duration,
    /// Longest delay, and the longest `Retry-After` honoured.
    pub max: Duration,
}

impl RetryPolicy {
    /// The delay before retry number `retry` (0-based): half of the doubled
    /// base, plus a random part of the other half, so many clients that
    /// failed together do not come back together.
    fn delay(&self, retry: u32) -> Duration {
        let doubled = self
            .base
            .saturating_mul(1u32 << retry.min(16))
            .min(self.max);
        let half = doubled / 2;
        let jitter = getrandom::u64().unwrap_or(0) % (half.as_millis() as u64 + 1);
        half + Duration::from_millis(jitter)
    }
}

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    failures: AtomicU64,
    retries: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    /// The endpoint refused a request for its `tools` field: it is called
    /// without tools from then on.
    tools_refused: AtomicBool,
}

thread_local! {
    /// The agents of this thread, by provider id and endpoint name; see
    /// [`OpenAi::agent`].
    static AGENTS: std::cell::RefCell<Vec<((u64, String), Agent)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Tells providers apart in [`AGENTS`].
static NEXT_PROVIDER_ID: AtomicU64 = AtomicU64::new(0);

/// What one call needs to know.
#[derive(Clone, Copy)]
struct Call<'a> {
    /// The endpoint's position in `[[llm.providers]]`.
    index: usize,
    endpoint: &'a Endpoint,
    counters: &'a Counters,
    ask: &'a Ask<'a>,
    sink: &'a TokenSink,
    abort: &'a AbortSignal,
}

/// Size of the buffers of one upstream connection, each way.
const BUFFER_SIZE: usize = 16 * 1024;

/// The provider. See the module documentation.
pub struct OpenAi {
    id: u64,
    /// The upstream reader and kept connections for plain `http://`
    /// endpoints; `None` when there are none (or the reader could not start).
    direct: Option<Direct>,
    endpoints: Vec<(Endpoint, Counters)>,
    retry: RetryPolicy,
    connect_timeout: Duration,
    read_timeout: Duration,
}

impl OpenAi {
    /// A provider over `endpoints` (tried in order), at least one.
    pub fn new(
        endpoints: Vec<Endpoint>,
        retry: RetryPolicy,
        connect_timeout: Duration,
        read_timeout: Duration,
    ) -> OpenAi {
        OpenAi {
            id: NEXT_PROVIDER_ID.fetch_add(1, Ordering::Relaxed),
            direct: Direct::start(endpoints.iter().map(|e| e.base_url.as_str())),
            endpoints: endpoints
                .into_iter()
                .map(|e| (e, Counters::default()))
                .collect(),
            retry,
            connect_timeout,
            read_timeout,
        }
    }

    /// This thread's ureq agent for `endpoint`, and whether it was used
    /// before (then its kept connection may have been closed by the
    /// upstream meanwhile). Each streaming worker keeps one per endpoint,
    /// so its connection stays open from one call to the next instead of a
    /// connect and a close per answer, and an abort can shut it down
    /// without touching any other worker's call.
    fn agent(&self, endpoint: &Endpoint) -> (Agent, bool) {
        let key = (self.id, endpoint.name.clone());
        AGENTS.with(|agents| {
            let mut agents = agents.borrow_mut();
            if let Some((_, agent)) = agents.iter().find(|(k, _)| *k == key) {
                return (agent.clone(), true);
            }
            let agent: Agent = Agent::config_builder()
                .timeout_connect(Some(self.connect_timeout))
                .timeout_per_read(Some(self.read_timeout))
                .http_status_as_error(false)
                // The default 128 KiB each way is allocated per connection;
                // a request head and a stream's chunks need far less.
                .input_buffer_size(BUFFER_SIZE)
                .output_buffer_size(BUFFER_SIZE)
                .max_idle_connections_per_host(1)
                .build()
                .into();
            agents.push((key, agent.clone()));
            (agent, false)
        })
    }

    /// Forgets this thread's agent for `endpoint` (shut down by an abort,
    /// or holding a connection that failed).
    fn drop_agent(&self, endpoint: &Endpoint) {
        AGENTS.with(|agents| {
            agents
                .borrow_mut()
                .retain(|((id, name), _)| !(*id == self.id && *name == endpoint.name))
        });
    }

    /// Runs `call` against `endpoint`, retrying as the policy allows while
    /// `retry_allowed` says nothing has reached a client yet. An abort
    /// ends it with `Ok(None)`.
    fn with_retries<T>(
        &self,
        endpoint: &Endpoint,
        counters: &Counters,
        abort: &AbortSignal,
        retry_allowed: &dyn Fn() -> bool,
        call: &mut dyn FnMut() -> Result<T, CallError>,
    ) -> Result<Option<T>, LlmError> {
        let mut retry = 0;
        loop {
            let result = call();
            let failure = match result {
                Ok(value) => return Ok(Some(value)),
                Err(failure) => failure,
            };
            if abort.is_aborted() {
                return Ok(None);
            }
            if failure.unanswered {
                // The kept connection was closed by the upstream while it
                // lay idle (servers close kept connections when they
                // please, some right after a streamed answer): the request
                // never reached it. Not a failure of the upstream, so it is
                // sent again at once on a new connection, whatever reached
                // the clients, and counts as no retry.
                log::debug!(
                    "{}: a kept connection was closed; reconnecting",
                    endpoint.name
                );
                // Nothing reached the upstream: no call to count.
                counters.calls.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            counters.failures.fetch_add(1, Ordering::Relaxed);
            let error = scrub(failure.error, endpoint);
            if !retry_allowed() || !failure.retryable || retry >= self.retry.max_retries {
                return Err(error);
            }
            let delay = match failure.retry_after {
                Some(asked) if asked > self.retry.max => {
                    log::warn!(
                        "{}: asked to retry after {asked:?}, longer than llm.retry_max_ms",
                        endpoint.name
                    );
                    return Err(error);
                }
                Some(asked) => asked,
                None => self.retry.delay(retry),
            };
            log::info!("{error}; retry {} in {delay:?}", retry + 1);
            retry += 1;
            counters.retries.fetch_add(1, Ordering::Relaxed);
            if abort.sleep(delay) {
                return Ok(None);
            }
        }
    }

    /// One round against `endpoint`, offering `ask.tools` unless the
    /// endpoint is known to refuse them. An endpoint that refuses them now
    /// is remembered and asked again at once without them, so only the
    /// first chat that finds out pays a second call.
    fn round(&self, call: &Call<'_>, emitted: &mut bool) -> Result<Turn, CallError> {
        let counters = call.counters;
        let refused = counters.tools_refused.load(Ordering::Relaxed);
        let tools = if refused { &[][..] } else { call.ask.tools };
        match self.stream_once(call, tools, emitted) {
            Err(failure) if failure.rejects_tools && !tools.is_empty() => {
                counters.failures.fetch_add(1, Ordering::Relaxed);
                if !counters.tools_refused.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "{}; calling it without tools from now on",
                        scrub(failure.error, call.endpoint)
                    );
                }
                self.stream_once(call, &[], emitted)
            }
            other => other,
        }
    }

    /// One HTTP call to the endpoint, streaming its answer into the sink
    /// and assembling the tool calls it makes: over a kept connection read
    /// by the upstream reader for a plain `http://` endpoint, with ureq
    /// otherwise.
    fn stream_once(
        &self,
        call: &Call<'_>,
        tools: &[ToolSpec],
        emitted: &mut bool,
    ) -> Result<Turn, CallError> {
        let Call {
            endpoint,
            counters,
            ask,
            ..
        } = *call;
        counters.calls.fetch_add(1, Ordering::Relaxed);
        let name = &endpoint.name;
        let model = endpoint.model.as_deref().unwrap_or(&ask.prompt.model);
        let body = request_body(ask.prompt, model, tools);
        let state = StreamState::new(
            name,
            ask.limits,
            call.sink.clone(),
            *emitted,
            !tools.is_empty(),
        );
        let direct = self.direct.as_ref();
        if let Some((direct, pool)) = direct.and_then(|d| d.pool(call.index).map(|p| (d, p))) {
            let auth = endpoint.api_key.as_ref().map(|key| format!("Bearer {key}"));
            let headers: Vec<(&str, &str)> = auth
                .iter()
                .map(|value| ("Authorization", value.as_str()))
                .collect();
            let body = serde_json::to_vec(&body).unwrap_or_default();
            let called = direct.call(
                pool,
                name,
                &headers,
                &body,
                self.connect_timeout,
                self.read_timeout,
                state,
                call.abort,
            );
            *emitted = called.emitted;
            count_usage(counters, called.usage);
            return called.result;
        }
        self.stream_ureq(call, &body, state, emitted)
    }

    /// [`Self::stream_once`] over this worker's ureq agent, read here.
    fn stream_ureq(
        &self,
        call: &Call<'_>,
        body: &Value,
        mut state: StreamState,
        emitted: &mut bool,
    ) -> Result<Turn, CallError> {
        let (endpoint, abort) = (call.endpoint, call.abort);
        let name = &endpoint.name;
        let (agent, kept) = self.agent(endpoint);
        // Shutting the agent down fails a blocked read at once and closes
        // the socket: that is how an abort reaches the upstream.
        let hook = abort.on_abort({
            let agent = agent.clone();
            move || agent.shutdown()
        });
        let result = (|| {
            let url = format!(
                "{}/chat/completions",
                endpoint.base_url.trim_end_matches('/')
            );
            let mut request = agent.post(&url).header("Accept", "text/event-stream");
            if let Some(key) = &endpoint.api_key {
                request = request.header("Authorization", &format!("Bearer {key}"));
            }
            let mut response = request
                .send_json(body)
                .map_err(|e| connect_error(name, e, kept))?;
            check_status(name, &mut response)?;
            let mut reader = response
                .into_body()
                .into_with_config()
                .limit(MAX_STREAM_BYTES)
                .reader();
            let mut buf = vec![0u8; 8 * 1024];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => return Ok(()),
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) if is_timeout(&e) => return Err(state.timed_out(self.read_timeout)),
                    Err(e) => return Err(state.broke(&e)),
                };
                match state.feed(&buf[..n])? {
                    Fed::More => {}
                    Fed::Done => {
                        // The rest of the body (the chunked encoding's last
                        // chunk) is read so that the connection can be kept.
                        while let Ok(n) = reader.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                        }
                        return Ok(());
                    }
                    // Dropping the reader closes the connection.
                    Fed::Stopped => return Ok(()),
                }
            }
        })();
        abort.forget(hook);
        // A hook that fired, even after the call, left the agent shut down;
        // a failed one may hold a broken connection.
        if abort.is_aborted() || result.is_err() {
            self.drop_agent(endpoint);
        }
        *emitted = state.emitted();
        count_usage(call.counters, state.usage);
        result?;
        state.end()
    }
}

impl Provider for OpenAi {
    fn name(&self) -> &str {
        "openai"
    }

    fn endpoint_stats(&self) -> Vec<EndpointStats> {
        self.endpoints
            .iter()
            .map(|(e, c)| EndpointStats {
                name: e.name.clone(),
                calls: c.calls.load(Ordering::Relaxed),
                failures: c.failures.load(Ordering::Relaxed),
                retries: c.retries.load(Ordering::Relaxed),
                prompt_tokens: c.prompt_tokens.load(Ordering::Relaxed),
                completion_tokens: c.completion_tokens.load(Ordering::Relaxed),
                tools_refused: c.tools_refused.load(Ordering::Relaxed),
            })
            .collect()
    }

    fn stream(
        &self,
        ask: &Ask<'_>,
        abort: &AbortSignal,
        sink: &TokenSink,
    ) -> Result<Turn, LlmError> {
        let emitted = std::cell::Cell::new(ask.committed);
        let mut last = LlmError::upstream("(none)", "no upstream endpoint is configured");
        let first = ask.endpoint.unwrap_or(0);
        for (i, (endpoint, counters)) in self.endpoints.iter().enumerate().skip(first) {
            let result =
                self.with_retries(endpoint, counters, abort, &|| !emitted.get(), &mut || {
                    let call = Call {
                        index: i,
                        endpoint,
                        counters,
                        ask,
                        sink,
                        abort,
                    };
                    let mut sent = emitted.get();
                    let result = self.round(&call, &mut sent);
                    emitted.set(sent);
                    result
                });
            match result {
                Ok(Some(turn)) => {
                    return Ok(Turn {
                        endpoint: i,
                        ..turn
                    })
                }
                Ok(None) => return Ok(Turn::answer(Finish::Cancelled)),
                Err(e) if emitted.get() => return Err(e),
                Err(e) => {
                    if let Some((next, _)) = self.endpoints.get(i + 1) {
                        log::warn!("{e}; falling back to {}", next.name);
                    }
                    last = e;
                }
            }
        }
        Err(last)
    }
}

/// Adds the token usage an upstream reported (prompt, completion) to the
/// endpoint's counters.
fn count_usage(counters: &Counters, (prompt, completion): (u64, u64)) {
    counters.prompt_tokens.fetch_add(prompt, Ordering::Relaxed);
    counters
        .completion_tokens
        .fetch_add(completion, Ordering::Relaxed);
}

/// The streamed chat completion request for `prompt`, offering `tools`
/// (no `tools` field at all when there are none).
fn request_body(prompt: &Prompt, model: &str, tools: &[ToolSpec]) -> Value {
    let messages: Vec<Value> = prompt.messages.iter().map(message_json).collect();
    let mut body = json!({
        "model": model,
        "messages": messages,
        "stream": true,
        // Servers that support it send token usage in a last chunk.
        "stream_options": {"include_usage": true},
    });
    // Options the client did not give stay out of the body, so the
    // upstream applies its own defaults rather than ours.
    if let Some(n) = prompt.max_tokens {
        body["max_tokens"] = json!(n);
    }
    if let Some(t) = prompt.temperature {
        body["temperature"] = json!(t);
    }
    if let Some(p) = prompt.top_p {
        body["top_p"] = json!(p);
    }
    if !prompt.stop.is_empty() {
        body["stop"] = json!(prompt.stop);
    }
    if let Some(seed) = prompt.seed {
        body["seed"] = json!(seed);
    }
    if let Some(user) = &prompt.user {
        body["user"] = json!(user);
    }
    if !tools.is_empty() {
        body["tools"] = tools
            .iter()
            .map(|t| {
                json!({
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.parameters,
                    }
                })
            })
            .collect();
        body["tool_choice"] = json!("auto");
    }
    body
}

/// One prompt message in OpenAI's shape: an assistant message that called
/// tools carries them (and `null` content when it said nothing), a `tool`
/// message names the call it answers.
fn message_json(m: &PromptMessage) -> Value {
    let mut message = json!({"role": m.role, "content": m.content});
    if !m.tool_calls.is_empty() {
        if m.content.is_empty() {
            message["content"] = Value::Null;
        }
        message["tool_calls"] = m
            .tool_calls
            .iter()
            .map(|c| {
                json!({
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                })
            })
            .collect();
    }
    if let Some(id) = &m.tool_call_id {
        message["tool_call_id"] = json!(id);
    }
    message
}

/// Turns an HTTP error status into a [`CallError`] carrying the upstream's
/// message; 429 and 5xx are worth a retry.
fn check_status(
    name: &str,
    response: &mut ureq::http::Response<ureq::Body>,
) -> Result<(), CallError> {
    let status = response.status().as_u16();
    if (200..300).contains(&status) {
        return Ok(());
    }
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let text = response
        .body_mut()
        .with_config()
        .limit(MAX_ERROR_BODY)
        .read_to_string()
        .unwrap_or_default();
    Err(status_failure(name, status, retry_after, &text))
}

/// A failed request before any response: connect errors and timeouts are
/// worth a retry, a malformed URL or a TLS misconfiguration is not.
fn connect_error(name: &str, e: ureq::Error, kept: bool) -> CallError {
    match e {
        ureq::Error::Timeout(_) => CallError::retryable(LlmError::timeout(
            name,
            format!("{name} did not answer in time: {e}"),
        )),
        ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
            CallError {
                unanswered: kept,
                ..CallError::retryable(LlmError::upstream(
                    name,
                    format!("cannot reach {name}: {e}"),
                ))
            }
        }
        other => CallError::fatal(LlmError::upstream(
            name,
            format!("calling {name} failed: {other}"),
        )),
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::TimedOut
        || e.get_ref()
            .and_then(|inner| inner.downcast_ref::<ureq::Error>())
            .is_some_and(|u| matches!(u, ureq::Error::Timeout(_)))
}

/// Removes the endpoint's API key from an error message: upstreams echo
/// headers back surprisingly often.
fn scrub(error: LlmError, endpoint: &Endpoint) -> LlmError {
    let Some(key) = endpoint.api_key.as_deref().filter(|k| k.len() >= 4) else {
        return error;
    };
    let clean = |s: String| s.replace(key, "[redacted]");
    match error {
        LlmError::Upstream { endpoint, detail } => LlmError::Upstream {
            endpoint,
            detail: clean(detail),
        },
        LlmError::Timeout { endpoint, detail } => LlmError::Timeout {
            endpoint,
            detail: clean(detail),
        },
    }
}

#[cfg(test)]
mod tests;
