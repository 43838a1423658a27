//! Assembling the prompt a leader sends upstream: the system prompt, as
//! much recent history as fits the context budget, and the new message.
//!
//! Pure functions, called on a preparation worker.

use super::Work;
use crate::history;
use crate::llm::{Prompt, PromptMessage};

/// A rough token count (about four characters per token, plus a few for
/// the message framing): enough to keep a prompt under a budget without a
/// model-specific tokenizer.
pub(super) fn estimate_tokens(text: &str) -> usize {
    text.chars().count().div_ceil(4) + 4
}

/// System prompt, then as much recent history as fits in `max_context_tokens`,
/// then the new message (always included).
pub(super) fn assemble_prompt(
    system: &str,
    stored: &[history::Message],
    work: &Work,
    max_context_tokens: usize,
) -> Prompt {
    let mut budget = max_context_tokens
        .saturating_sub(estimate_tokens(system))
        .saturating_sub(estimate_tokens(&work.message));
    let mut kept = Vec::new();
    for m in stored.iter().rev() {
        let cost = estimate_tokens(&m.content);
        if cost > budget {
            break;
        }
        budget -= cost;
        kept.push(m);
    }
    let mut messages = Vec::with_capacity(kept.len() + 2);
    if !system.is_empty() {
        messages.push(PromptMessage::new("system", system));
    }
    messages.extend(
        kept.into_iter()
            .rev()
            .map(|m| PromptMessage::new(m.role.as_str(), m.content.clone())),
    );
    messages.push(PromptMessage::new("user", work.message.clone()));
    Prompt {
        model: work.model.clone(),
        messages,
        temperature: work.temperature,
        top_p: work.top_p,
        max_tokens: work.max_tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work(message: &str) -> Work {
        Work {
            key: [0; 32],
            fresh: false,
            history_len: 0,
            cache_writes_seen: 0,
            message: message.into(),
            model: "m".into(),
            temperature: None,
            top_p: None,
            max_tokens: 10,
        }
    }

    fn stored(n: usize) -> Vec<history::Message> {
        (0..n)
            .map(|i| history::Message {
                role: if i % 2 == 0 {
                    history::Role::User
                } else {
                    history::Role::Assistant
                },
                content: format!("message number {i} with some padding text"),
                at_ms: 0,
            })
            .collect()
    }

    #[test]
    fn prompt_keeps_the_newest_history_within_budget() {
        let all = assemble_prompt("sys", &stored(10), &work("now"), 100_000);
        assert_eq!(all.messages.len(), 12);
        assert_eq!(all.messages[0].role, "system");
        assert_eq!(all.messages[11].content, "now");
        let some = assemble_prompt("sys", &stored(10), &work("now"), 60);
        assert!(some.messages.len() < 12 && some.messages.len() > 2);
        // What is kept is the most recent part, in order.
        assert_eq!(
            some.messages[some.messages.len() - 2].content,
            stored(10)[9].content
        );
        let none = assemble_prompt("sys", &stored(10), &work("now"), 1);
        assert_eq!(none.messages.len(), 2);
    }
}
