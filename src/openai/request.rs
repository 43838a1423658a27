//! Reading a `POST /v1/chat/completions` body into a [`ChatRequest`].
//!
//! The body is read in two steps. First the top-level object: each honoured
//! field is kept as a [`Value`] and everything else is skipped without being
//! built, so an unknown field costs nothing and a field serde cannot read
//! (a number like `1e999`) is still named in the refusal. Then each kept
//! field is checked on its own, which is what lets every refusal name its
//! field down to `messages[2].content[0].type`.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value};

use crate::llm::{Prompt, PromptMessage, ToolCall};
use crate::protocol::{ErrorCode, Failure};

/// Most `stop` sequences a request may give (OpenAI's own limit).
pub const MAX_STOP_SEQUENCES: usize = 4;
/// Longest `stop` sequence, in characters.
pub const MAX_STOP_CHARS: usize = 256;
/// Longest `model` name, in characters. The name is echoed in every chunk.
pub const MAX_MODEL_CHARS: usize = 256;
/// Longest `user`, in characters.
pub const MAX_USER_CHARS: usize = 256;

/// A chat completion request, checked: everything chorus honours, in the
/// form the pipeline needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The model asked for; `None` when the client sent none (the server's
    /// configured model applies, as for a WebSocket chat without one).
    pub model: Option<String>,
    /// The messages, in order, already in the upstream's shape.
    pub messages: Vec<PromptMessage>,
    /// `stream`: answer with server-sent events rather than one object.
    pub stream: bool,
    /// `stream_options.include_usage`: end the stream with a usage chunk.
    pub include_usage: bool,
    /// `max_completion_tokens`, or else `max_tokens`.
    pub max_tokens: Option<u32>,
    /// `temperature`, in `0..=2`.
    pub temperature: Option<f64>,
    /// `top_p`, in `0..=1`.
    pub top_p: Option<f64>,
    /// `stop`, as a list (a single string becomes a list of one).
    pub stop: Vec<String>,
    /// `seed`.
    pub seed: Option<i64>,
    /// `user`.
    pub user: Option<String>,
}

impl ChatRequest {
    /// The prompt that goes upstream: the messages as given and exactly the
    /// options the client sent, with `default_model` when it named none.
    pub fn into_prompt(self, default_model: &str) -> Prompt {
        Prompt {
            model: self.model.unwrap_or_else(|| default_model.to_owned()),
            messages: self.messages,
            temperature: self.temperature,
            top_p: self.top_p,
            max_tokens: self.max_tokens,
            stop: self.stop,
            seed: self.seed,
            user: self.user,
        }
    }
}

/// Why a request body was refused; always a `400` `bad_request`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    /// The offending field, e.g. `messages[1].role` (OpenAI's `param`);
    /// `None` when the body as a whole is unreadable.
    pub param: Option<String>,
    /// What is wrong, naming the field.
    pub message: String,
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RequestError {}

impl From<RequestError> for Failure {
    fn from(e: RequestError) -> Failure {
        Failure::new(ErrorCode::BadRequest, e.message)
    }
}

fn refuse(param: impl Into<String>, message: impl Into<String>) -> RequestError {
    RequestError {
        param: Some(param.into()),
        message: message.into(),
    }
}

/// Reads and checks the body of `POST /v1/chat/completions`.
pub fn parse_chat_request(body: &[u8]) -> Result<ChatRequest, RequestError> {
    let mut failed = None;
    let mut de = serde_json::Deserializer::from_slice(body);
    let read = TopLevel {
        failed: &mut failed,
    }
    .deserialize(&mut de)
    .and_then(|fields| de.end().map(|()| fields));
    let mut fields = read.map_err(|e| match failed {
        // The message already starts with the field's name.
        Some(field) => refuse(field, e.to_string()),
        None => RequestError {
            param: None,
            message: format!("the body is not a valid JSON object: {e}"),
        },
    })?;
    let mut take = |field: Field| fields[field as usize].take().filter(|v| !v.is_null());

    refuse_tools(take(Field::Tools), "tools")?;
    refuse_tools(take(Field::Functions), "functions")?;
    refuse_tool_choice(take(Field::ToolChoice), "tool_choice")?;
    refuse_tool_choice(take(Field::FunctionCall), "function_call")?;
    if let Some(n) = take(Field::N) {
        if n.as_u64() != Some(1) {
            return Err(refuse("n", "`n` must be 1: chorus gives one choice"));
        }
    }

    let model = match take(Field::Model) {
        None => None,
        Some(v) => Some(bounded_string(v, "model", MAX_MODEL_CHARS, false)?),
    };
    let messages = match take(Field::Messages) {
        None => return Err(refuse("messages", "`messages` is required")),
        Some(Value::Array(list)) if list.is_empty() => {
            return Err(refuse("messages", "`messages` must not be empty"))
        }
        Some(Value::Array(list)) => list
            .into_iter()
            .enumerate()
            .map(|(i, m)| message(m, i))
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(refuse("messages", "`messages` must be an array")),
    };
    let stream = match take(Field::Stream) {
        None => false,
        Some(v) => boolean(&v, "stream")?,
    };
    let include_usage = match take(Field::StreamOptions) {
        None => false,
        Some(Value::Object(options)) => match options.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(v) => boolean(v, "stream_options.include_usage")?,
        },
        Some(_) => {
            return Err(refuse(
                "stream_options",
                "`stream_options` must be an object",
            ))
        }
    };
    // Both checked, so a broken one is never hidden by the other; the newer
    // name wins because it is the one OpenAI documents today.
    let max_tokens = take(Field::MaxTokens)
        .map(|v| token_limit(&v, "max_tokens"))
        .transpose()?;
    let max_completion_tokens = take(Field::MaxCompletionTokens)
        .map(|v| token_limit(&v, "max_completion_tokens"))
        .transpose()?;
    let temperature = take(Field::Temperature)
        .map(|v| number_in(&v, "temperature", 2.0))
        .transpose()?;
    let top_p = take(Field::TopP)
        .map(|v| number_in(&v, "top_p", 1.0))
        .transpose()?;
    let stop = match take(Field::Stop) {
        None => Vec::new(),
        Some(Value::String(s)) => vec![stop_sequence(s, "stop")?],
        Some(Value::Array(list)) => {
            if list.len() > MAX_STOP_SEQUENCES {
                return Err(refuse(
                    "stop",
                    format!("`stop` may give at most {MAX_STOP_SEQUENCES} sequences"),
                ));
            }
            list.into_iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => stop_sequence(s, &format!("stop[{i}]")),
                    _ => Err(refuse(
                        format!("stop[{i}]"),
                        format!("`stop[{i}]` must be a string"),
                    )),
                })
                .collect::<Result<_, _>>()?
        }
        Some(_) => {
            return Err(refuse(
                "stop",
                "`stop` must be a string or an array of strings",
            ))
        }
    };
    let seed = match take(Field::Seed) {
        None => None,
        Some(v) => Some(
            v.as_i64()
                .ok_or_else(|| refuse("seed", "`seed` must be an integer that fits in 64 bits"))?,
        ),
    };
    let user = match take(Field::User) {
        None => None,
        Some(v) => Some(bounded_string(v, "user", MAX_USER_CHARS, true)?),
    };
    Ok(ChatRequest {
        model,
        messages,
        stream,
        include_usage,
        max_tokens: max_completion_tokens.or(max_tokens),
        temperature,
        top_p,
        stop,
        seed,
        user,
    })
}

/// `tools` / `functions`: chorus's own tools are not used for HTTP requests
/// and a client's cannot be run either, so only "none at all" is accepted.
fn refuse_tools(value: Option<Value>, field: &str) -> Result<(), RequestError> {
    match value {
        None => Ok(()),
        Some(Value::Array(list)) if list.is_empty() => Ok(()),
        Some(_) => Err(refuse(
            field,
            format!("`{field}` is not supported: chorus does not offer client tools to the model"),
        )),
    }
}

/// `tool_choice` / `function_call`: with no tools, only `"none"` means
/// anything, so any other choice is refused rather than silently dropped.
fn refuse_tool_choice(value: Option<Value>, field: &str) -> Result<(), RequestError> {
    match value {
        None => Ok(()),
        Some(Value::String(s)) if s == "none" => Ok(()),
        Some(_) => Err(refuse(
            field,
            format!(
                "`{field}` may only be \"none\": chorus does not offer client tools to the model"
            ),
        )),
    }
}

fn boolean(value: &Value, field: &str) -> Result<bool, RequestError> {
    value
        .as_bool()
        .ok_or_else(|| refuse(field, format!("`{field}` must be true or false")))
}

/// A string of at most `max` characters; empty only when `may_be_empty`.
fn bounded_string(
    value: Value,
    field: &str,
    max: usize,
    may_be_empty: bool,
) -> Result<String, RequestError> {
    let Value::String(s) = value else {
        return Err(refuse(field, format!("`{field}` must be a string")));
    };
    if s.is_empty() && !may_be_empty {
        return Err(refuse(field, format!("`{field}` must not be empty")));
    }
    if s.chars().count() > max {
        return Err(refuse(
            field,
            format!("`{field}` must be at most {max} characters"),
        ));
    }
    Ok(s)
}

fn stop_sequence(s: String, field: &str) -> Result<String, RequestError> {
    bounded_string(Value::String(s), field, MAX_STOP_CHARS, false)
}

fn token_limit(value: &Value, field: &str) -> Result<u32, RequestError> {
    match value.as_u64() {
        Some(0) => Err(refuse(field, format!("`{field}` must be at least 1"))),
        Some(n) => u32::try_from(n)
            .map_err(|_| refuse(field, format!("`{field}` must be at most {}", u32::MAX))),
        None => Err(refuse(
            field,
            format!("`{field}` must be a positive integer"),
        )),
    }
}

/// A finite number in `0..=max`. JSON has no NaN or infinity, and serde
/// refuses a literal too large for an `f64`, but the check stays so the
/// range is stated in one place.
fn number_in(value: &Value, field: &str, max: f64) -> Result<f64, RequestError> {
    match value.as_f64() {
        Some(x) if x.is_finite() && (0.0..=max).contains(&x) => Ok(x),
        Some(_) => Err(refuse(
            field,
            format!("`{field}` must be between 0 and {max}"),
        )),
        None => Err(refuse(field, format!("`{field}` must be a number"))),
    }
}

/// One element of `messages`, in the upstream's shape.
fn message(value: Value, i: usize) -> Result<PromptMessage, RequestError> {
    let at = |field: &str| format!("messages[{i}].{field}");
    let Value::Object(mut m) = value else {
        return Err(refuse(
            format!("messages[{i}]"),
            format!("`messages[{i}]` must be an object"),
        ));
    };
    let role = match m.get("role") {
        Some(Value::String(r)) => match r.as_str() {
            "system" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" => "tool",
            other => {
                return Err(refuse(
                    at("role"),
                    format!(
                        "`{}` must be system, user, assistant or tool, not {other:?}",
                        at("role")
                    ),
                ))
            }
        },
        Some(_) => {
            return Err(refuse(
                at("role"),
                format!("`{}` must be a string", at("role")),
            ))
        }
        None => return Err(refuse(at("role"), format!("`{}` is required", at("role")))),
    };
    let tool_calls = match (role, m.remove("tool_calls")) {
        ("assistant", Some(Value::Array(calls))) => calls
            .into_iter()
            .enumerate()
            .map(|(j, c)| tool_call(c, &at(&format!("tool_calls[{j}]"))))
            .collect::<Result<Vec<_>, _>>()?,
        ("assistant", None | Some(Value::Null)) => Vec::new(),
        ("assistant", Some(_)) => {
            return Err(refuse(
                at("tool_calls"),
                format!("`{}` must be an array", at("tool_calls")),
            ))
        }
        // Not a field of the other roles: ignored like any unknown field.
        _ => Vec::new(),
    };
    let content = match m.remove("content") {
        Some(Value::String(s)) => s,
        Some(Value::Array(parts)) => text_parts(parts, &at("content"))?,
        // OpenAI's one case of a message without content: an assistant
        // turn that only called tools.
        None | Some(Value::Null) if !tool_calls.is_empty() => String::new(),
        None | Some(Value::Null) => {
            return Err(refuse(
                at("content"),
                format!("`{}` is required", at("content")),
            ))
        }
        Some(_) => {
            return Err(refuse(
                at("content"),
                format!(
                    "`{}` must be a string or an array of text parts",
                    at("content")
                ),
            ))
        }
    };
    let tool_call_id = if role == "tool" {
        match m.remove("tool_call_id") {
            Some(Value::String(id)) if !id.is_empty() => Some(id),
            _ => {
                return Err(refuse(
                    at("tool_call_id"),
                    format!(
                        "`{}` is required (a non-empty string) on a tool message",
                        at("tool_call_id")
                    ),
                ))
            }
        }
    } else {
        None
    };
    Ok(PromptMessage {
        role,
        content,
        tool_calls,
        tool_call_id,
    })
}

/// A `content` array: text parts only, joined with nothing between them.
fn text_parts(parts: Vec<Value>, field: &str) -> Result<String, RequestError> {
    let mut text = String::new();
    for (j, part) in parts.into_iter().enumerate() {
        let here = format!("{field}[{j}]");
        let Value::Object(part) = part else {
            return Err(refuse(&here, format!("`{here}` must be an object")));
        };
        match part.get("type") {
            Some(Value::String(t)) if t == "text" => {}
            Some(Value::String(t)) => {
                return Err(refuse(
                    format!("{here}.type"),
                    format!("`{here}.type` is {t:?}: only \"text\" content parts are supported"),
                ))
            }
            _ => {
                return Err(refuse(
                    format!("{here}.type"),
                    format!("`{here}.type` must be \"text\""),
                ))
            }
        }
        match part.get("text") {
            Some(Value::String(s)) => text.push_str(s),
            _ => {
                return Err(refuse(
                    format!("{here}.text"),
                    format!("`{here}.text` must be a string"),
                ))
            }
        }
    }
    Ok(text)
}

/// One call of an assistant message's `tool_calls`, as the model made it
/// in an earlier turn the client kept.
fn tool_call(value: Value, here: &str) -> Result<ToolCall, RequestError> {
    let Value::Object(call) = value else {
        return Err(refuse(here, format!("`{here}` must be an object")));
    };
    let text = |map: &Map<String, Value>, key: &str, field: String, may_be_empty: bool| match map
        .get(key)
    {
        Some(Value::String(s)) if may_be_empty || !s.is_empty() => Ok(s.clone()),
        _ if may_be_empty => Err(refuse(&field, format!("`{field}` must be a string"))),
        _ => Err(refuse(
            &field,
            format!("`{field}` must be a non-empty string"),
        )),
    };
    match call.get("type") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if t == "function" => {}
        Some(_) => {
            return Err(refuse(
                format!("{here}.type"),
                format!("`{here}.type` must be \"function\""),
            ))
        }
    }
    let id = text(&call, "id", format!("{here}.id"), false)?;
    let Some(Value::Object(function)) = call.get("function") else {
        return Err(refuse(
            format!("{here}.function"),
            format!("`{here}.function` must be an object"),
        ));
    };
    Ok(ToolCall {
        id,
        name: text(function, "name", format!("{here}.function.name"), false)?,
        arguments: text(
            function,
            "arguments",
            format!("{here}.function.arguments"),
            true,
        )?,
        refused: None,
    })
}

// ---------------------------------------------------------------------------
// The top-level object

/// The honoured top-level fields, and the tool fields that are refused.
#[derive(Debug, Clone, Copy)]
enum Field {
    Model,
    Messages,
    Stream,
    StreamOptions,
    MaxTokens,
    MaxCompletionTokens,
    Temperature,
    TopP,
    Stop,
    Seed,
    User,
    N,
    Tools,
    ToolChoice,
    Functions,
    FunctionCall,
}

/// Wire names, in [`Field`] order.
const FIELD_NAMES: [&str; 16] = [
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "user",
    "n",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
];

type Fields = [Option<Value>; FIELD_NAMES.len()];

/// Reads the top-level object into [`Fields`], noting in `failed` which
/// field serde could not read so the refusal can name it.
struct TopLevel<'a> {
    failed: &'a mut Option<&'static str>,
}

impl<'de> DeserializeSeed<'de> for TopLevel<'_> {
    type Value = Fields;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Fields, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TopLevel<'_> {
    type Value = Fields;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let mut fields: Fields = Default::default();
        while let Some(key) = map.next_key::<String>()? {
            let Some(i) = FIELD_NAMES.iter().position(|f| *f == key) else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            let name = FIELD_NAMES[i];
            *self.failed = Some(name);
            if fields[i].is_some() {
                return Err(de::Error::custom(format_args!("`{name}` is given twice")));
            }
            let value = map
                .next_value::<Value>()
                .map_err(|e| de::Error::custom(format_args!("`{name}`: {e}")))?;
            fields[i] = Some(value);
            *self.failed = None;
        }
        Ok(fields)
    }
}
