//! The identical-request key: two requests share a generation (and a cache
//! entry) exactly when the model would be asked the same thing, whichever
//! transport they came by.
//!
//! A WebSocket chat is keyed at accept, on its connection thread, from its
//! conversation's stored history *digest* rather than its text, so the cost
//! does not grow with the conversation ([`Input::Turn`]). An HTTP request
//! brings its whole message list; when that list has the shape a chat's
//! upstream input has (an optional non-empty system message, user and
//! assistant messages, a last user message), it is keyed as that turn
//! ([`turn_of`]), so the two transports share; any other list is keyed as
//! a list ([`Input::List`]).

use sha2::{Digest, Sha256};

use crate::history::{self, chain_digest};
use crate::llm::PromptMessage;
use crate::request_key::Key;

/// What the model would be sent, in normalised form.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// A chat turn: the system prompt (empty: none), the stored history
    /// before the message (as its digest), and the user's message.
    Turn {
        /// The system prompt; empty when no system message is sent.
        system_prompt: &'a str,
        /// [`history::chain_digest`] over the messages before this one.
        history_digest: &'a [u8; 32],
        /// The user's message.
        message: &'a str,
    },
    /// Any other message list, as its digest (`list_digest`).
    List(&'a [u8; 32]),
}

/// Everything the model would see, in normalised form.
#[derive(Debug, Clone, Copy)]
pub struct KeyInput<'a> {
    /// Model name after defaults.
    pub model: &'a str,
    /// Temperature, if sent.
    pub temperature: Option<f64>,
    /// Top-p, if sent.
    pub top_p: Option<f64>,
    /// Token limit, if sent (a chat always sends one, after defaults).
    pub max_tokens: Option<u32>,
    /// Stop sequences sent.
    pub stop: &'a [String],
    /// Sampling seed, if sent.
    pub seed: Option<i64>,
    /// The messages.
    pub input: Input<'a>,
}

/// The key of `input`. Fields are length-prefixed and tagged so no two
/// different inputs can encode to the same bytes.
pub fn identical_request_key(input: &KeyInput<'_>) -> Key {
    let mut h = Sha256::new();
    h.update(b"chorus-key-v2\0");
    let mut text = |label: u8, s: &str| {
        h.update([label]);
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    text(b'm', input.model);
    for stop in input.stop {
        text(b'x', stop);
    }
    match input.input {
        Input::Turn {
            system_prompt,
            message,
            ..
        } => {
            text(b's', system_prompt);
            text(b'u', message);
        }
        Input::List(_) => {}
    }
    let mut number = |label: u8, v: Option<f64>| {
        h.update([label]);
        match v {
            // -0.0 and 0.0 ask the model the same thing.
            Some(v) => {
                h.update([1]);
                h.update((v + 0.0).to_bits().to_le_bytes());
            }
            None => h.update([0]),
        }
    };
    number(b't', input.temperature);
    number(b'p', input.top_p);
    h.update([b'n']);
    match input.max_tokens {
        Some(n) => {
            h.update([1]);
            h.update(n.to_le_bytes());
        }
        None => h.update([0]),
    }
    h.update([b'r']);
    match input.seed {
        Some(n) => {
            h.update([1]);
            h.update(n.to_le_bytes());
        }
        None => h.update([0]),
    }
    match input.input {
        Input::Turn { history_digest, .. } => {
            h.update([b'h']);
            h.update(history_digest);
        }
        Input::List(digest) => {
            h.update([b'l']);
            h.update(digest);
        }
    }
    h.finalize().into()
}

/// A message list as a chat turn, when it has that shape: an optional
/// first system message with non-empty text, then user and assistant
/// messages with text only, the last one a user message whose text has no
/// surrounding whitespace (a chat's message is trimmed before it is sent).
/// Returns the system prompt, the digest of the messages between, and the
/// last message.
pub fn turn_of(messages: &[PromptMessage]) -> Option<(&str, [u8; 32], &str)> {
    let (last, rest) = messages.split_last()?;
    if last.role != "user" || !plain(last) || last.content.trim() != last.content {
        return None;
    }
    let (system, between) = match rest.split_first() {
        Some((first, between)) if first.role == "system" => {
            if first.content.is_empty() || !plain(first) {
                return None;
            }
            (first.content.as_str(), between)
        }
        _ => ("", rest),
    };
    let mut digest = [0u8; 32];
    for m in between {
        let role = match m.role {
            "user" => history::Role::User,
            "assistant" => history::Role::Assistant,
            _ => return None,
        };
        if !plain(m) {
            return None;
        }
        digest = chain_digest(&digest, role, &m.content);
    }
    Some((system, digest, &last.content))
}

/// True for a message with text only (no tool calls, no tool call id).
fn plain(m: &PromptMessage) -> bool {
    m.tool_calls.is_empty() && m.tool_call_id.is_none()
}

/// A digest of any message list: every role, text, tool call and tool call
/// id, length-prefixed.
pub fn list_digest(messages: &[PromptMessage]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"chorus-messages-v1\0");
    let mut text = |label: u8, s: &str| {
        h.update([label]);
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    for m in messages {
        text(b'R', m.role);
        text(b'C', &m.content);
        if let Some(id) = &m.tool_call_id {
            text(b'I', id);
        }
        for call in &m.tool_calls {
            text(b'i', &call.id);
            text(b'n', &call.name);
            text(b'a', &call.arguments);
        }
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> KeyInput<'static> {
        KeyInput {
            model: "m",
            temperature: None,
            top_p: None,
            max_tokens: Some(100),
            stop: &[],
            seed: None,
            input: Input::Turn {
                system_prompt: "sys",
                history_digest: &[0; 32],
                message: "hello",
            },
        }
    }

    #[test]
    fn every_field_matters() {
        let k = identical_request_key(&base());
        let stop = ["\n".to_owned()];
        let variants = [
            KeyInput {
                model: "n",
                ..base()
            },
            KeyInput {
                temperature: Some(0.0),
                ..base()
            },
            KeyInput {
                top_p: Some(1.0),
                ..base()
            },
            KeyInput {
                max_tokens: Some(101),
                ..base()
            },
            KeyInput {
                max_tokens: None,
                ..base()
            },
            KeyInput {
                stop: &stop,
                ..base()
            },
            KeyInput {
                seed: Some(0),
                ..base()
            },
            KeyInput {
                input: Input::Turn {
                    system_prompt: "other",
                    history_digest: &[0; 32],
                    message: "hello",
                },
                ..base()
            },
            KeyInput {
                input: Input::Turn {
                    system_prompt: "sys",
                    history_digest: &[1; 32],
                    message: "hello",
                },
                ..base()
            },
            KeyInput {
                input: Input::Turn {
                    system_prompt: "sys",
                    history_digest: &[0; 32],
                    message: "hello!",
                },
                ..base()
            },
            KeyInput {
                input: Input::List(&[0; 32]),
                ..base()
            },
            // Moving text between fields must change the key too.
            KeyInput {
                model: "ms",
                input: Input::Turn {
                    system_prompt: "ys",
                    history_digest: &[0; 32],
                    message: "hello",
                },
                ..base()
            },
        ];
        for v in variants {
            assert_ne!(k, identical_request_key(&v), "{v:?}");
        }
    }

    fn msg(role: &'static str, content: &str) -> PromptMessage {
        PromptMessage::new(role, content)
    }

    #[test]
    fn a_chat_shaped_list_is_the_turn_a_chat_would_be() {
        let messages = [
            msg("system", "be brief"),
            msg("user", "hi"),
            msg("assistant", "hello"),
            msg("user", "how are you?"),
        ];
        let (system, digest, message) = turn_of(&messages).unwrap();
        assert_eq!((system, message), ("be brief", "how are you?"));
        // The digest the history keeps for those two stored messages.
        let stored = chain_digest(&[0; 32], history::Role::User, "hi");
        let stored = chain_digest(&stored, history::Role::Assistant, "hello");
        assert_eq!(digest, stored);
        // Without a system message: the chat of a server with no system prompt.
        let (system, digest, _) = turn_of(&messages[1..]).unwrap();
        assert_eq!((system, digest), ("", stored));
    }

    #[test]
    fn other_lists_are_not_turns() {
        let with_tool_call_id = PromptMessage {
            tool_call_id: Some("c1".into()),
            ..msg("tool", "12")
        };
        for list in [
            vec![],
            vec![msg("user", "hi"), msg("assistant", "hello")],
            vec![msg("system", ""), msg("user", "hi")],
            vec![msg("user", " hi ")],
            vec![msg("system", "a"), msg("system", "b"), msg("user", "hi")],
            vec![msg("user", "hi"), with_tool_call_id, msg("user", "and?")],
        ] {
            assert!(turn_of(&list).is_none(), "{list:?}");
        }
    }

    #[test]
    fn list_digests_tell_roles_and_boundaries_apart() {
        let a = list_digest(&[msg("user", "ab"), msg("user", "c")]);
        let b = list_digest(&[msg("user", "a"), msg("user", "bc")]);
        let c = list_digest(&[msg("assistant", "ab"), msg("user", "c")]);
        assert_ne!(a, b);
        assert_ne!(a, c);
    }
}
