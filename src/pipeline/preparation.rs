//! The preparation stage: the prompt a leader sends upstream, made of the
//! system prompt, as much recent history as fits the context budget, and
//! the new message. [`Preparation`] holds what that needs and nothing else.
//!
//! Threads: runs on a preparation worker, one prompt at a time per worker;
//! [`read_context`] reads the history that fits, [`assemble_prompt`] is a
//! pure function.

use super::work::Work;
use crate::history;
use crate::llm::{Prompt, PromptMessage};

/// What the preparation stage needs: the history to read and the two
/// settings that shape a prompt.
pub(super) struct Preparation {
    history: history::History,
    system_prompt: String,
    max_context_tokens: usize,
}

impl Preparation {
    pub(super) fn new(
        history: history::History,
        system_prompt: String,
        max_context_tokens: usize,
    ) -> Preparation {
        Preparation {
            history,
            system_prompt,
            max_context_tokens,
        }
    }

    /// The prompt for `work`, the next message of `conversation`.
    pub(super) fn prompt(
        &self,
        conversation: &str,
        work: &Work,
    ) -> Result<Prompt, history::HistoryError> {
        let stored = read_context(
            &self.history,
            conversation,
            &self.system_prompt,
            work,
            self.max_context_tokens,
        )?;
        Ok(assemble_prompt(
            &self.system_prompt,
            &stored,
            work,
            self.max_context_tokens,
        ))
    }
}

/// A rough token count (about four characters per token, plus a few for
/// the message framing): enough to keep a prompt under a budget without a
/// model-specific tokenizer.
fn estimate_tokens(text: &str) -> usize {
    text.chars().count().div_ceil(4) + 4
}

/// Tokens left for history once the system prompt and the new message are in.
fn history_budget(system: &str, work: &Work, max_context_tokens: usize) -> usize {
    max_context_tokens
        .saturating_sub(estimate_tokens(system))
        .saturating_sub(estimate_tokens(&work.message))
}

/// The stored messages before `work`'s, oldest first, that
/// [`assemble_prompt`] would keep: read newest first, stopping at the first
/// that does not fit, so a long conversation costs no more to prepare than
/// a short one.
fn read_context(
    history: &history::History,
    conversation: &str,
    system: &str,
    work: &Work,
    max_context_tokens: usize,
) -> Result<Vec<history::Message>, history::HistoryError> {
    let mut budget = history_budget(system, work, max_context_tokens);
    let mut kept = Vec::new();
    history.newest_first(conversation, Some(work.history_len), |_, m| {
        let cost = estimate_tokens(&m.content);
        if cost > budget {
            return history::Take::Refuse;
        }
        budget -= cost;
        kept.push(m);
        history::Take::More
    })?;
    kept.reverse();
    Ok(kept)
}

/// System prompt, then as much recent history as fits in `max_context_tokens`,
/// then the new message (always included).
fn assemble_prompt(
    system: &str,
    stored: &[history::Message],
    work: &Work,
    max_context_tokens: usize,
) -> Prompt {
    let mut budget = history_budget(system, work, max_context_tokens);
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
        max_tokens: Some(work.max_tokens),
        stop: Vec::new(),
        seed: None,
        user: None,
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
            given: None,
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
                partial: false,
            })
            .collect()
    }

    /// A real store holding `n` messages of about `chars` characters.
    fn store(
        n: usize,
        chars: usize,
    ) -> (tempfile::TempDir, history::History, Vec<history::Message>) {
        let dir = tempfile::tempdir().unwrap();
        let h = history::History::open(&dir.path().join("h.db"), 2).unwrap();
        let messages: Vec<(history::Role, String)> = (0..n)
            .map(|i| {
                let role = if i % 2 == 0 {
                    history::Role::User
                } else {
                    history::Role::Assistant
                };
                (role, format!("{i} {}", "é".repeat(chars + i % 7)))
            })
            .collect();
        h.write_all("c", messages, |_| {});
        h.sync().unwrap();
        let all = h.context("c", u64::MAX).unwrap();
        (dir, h, all)
    }

    #[test]
    fn reading_only_what_fits_forms_the_same_prompt() {
        for (n, chars) in [(0, 10), (1, 10), (10, 30), (40, 200)] {
            let (_dir, h, all) = store(n, chars);
            let mut w = work("now");
            for history_len in [0, n as u64 / 2, n as u64] {
                w.history_len = history_len;
                let before = &all[..history_len as usize];
                for budget in [1, 30, 60, 200, 1000, 100_000] {
                    let read = read_context(&h, "c", "sys", &w, budget).unwrap();
                    assert_eq!(
                        assemble_prompt("sys", &read, &w, budget),
                        assemble_prompt("sys", before, &w, budget),
                        "{n} messages, {history_len} before, budget {budget}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_long_history_is_read_only_as_far_as_the_budget() {
        // 300 messages of about 2,000 characters; a budget of 2,048 tokens
        // holds about four of them.
        let (_dir, h, _) = store(300, 2000);
        let mut w = work("now");
        w.history_len = 300;
        let before = h.rows_read();
        let read = read_context(&h, "c", "sys", &w, 2048).unwrap();
        let rows = h.rows_read() - before;
        // Less the system prompt and the new message.
        let kept = assemble_prompt("sys", &read, &w, 2048).messages.len() - 2;
        assert!(kept > 0);
        assert!(
            rows <= kept as u64 + 1,
            "read {rows} rows for a prompt that keeps {kept}"
        );
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
