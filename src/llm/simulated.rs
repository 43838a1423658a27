//! The simulated model: deterministic text with realistic timing, so chorus
//! runs, demos and tests with no model server.
//!
//! The answer is derived from a hash of the whole prompt, so identical
//! prompts give identical answers and any change of history or options
//! changes the answer — exactly the property the cache and the singleflight
//! rely on, and what tests check.

use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{AbortSignal, Flow, LlmError, Prompt, Provider, StreamEnd};

/// Timing and length of simulated answers (`[llm.simulated]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Simulated {
    /// Delay before the first token.
    pub first_token: Duration,
    /// Delay between tokens.
    pub token_interval: Duration,
    /// Tokens in a complete answer.
    pub tokens: u32,
}

const WORDS: [&str; 48] = [
    "the",
    "gateway",
    "streams",
    "tokens",
    "to",
    "every",
    "client",
    "while",
    "one",
    "leader",
    "prepares",
    "a",
    "prompt",
    "and",
    "followers",
    "share",
    "its",
    "answer",
    "cache",
    "keeps",
    "complete",
    "replies",
    "for",
    "later",
    "so",
    "upstream",
    "calls",
    "stay",
    "rare",
    "threads",
    "wait",
    "on",
    "bounded",
    "queues",
    "history",
    "lives",
    "in",
    "sqlite",
    "each",
    "request",
    "gets",
    "exactly",
    "one",
    "end",
    "quickly",
    "simple",
    "synchronous",
    "code",
];

impl Simulated {
    /// The tokens of the complete answer to `prompt`, before `max_tokens`.
    pub fn answer(&self, prompt: &Prompt) -> Vec<String> {
        let mut hasher = Sha256::new();
        hasher.update(prompt.model.as_bytes());
        hasher.update(format!(
            "{:?}|{:?}|{}",
            prompt.temperature, prompt.top_p, prompt.max_tokens
        ));
        for m in &prompt.messages {
            hasher.update(m.role.as_bytes());
            hasher.update((m.content.len() as u64).to_le_bytes());
            hasher.update(m.content.as_bytes());
        }
        let seed = hasher.finalize();
        // xorshift64* seeded from the prompt hash: cheap, deterministic, good enough for prose.
        let mut state = u64::from_le_bytes(seed[..8].try_into().unwrap_or([7; 8])) | 1;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let mut tokens = Vec::with_capacity(self.tokens as usize);
        let mut sentence_left = 0;
        for i in 0..self.tokens {
            let word = WORDS[(next() % WORDS.len() as u64) as usize];
            let mut token = String::with_capacity(word.len() + 2);
            if i > 0 {
                token.push(' ');
            }
            if sentence_left == 0 {
                sentence_left = 6 + next() % 8;
                let mut chars = word.chars();
                if let Some(first) = chars.next() {
                    token.extend(first.to_uppercase());
                    token.push_str(chars.as_str());
                }
            } else {
                token.push_str(word);
            }
            sentence_left -= 1;
            if sentence_left == 0 || i + 1 == self.tokens {
                token.push('.');
                sentence_left = 0;
            }
            tokens.push(token);
        }
        tokens
    }
}

impl Provider for Simulated {
    fn name(&self) -> &str {
        "simulated"
    }

    fn stream(
        &self,
        prompt: &Prompt,
        abort: &AbortSignal,
        on_token: &mut dyn FnMut(&str) -> Flow,
    ) -> Result<StreamEnd, LlmError> {
        let tokens = self.answer(prompt);
        for (i, token) in tokens.iter().enumerate() {
            if i as u64 >= u64::from(prompt.max_tokens) {
                return Ok(StreamEnd::Length);
            }
            let delay = if i == 0 {
                self.first_token
            } else {
                self.token_interval
            };
            if abort.sleep(delay) {
                return Ok(StreamEnd::Aborted);
            }
            if on_token(token) == Flow::Stop {
                return Ok(StreamEnd::Aborted);
            }
        }
        Ok(StreamEnd::Stop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::PromptMessage;
    use std::time::Instant;

    fn prompt(text: &str, max_tokens: u32) -> Prompt {
        Prompt {
            model: "m".into(),
            messages: vec![PromptMessage {
                role: "user",
                content: text.into(),
            }],
            temperature: None,
            top_p: None,
            max_tokens,
        }
    }

    fn sim(tokens: u32, interval_ms: u64) -> Simulated {
        Simulated {
            first_token: Duration::from_millis(interval_ms),
            token_interval: Duration::from_millis(interval_ms),
            tokens,
        }
    }

    fn run(s: &Simulated, p: &Prompt) -> (Vec<String>, StreamEnd) {
        let mut got = Vec::new();
        let end = s
            .stream(p, &AbortSignal::new(), &mut |t| {
                got.push(t.to_owned());
                Flow::Continue
            })
            .unwrap();
        (got, end)
    }

    #[test]
    fn deterministic_and_prompt_dependent() {
        let s = sim(20, 0);
        let (a, end) = run(&s, &prompt("hello", 100));
        assert_eq!(end, StreamEnd::Stop);
        assert_eq!(a.len(), 20);
        assert_eq!(a, run(&s, &prompt("hello", 100)).0);
        assert_ne!(a, run(&s, &prompt("hello!", 100)).0);
        assert!(a.concat().ends_with('.'));
    }

    #[test]
    fn max_tokens_gives_length() {
        let (a, end) = run(&sim(20, 0), &prompt("x", 5));
        assert_eq!((a.len(), end), (5, StreamEnd::Length));
    }

    #[test]
    fn abort_is_noticed_within_one_interval() {
        // Ten-second intervals: returning well before one passes proves the wake-up.
        let s = sim(1000, 10_000);
        let abort = AbortSignal::new();
        let other = abort.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            other.abort();
        });
        let started = Instant::now();
        let end = s
            .stream(&prompt("x", 5000), &abort, &mut |_| Flow::Continue)
            .unwrap();
        assert_eq!(end, StreamEnd::Aborted);
        assert!(started.elapsed() < Duration::from_secs(5));
        t.join().unwrap();
    }

    #[test]
    fn callback_can_stop() {
        let mut n = 0;
        let end = sim(10, 0)
            .stream(&prompt("x", 100), &AbortSignal::new(), &mut |_| {
                n += 1;
                if n == 3 {
                    Flow::Stop
                } else {
                    Flow::Continue
                }
            })
            .unwrap();
        assert_eq!((n, end), (3, StreamEnd::Aborted));
    }
}
