//! Live fan-out of one generation's tokens to every attached client, with the
//! token history kept for late joiners and for `resume`.
//!
//! Threads: one producer — the streaming worker running the generation —
//! calls [`Broadcast::publish`]; any thread may [`Broadcast::subscribe`]
//! (follower pool, connection threads resuming, the history writer replaying
//! a finished request) or detach. Everything happens under one mutex per
//! generation, because appending a token to the history and handing it to the
//! current subscribers must be atomic: a subscriber that joins concurrently
//! then gets each token exactly once, either from the replay or live, never
//! both and never neither.
//!
//! The producer never blocks on a subscriber. Each attachment writes into its
//! connection's bounded [`Outbox`] (which, for a connection asleep with
//! nothing else to write, means a non-blocking write to its socket); when
//! that is full the attachment is cut off with `slow_consumer` and removed,
//! and the others carry on. The token is encoded once ([`TokenTail`]) and
//! the same bytes go to every outbox. From [`PARALLEL_FANOUT`] subscribers
//! on, the hand-outs of one token run on rayon's pool (still under the
//! generation's mutex, which the publishing thread holds while it waits),
//! so a big audience is served by every core.
//!
//! ```
//! use std::sync::Arc;
//! use chorus::broadcast::{Attachment, Broadcast};
//! use chorus::outbox::{Frame, Outbox};
//!
//! let broadcast = Broadcast::new();
//! let early = Attachment::new(Arc::new(Outbox::new(64).unwrap()), "r-early");
//! broadcast.subscribe(&early, 0);
//! broadcast.publish("Hel");
//! let late = Attachment::new(Arc::new(Outbox::new(64).unwrap()), "r-late");
//! broadcast.subscribe(&late, 0); // replays "Hel", then goes live
//! broadcast.publish("lo");
//! let text = broadcast.finish();
//! assert_eq!(text.text, "Hello");
//! assert_eq!(early.outbox.len(), 2); // two live tokens
//! assert_eq!(late.outbox.len(), 2); // a replay of one token, one live token
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use rayon::prelude::*;

use crate::outbox::{Frame, Outbox, PushError, Replay, Tokens};
use crate::protocol::{self, ErrorCode, Failure, TokenTail};

/// One client connection attached to one request's stream.
#[derive(Debug)]
pub struct Attachment {
    /// The connection's outbound queue.
    pub outbox: Arc<Outbox>,
    /// The request id this attachment receives tokens for.
    pub request: Arc<str>,
    /// `{"type":"token","request":"…` for this request.
    pub prefix: Arc<[u8]>,
    /// Set once when the attachment was cut off as a slow consumer.
    cut: AtomicBool,
}

impl Attachment {
    /// An attachment of `outbox` to `request`.
    pub fn new(outbox: Arc<Outbox>, request: &str) -> Arc<Attachment> {
        Arc::new(Attachment {
            outbox,
            prefix: protocol::token_prefix(request),
            request: request.into(),
            cut: AtomicBool::new(false),
        })
    }

    /// True when this attachment can still receive frames: neither cut off
    /// nor on a closed connection.
    pub fn is_live(&self) -> bool {
        !self.cut.load(Ordering::Acquire) && !self.outbox.is_closed()
    }

    /// True when it was cut off as a slow consumer (and already told so).
    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }

    fn cut_off(&self) {
        if !self.cut.swap(true, Ordering::AcqRel) {
            let failure = Failure::new(
                ErrorCode::SlowConsumer,
                "the connection did not read its tokens fast enough; resume to continue",
            );
            let _ = self.outbox.push(Frame::Json(protocol::error(
                Some(&self.request),
                None,
                &failure,
            )));
        }
    }

    /// Hands token `seq` to this attachment, which wants tokens from `from` on.
    fn deliver(&self, seq: u64, from: u64, tail: &TokenTail) -> Delivery {
        if self.is_cut() {
            return Delivery::Dropped;
        }
        if seq < from {
            return Delivery::Kept;
        }
        match self.outbox.queue_token(self.token(tail)) {
            Ok(false) => Delivery::Kept,
            Ok(true) => Delivery::Wake,
            Err(PushError::Full) => {
                self.cut_off();
                Delivery::Dropped
            }
            Err(PushError::Closed) => Delivery::Dropped,
        }
    }

    fn token(&self, tail: &TokenTail) -> Frame {
        Frame::Token {
            prefix: self.prefix.clone(),
            tail: tail.clone(),
        }
    }
}

/// What handing one token to one attachment did.
enum Delivery {
    /// Delivered (or not wanted yet); the attachment stays.
    Kept,
    /// Queued for a parked connection, which must be woken.
    Wake,
    /// Cut off or closed; the attachment leaves the stream.
    Dropped,
}

/// From this many subscribers on, a token is handed out by the rayon pool
/// rather than by the publishing thread alone. Handing a token to an idle
/// connection is a non-blocking socket write (see [`Outbox`]), pure CPU work
/// that never waits, so it fits rayon; spread over the cores, the last of
/// thousands of subscribers gets it proportionally sooner.
pub const PARALLEL_FANOUT: usize = 64;

/// What a finished generation produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Produced {
    /// The whole text.
    pub text: String,
    /// Byte offsets where each token ends, so the original boundaries survive.
    pub ends: Vec<usize>,
}

/// The pieces of `text` that end at the byte offsets `ends`: tokens stored
/// as one string plus their boundaries.
pub fn split_at_ends<'a>(text: &'a str, ends: &'a [usize]) -> impl Iterator<Item = &'a str> {
    let mut start = 0;
    ends.iter().map(move |&end| {
        let piece = &text[start..end];
        start = end;
        piece
    })
}

impl Produced {
    /// The tokens as they were produced.
    pub fn pieces(&self) -> impl Iterator<Item = &str> {
        split_at_ends(&self.text, &self.ends)
    }

    /// The text of the first `tokens` tokens.
    pub fn prefix_text(&self, tokens: usize) -> &str {
        match tokens.checked_sub(1).and_then(|i| self.ends.get(i)) {
            Some(&end) => &self.text[..end],
            None if tokens == 0 => "",
            None => &self.text,
        }
    }
}

struct Inner {
    /// Encoded tails of every token so far; index = seq. The only copy of
    /// the text: [`Produced`] is decoded from them when asked for, so a
    /// generation holds its answer once, not twice, for the whole replay
    /// window (and a cache entry shares the same tails).
    tails: Vec<TokenTail>,
    /// Bytes of text in `tails`, to size a [`Produced`] exactly.
    text_bytes: usize,
    /// Live attachments and the first `seq` each wants (a `resume` may ask
    /// for tokens that do not exist yet).
    subscribers: Vec<(Arc<Attachment>, u64)>,
    ended: bool,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
}

impl Inner {
    /// The text and token boundaries, decoded from the tails.
    fn produced(&self) -> Produced {
        let mut text = String::with_capacity(self.text_bytes);
        let mut ends = Vec::with_capacity(self.tails.len());
        for tail in &self.tails {
            tail.append_text(&mut text);
            ends.push(text.len());
        }
        Produced { text, ends }
    }
}

/// The token stream of one generation. Share it as `Arc<Broadcast>`.
pub struct Broadcast {
    inner: Mutex<Inner>,
}

/// What [`Broadcast::subscribe`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscribed {
    /// Tokens replayed from the history.
    pub replayed: u64,
    /// True when the attachment now receives live tokens; false when the
    /// stream had already ended or the replay overflowed the outbox.
    pub live: bool,
}

impl Default for Broadcast {
    fn default() -> Self {
        Broadcast {
            inner: Mutex::new(Inner {
                tails: Vec::new(),
                text_bytes: 0,
                subscribers: Vec::new(),
                ended: false,
                first_token_at: None,
                last_token_at: None,
            }),
        }
    }
}

impl Broadcast {
    /// An open stream with no tokens and no subscribers.
    pub fn new() -> Arc<Broadcast> {
        Arc::new(Broadcast::default())
    }

    /// Appends a token and hands it to every live subscriber. Returns the
    /// token's `seq`, or `None` when the stream already ended.
    ///
    /// Never blocks on a subscriber: one whose outbox is full is cut off with
    /// `slow_consumer`, one whose connection closed is dropped.
    pub fn publish(&self, text: &str) -> Option<u64> {
        let mut to_wake = Vec::new();
        let seq = {
            let mut inner = self.inner.lock();
            if inner.ended {
                return None;
            }
            let seq = inner.tails.len() as u64;
            let tail = TokenTail::encode(seq, text);
            let now = Instant::now();
            inner.first_token_at.get_or_insert(now);
            inner.last_token_at = Some(now);
            inner.text_bytes += text.len();
            let deliver = |(sub, from): &(Arc<Attachment>, u64)| sub.deliver(seq, *from, &tail);
            let outcomes: Vec<Delivery> = if inner.subscribers.len() >= PARALLEL_FANOUT {
                inner.subscribers.par_iter().map(deliver).collect()
            } else {
                inner.subscribers.iter().map(deliver).collect()
            };
            let mut outcome = outcomes.into_iter();
            inner.subscribers.retain(|(sub, _)| match outcome.next() {
                Some(Delivery::Kept) => true,
                Some(Delivery::Wake) => {
                    to_wake.push(sub.outbox.clone());
                    true
                }
                Some(Delivery::Dropped) | None => false,
            });
            inner.tails.push(tail);
            seq
        };
        // The wake-ups are system calls: make them after the lock is released,
        // so subscribers and detaches never wait behind thousands of them.
        for outbox in to_wake {
            outbox.wake();
        }
        Some(seq)
    }

    /// Attaches `attachment`: replays tokens with `seq >= from`, then (if the
    /// stream is still open) delivers every later token live. Atomic with
    /// respect to [`Broadcast::publish`], so there is no gap and no duplicate.
    pub fn subscribe(self: &Arc<Self>, attachment: &Arc<Attachment>, from: u64) -> Subscribed {
        let mut inner = self.inner.lock();
        let produced = inner.tails.len() as u64;
        let replayed = produced.saturating_sub(from);
        if replayed > 0 {
            // One queue slot for the whole range; the connection expands it.
            let replay = Frame::Replay(Replay {
                source: Tokens::Stream(self.clone()),
                prefix: attachment.prefix.clone(),
                from,
                to: produced,
            });
            match attachment.outbox.push_token(replay) {
                Ok(()) => {}
                Err(PushError::Full) => {
                    attachment.cut_off();
                    return Subscribed {
                        replayed: 0,
                        live: false,
                    };
                }
                Err(PushError::Closed) => {
                    return Subscribed {
                        replayed: 0,
                        live: false,
                    }
                }
            }
        }
        if inner.ended {
            return Subscribed {
                replayed,
                live: false,
            };
        }
        inner.subscribers.push((attachment.clone(), from));
        Subscribed {
            replayed,
            live: true,
        }
    }

    /// Appends the tails of tokens `from..to` (clamped to what exists) to `out`.
    pub fn tails(&self, from: u64, to: u64, out: &mut Vec<TokenTail>) {
        let inner = self.inner.lock();
        let len = inner.tails.len();
        let from = usize::try_from(from).unwrap_or(len).min(len);
        let to = usize::try_from(to).unwrap_or(len).min(len);
        if from < to {
            out.extend_from_slice(&inner.tails[from..to]);
        }
    }

    /// Detaches one attachment; true when it was subscribed.
    pub fn unsubscribe(&self, attachment: &Arc<Attachment>) -> bool {
        let mut inner = self.inner.lock();
        let before = inner.subscribers.len();
        inner
            .subscribers
            .retain(|(s, _)| !Arc::ptr_eq(s, attachment));
        inner.subscribers.len() != before
    }

    /// Detaches `attachments` and returns what had been produced at that
    /// moment, atomically: exactly the tokens they were sent.
    pub fn detach(&self, attachments: &[Arc<Attachment>]) -> Produced {
        let mut inner = self.inner.lock();
        inner
            .subscribers
            .retain(|(s, _)| !attachments.iter().any(|a| Arc::ptr_eq(s, a)));
        inner.produced()
    }

    /// Subscribers that can still receive tokens.
    pub fn live_subscribers(&self) -> usize {
        self.inner
            .lock()
            .subscribers
            .iter()
            .filter(|(s, _)| s.is_live())
            .count()
    }

    /// Calls `f` for each live subscriber, under the stream's lock, so a
    /// control frame (like `state`) lands in order with the tokens.
    pub fn for_each_subscriber(&self, mut f: impl FnMut(&Attachment)) {
        let inner = self.inner.lock();
        for (sub, _) in inner.subscribers.iter().filter(|(s, _)| s.is_live()) {
            f(sub);
        }
    }

    /// Ends the stream: no more tokens, every subscriber detached. Returns
    /// what was produced. Idempotent.
    pub fn finish(&self) -> Produced {
        let mut inner = self.inner.lock();
        inner.ended = true;
        inner.subscribers.clear();
        inner.subscribers.shrink_to_fit();
        inner.tails.shrink_to_fit();
        inner.produced()
    }

    /// True once [`Broadcast::finish`] ran.
    pub fn is_ended(&self) -> bool {
        self.inner.lock().ended
    }

    /// Tokens published so far.
    pub fn tokens(&self) -> u64 {
        self.inner.lock().tails.len() as u64
    }

    /// A copy of what has been produced so far.
    pub fn produced(&self) -> Produced {
        self.inner.lock().produced()
    }

    /// The tails of every token so far, shared (not copied): a cache entry
    /// made from them holds no second copy of the encoded answer.
    pub fn all_tails(&self) -> Vec<TokenTail> {
        self.inner.lock().tails.clone()
    }

    /// Bytes of token data this stream holds (the encoded tails), for tests
    /// and measurements of what an answer costs.
    pub fn held_bytes(&self) -> usize {
        self.inner.lock().tails.iter().map(|t| t.0.len()).sum()
    }

    /// When the first token was published.
    pub fn first_token_at(&self) -> Option<Instant> {
        self.inner.lock().first_token_at
    }

    /// When the latest token was published.
    pub fn last_token_at(&self) -> Option<Instant> {
        self.inner.lock().last_token_at
    }
}

impl std::fmt::Debug for Broadcast {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.inner.lock();
        f.debug_struct("Broadcast")
            .field("tokens", &inner.tails.len())
            .field("subscribers", &inner.subscribers.len())
            .field("ended", &inner.ended)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    fn attach(request: &str, capacity: usize) -> Arc<Attachment> {
        Attachment::new(Arc::new(Outbox::new(capacity).unwrap()), request)
    }

    /// Decodes the frames waiting in an outbox into (seq, text) pairs of tokens
    /// and the codes of errors.
    fn drain(a: &Attachment) -> (Vec<(u64, String)>, Vec<String>) {
        let mut batch = Vec::new();
        a.outbox.take_all(&mut batch);
        let mut tokens = Vec::new();
        let mut errors = Vec::new();
        for frame in batch {
            match frame {
                Frame::Token { prefix, tail } => {
                    let mut bytes = prefix.to_vec();
                    bytes.extend_from_slice(&tail.0);
                    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                    assert_eq!(v["request"].as_str().unwrap(), &*a.request);
                    tokens.push((
                        v["seq"].as_u64().unwrap(),
                        v["text"].as_str().unwrap().to_owned(),
                    ));
                }
                Frame::Json(bytes) => {
                    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                    errors.push(v["code"].as_str().unwrap_or("").to_owned());
                }
                Frame::Replay(r) => {
                    let mut tails = Vec::new();
                    r.source.tails(r.from, r.to, &mut tails);
                    for (i, tail) in tails.iter().enumerate() {
                        let mut bytes = r.prefix.to_vec();
                        bytes.extend_from_slice(&tail.0);
                        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                        assert_eq!(v["seq"].as_u64().unwrap(), r.from + i as u64);
                        tokens.push((
                            v["seq"].as_u64().unwrap(),
                            v["text"].as_str().unwrap().to_owned(),
                        ));
                    }
                }
                Frame::Close(..) => panic!("unexpected close"),
                Frame::Encoded(_) => panic!("no socket is attached, so nothing is written through"),
            }
        }
        (tokens, errors)
    }

    #[test]
    fn smoke_live_and_replay() {
        let b = Broadcast::new();
        let a = attach("r-a", 16);
        assert!(b.subscribe(&a, 0).live);
        b.publish("x");
        b.publish("y");
        let late = attach("r-b", 16);
        assert_eq!(b.subscribe(&late, 1).replayed, 1);
        b.publish("z");
        let produced = b.finish();
        assert_eq!(produced.pieces().collect::<Vec<_>>(), ["x", "y", "z"]);
        assert_eq!(
            drain(&a).0,
            [(0, "x".into()), (1, "y".into()), (2, "z".into())]
        );
        assert_eq!(drain(&late).0, [(1, "y".into()), (2, "z".into())]);
    }

    #[test]
    fn a_token_is_encoded_once_and_shared_by_every_subscriber() {
        let b = Broadcast::new();
        let subs: Vec<_> = (0..3).map(|i| attach(&format!("r-{i}"), 8)).collect();
        for a in &subs {
            b.subscribe(a, 0);
        }
        b.publish("shared");
        let tails: Vec<Arc<[u8]>> = subs
            .iter()
            .map(|a| {
                let mut batch = Vec::new();
                a.outbox.take_all(&mut batch);
                match batch.pop() {
                    Some(Frame::Token { tail, .. }) => tail.0,
                    other => panic!("expected a token frame, got {other:?}"),
                }
            })
            .collect();
        assert!(Arc::ptr_eq(&tails[0], &tails[1]) && Arc::ptr_eq(&tails[1], &tails[2]));
    }

    #[test]
    fn after_finish_subscribe_replays_only_and_publish_is_refused() {
        let b = Broadcast::new();
        b.publish("a");
        b.finish();
        assert_eq!(b.publish("b"), None);
        let a = attach("r", 16);
        assert_eq!(
            b.subscribe(&a, 0),
            Subscribed {
                replayed: 1,
                live: false
            }
        );
    }

    #[test]
    fn slow_consumer_is_cut_off_without_affecting_others() {
        let b = Broadcast::new();
        let slow = attach("r-slow", 2);
        let fast = attach("r-fast", 1000);
        b.subscribe(&slow, 0);
        b.subscribe(&fast, 0);
        for i in 0..10 {
            b.publish(&i.to_string());
        }
        let (tokens, errors) = drain(&slow);
        assert_eq!(tokens.len(), 2);
        assert_eq!(errors, ["slow_consumer"]);
        assert!(slow.is_cut());
        assert_eq!(drain(&fast).0.len(), 10);
        assert_eq!(b.live_subscribers(), 1);
    }

    #[test]
    fn parallel_fanout_cuts_only_the_slow_consumer() {
        let b = Broadcast::new();
        let slow = attach("r-slow", 2);
        let fast: Vec<_> = (0..PARALLEL_FANOUT * 2)
            .map(|i| attach(&format!("r-{i}"), 1000))
            .collect();
        b.subscribe(&slow, 0);
        for a in &fast {
            b.subscribe(a, 0);
        }
        for i in 0..10 {
            b.publish(&i.to_string());
        }
        let (tokens, errors) = drain(&slow);
        assert_eq!(tokens.len(), 2);
        assert_eq!(errors, ["slow_consumer"]);
        for a in &fast {
            let (tokens, errors) = drain(a);
            assert!(errors.is_empty());
            assert_eq!(
                tokens.iter().map(|t| t.0).collect::<Vec<_>>(),
                (0..10).collect::<Vec<_>>()
            );
        }
        assert_eq!(b.live_subscribers(), fast.len());
    }

    #[test]
    fn closed_connection_is_dropped() {
        let b = Broadcast::new();
        let a = attach("r", 4);
        b.subscribe(&a, 0);
        a.outbox.close();
        b.publish("x");
        assert_eq!(b.live_subscribers(), 0);
    }

    #[test]
    fn prefix_text_follows_token_boundaries() {
        let p = Produced {
            text: "abcdef".into(),
            ends: vec![2, 3, 6],
        };
        assert_eq!(p.prefix_text(0), "");
        assert_eq!(p.prefix_text(2), "abc");
        assert_eq!(p.prefix_text(9), "abcdef");
    }

    /// Many threads subscribe at random moments while one thread publishes:
    /// every subscriber must see every token from its `from`, in order, once.
    #[test]
    fn stress_concurrent_subscribe_has_no_gap_or_duplicate() {
        const TOKENS: u64 = 2_000;
        // Above PARALLEL_FANOUT, so both delivery paths are exercised.
        const SUBSCRIBERS: usize = 2 * PARALLEL_FANOUT;
        let b = Broadcast::new();
        let producer = {
            let b = b.clone();
            thread::spawn(move || {
                for i in 0..TOKENS {
                    b.publish(&format!("t{i} "));
                    if i % 64 == 0 {
                        thread::yield_now();
                    }
                }
                b.finish()
            })
        };
        let subscribers: Vec<_> = (0..SUBSCRIBERS)
            .map(|n| {
                let b = b.clone();
                thread::spawn(move || {
                    thread::sleep(std::time::Duration::from_micros(n as u64 * 50));
                    let a = attach(&format!("r-{n}"), usize::MAX);
                    let from = (n as u64 * 7) % 5;
                    b.subscribe(&a, from);
                    (from, a)
                })
            })
            .collect();
        let produced = producer.join().unwrap();
        assert_eq!(produced.ends.len() as u64, TOKENS);
        for handle in subscribers {
            let (from, a) = handle.join().unwrap();
            let (tokens, errors) = drain(&a);
            assert!(errors.is_empty());
            let seqs: Vec<u64> = tokens.iter().map(|t| t.0).collect();
            let expected: Vec<u64> = (from..TOKENS).collect();
            assert!(
                seqs == expected,
                "subscriber {} saw a gap or duplicate",
                a.request
            );
            for (seq, text) in tokens {
                assert_eq!(text, format!("t{seq} "));
            }
        }
    }

    /// Subscribers attach and detach from many threads while tokens flow; the
    /// producer never blocks and every detached subscriber stops receiving.
    #[test]
    fn stress_subscribe_unsubscribe_churn() {
        let b = Broadcast::new();
        let stop = Arc::new(AtomicBool::new(false));
        let churners: Vec<_> = (0..8)
            .map(|n| {
                let (b, stop) = (b.clone(), stop.clone());
                thread::spawn(move || {
                    let mut rounds = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let a = attach(&format!("r-{n}"), 64);
                        b.subscribe(&a, b.tokens());
                        thread::yield_now();
                        b.unsubscribe(&a);
                        let (tokens, _) = drain(&a);
                        // Once unsubscribed, nothing more arrives.
                        assert!(drain(&a).0.is_empty());
                        let seqs: Vec<u64> = tokens.iter().map(|t| t.0).collect();
                        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
                        rounds += 1;
                    }
                    rounds
                })
            })
            .collect();
        for i in 0..20_000 {
            b.publish(if i % 2 == 0 { "a" } else { "b" });
        }
        stop.store(true, Ordering::Relaxed);
        let rounds: usize = churners.into_iter().map(|h| h.join().unwrap()).sum();
        assert!(rounds > 0);
        assert_eq!(b.live_subscribers(), 0);
    }
}
