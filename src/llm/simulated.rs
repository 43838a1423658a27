//! The simulated model: deterministic text with realistic timing, so chorus
//! runs, demos and tests with no model server.
//!
//! The answer is derived from a hash of the whole prompt, so identical
//! prompts give identical answers and any change of history or options
//! changes the answer — exactly the property the cache and the singleflight
//! rely on, and what tests check.
//!
//! Tools go the same way as with a real model: offered tools that the user's
//! message asks for by keyword (see [`choose_tools`]) make a round that ends
//! with those calls after the first-token delay, and the next round's answer
//! opens by quoting the tool results.

use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{
    AbortSignal, Ask, Finish, Flow, LlmError, Prompt, Provider, TokenSink, ToolCall, ToolSpec, Turn,
};

/// Timing and length of simulated answers (`[llm.simulated]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Simulated {
    /// Delay before the first token.
    pub first_token: Duration,
    /// Delay between tokens.
    pub token_interval: Duration,
    /// Tokens in a complete answer.
    pub tokens: u32,
    /// Each generated token is padded to this many bytes; 0 leaves it as is.
    /// Big tokens are what memory and slow-consumer tests need.
    pub token_bytes: usize,
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

/// The simulated model's choice of tools for `message`, by keywords, so
/// demos and tests show tools without a real model: "calculate 2+3*4" calls
/// `calculator`, "what time is it" calls `clock`, "search my history for
/// pizza" calls `search_history`. Only tools in `offered` are chosen.
pub fn choose_tools(message: &str, offered: &[ToolSpec]) -> Vec<ToolCall> {
    let offers = |name: &str| offered.iter().any(|t| t.name == name);
    let lower = message.to_lowercase();
    let mut calls = Vec::new();
    let mut call = |name: &str, arguments: serde_json::Value| {
        calls.push(ToolCall {
            id: format!("call_{}", calls.len()),
            name: name.to_owned(),
            arguments: arguments.to_string(),
            refused: None,
        });
    };
    if offers("calculator") {
        // Byte offsets of the lower-cased text fit the original while
        // the keyword is ASCII and nothing before it changes length.
        let keyword = ["calculate", "compute"]
            .iter()
            .find_map(|k| lower.find(k).map(|at| at + k.len()));
        if let Some(rest) = keyword.and_then(|at| message.get(at..)) {
            let expression = leading_expression(rest);
            if expression.chars().any(|c| c.is_ascii_digit()) {
                call(
                    "calculator",
                    serde_json::json!({ "expression": expression }),
                );
            }
        }
    }
    if offers("clock")
        && ["what time", "the time", "current time", "clock"]
            .iter()
            .any(|k| lower.contains(k))
    {
        call("clock", serde_json::json!({}));
    }
    if offers("search_history") {
        let query = [
            "search my history for",
            "search history for",
            "did i mention",
        ]
        .iter()
        .find_map(|k| lower.find(k).map(|at| at + k.len()))
        .and_then(|at| message.get(at..))
        .map(|rest| rest.trim().trim_end_matches(['?', '.', '!']).trim())
        .filter(|q| !q.is_empty());
        if let Some(query) = query {
            call("search_history", serde_json::json!({ "query": query }));
        }
    }
    calls
}

/// The arithmetic at the start of `text`: digits, operators, brackets and
/// math function names, up to the first other word ("(2+3)*4 and what
/// time is it" gives "(2+3)*4").
fn leading_expression(text: &str) -> &str {
    const FUNCTIONS: [&str; 9] = ["sqrt", "sin", "cos", "tan", "ln", "log", "exp", "abs", "pi"];
    let mut end = 0;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let taken = if let Some(f) = FUNCTIONS.iter().find(|f| rest.starts_with(*f)) {
            f.len()
        } else if c.is_ascii_digit() || c.is_whitespace() || "+-*/^()., ×÷%".contains(c) {
            c.len_utf8()
        } else {
            break;
        };
        end += taken;
        rest = &rest[taken..];
    }
    text[..end].trim().trim_end_matches(['.', ',']).trim()
}

impl Simulated {
    /// The tokens of the complete answer to `prompt`, before `max_tokens`.
    /// When the prompt carries tool results, the answer opens by quoting
    /// them, so a demo shows the tools at work.
    pub fn answer(&self, prompt: &Prompt) -> Vec<String> {
        let mut hasher = Sha256::new();
        hasher.update(prompt.model.as_bytes());
        // A limit hashes as the bare number it was before it became
        // optional, so the answers to WebSocket chats did not change.
        let max_tokens = prompt.max_tokens.map_or("-".to_owned(), |n| n.to_string());
        hasher.update(format!(
            "{:?}|{:?}|{max_tokens}",
            prompt.temperature, prompt.top_p
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
        let calls: Vec<&ToolCall> = prompt.messages.iter().flat_map(|m| &m.tool_calls).collect();
        let results = prompt.messages.iter().filter(|m| m.role == "tool");
        for result in results {
            // Each tool result becomes "name says: result."
            let name = calls
                .iter()
                .find(|c| Some(&c.id) == result.tool_call_id.as_ref())
                .map_or("a tool", |c| c.name.as_str());
            let sentence = format!("{name} says: {}.", result.content.trim_end_matches('.'));
            for (i, word) in sentence.split(' ').enumerate() {
                let lead = if tokens.is_empty() && i == 0 { "" } else { " " };
                tokens.push(format!("{lead}{word}"));
            }
        }
        let mut sentence_left = 0;
        for i in tokens.len() as u32..self.tokens.max(tokens.len() as u32) {
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
            pad(&mut token, word, self.token_bytes);
            tokens.push(token);
        }
        tokens
    }
}

/// Pads `token` to `bytes` bytes with repetitions of `word` (ASCII, so the
/// cut lands on a character boundary).
fn pad(token: &mut String, word: &str, bytes: usize) {
    if token.len() >= bytes {
        return;
    }
    token.reserve_exact(bytes - token.len());
    while token.len() < bytes {
        token.push(' ');
        token.push_str(word);
    }
    token.truncate(bytes);
}

impl Provider for Simulated {
    fn name(&self) -> &str {
        "simulated"
    }

    fn stream(
        &self,
        ask: &Ask<'_>,
        abort: &AbortSignal,
        sink: &TokenSink,
    ) -> Result<Turn, LlmError> {
        let prompt = ask.prompt;
        // Tools are chosen only for a question no tool has answered yet:
        // after a tool round the last message is a tool result.
        let question = prompt.messages.last().filter(|m| m.role == "user");
        if let Some(question) = question.filter(|_| !ask.tools.is_empty()) {
            let calls = choose_tools(&question.content, ask.tools);
            if !calls.is_empty() {
                if abort.sleep(self.first_token) {
                    return Ok(Turn::answer(Finish::Cancelled));
                }
                return Ok(Turn {
                    tool_calls: calls,
                    ..Turn::answer(Finish::Stop)
                });
            }
        }
        let tokens = self.answer(prompt);
        for (i, token) in tokens.iter().enumerate() {
            if prompt.max_tokens.is_some_and(|n| i as u64 >= u64::from(n)) {
                return Ok(Turn::answer(Finish::Length));
            }
            let delay = if i == 0 {
                self.first_token
            } else {
                self.token_interval
            };
            if abort.sleep(delay) {
                return Ok(Turn::answer(Finish::Cancelled));
            }
            if sink(token) == Flow::Stop {
                return Ok(Turn::answer(Finish::Cancelled));
            }
        }
        // Tools offered and none called: what it said is its answer; the
        // pipeline needs it back only with tool calls, so none is kept.
        // Like a real server, it reports what the round cost: its own
        // tokens, and the prompt at about four characters a token.
        let prompt_chars: usize = prompt
            .messages
            .iter()
            .map(|m| m.content.chars().count())
            .sum();
        Ok(Turn {
            usage: Some(crate::protocol::Usage {
                prompt_tokens: prompt_chars.div_ceil(4) as u64,
                completion_tokens: tokens.len() as u64,
            }),
            ..Turn::answer(Finish::Stop)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::PromptMessage;
    use parking_lot::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    fn prompt(text: &str, max_tokens: u32) -> Prompt {
        Prompt {
            model: "m".into(),
            messages: vec![PromptMessage::new("user", text)],
            temperature: None,
            top_p: None,
            max_tokens: Some(max_tokens),
            stop: Vec::new(),
            seed: None,
            user: None,
        }
    }

    fn sim(tokens: u32, interval_ms: u64) -> Simulated {
        Simulated {
            first_token: Duration::from_millis(interval_ms),
            token_interval: Duration::from_millis(interval_ms),
            tokens,
            token_bytes: 0,
        }
    }

    fn ask(p: &Prompt) -> Ask<'_> {
        Ask {
            prompt: p,
            tools: &[],
            limits: Default::default(),
            committed: false,
            endpoint: None,
        }
    }

    /// A sink that keeps what it gets, and a handle to read it.
    fn collector() -> (TokenSink, Arc<Mutex<Vec<String>>>) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let kept = got.clone();
        let sink: TokenSink = Arc::new(move |t: &str| {
            kept.lock().push(t.to_owned());
            Flow::Continue
        });
        (sink, got)
    }

    fn run(s: &Simulated, p: &Prompt) -> (Vec<String>, Finish) {
        let (sink, got) = collector();
        let turn = s.stream(&ask(p), &AbortSignal::new(), &sink).unwrap();
        let got = got.lock().clone();
        (got, turn.end)
    }

    #[test]
    fn deterministic_and_prompt_dependent() {
        let s = sim(20, 0);
        let (a, end) = run(&s, &prompt("hello", 100));
        assert_eq!(end, Finish::Stop);
        assert_eq!(a.len(), 20);
        assert_eq!(a, run(&s, &prompt("hello", 100)).0);
        assert_ne!(a, run(&s, &prompt("hello!", 100)).0);
        assert!(a.concat().ends_with('.'));
    }

    #[test]
    fn token_bytes_pads_every_token_to_that_size() {
        let big = Simulated {
            token_bytes: 4096,
            ..sim(10, 0)
        };
        let (a, _) = run(&big, &prompt("hello", 100));
        assert_eq!(a.len(), 10);
        assert!(a.iter().all(|t| t.len() == 4096), "every token is padded");
        let (natural, _) = run(&sim(10, 0), &prompt("hello", 100));
        assert!(a[0].starts_with(natural[0].as_str()));
    }

    #[test]
    fn max_tokens_gives_length() {
        let (a, end) = run(&sim(20, 0), &prompt("x", 5));
        assert_eq!((a.len(), end), (5, Finish::Length));
    }

    #[test]
    fn no_max_tokens_gives_the_whole_answer() {
        let unbounded = Prompt {
            max_tokens: None,
            ..prompt("x", 5)
        };
        let (a, end) = run(&sim(20, 0), &unbounded);
        assert_eq!((a.len(), end), (20, Finish::Stop));
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
        let sink: TokenSink = Arc::new(|_: &str| Flow::Continue);
        let turn = s.stream(&ask(&prompt("x", 5000)), &abort, &sink).unwrap();
        assert_eq!(turn.end, Finish::Cancelled);
        assert!(started.elapsed() < Duration::from_secs(5));
        t.join().unwrap();
    }

    #[test]
    fn callback_can_stop() {
        let n = Arc::new(AtomicUsize::new(0));
        let counted = n.clone();
        let sink: TokenSink = Arc::new(move |_: &str| {
            if counted.fetch_add(1, Ordering::SeqCst) + 1 == 3 {
                Flow::Stop
            } else {
                Flow::Continue
            }
        });
        let turn = sim(10, 0)
            .stream(&ask(&prompt("x", 100)), &AbortSignal::new(), &sink)
            .unwrap();
        assert_eq!((n.load(Ordering::SeqCst), turn.end), (3, Finish::Cancelled));
    }

    #[test]
    fn a_tool_round_ends_with_the_calls_and_the_next_quotes_the_results() {
        let offered = [ToolSpec {
            name: "calculator",
            description: "",
            parameters: serde_json::json!({}),
        }];
        let s = sim(6, 0);
        let mut p = prompt("calculate 2+3*4", 100);
        let (sink, tokens) = collector();
        let first = s
            .stream(
                &Ask {
                    tools: &offered,
                    ..ask(&p)
                },
                &AbortSignal::new(),
                &sink,
            )
            .unwrap();
        assert!(tokens.lock().is_empty());
        assert_eq!(first.tool_calls.len(), 1);
        let call = first.tool_calls[0].clone();
        p.messages.push(PromptMessage {
            tool_calls: vec![call.clone()],
            ..PromptMessage::new("assistant", "")
        });
        p.messages.push(PromptMessage {
            tool_call_id: Some(call.id),
            ..PromptMessage::new("tool", "14")
        });
        let (answer, end) = run(&s, &p);
        assert_eq!(end, Finish::Stop);
        assert!(
            answer.concat().starts_with("calculator says: 14."),
            "{answer:?}"
        );
    }

    #[test]
    fn the_keyword_rules_pick_tools_and_their_arguments() {
        let offered: Vec<ToolSpec> = ["calculator", "clock", "search_history"]
            .iter()
            .map(|name| ToolSpec {
                name,
                description: "",
                parameters: serde_json::json!({}),
            })
            .collect();
        let picks = |m: &str| -> Vec<(String, String)> {
            choose_tools(m, &offered)
                .into_iter()
                .map(|c| (c.name, c.arguments))
                .collect()
        };
        assert_eq!(
            picks("calculate (2+3)*4 and what time is it?"),
            [
                ("calculator".into(), r#"{"expression":"(2+3)*4"}"#.into()),
                ("clock".into(), "{}".into())
            ]
        );
        assert_eq!(
            picks("Please compute sqrt(16) + 2."),
            [(
                "calculator".into(),
                r#"{"expression":"sqrt(16) + 2"}"#.into()
            )]
        );
        assert_eq!(
            picks("Search my history for pizza recipes?"),
            [(
                "search_history".into(),
                r#"{"query":"pizza recipes"}"#.into()
            )]
        );
        assert!(picks("calculate nothing at all").is_empty());
        assert!(picks("Hello there").is_empty());
        assert!(choose_tools("what time is it", &offered[..1]).is_empty());
    }
}
