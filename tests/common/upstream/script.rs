//! Builders of the events of a [`Reply::Events`] stream: content tokens
//! and tool calls in OpenAI's `choices[0].delta` format, whole or in
//! pieces, well formed or not. Only the test's own thread uses them, to
//! build replies before it queues them; nothing here touches a socket.

use std::time::Duration;

use serde_json::{json, Value};

use super::Reply;

/// One tool call as a model streams it: [`Script::call`] and
/// [`Script::calls`] send its head (`index`, `id`, `type`, `name` and
/// empty `arguments`) and then its `arguments` in pieces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptedCall {
    /// The position OpenAI's deltas use to say which call a piece belongs
    /// to. A well-behaved model numbers its calls 0, 1, 2, …; tests of
    /// hostile upstreams give gaps and repeats.
    pub index: u64,
    pub id: String,
    pub name: String,
    /// The whole arguments text; it need not be JSON.
    pub arguments: String,
}

impl ScriptedCall {
    pub fn new(index: u64, id: &str, name: &str, arguments: &str) -> ScriptedCall {
        ScriptedCall {
            index,
            id: id.to_owned(),
            name: name.to_owned(),
            arguments: arguments.to_owned(),
        }
    }

    /// The delta that starts the call: everything but the arguments.
    fn head(&self) -> Value {
        Script::call_head_delta(self.index, &self.id, &self.name, "")
    }

    /// The arguments in pieces of `piece_bytes` bytes (at least 1), each
    /// cut at a character boundary, so a piece holding a multi-byte
    /// character is that much longer. Empty arguments are no piece at all.
    fn pieces(&self, piece_bytes: usize) -> Vec<Value> {
        split(&self.arguments, piece_bytes)
            .into_iter()
            .map(|piece| Script::arguments_delta(self.index, piece))
            .collect()
    }
}

/// Splits `text` into pieces of at least `size` bytes (1 if 0), cut only
/// at character boundaries.
fn split(text: &str, size: usize) -> Vec<&str> {
    let size = size.max(1);
    let mut pieces = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + size).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        pieces.push(&text[start..end]);
        start = end;
    }
    pieces
}

/// Builds the events of a [`Reply::Events`] stream in the order a model
/// would stream them: content tokens and tool calls, in OpenAI's
/// `choices[0].delta` format. The builder says nothing about whether the
/// result is well formed, so tests can script broken upstreams too.
///
/// ```ignore
/// let reply = Script::new()
///     .content("Let me check. ")
///     .call(&ScriptedCall::new(0, "call_1", "calculator", r#"{"expression":"2+3*4"}"#), 1)
///     .reply("tool_calls");
/// ```
#[derive(Debug, Clone, Default)]
pub struct Script {
    events: Vec<Value>,
}

impl Script {
    pub fn new() -> Script {
        Script::default()
    }

    /// One content token: `{"content": text}`.
    pub fn content(mut self, text: &str) -> Script {
        self.events.push(json!({"content": text}));
        self
    }

    /// One content token per item.
    pub fn contents(self, texts: &[&str]) -> Script {
        texts.iter().fold(self, |script, text| script.content(text))
    }

    /// One call: its head, then its arguments in pieces of `piece_bytes`.
    pub fn call(self, call: &ScriptedCall, piece_bytes: usize) -> Script {
        self.calls(std::slice::from_ref(call), piece_bytes)
    }

    /// Several calls streamed at once, as parallel calls may be: every
    /// head first, in order, then the arguments round-robin, piece `k` of
    /// each call before piece `k + 1` of any (so with more than one call
    /// the pieces interleave).
    pub fn calls(mut self, calls: &[ScriptedCall], piece_bytes: usize) -> Script {
        self.events.extend(calls.iter().map(ScriptedCall::head));
        let pieces: Vec<Vec<Value>> = calls.iter().map(|c| c.pieces(piece_bytes)).collect();
        let rounds = pieces.iter().map(Vec::len).max().unwrap_or(0);
        for k in 0..rounds {
            self.events
                .extend(pieces.iter().filter_map(|p| p.get(k)).cloned());
        }
        self
    }

    /// The head of a call on its own, with `arguments` as its first piece
    /// (OpenAI sends `""`; some servers send everything at once).
    pub fn call_head(mut self, index: u64, id: &str, name: &str, arguments: &str) -> Script {
        self.events
            .push(Script::call_head_delta(index, id, name, arguments));
        self
    }

    /// A piece of the arguments of the call at `index`.
    pub fn arguments(mut self, index: u64, piece: &str) -> Script {
        self.events.push(Script::arguments_delta(index, piece));
        self
    }

    /// Any delta object, or any whole chunk (a value with `choices`).
    pub fn raw(mut self, event: Value) -> Script {
        self.events.push(event);
        self
    }

    /// The events so far.
    pub fn events(&self) -> &[Value] {
        &self.events
    }

    /// The stream, with no delay between events.
    pub fn reply(self, finish: &'static str) -> Reply {
        self.reply_with_delay(finish, Duration::ZERO)
    }

    /// The stream, `delay` before each event.
    pub fn reply_with_delay(self, finish: &'static str, delay: Duration) -> Reply {
        Reply::Events {
            events: self.events,
            delay,
            finish,
        }
    }

    fn call_head_delta(index: u64, id: &str, name: &str, arguments: &str) -> Value {
        json!({"tool_calls": [{
            "index": index,
            "id": id,
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }]})
    }

    fn arguments_delta(index: u64, piece: &str) -> Value {
        json!({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
    }
}
