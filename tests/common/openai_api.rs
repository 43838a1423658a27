//! What the HTTP API tests share: a chorus in front of the test upstream,
//! upstream answers, and checks of OpenAI error objects.

use std::time::Duration;

use serde_json::Value;

use super::upstream::{Reply, Upstream};
use super::Server;

/// The model chorus is configured with, which clients ask for.
pub const MODEL: &str = "test-model";
/// The one token of a chorus with `auth_tokens`.
pub const TOKEN: &str = "sk-chorus-test-3b1f";

/// A chorus whose provider is `upstream`, with default settings otherwise;
/// `extra` adds whole tables.
pub fn chorus(upstream: &Upstream, extra: &str) -> Server {
    Server::start(&format!(
        "[llm]\nprovider = \"openai\"\nbase_url = \"{}\"\nmodel = \"{MODEL}\"\n{extra}",
        upstream.base_url()
    ))
}

/// Owned copies of `words`.
pub fn strings(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| (*w).to_owned()).collect()
}

/// An upstream answer of `words`, `delay` before each, with usage
/// `prompt` + `words.len()` tokens.
pub fn answer(words: &[&str], delay: Duration, prompt: u64) -> Reply {
    Reply::Stream {
        tokens: strings(words),
        delay,
        finish: "stop",
        usage: Some((prompt, words.len() as u64)),
    }
}

/// Whether `text` has `word` standing alone: not inside a longer name.
pub fn has_word(text: &str, word: &str) -> bool {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(word).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        !before.is_some_and(is_name) && !after.is_some_and(is_name)
    })
}

/// Asserts an OpenAI error object (`{"message","type","code"}`) with
/// `code`, whose message (or `param`, where given) names `field`.
pub fn assert_names_field(error: &Value, code: &str, field: &str) {
    assert_eq!(error["code"], code, "{error}");
    assert!(error["type"].is_string(), "no error type: {error}");
    let message = error["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message: {error}"));
    let param = error["param"].as_str().unwrap_or("");
    assert!(
        has_word(message, field) || has_word(param, field),
        "the error does not name the field `{field}`: {error}"
    );
}
