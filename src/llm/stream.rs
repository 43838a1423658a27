//! Reading one OpenAI-compatible chat completion stream: the event-stream
//! parser, the chunk JSON, the tool-call assembler, and the content handed
//! to the round's sink the moment it arrives. Transport-blind: it is fed
//! body bytes by whoever reads the socket, so the same code serves the
//! blocking reader (ureq, for `https://`) and the upstream reader thread
//! (plain `http://`).
//!
//! Also the one place a failed call is described ([`CallError`]): whether
//! it may be retried, whether the upstream refused tools, whether the
//! request never reached the upstream.
//!
//! Threads: a [`StreamState`] belongs to the thread feeding it, one stream
//! at a time; its sink may publish to any number of subscribers.

use std::borrow::Cow;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::sse::{Event, SseParser};
use super::{CallAssembler, CallLimits, Finish, Flow, LlmError, TokenSink, Turn};

/// Longest event (all its `data:` lines) accepted from an upstream.
pub(crate) const MAX_EVENT_BYTES: usize = 1 << 20;
/// Most bytes of an upstream message passed on to clients.
const MAX_MESSAGE_CHARS: usize = 500;

/// How one failed call may go on.
pub(crate) struct CallError {
    pub error: LlmError,
    /// Worth another try on the same endpoint.
    pub retryable: bool,
    /// What the upstream asked for with `Retry-After`.
    pub retry_after: Option<Duration>,
    /// The upstream refused the call because of its `tools` field.
    pub rejects_tools: bool,
    /// A kept connection failed before any answer came back: the upstream
    /// had closed it while it lay idle, and the request never reached it.
    pub unanswered: bool,
}

impl CallError {
    pub fn fatal(error: LlmError) -> CallError {
        CallError {
            error,
            retryable: false,
            retry_after: None,
            rejects_tools: false,
            unanswered: false,
        }
    }

    pub fn retryable(error: LlmError) -> CallError {
        CallError {
            retryable: true,
            ..CallError::fatal(error)
        }
    }

    /// A broken stream is as good as a failed connect while nothing of it
    /// reached anyone; after that it must not be tried again.
    pub fn broken(error: LlmError, emitted: bool) -> CallError {
        if emitted {
            CallError::fatal(error)
        } else {
            CallError::retryable(error)
        }
    }
}

/// One chunk of a chat completion stream, borrowed from its text: only
/// what chorus reads, so a chunk costs no map and, for content without
/// escapes, no string copy.
#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<Choice<'a>>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    tool_calls: Option<Vec<CallDelta<'a>>>,
}

#[derive(Deserialize)]
struct CallDelta<'a> {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    function: Option<FunctionDelta<'a>>,
}

#[derive(Deserialize)]
struct FunctionDelta<'a> {
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    arguments: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

/// What a stream reader does after a piece of the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fed {
    /// Read on.
    More,
    /// `[DONE]` came: the answer is complete.
    Done,
    /// The sink said stop: close the connection.
    Stopped,
}

/// The state of one stream being read. See the module documentation.
pub(crate) struct StreamState {
    /// The endpoint's name, for messages.
    name: String,
    parser: SseParser,
    events: Vec<Event>,
    calls: CallAssembler,
    finish: Option<String>,
    done: bool,
    stopped: bool,
    /// Something of the answer reached a client (this call or an earlier
    /// round): a failure may not be retried.
    emitted: bool,
    /// Keep what the model says (when tools were offered).
    keep_said: bool,
    said: String,
    /// Token usage the upstream reported: prompt, completion.
    pub usage: (u64, u64),
    sink: TokenSink,
}

impl StreamState {
    /// A stream from the endpoint `name`; `committed` when something of
    /// the answer already reached a client.
    pub fn new(
        name: &str,
        limits: CallLimits,
        sink: TokenSink,
        committed: bool,
        keep_said: bool,
    ) -> StreamState {
        StreamState {
            name: name.to_owned(),
            parser: SseParser::new(MAX_EVENT_BYTES),
            events: Vec::new(),
            calls: CallAssembler::new(limits),
            finish: None,
            done: false,
            stopped: false,
            emitted: committed,
            keep_said,
            said: String::new(),
            usage: (0, 0),
            sink,
        }
    }

    /// True once a token went to the sink (or the call began committed).
    pub fn emitted(&self) -> bool {
        self.emitted
    }

    /// Takes a piece of the response body.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Fed, CallError> {
        let events = &mut self.events;
        let parsed = self.parser.feed(bytes, &mut |event| events.push(event));
        // The events complete before a bad line count, as they would have
        // had the line come in a later read.
        let mut events = std::mem::take(&mut self.events);
        let result = self.handle(&mut events);
        events.clear();
        self.events = events;
        match (result, parsed) {
            (Ok(Fed::More), Err(e)) => Err(CallError::fatal(LlmError::upstream(
                &self.name,
                format!("{} sent a bad stream: {e}", self.name),
            ))),
            (result, _) => result,
        }
    }

    fn handle(&mut self, events: &mut Vec<Event>) -> Result<Fed, CallError> {
        for event in events.drain(..) {
            if event.data == "[DONE]" {
                self.done = true;
                return Ok(Fed::Done);
            }
            let chunk: Chunk<'_> = serde_json::from_str(&event.data).map_err(|e| {
                CallError::fatal(LlmError::upstream(
                    &self.name,
                    format!(
                        "{} sent a chunk that is not a chat completion chunk: {e}",
                        self.name
                    ),
                ))
            })?;
            if let Some(error) = chunk.error {
                return Err(CallError::fatal(LlmError::upstream(
                    &self.name,
                    format!(
                        "{} reported an error mid-stream: {}",
                        self.name,
                        error_message(&error.to_string())
                    ),
                )));
            }
            if let Some(usage) = &chunk.usage {
                self.usage.0 += usage.prompt_tokens.unwrap_or(0);
                self.usage.1 += usage.completion_tokens.unwrap_or(0);
            }
            let Some(choice) = chunk.choices.into_iter().next() else {
                continue;
            };
            if let Some(delta) = choice.delta {
                for call in delta.tool_calls.into_iter().flatten() {
                    let function = call.function.as_ref();
                    self.calls.push(
                        call.index,
                        call.id.as_deref(),
                        function.and_then(|f| f.name.as_deref()),
                        function.and_then(|f| f.arguments.as_deref()),
                    );
                }
                if let Some(text) = delta.content.filter(|t| !t.is_empty()) {
                    self.emitted = true;
                    if self.keep_said {
                        self.said.push_str(&text);
                    }
                    if (self.sink)(&text) == Flow::Stop {
                        self.stopped = true;
                        return Ok(Fed::Stopped);
                    }
                }
            }
            if let Some(reason) = choice.finish_reason {
                self.finish = Some(reason.into_owned());
            }
        }
        Ok(Fed::More)
    }

    /// How the round ended, once the reading is over: after `[DONE]`, a
    /// stop, or the end of the body.
    pub fn end(self) -> Result<Turn, CallError> {
        if self.stopped {
            return Ok(Turn::answer(Finish::Cancelled));
        }
        let end = match self.finish.as_deref() {
            Some("length") => Finish::Length,
            Some(_) => Finish::Stop,
            // `[DONE]` without a finish reason: some servers skip it.
            None if self.done => Finish::Stop,
            None => {
                let error = LlmError::upstream(
                    &self.name,
                    format!(
                        "the stream from {} ended before the answer was complete",
                        self.name
                    ),
                );
                return Err(CallError::broken(error, self.emitted));
            }
        };
        // A server that reports usage sends it in a last chunk; (0, 0) is
        // one that did not.
        let usage = (self.usage != (0, 0)).then_some(crate::protocol::Usage {
            prompt_tokens: self.usage.0,
            completion_tokens: self.usage.1,
        });
        Ok(Turn {
            end,
            tool_calls: self.calls.finish(),
            endpoint: 0,
            said: self.said,
            usage,
        })
    }

    /// The failure of a stream whose connection broke.
    pub fn broke(&self, e: &std::io::Error) -> CallError {
        let error = LlmError::upstream(
            &self.name,
            format!("the stream from {} broke: {e}", self.name),
        );
        CallError::broken(error, self.emitted)
    }

    /// The failure of a stream that went silent for `timeout`.
    pub fn timed_out(&self, timeout: Duration) -> CallError {
        CallError::fatal(LlmError::timeout(
            &self.name,
            format!("{} sent nothing for {} ms", self.name, timeout.as_millis()),
        ))
    }
}

/// An HTTP error status as a call failure, with the upstream's message;
/// 429 and 5xx are worth a retry.
pub(crate) fn status_failure(
    name: &str,
    status: u16,
    retry_after: Option<Duration>,
    text: &str,
) -> CallError {
    let message = error_message(text);
    // How servers without tool support answer a request that offers tools
    // (llama.cpp's server without `--jinja`: "tools param requires
    // --jinja flag"); a retry would only be refused again.
    let rejects_tools = (400..600).contains(&status) && message.to_lowercase().contains("tool");
    CallError {
        error: LlmError::upstream(name, format!("{name} answered HTTP {status}: {message}")),
        retryable: status == 429 || status >= 500,
        retry_after,
        rejects_tools,
        unanswered: false,
    }
}

/// The human part of an upstream error body: OpenAI's `error.message`, a
/// bare `error` string, or the text itself, shortened.
pub(crate) fn error_message(text: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(text).ok();
    let message = parsed
        .as_ref()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.get("message"))
                .or_else(|| v.get("error"))
                .or_else(|| v.get("detail"))
        })
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| text.trim().to_owned());
    let message = if message.is_empty() {
        "(no message)".to_owned()
    } else {
        message
    };
    let mut short: String = message.chars().take(MAX_MESSAGE_CHARS).collect();
    if short.len() < message.len() {
        short.push('…');
    }
    short
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_are_found_and_shortened() {
        assert_eq!(
            error_message(r#"{"error":{"message":"model not found","type":"x"}}"#),
            "model not found"
        );
        assert_eq!(error_message(r#"{"error":"overloaded"}"#), "overloaded");
        assert_eq!(error_message("  Bad Gateway  "), "Bad Gateway");
        assert_eq!(error_message(""), "(no message)");
        let long = "x".repeat(2000);
        assert_eq!(error_message(&long).chars().count(), MAX_MESSAGE_CHARS + 1);
    }
}
