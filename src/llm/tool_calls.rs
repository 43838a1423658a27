//! Assembles the tool calls a model streams in pieces.
//!
//! OpenAI's streaming format sends a call as deltas keyed by `index`: the
//! first delta of a call carries its `id` and `function.name`, later ones
//! pieces of `function.arguments` to be concatenated; several calls of one
//! message may interleave. The upstream is not trusted to do this well, so
//! everything a malformed or hostile stream can do ends as a call with a
//! [`ToolCall::refused`] reason (which the model gets back as an error
//! result) instead of a failed request, and everything it can make this
//! module hold has a byte bound:
//!
//! - arguments longer than [`CallLimits::max_argument_bytes`] stop growing
//!   and are refused;
//! - calls beyond [`CallLimits::max_calls`] in one round are refused, and
//!   beyond twice that many they are not even recorded;
//! - a new `index` that jumps over the next expected one, or a second call
//!   (a new `id`) at an index already used, is refused;
//! - a name is cut at [`MAX_NAME_BYTES`] (and then names no tool).
//!
//! Threads: owned by the streaming worker that reads the round.

use super::ToolCall;

/// Longest tool name kept; no real tool name comes close.
pub const MAX_NAME_BYTES: usize = 64;

/// Bounds on the calls of one round (`[tools] max_calls`,
/// `max_argument_bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallLimits {
    /// Most calls run in one round.
    pub max_calls: usize,
    /// Longest arguments of one call, in bytes.
    pub max_argument_bytes: usize,
}

impl Default for CallLimits {
    fn default() -> Self {
        CallLimits {
            max_calls: 8,
            max_argument_bytes: 16 * 1024,
        }
    }
}

/// One call being assembled.
#[derive(Debug)]
struct Pending {
    /// The upstream's `index`, or the position for deltas without one.
    index: u64,
    call: ToolCall,
    /// Its arguments outgrew the limit: nothing more is kept of them.
    overflowed: bool,
}

/// Collects the tool-call deltas of one streamed message.
///
/// ```
/// use chorus::llm::{CallAssembler, CallLimits};
/// let mut calls = CallAssembler::new(CallLimits::default());
/// calls.push(Some(0), Some("call_a"), Some("calculator"), Some("{\"expr"));
/// calls.push(Some(1), Some("call_b"), Some("clock"), Some(""));
/// calls.push(Some(0), None, None, Some("ession\": \"1+1\"}"));
/// let calls = calls.finish();
/// assert_eq!(calls.len(), 2);
/// assert_eq!(calls[0].arguments, r#"{"expression": "1+1"}"#);
/// assert_eq!(calls[1].name, "clock");
/// assert!(calls.iter().all(|c| c.refused.is_none()));
/// ```
#[derive(Debug)]
pub struct CallAssembler {
    limits: CallLimits,
    calls: Vec<Pending>,
    /// The next index a new call is expected at.
    next_index: u64,
    /// Calls seen past the recording bound, for the log.
    dropped: usize,
}

impl CallAssembler {
    /// An assembler for one message.
    pub fn new(limits: CallLimits) -> CallAssembler {
        CallAssembler {
            limits,
            calls: Vec::new(),
            next_index: 0,
            dropped: 0,
        }
    }

    /// True when no call has been seen.
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty() && self.dropped == 0
    }

    /// Takes one delta: its `index`, and the `id`, `function.name` and
    /// `function.arguments` it carries, each when present.
    pub fn push(
        &mut self,
        index: Option<u64>,
        id: Option<&str>,
        name: Option<&str>,
        arguments: Option<&str>,
    ) {
        let id = id.filter(|id| !id.is_empty());
        let slot = match index {
            Some(index) => self.calls.iter().rposition(|p| p.index == index),
            // No index (some servers send whole calls without one): a new
            // id starts a call, anything else continues the last one.
            None => match (self.calls.last(), id) {
                (Some(last), Some(id)) if last.call.id != id => None,
                (Some(_), _) => Some(self.calls.len() - 1),
                (None, _) => None,
            },
        };
        let slot = match slot {
            Some(slot)
                if id.is_none_or(|id| {
                    let known = &self.calls[slot].call.id;
                    known == id || known.is_empty()
                }) =>
            {
                slot
            }
            // A new id at a used index is a second call, not a continuation.
            Some(_) => match self.start(index, id, true) {
                Some(slot) => slot,
                None => return,
            },
            None => match self.start(index, id, false) {
                Some(slot) => slot,
                None => return,
            },
        };
        let limits = self.limits;
        let Pending {
            call, overflowed, ..
        } = &mut self.calls[slot];
        if let Some(id) = id {
            if call.id.is_empty() {
                call.id = id.to_owned();
            }
        }
        if let Some(name) = name {
            let room = MAX_NAME_BYTES.saturating_sub(call.name.len());
            call.name.push_str(prefix(name, room));
        }
        match arguments {
            Some(_) if *overflowed => {}
            Some(piece) if call.arguments.len() + piece.len() > limits.max_argument_bytes => {
                *overflowed = true;
                call.refused = Some(format!(
                    "the arguments are longer than {} bytes",
                    limits.max_argument_bytes
                ));
                call.arguments = String::new();
            }
            Some(piece) => call.arguments.push_str(piece),
            None => {}
        }
    }

    /// Records a new call; `None` when past the recording bound.
    fn start(&mut self, index: Option<u64>, id: Option<&str>, repeats: bool) -> Option<usize> {
        if self.calls.len() >= self.limits.max_calls.saturating_mul(2).max(1) {
            self.dropped += 1;
            return None;
        }
        let index = index.unwrap_or(self.next_index);
        let refused = if repeats {
            Some(format!("the call repeats index {index} of an earlier call"))
        } else if index != self.next_index {
            Some(format!(
                "the call's index {index} skips index {}",
                self.next_index
            ))
        } else if self.calls.len() >= self.limits.max_calls {
            Some(format!(
                "too many tool calls in one round (at most {})",
                self.limits.max_calls
            ))
        } else {
            None
        };
        if !repeats {
            self.next_index = self.next_index.max(index.saturating_add(1));
        }
        self.calls.push(Pending {
            overflowed: false,
            index,
            call: ToolCall {
                id: id.map(str::to_owned).unwrap_or_default(),
                name: String::new(),
                arguments: String::new(),
                refused,
            },
        });
        Some(self.calls.len() - 1)
    }

    /// The calls in the order they started, each with an id (made up
    /// where the upstream sent none, unique within the message).
    pub fn finish(self) -> Vec<ToolCall> {
        if self.dropped > 0 {
            log::warn!(
                "the model made {} tool calls beyond any limit in one message; ignored",
                self.dropped
            );
        }
        let mut calls: Vec<ToolCall> = self.calls.into_iter().map(|p| p.call).collect();
        for i in 0..calls.len() {
            let taken = |calls: &[ToolCall], id: &str| {
                id.is_empty() || calls[..i].iter().any(|c| c.id == id)
            };
            if taken(&calls, &calls[i].id) {
                // A made-up id may not be one the upstream sent for another
                // call either (the results are matched to calls by id).
                let mut n = i;
                let mut id = format!("call_chorus_{n}");
                while taken(&calls, &id) || calls[i + 1..].iter().any(|c| c.id == id) {
                    n += calls.len();
                    id = format!("call_chorus_{n}");
                }
                calls[i].id = id;
            }
        }
        calls
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
fn prefix(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One delta: index, id, name, arguments.
    type Delta<'a> = (
        Option<u64>,
        Option<&'a str>,
        Option<&'a str>,
        Option<&'a str>,
    );
    /// A delta of the property test: id, name, arguments (the index is the queue's).
    type Piece<'a> = (Option<&'a str>, Option<&'a str>, String);

    fn assemble(deltas: &[Delta<'_>]) -> Vec<ToolCall> {
        assemble_with(CallLimits::default(), deltas)
    }

    fn assemble_with(limits: CallLimits, deltas: &[Delta<'_>]) -> Vec<ToolCall> {
        let mut a = CallAssembler::new(limits);
        for (index, id, name, args) in deltas {
            a.push(*index, *id, *name, *args);
        }
        a.finish()
    }

    #[test]
    fn made_up_ids_never_take_an_id_the_upstream_sent() {
        let calls = assemble(&[
            (Some(0), Some("call_chorus_1"), Some("clock"), Some("{}")),
            (Some(1), None, Some("clock"), Some("{}")),
            (Some(2), Some("call_chorus_1"), Some("clock"), Some("{}")),
        ]);
        let ids: Vec<&str> = calls.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids.len(), 3);
        assert!(
            ids.iter()
                .all(|id| ids.iter().filter(|i| *i == id).count() == 1),
            "{ids:?}"
        );
        assert_eq!(ids[0], "call_chorus_1");
    }

    #[test]
    fn a_jump_or_a_repeat_of_an_index_is_refused() {
        let calls = assemble(&[
            (Some(0), Some("a"), Some("calculator"), Some("{}")),
            (Some(5), Some("b"), Some("clock"), Some("{}")),
            (Some(0), Some("c"), Some("clock"), Some("{}")),
            (Some(0), None, None, Some(" ")),
        ]);
        assert_eq!(calls.len(), 3);
        assert!(calls[0].refused.is_none());
        assert!(calls[1].refused.as_deref().unwrap().contains("skips"));
        let repeat = calls[2].refused.as_deref().unwrap();
        assert!(repeat.contains("repeats index 0"), "{repeat}");
        // The continuation went to the latest call at that index.
        assert_eq!(calls[2].arguments, "{} ");
        assert_eq!(calls[0].arguments, "{}");
    }

    #[test]
    fn oversized_arguments_are_refused_and_not_kept() {
        let limits = CallLimits {
            max_calls: 8,
            max_argument_bytes: 10,
        };
        let calls = assemble_with(
            limits,
            &[
                (Some(0), Some("a"), Some("calculator"), Some("{\"x\":")),
                (Some(0), None, None, Some("\"0123456789\"}")),
                (Some(0), None, None, Some("more")),
            ],
        );
        assert!(calls[0].refused.as_deref().unwrap().contains("10 bytes"));
        assert!(calls[0].arguments.is_empty());
    }

    #[test]
    fn calls_past_the_limit_are_refused_and_past_twice_the_limit_dropped() {
        let limits = CallLimits {
            max_calls: 2,
            max_argument_bytes: 100,
        };
        let deltas: Vec<_> = (0..10u64)
            .map(|i| (Some(i), None, Some("clock"), Some("{}")))
            .collect();
        let calls = assemble_with(limits, &deltas);
        assert_eq!(calls.len(), 4);
        assert!(calls[..2].iter().all(|c| c.refused.is_none()));
        assert!(calls[2..]
            .iter()
            .all(|c| c.refused.as_deref().unwrap().contains("at most 2")));
    }

    #[test]
    fn missing_ids_and_indexes_are_filled_in() {
        let calls = assemble(&[
            (None, None, Some("calc"), Some("{\"a\"")),
            (None, None, Some("ulator"), Some(":1}")),
            (None, Some("x"), Some("clock"), None),
            (None, Some("x"), None, Some("{}")),
        ]);
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].name, "calculator");
        assert_eq!(calls[0].arguments, "{\"a\":1}");
        assert_eq!(calls[0].id, "call_chorus_0");
        assert_eq!(
            (calls[1].id.as_str(), calls[1].arguments.as_str()),
            ("x", "{}")
        );
        assert!(calls.iter().all(|c| c.refused.is_none()));
    }

    #[test]
    fn long_names_are_cut_on_a_character_boundary() {
        let name = "é".repeat(100);
        let calls = assemble(&[(Some(0), Some("a"), Some(&name), None)]);
        assert!(calls[0].name.len() <= MAX_NAME_BYTES);
        assert!(calls[0].name.chars().all(|c| c == 'é'));
    }

    /// xorshift64*: deterministic, so a failing seed can be replayed.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Any split of any set of calls into pieces, interleaved across calls
    /// in any order that keeps each call's own pieces in order, assembles
    /// back to exactly those calls.
    #[test]
    fn property_any_split_and_interleaving_gives_the_same_calls() {
        const ALPHABET: &[char] = &['{', '}', '"', ':', 'a', '1', ' ', 'é', '\\', '€'];
        for seed in 1..=500u64 {
            let mut rng = XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let count = 1 + rng.below(5);
            let expected: Vec<ToolCall> = (0..count)
                .map(|i| ToolCall {
                    id: format!("call_{seed}_{i}"),
                    name: ["calculator", "clock", "search_history"][rng.below(3)].to_owned(),
                    arguments: (0..rng.below(40))
                        .map(|_| ALPHABET[rng.below(ALPHABET.len())])
                        .collect(),
                    refused: None,
                })
                .collect();
            // Each call's deltas: the head (id and name, maybe some
            // arguments), then the rest of the arguments cut at random
            // character boundaries.
            let mut queues: Vec<Vec<Piece<'_>>> = expected
                .iter()
                .map(|call| {
                    let chars: Vec<char> = call.arguments.chars().collect();
                    let mut pieces = Vec::new();
                    let mut at = 0;
                    let head = rng.below(chars.len() + 1);
                    pieces.push((
                        Some(call.id.as_str()),
                        Some(call.name.as_str()),
                        chars[..head].iter().collect::<String>(),
                    ));
                    at += head;
                    while at < chars.len() {
                        let n = 1 + rng.below(chars.len() - at);
                        pieces.push((None, None, chars[at..at + n].iter().collect()));
                        at += n;
                    }
                    pieces.reverse();
                    pieces
                })
                .collect();
            let mut assembler = CallAssembler::new(CallLimits::default());
            // Calls start in index order; after that, pieces interleave.
            let mut started = 0;
            loop {
                let open: Vec<usize> = (0..queues.len())
                    .filter(|&i| !queues[i].is_empty() && i <= started)
                    .collect();
                if open.is_empty() {
                    break;
                }
                let i = open[rng.below(open.len())];
                if i == started {
                    started += 1;
                }
                let Some((id, name, args)) = queues[i].pop() else {
                    continue;
                };
                assembler.push(Some(i as u64), id, name, Some(&args));
            }
            assert_eq!(assembler.finish(), expected, "seed {seed}");
        }
    }
}
