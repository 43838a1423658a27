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
            } => self.outbox.tokens_frame(&to.layout, source, *from, *until),
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
        self.outbox.queue_live_token(&to.layout, token)
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
