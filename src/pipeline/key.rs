//! The identical-request key: two chats share a generation (and a cache
//! entry) exactly when the model would see the same input.
//!
//! Computed on the connection thread at accept, from the stored history's
//! digest rather than its text, so the cost does not grow with the
//! conversation.

use sha2::{Digest, Sha256};

use crate::cache::Key;

/// Everything the model would see, in normalised form.
#[derive(Debug, Clone, Copy)]
pub struct KeyInput<'a> {
    /// Model name after defaults.
    pub model: &'a str,
    /// Temperature, if given.
    pub temperature: Option<f64>,
    /// Top-p, if given.
    pub top_p: Option<f64>,
    /// Token limit after defaults.
    pub max_tokens: u32,
    /// The configured system prompt.
    pub system_prompt: &'a str,
    /// Digest of the conversation's stored history before this message.
    pub history_digest: &'a [u8; 32],
    /// The user's message (trimmed here).
    pub message: &'a str,
}

/// The key of `input`. Fields are length-prefixed and tagged so no two
/// different inputs can encode to the same bytes.
pub fn identical_request_key(input: &KeyInput<'_>) -> Key {
    let mut h = Sha256::new();
    h.update(b"chorus-key-v1\0");
    let mut text = |label: u8, s: &str| {
        h.update([label]);
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    text(b'm', input.model);
    text(b's', input.system_prompt);
    text(b'u', input.message.trim());
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
    h.update(input.max_tokens.to_le_bytes());
    h.update([b'h']);
    h.update(input.history_digest);
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
            max_tokens: 100,
            system_prompt: "sys",
            history_digest: &[0; 32],
            message: "hello",
        }
    }

    #[test]
    fn whitespace_around_the_message_does_not_matter() {
        let k = identical_request_key(&base());
        let spaced = KeyInput {
            message: "  hello\n",
            ..base()
        };
        assert_eq!(k, identical_request_key(&spaced));
    }

    #[test]
    fn every_field_matters() {
        let k = identical_request_key(&base());
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
                max_tokens: 101,
                ..base()
            },
            KeyInput {
                system_prompt: "other",
                ..base()
            },
            KeyInput {
                history_digest: &[1; 32],
                ..base()
            },
            KeyInput {
                message: "hello!",
                ..base()
            },
            // Moving text between fields must change the key too.
            KeyInput {
                model: "ms",
                system_prompt: "ys",
                ..base()
            },
        ];
        for v in variants {
            assert_ne!(k, identical_request_key(&v), "{v:?}");
        }
    }
}
