//! Live fan-out of one generation's tokens to every attached subscriber,
//! with the token history kept for late joiners and for `resume`.
//!
//! A leaf: it imports nothing of the crate. What a subscriber is (a
//! WebSocket, an HTTP response, a test's queue) is the caller's business,
//! behind the [`Subscriber`] trait; what the broadcaster knows of a token
//! is its `seq` and its text, escaped once as a JSON string ([`Token`]),
//! since every transport chorus speaks carries tokens inside JSON.
//!
//! Threads: one producer — the worker running the generation — calls
//! [`Broadcast::publish`]; any thread may [`Broadcast::subscribe`]
//! (follower pool, connection threads resuming, the history writer replaying
//! a finished request) or detach. Everything happens under one mutex per
//! generation, because appending a token to the history and handing it to the
//! current subscribers must be atomic: a subscriber that joins concurrently
//! then gets each token exactly once, either from the replay or live, never
//! both and never neither.
//!
//! The producer never blocks on a subscriber: [`Subscriber::token`] must not
//! block (a transport queues the token, or writes it to a socket that will
//! take it), and a subscriber that answers [`Handed::Dropped`] (it was too
//! slow and cut itself off, or its connection closed) leaves the stream
//! while the others carry on. From [`PARALLEL_FANOUT`] subscribers on, the
//! hand-outs of one token run on rayon's pool (still under the generation's
//! mutex, which the publishing thread holds while it waits), so a big
//! audience is served by every core.
//!
//! ```
//! use std::sync::Arc;
//! use chorus::broadcast::{Broadcast, Handed, Subscriber, Token, TokenSource};
//! use parking_lot::Mutex;
//!
//! #[derive(Default)]
//! struct Collect(Mutex<Vec<u64>>);
//! impl Subscriber for Collect {
//!     fn token(&self, token: &Token) -> Handed {
//!         self.0.lock().push(token.seq);
//!         Handed::Kept
//!     }
//!     fn replay(&self, source: Arc<dyn TokenSource>, from: u64, to: u64) -> bool {
//!         self.0.lock().extend(from..to);
//!         true
//!     }
//!     fn wake(&self) {}
//! }
//!
//! let broadcast = Broadcast::new();
//! let early = Arc::new(Collect::default());
//! broadcast.subscribe(&early, 0);
//! broadcast.publish("Hel");
//! let late = Arc::new(Collect::default());
//! broadcast.subscribe(&late, 0); // replays "Hel", then goes live
//! broadcast.publish("lo");
//! assert_eq!(broadcast.finish().text, "Hello");
//! assert_eq!(*early.0.lock(), [0, 1]);
//! assert_eq!(*late.0.lock(), [0, 1]);
//! ```

use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use rayon::prelude::*;

/// One generated token: its place in the answer and its text as a JSON
/// string literal (quotes included), escaped once and shared by every
/// subscriber, replay and cache entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// Its position in the answer, from 0.
    pub seq: u64,
    /// The text as a JSON string literal, e.g. `"a \"b\""`.
    pub json: Arc<str>,
}

impl Token {
    /// Token `seq` with `text`, escaped as a JSON string.
    pub fn new(seq: u64, text: &str) -> Token {
        // Serialising a &str cannot fail.
        let json = serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_owned());
        Token {
            seq,
            json: json.into(),
        }
    }

    /// Appends the token's text, unescaped, to `out`.
    pub fn append_text(&self, out: &mut String) {
        // Text without escapes is borrowed as is; only escaped text allocates.
        match serde_json::from_str::<&str>(&self.json) {
            Ok(text) => out.push_str(text),
            Err(_) => {
                if let Ok(text) = serde_json::from_str::<String>(&self.json) {
                    out.push_str(&text);
                }
            }
        }
    }

    /// Bytes of the escaped text (quotes included).
    pub fn json_len(&self) -> usize {
        self.json.len()
    }
}

/// Something that keeps a range of tokens: a generation's stream, a cached
/// answer. A replay holds one of these instead of a copy of the tokens.
pub trait TokenSource: Send + Sync {
    /// Appends tokens `from..to` (clamped to what exists) to `out`.
    fn tokens(&self, from: u64, to: u64, out: &mut Vec<Token>);
}

/// Appends `tokens[from..to]`, clamped, to `out`: [`TokenSource::tokens`]
/// for anything that keeps its tokens in a slice.
pub fn tokens_of(tokens: &[Token], from: u64, to: u64, out: &mut Vec<Token>) {
    let len = tokens.len();
    let from = usize::try_from(from).unwrap_or(len).min(len);
    let to = usize::try_from(to).unwrap_or(len).min(len);
    if from < to {
        out.extend_from_slice(&tokens[from..to]);
    }
}

impl TokenSource for Vec<Token> {
    fn tokens(&self, from: u64, to: u64, out: &mut Vec<Token>) {
        tokens_of(self, from, to, out);
    }
}

/// What handing a token to a subscriber did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handed {
    /// Delivered (written or queued); the subscriber stays.
    Kept,
    /// Queued for a subscriber that sleeps and must get [`Subscriber::wake`]
    /// (after the stream's lock is released).
    Wake,
    /// Cut off or closed; the subscriber leaves the stream.
    Dropped,
}

/// One receiver of a stream's tokens. Implementations must not block: they
/// run under the stream's lock, on the producer's thread or rayon's pool.
pub trait Subscriber: Send + Sync + 'static {
    /// Hands over one live token.
    fn token(&self, token: &Token) -> Handed;
    /// Hands over tokens `from..to` kept by `source`, to be read as the
    /// subscriber can take them, later: this runs under the stream's lock,
    /// so reading `source` here would deadlock. False when it could not be
    /// queued (the subscriber was cut off or is closed): it then does not
    /// go live.
    fn replay(&self, source: Arc<dyn TokenSource>, from: u64, to: u64) -> bool;
    /// Wakes a subscriber that answered [`Handed::Wake`].
    fn wake(&self);
    /// False once the subscriber can no longer receive anything.
    fn is_live(&self) -> bool {
        true
    }
}

/// From this many subscribers on, a token is handed out by the rayon pool
/// rather than by the publishing thread alone. Handing a token to an idle
/// connection is a non-blocking socket write, pure CPU work that never
/// waits, so it fits rayon; spread over the cores, the last of thousands of
/// subscribers gets it proportionally sooner.
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

    /// The text and token boundaries of `tokens`.
    pub fn of(tokens: &[Token]) -> Produced {
        let mut text = String::new();
        let mut ends = Vec::with_capacity(tokens.len());
        for token in tokens {
            token.append_text(&mut text);
            ends.push(text.len());
        }
        Produced { text, ends }
    }
}

struct Inner<S> {
    /// Every token so far; index = seq. The only copy of the text:
    /// [`Produced`] is decoded from them when asked for, so a generation
    /// holds its answer once for the whole replay window (and a cache entry
    /// shares the same tokens).
    tokens: Vec<Token>,
    /// Live subscribers and the first `seq` each wants (a `resume` may ask
    /// for tokens that do not exist yet).
    subscribers: Vec<(Arc<S>, u64)>,
    ended: bool,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
}

/// The token stream of one generation. Share it as `Arc<Broadcast<S>>`.
pub struct Broadcast<S> {
    inner: Mutex<Inner<S>>,
}

/// What [`Broadcast::subscribe`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscribed {
    /// Tokens replayed from the history.
    pub replayed: u64,
    /// True when the subscriber now receives live tokens; false when the
    /// stream had already ended or the replay could not be queued.
    pub live: bool,
}

impl<S> Default for Broadcast<S> {
    fn default() -> Self {
        Broadcast {
            inner: Mutex::new(Inner {
                tokens: Vec::new(),
                subscribers: Vec::new(),
                ended: false,
                first_token_at: None,
                last_token_at: None,
            }),
        }
    }
}

impl<S: Subscriber> TokenSource for Broadcast<S> {
    fn tokens(&self, from: u64, to: u64, out: &mut Vec<Token>) {
        tokens_of(&self.inner.lock().tokens, from, to, out);
    }
}

impl<S: Subscriber> Broadcast<S> {
    /// An open stream with no tokens and no subscribers.
    pub fn new() -> Arc<Broadcast<S>> {
        Arc::new(Broadcast::default())
    }

    /// Appends a token and hands it to every live subscriber. Returns the
    /// token's `seq`, or `None` when the stream already ended.
    ///
    /// Never blocks on a subscriber: one that answers [`Handed::Dropped`]
    /// leaves the stream.
    pub fn publish(&self, text: &str) -> Option<u64> {
        let mut to_wake = Vec::new();
        let seq = {
            let mut inner = self.inner.lock();
            if inner.ended {
                return None;
            }
            let seq = inner.tokens.len() as u64;
            let token = Token::new(seq, text);
            let now = Instant::now();
            inner.first_token_at.get_or_insert(now);
            inner.last_token_at = Some(now);
            let hand = |(sub, from): &(Arc<S>, u64)| {
                if seq < *from {
                    Handed::Kept
                } else {
                    sub.token(&token)
                }
            };
            let outcomes: Vec<Handed> = if inner.subscribers.len() >= PARALLEL_FANOUT {
                inner.subscribers.par_iter().map(hand).collect()
            } else {
                inner.subscribers.iter().map(hand).collect()
            };
            let mut outcome = outcomes.into_iter();
            inner.subscribers.retain(|(sub, _)| match outcome.next() {
                Some(Handed::Kept) => true,
                Some(Handed::Wake) => {
                    to_wake.push(sub.clone());
                    true
                }
                Some(Handed::Dropped) | None => false,
            });
            inner.tokens.push(token);
            seq
        };
        // The wake-ups are system calls: make them after the lock is released,
        // so subscribers and detaches never wait behind thousands of them.
        for sub in to_wake {
            sub.wake();
        }
        Some(seq)
    }

    /// Attaches `subscriber`: replays tokens with `seq >= from`, then (if
    /// the stream is still open) delivers every later token live. Atomic
    /// with respect to [`Broadcast::publish`], so there is no gap and no
    /// duplicate.
    pub fn subscribe(self: &Arc<Self>, subscriber: &Arc<S>, from: u64) -> Subscribed {
        let mut inner = self.inner.lock();
        let produced = inner.tokens.len() as u64;
        let replayed = produced.saturating_sub(from);
        // One hand-over for the whole range; the subscriber reads it as it can.
        if replayed > 0 && !subscriber.replay(self.clone(), from, produced) {
            return Subscribed {
                replayed: 0,
                live: false,
            };
        }
        if inner.ended {
            return Subscribed {
                replayed,
                live: false,
            };
        }
        inner.subscribers.push((subscriber.clone(), from));
        Subscribed {
            replayed,
            live: true,
        }
    }

    /// Detaches one subscriber; true when it was subscribed.
    pub fn unsubscribe(&self, subscriber: &Arc<S>) -> bool {
        let mut inner = self.inner.lock();
        let before = inner.subscribers.len();
        inner
            .subscribers
            .retain(|(s, _)| !Arc::ptr_eq(s, subscriber));
        inner.subscribers.len() != before
    }

    /// Detaches `subscribers` and returns what had been produced at that
    /// moment, atomically: exactly the tokens they were sent.
    pub fn detach(&self, subscribers: &[Arc<S>]) -> Produced {
        let mut inner = self.inner.lock();
        inner
            .subscribers
            .retain(|(s, _)| !subscribers.iter().any(|a| Arc::ptr_eq(s, a)));
        Produced::of(&inner.tokens)
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
    /// message sent there (like a `state` change) lands in order with the
    /// tokens.
    pub fn for_each_subscriber(&self, mut f: impl FnMut(&S)) {
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
        inner.tokens.shrink_to_fit();
        Produced::of(&inner.tokens)
    }

    /// True once [`Broadcast::finish`] ran.
    pub fn is_ended(&self) -> bool {
        self.inner.lock().ended
    }

    /// Tokens published so far.
    pub fn token_count(&self) -> u64 {
        self.inner.lock().tokens.len() as u64
    }

    /// A copy of what has been produced so far.
    pub fn produced(&self) -> Produced {
        Produced::of(&self.inner.lock().tokens)
    }

    /// Every token so far, shared (not copied): a cache entry made from
    /// them holds no second copy of the answer.
    pub fn all_tokens(&self) -> Vec<Token> {
        self.inner.lock().tokens.clone()
    }

    /// Bytes of token data this stream holds (the escaped texts), for tests
    /// and measurements of what an answer costs.
    pub fn held_bytes(&self) -> usize {
        self.inner.lock().tokens.iter().map(Token::json_len).sum()
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

impl<S> std::fmt::Debug for Broadcast<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.inner.lock();
        f.debug_struct("Broadcast")
            .field("tokens", &inner.tokens.len())
            .field("subscribers", &inner.subscribers.len())
            .field("ended", &inner.ended)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::thread;

    /// A subscriber that keeps what it is handed, up to `capacity` tokens
    /// and replays, and cuts itself off past that, like a slow connection.
    struct Queue {
        name: String,
        capacity: usize,
        got: Mutex<Vec<Got>>,
        cut: AtomicBool,
        closed: AtomicBool,
    }

    impl Subscriber for Queue {
        fn token(&self, token: &Token) -> Handed {
            if self.cut.load(Ordering::Relaxed) || self.closed.load(Ordering::Relaxed) {
                return Handed::Dropped;
            }
            let mut got = self.got.lock();
            if got.len() >= self.capacity {
                self.cut.store(true, Ordering::Relaxed);
                return Handed::Dropped;
            }
            got.push(Got::Token(token.clone()));
            Handed::Kept
        }

        fn replay(&self, source: Arc<dyn TokenSource>, from: u64, to: u64) -> bool {
            let mut got = self.got.lock();
            if got.len() >= self.capacity {
                self.cut.store(true, Ordering::Relaxed);
                return false;
            }
            got.push(Got::Replay(source, from, to));
            true
        }

        fn wake(&self) {}

        fn is_live(&self) -> bool {
            !self.cut.load(Ordering::Relaxed) && !self.closed.load(Ordering::Relaxed)
        }
    }

    fn queue(name: &str, capacity: usize) -> Arc<Queue> {
        Arc::new(Queue {
            name: name.to_owned(),
            capacity,
            got: Mutex::new(Vec::new()),
            cut: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        })
    }

    enum Got {
        Token(Token),
        Replay(Arc<dyn TokenSource>, u64, u64),
    }

    /// The tokens `q` was handed, replays expanded, as (seq, text).
    fn drain(q: &Queue) -> Vec<(u64, String)> {
        let got = std::mem::take(&mut *q.got.lock());
        let mut tokens = Vec::new();
        for g in got {
            match g {
                Got::Token(t) => tokens.push(t),
                Got::Replay(source, from, to) => source.tokens(from, to, &mut tokens),
            }
        }
        tokens
            .into_iter()
            .map(|t| {
                let mut text = String::new();
                t.append_text(&mut text);
                (t.seq, text)
            })
            .collect()
    }

    #[test]
    fn smoke_live_and_replay() {
        let b = Broadcast::new();
        let a = queue("a", 16);
        assert!(b.subscribe(&a, 0).live);
        b.publish("x");
        b.publish("y");
        let late = queue("b", 16);
        assert_eq!(b.subscribe(&late, 1).replayed, 1);
        b.publish("z");
        let produced = b.finish();
        assert_eq!(produced.pieces().collect::<Vec<_>>(), ["x", "y", "z"]);
        assert_eq!(
            drain(&a),
            [(0, "x".into()), (1, "y".into()), (2, "z".into())]
        );
        assert_eq!(drain(&late), [(1, "y".into()), (2, "z".into())]);
    }

    #[test]
    fn a_token_is_escaped_once_and_shared_by_every_subscriber() {
        struct Keep(Mutex<Vec<Token>>);
        impl Subscriber for Keep {
            fn token(&self, token: &Token) -> Handed {
                self.0.lock().push(token.clone());
                Handed::Kept
            }
            fn replay(&self, _: Arc<dyn TokenSource>, _: u64, _: u64) -> bool {
                true
            }
            fn wake(&self) {}
        }
        let b = Broadcast::new();
        let subs: Vec<_> = (0..3)
            .map(|_| Arc::new(Keep(Mutex::new(Vec::new()))))
            .collect();
        for s in &subs {
            b.subscribe(s, 0);
        }
        b.publish("a \"quoted\"\n");
        let held: Vec<Token> = subs.iter().map(|s| s.0.lock()[0].clone()).collect();
        assert!(Arc::ptr_eq(&held[0].json, &held[1].json));
        assert!(Arc::ptr_eq(&held[1].json, &held[2].json));
        assert_eq!(&*held[0].json, r#""a \"quoted\"\n""#);
        // The history keeps the same allocation.
        assert!(Arc::ptr_eq(&b.all_tokens()[0].json, &held[0].json));
    }

    #[test]
    fn token_text_round_trips_through_its_json() {
        for text in [
            "",
            "plain",
            "\"\\",
            "\u{0}\u{1f}\n\t",
            "wörld 🦀",
            "</script>",
        ] {
            let mut out = String::new();
            Token::new(7, text).append_text(&mut out);
            assert_eq!(out, text);
        }
    }

    #[test]
    fn after_finish_subscribe_replays_only_and_publish_is_refused() {
        let b = Broadcast::new();
        b.publish("a");
        b.finish();
        assert_eq!(b.publish("b"), None);
        let a = queue("r", 16);
        assert_eq!(
            b.subscribe(&a, 0),
            Subscribed {
                replayed: 1,
                live: false
            }
        );
    }

    #[test]
    fn a_refused_replay_does_not_go_live() {
        let b = Broadcast::new();
        b.publish("a");
        b.publish("b");
        let full = queue("full", 0);
        assert!(!b.subscribe(&full, 0).live);
        b.publish("c");
        assert!(drain(&full).is_empty());
        assert_eq!(b.live_subscribers(), 0);
    }

    #[test]
    fn slow_consumer_is_cut_off_without_affecting_others() {
        let b = Broadcast::new();
        let slow = queue("slow", 2);
        let fast = queue("fast", 1000);
        b.subscribe(&slow, 0);
        b.subscribe(&fast, 0);
        for i in 0..10 {
            b.publish(&i.to_string());
        }
        assert_eq!(drain(&slow).len(), 2);
        assert!(slow.cut.load(Ordering::Relaxed));
        assert_eq!(drain(&fast).len(), 10);
        assert_eq!(b.live_subscribers(), 1);
    }

    #[test]
    fn parallel_fanout_cuts_only_the_slow_consumer() {
        let b = Broadcast::new();
        let slow = queue("slow", 2);
        let fast: Vec<_> = (0..PARALLEL_FANOUT * 2)
            .map(|i| queue(&format!("r-{i}"), 1000))
            .collect();
        b.subscribe(&slow, 0);
        for a in &fast {
            b.subscribe(a, 0);
        }
        for i in 0..10 {
            b.publish(&i.to_string());
        }
        assert_eq!(drain(&slow).len(), 2);
        for a in &fast {
            assert_eq!(
                drain(a).iter().map(|t| t.0).collect::<Vec<_>>(),
                (0..10).collect::<Vec<_>>()
            );
        }
        assert_eq!(b.live_subscribers(), fast.len());
    }

    #[test]
    fn closed_subscriber_is_dropped() {
        let b = Broadcast::new();
        let a = queue("r", 4);
        b.subscribe(&a, 0);
        a.closed.store(true, Ordering::Relaxed);
        b.publish("x");
        assert_eq!(b.live_subscribers(), 0);
        assert!(!b.unsubscribe(&a));
    }

    #[test]
    fn a_subscriber_waiting_for_a_later_seq_gets_nothing_before_it() {
        let b = Broadcast::new();
        let a = queue("r", 16);
        // A resume may ask for tokens that do not exist yet.
        assert_eq!(b.subscribe(&a, 2).replayed, 0);
        for t in ["a", "b", "c", "d"] {
            b.publish(t);
        }
        assert_eq!(drain(&a), [(2, "c".into()), (3, "d".into())]);
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
                    let a = queue(&format!("r-{n}"), usize::MAX);
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
            let tokens = drain(&a);
            let seqs: Vec<u64> = tokens.iter().map(|t| t.0).collect();
            let expected: Vec<u64> = (from..TOKENS).collect();
            assert!(
                seqs == expected,
                "subscriber {} saw a gap or duplicate",
                a.name
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
                        let a = queue(&format!("r-{n}"), 64);
                        b.subscribe(&a, b.token_count());
                        thread::yield_now();
                        b.unsubscribe(&a);
                        let tokens = drain(&a);
                        // Once unsubscribed, nothing more arrives.
                        assert!(drain(&a).is_empty());
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
