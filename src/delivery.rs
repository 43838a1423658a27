//! What the pipeline tells its clients, and the one seam every transport
//! plugs into.
//!
//! The pipeline speaks in [`Event`]s (accepted, state, start, token, tool,
//! done, error) to [`Attachment`]s, one per client of a request, and knows
//! nothing of WebSocket or SSE. A transport implements [`Client`] for one
//! of its connections: it turns each event into its own bytes, once per
//! event, and owns the connection's bounded outbound queue, the writing
//! straight through to an idle socket, and the decision that a client is
//! too slow ([`PushError::Full`]).
//!
//! Tokens go through the same seam without being encoded per subscriber:
//! the broadcaster escapes a token's text once ([`Token`]), and a transport
//! lays it out with bytes of its own made once per request
//! ([`TokenLayout`]): `head`, the `seq` in decimal, `mid`, the escaped
//! text, `tail`.
//!
//! Threads: events are sent from whichever thread moves a request on
//! (connection threads, pipeline workers, the history writer, the janitor);
//! tokens from the thread publishing a generation, or rayon's pool for a
//! big audience. Every [`Client`] method must return without blocking.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::broadcast::{Handed, Subscriber, Token, TokenSource};
use crate::protocol::{ErrorCode, Failure, Finish, Role, Stage, Timings, Usage};

/// Something that happened to a request, as its clients are told.
#[derive(Clone)]
pub enum Event<'a> {
    /// The chat was admitted and its question stored.
    Accepted {
        /// The client's id for the chat.
        id: &'a str,
        /// The conversation it belongs to.
        conversation: &'a str,
    },
    /// The request moved to another stage.
    State {
        /// The stage it is in now.
        stage: Stage,
        /// Its place in the queue, when queued.
        position: Option<usize>,
    },
    /// The answer begins; `role` says where it comes from.
    Start {
        /// Leader, follower or cache.
        role: Role,
    },
    /// Tokens `from..to` of the answer, kept by `source`: the replay of an
    /// ended request, a cached answer.
    Tokens {
        /// Where the tokens are kept.
        source: Arc<dyn TokenSource>,
        /// First `seq` to send.
        from: u64,
        /// One past the last `seq` to send.
        to: u64,
    },
    /// A tool call, a piece of its output, or its result.
    Tool {
        /// The tool's name.
        name: &'a str,
        /// `call`, `output` or `result`.
        phase: &'a str,
        /// The arguments, the output or the result.
        text: &'a str,
    },
    /// The answer ended.
    Done {
        /// How it ended.
        finish: Finish,
        /// Tokens in the answer.
        tokens: u64,
        /// Where it came from.
        role: Role,
        /// Where the time went.
        timings: Timings,
        /// What the generation cost upstream, as reported, whatever the
        /// role (a cache hit: the generation that made the answer).
        usage: Option<Usage>,
    },
    /// The request failed after it was accepted.
    Error {
        /// The client's id for the chat, if it gave one.
        id: Option<&'a str>,
        /// What went wrong.
        failure: &'a Failure,
    },
    /// The chat was refused or ended before `accepted` went out: the client
    /// knows it by its own id only.
    Refused {
        /// The client's id for the chat.
        id: &'a str,
        /// Why.
        failure: &'a Failure,
    },
}

impl std::fmt::Debug for Event<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Accepted { .. } => f.write_str("Accepted"),
            Event::State { stage, .. } => write!(f, "State({stage:?})"),
            Event::Start { role } => write!(f, "Start({})", role.as_str()),
            Event::Tokens { from, to, .. } => write!(f, "Tokens({from}..{to})"),
            Event::Tool { name, phase, .. } => write!(f, "Tool({name}, {phase})"),
            Event::Done { finish, .. } => write!(f, "Done({finish:?})"),
            Event::Error { failure, .. } => write!(f, "Error({})", failure.code),
            Event::Refused { failure, .. } => write!(f, "Refused({})", failure.code),
        }
    }
}

/// Why a client did not take what it was handed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PushError {
    /// Its bound is reached: the client does not read fast enough.
    Full,
    /// The connection is gone; nothing will ever read it.
    Closed,
}

/// The bytes a transport writes around each token of one request:
/// `head`, the token's `seq` in decimal, `mid`, the token's escaped text,
/// `tail`. Made once per request, shared by all its tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenLayout {
    /// Before the `seq`.
    pub head: Box<[u8]>,
    /// Between the `seq` and the text.
    pub mid: Box<[u8]>,
    /// After the text.
    pub tail: Box<[u8]>,
}

impl TokenLayout {
    /// Calls `f` with the pieces of `token` laid out, in order.
    ///
    /// ```
    /// use chorus::broadcast::Token;
    /// use chorus::delivery::TokenLayout;
    /// let layout = TokenLayout {
    ///     head: b"<".as_slice().into(),
    ///     mid: b":".as_slice().into(),
    ///     tail: b">".as_slice().into(),
    /// };
    /// let mut out = Vec::new();
    /// layout.with_parts(&Token::new(12, "hi"), |parts| out = parts.concat());
    /// assert_eq!(out, b"<12:\"hi\">");
    /// ```
    pub fn with_parts<R>(&self, token: &Token, f: impl FnOnce(&[&[u8]]) -> R) -> R {
        let mut digits = [0u8; 20];
        let seq = decimal(token.seq, &mut digits);
        f(&[
            &self.head,
            seq,
            &self.mid,
            token.json.as_bytes(),
            &self.tail,
        ])
    }

    /// Bytes `token` takes when laid out.
    pub fn len(&self, token: &Token) -> usize {
        let mut digits = [0u8; 20];
        self.head.len()
            + decimal(token.seq, &mut digits).len()
            + self.mid.len()
            + token.json.len()
            + self.tail.len()
    }
}

/// `n` in decimal, written into the end of `buf`.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// One client connection as the pipeline sees it: a WebSocket, an HTTP
/// response. Implemented by each transport; no method may block.
pub trait Client: Send + Sync + 'static {
    /// The layout of `request`'s tokens on this connection.
    fn token_layout(&self, request: &str) -> TokenLayout;

    /// Sends `events` for `to`'s request, in order and after everything
    /// sent before (in one write when the connection is idle). Never
    /// refused for size: the end of a request must not be lost. The
    /// source of an [`Event::Tokens`] may be read at once (it is never
    /// sent under its own lock).
    fn send(&self, to: &Attachment, events: &[Event<'_>]) -> Result<(), PushError>;

    /// Like [`Client::send`], but the events may wait for the next write to
    /// carry them (`accepted` and the first `state`, which a cached answer
    /// usually follows within microseconds). They never wait longer than
    /// the next [`Client::release_deferred`].
    fn send_deferred(&self, to: &Attachment, events: &[Event<'_>]);

    /// Writes out events left waiting by [`Client::send_deferred`].
    fn release_deferred(&self);

    /// Hands over one live token; `Ok(true)` when the connection sleeps and
    /// must get [`Client::wake`]. [`PushError::Full`] when the client is too
    /// slow to take it.
    fn token(&self, to: &Attachment, token: &Token) -> Result<bool, PushError>;

    /// Hands over tokens `from..until` of `source` as one item, read as the
    /// connection can take them. Called under the stream's lock: queue it,
    /// do not read `source` here.
    fn replay(
        &self,
        to: &Attachment,
        source: Arc<dyn TokenSource>,
        from: u64,
        until: u64,
    ) -> Result<(), PushError>;

    /// Wakes the connection after [`Client::token`] said so.
    fn wake(&self);

    /// True once the connection is gone.
    fn is_closed(&self) -> bool;
}

/// True when `a` and `b` are the same connection.
pub fn same_client(a: &Arc<dyn Client>, b: &Arc<dyn Client>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

/// One client connection attached to one request.
pub struct Attachment {
    /// The connection.
    pub client: Arc<dyn Client>,
    /// The request it receives.
    pub request: Arc<str>,
    /// How the connection lays out this request's tokens.
    pub layout: Arc<TokenLayout>,
    /// Set once when the attachment was cut off as a slow consumer.
    cut: AtomicBool,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("request", &self.request)
            .field("cut", &self.is_cut())
            .finish()
    }
}

impl Attachment {
    /// An attachment of `client` to `request`.
    pub fn new(client: &Arc<dyn Client>, request: &str) -> Arc<Attachment> {
        Arc::new(Attachment {
            layout: Arc::new(client.token_layout(request)),
            client: client.clone(),
            request: request.into(),
            cut: AtomicBool::new(false),
        })
    }

    /// True when this attachment can still receive events: neither cut off
    /// nor on a closed connection.
    pub fn is_live(&self) -> bool {
        !self.cut.load(Ordering::Acquire) && !self.client.is_closed()
    }

    /// True when it was cut off as a slow consumer (and already told so).
    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }

    /// True when this is an attachment of `client`.
    pub fn is_of(&self, client: &Arc<dyn Client>) -> bool {
        same_client(&self.client, client)
    }

    /// Sends `events` (see [`Client::send`]); a closed connection is not an
    /// error worth reporting, the request goes on for its other clients.
    pub fn send(&self, events: &[Event<'_>]) {
        let _ = self.client.send(self, events);
    }

    /// Sends `events` that may ride along with the next write.
    pub fn send_deferred(&self, events: &[Event<'_>]) {
        self.client.send_deferred(self, events);
    }

    /// Tells the client once that it was too slow; it gets no more tokens.
    fn cut_off(&self) {
        if !self.cut.swap(true, Ordering::AcqRel) {
            let failure = Failure::new(
                ErrorCode::SlowConsumer,
                "the connection did not read its tokens fast enough; resume to continue",
            );
            self.send(&[Event::Error {
                id: None,
                failure: &failure,
            }]);
        }
    }
}

impl Subscriber for Attachment {
    fn token(&self, token: &Token) -> Handed {
        if self.is_cut() {
            return Handed::Dropped;
        }
        match self.client.token(self, token) {
            Ok(false) => Handed::Kept,
            Ok(true) => Handed::Wake,
            Err(PushError::Full) => {
                self.cut_off();
                Handed::Dropped
            }
            Err(PushError::Closed) => Handed::Dropped,
        }
    }

    fn replay(&self, source: Arc<dyn TokenSource>, from: u64, to: u64) -> bool {
        match self.client.replay(self, source, from, to) {
            Ok(()) => true,
            Err(PushError::Full) => {
                self.cut_off();
                false
            }
            Err(PushError::Closed) => false,
        }
    }

    fn wake(&self) {
        self.client.wake();
    }

    fn is_live(&self) -> bool {
        Attachment::is_live(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_writes_every_width() {
        let mut buf = [0u8; 20];
        for n in [0, 7, 10, 99, 12345, u64::MAX] {
            assert_eq!(decimal(n, &mut buf), n.to_string().as_bytes());
        }
    }

    #[test]
    fn layout_length_matches_the_parts() {
        let layout = TokenLayout {
            head: b"{\"seq\":".as_slice().into(),
            mid: b",\"text\":".as_slice().into(),
            tail: b"}".as_slice().into(),
        };
        let token = Token::new(4096, "a \"b\"");
        let bytes = layout.with_parts(&token, |p| p.concat());
        assert_eq!(bytes.len(), layout.len(&token));
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["seq"], 4096);
        assert_eq!(v["text"], "a \"b\"");
    }
}
