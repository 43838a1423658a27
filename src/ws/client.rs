//! A WebSocket connection as the pipeline's [`Client`]: events become the
//! protocol's JSON messages, tokens are laid out as token frames, and all of
//! it goes through the connection's bounded [`Outbox`], framed as WebSocket
//! text frames.
//!
//! Threads: called by whichever thread sends to the connection (pipeline
//! workers, the history writer, the janitor, rayon's pool during a big
//! fan-out, the connection's own thread); the outbox's consumer is the
//! connection thread.

use std::sync::Arc;

use super::{encode, frame};
use crate::broadcast::{Token, TokenSource};
use crate::delivery::{Attachment, Client, Event, PushError, TokenLayout};
use crate::outbox::{Frame, Outbox, Replay};

/// A range of tokens with at most this many bytes of text is laid out
/// when it is sent, so a small cached answer reaches the socket in one
/// write with its `start` and `done`; a bigger one is replayed from where
/// it is kept as the socket takes it: no copy per client, and nothing held
/// for a client that does not read.
const INLINE_TOKEN_BYTES: usize = 64 * 1024;
/// Ranges longer than this are replayed without looking at their size.
const INLINE_MAX_TOKENS: u64 = 4096;

/// An outbox for a WebSocket connection: frames are WebSocket text frames.
pub fn outbox(frames: usize, bytes: usize) -> std::io::Result<Outbox> {
    Ok(Outbox::bounded(frames, bytes)?.framed(frame::encode_text))
}

/// The pipeline's handle on one WebSocket connection.
#[derive(Debug)]
pub struct WsClient {
    outbox: Arc<Outbox>,
}

impl WsClient {
    /// The client writing into `outbox` (made by [`outbox`]).
    pub fn new(outbox: Arc<Outbox>) -> Arc<WsClient> {
        Arc::new(WsClient { outbox })
    }

    /// The frame that sends tokens `from..until` of `source`: laid out now
    /// when small, else a replay.
    fn tokens(
        &self,
        layout: &Arc<TokenLayout>,
        source: &Arc<dyn TokenSource>,
        from: u64,
        until: u64,
    ) -> Option<Frame> {
        if from >= until {
            return None;
        }
        if until - from <= INLINE_MAX_TOKENS {
            let mut tokens = Vec::new();
            source.tokens(from, until, &mut tokens);
            let text: usize = tokens.iter().map(Token::json_len).sum();
            if text <= INLINE_TOKEN_BYTES {
                let framing = self.outbox.framing();
                let mut bytes = Vec::with_capacity(text + tokens.len() * (layout.head.len() + 24));
                for token in &tokens {
                    layout.with_parts(token, |parts| framing(&mut bytes, parts));
                }
                return Some(Frame::Encoded(bytes));
            }
        }
        Some(Frame::Replay(Replay {
            source: source.clone(),
            layout: layout.clone(),
            from,
            to: until,
        }))
    }
}

impl Client for WsClient {
    fn token_layout(&self, request: &str) -> TokenLayout {
        encode::token_layout(request)
    }

    fn send(&self, to: &Attachment, events: &[Event<'_>]) -> Result<(), PushError> {
        let frames = events.iter().filter_map(|event| match event {
            Event::Tokens {
                source,
                from,
                to: until,
            } => self.tokens(&to.layout, source, *from, *until),
            event => encode::event(&to.request, event).map(Frame::Message),
        });
        self.outbox.push_all(frames)
    }

    fn send_deferred(&self, to: &Attachment, events: &[Event<'_>]) {
        self.outbox
            .push_deferred(events.iter().filter_map(|e| encode::event(&to.request, e)));
    }

    fn release_deferred(&self) {
        self.outbox.release_deferred();
    }

    fn token(&self, to: &Attachment, token: &Token) -> Result<bool, PushError> {
        self.outbox.queue_token(Frame::Token {
            layout: to.layout.clone(),
            token: token.clone(),
        })
    }

    fn replay(
        &self,
        to: &Attachment,
        source: Arc<dyn TokenSource>,
        from: u64,
        until: u64,
    ) -> Result<(), PushError> {
        self.outbox.push_token(Frame::Replay(Replay {
            source,
            layout: to.layout.clone(),
            from,
            to: until,
        }))
    }

    fn wake(&self) {
        self.outbox.wake();
    }

    fn is_closed(&self) -> bool {
        self.outbox.is_closed()
    }
}
