//! Unit and stress tests of the outbox.

use super::*;
use rustix::event::{poll, PollFd, PollFlags};
use std::time::Duration;

/// A token layout like the WebSocket protocol's.
fn layout() -> Arc<TokenLayout> {
    Arc::new(TokenLayout {
        head: b"{\"type\":\"token\",\"request\":\"r\",\"seq\":"
            .as_slice()
            .into(),
        mid: b",\"text\":".as_slice().into(),
        tail: b"}".as_slice().into(),
    })
}

fn token(seq: u64) -> Frame {
    Frame::Token {
        layout: layout(),
        token: Token::new(seq, "x"),
    }
}

/// A framing the tests can read back: each message's length (4 bytes,
/// big-endian), then its bytes.
fn length_prefixed(out: &mut Vec<u8>, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.extend_from_slice(&u32::try_from(len).unwrap().to_be_bytes());
    for part in parts {
        out.extend_from_slice(part);
    }
}

#[test]
fn tokens_are_bounded_but_control_frames_are_not() {
    let o = Outbox::new(2).unwrap();
    o.push_token(token(0)).unwrap();
    o.push_token(token(1)).unwrap();
    assert_eq!(o.push_token(token(2)), Err(PushError::Full));
    o.push(Frame::Message(b"{}".to_vec())).unwrap();
    assert_eq!(o.len(), 3);
}

fn token_len() -> usize {
    token(0).encoded_len()
}

#[test]
fn tokens_are_refused_past_the_byte_bound_and_everything_counts() {
    let t = token_len();
    let o = Outbox::bounded(1000, 3 * t).unwrap();
    o.push_token(token(0)).unwrap();
    o.push_token(token(1)).unwrap();
    // A control frame is admitted past anything, and it counts.
    o.push(Frame::Message(vec![b'x'; t])).unwrap();
    assert_eq!(o.push_token(token(2)), Err(PushError::Full));
    assert_eq!(o.room(), 0);
    let mut batch = Vec::new();
    o.take_some(&mut batch, 1, usize::MAX);
    // What the consumer took and has not written still counts.
    assert_eq!(o.room(), 0);
    assert_eq!(o.push_token(token(2)), Err(PushError::Full));
    o.set_unwritten(0);
    assert_eq!(o.room(), t);
    o.push_token(token(2)).unwrap();
    // A replay holds no bytes of its own until it is expanded.
    let replay = Frame::Replay(Replay {
        source: Arc::new(Vec::<Token>::new()),
        layout: layout(),
        from: 0,
        to: 10,
    });
    o.push_token(replay).unwrap();
    assert_eq!(o.room(), 0);
}

#[test]
fn take_some_stops_at_its_byte_budget_but_takes_at_least_one_frame() {
    let o = Outbox::new(100).unwrap();
    for _ in 0..5 {
        o.push(Frame::Message(vec![0; 100])).unwrap();
    }
    let mut batch = Vec::new();
    o.take_some(&mut batch, 100, 250);
    assert_eq!(
        batch.len(),
        3,
        "stops after the frame that reaches the budget"
    );
    assert_eq!(o.queued_bytes(), 200);
    batch.clear();
    o.take_some(&mut batch, 100, 1);
    assert_eq!(batch.len(), 1);
    assert_eq!(o.queued_bytes(), 100);
}

#[test]
fn queued_bytes_follow_pushes_and_takes() {
    let o = Outbox::new(8).unwrap();
    o.push(Frame::Message(vec![0; 100])).unwrap();
    o.push_token(token(0)).unwrap();
    let token_len = token(0).encoded_len();
    assert_eq!(o.queued_bytes(), 100 + token_len);
    let mut batch = Vec::new();
    o.take_some(&mut batch, 1, usize::MAX);
    assert_eq!(o.queued_bytes(), token_len);
    o.take_all(&mut batch);
    assert_eq!(o.queued_bytes(), 0);
    o.push(Frame::Message(vec![0; 7])).unwrap();
    o.close();
    assert_eq!(o.queued_bytes(), 0);
}

#[test]
fn closed_refuses_everything() {
    let o = Outbox::new(2).unwrap();
    o.push(Frame::Message(vec![])).unwrap();
    o.close();
    assert!(o.is_empty());
    assert_eq!(o.push(Frame::Message(vec![])), Err(PushError::Closed));
    assert_eq!(o.push_token(token(0)), Err(PushError::Closed));
}

#[test]
fn a_push_wakes_a_parked_consumer() {
    let o = Arc::new(Outbox::new(8).unwrap());
    assert!(o.park_if_empty(false));
    let producer = {
        let o = o.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            o.push(Frame::Message(b"1".to_vec())).unwrap();
        })
    };
    let mut fds = [PollFd::new(&o.waker, PollFlags::IN)];
    let ready = poll(&mut fds, None).unwrap();
    assert_eq!(ready, 1);
    o.unpark(true);
    let mut batch = Vec::new();
    o.take_all(&mut batch);
    assert_eq!(batch.len(), 1);
    producer.join().unwrap();
}

#[test]
fn no_wake_when_the_consumer_is_not_parked() {
    let o = Outbox::new(8).unwrap();
    o.push(Frame::Message(vec![])).unwrap();
    let mut fds = [PollFd::new(&o.waker, PollFlags::IN)];
    let timeout = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    assert_eq!(poll(&mut fds, Some(&timeout)).unwrap(), 0);
}

#[test]
fn stress_many_producers_one_consumer_loses_nothing() {
    const PRODUCERS: usize = 8;
    const EACH: usize = 5_000;
    let o = Arc::new(Outbox::new(usize::MAX).unwrap());
    let handles: Vec<_> = (0..PRODUCERS)
        .map(|_| {
            let o = o.clone();
            std::thread::spawn(move || {
                for i in 0..EACH {
                    if i % 2 == 0 {
                        o.push(Frame::Message(vec![])).unwrap();
                    } else {
                        o.push_token(token(i as u64)).unwrap();
                    }
                }
            })
        })
        .collect();
    let mut got = 0;
    let mut batch = Vec::new();
    while got < PRODUCERS * EACH {
        if o.park_if_empty(false) {
            let mut fds = [PollFd::new(&o.waker, PollFlags::IN)];
            let timeout = rustix::event::Timespec {
                tv_sec: 5,
                tv_nsec: 0,
            };
            assert_eq!(poll(&mut fds, Some(&timeout)).unwrap(), 1, "lost wake-up");
            o.unpark(true);
        }
        batch.clear();
        o.take_all(&mut batch);
        got += batch.len();
    }
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(got, PRODUCERS * EACH);
}

/// A connected loopback pair: the server side non-blocking (as a
/// connection thread sets it), the client side blocking.
fn socket_pair() -> (Arc<TcpStream>, TcpStream) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    server.set_nonblocking(true).unwrap();
    (Arc::new(server), client)
}

/// Reads `n` messages framed by [`length_prefixed`] from `client`.
fn read_texts(mut client: TcpStream, n: usize) -> Vec<String> {
    use std::io::Read;
    (0..n)
        .map(|_| {
            let mut len = [0u8; 4];
            client.read_exact(&mut len).unwrap();
            let mut text = vec![0; u32::from_be_bytes(len) as usize];
            client.read_exact(&mut text).unwrap();
            String::from_utf8(text).unwrap()
        })
        .collect()
}

/// An outbox whose socket side the tests can read.
fn framed(capacity: usize) -> Outbox {
    Outbox::new(capacity).unwrap().framed(length_prefixed)
}

fn json(text: &str) -> Frame {
    Frame::Message(text.as_bytes().to_vec())
}

#[test]
fn a_parked_idle_consumer_is_written_through_without_a_wake() {
    let (server, client) = socket_pair();
    let o = framed(8);
    o.attach_socket(server);
    assert!(o.park_if_empty(true));
    o.push(json("1")).unwrap();
    o.push_token(token(0)).unwrap();
    o.push_all([json("2"), json("3")]).unwrap();
    assert!(o.is_empty(), "everything went straight to the socket");
    let mut fds = [PollFd::new(&o.waker, PollFlags::IN)];
    let now = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    assert_eq!(poll(&mut fds, Some(&now)).unwrap(), 0, "nobody was woken");
    let texts = read_texts(client, 4);
    assert_eq!(texts[0], "1");
    assert!(texts[1].starts_with(r#"{"type":"token","request":"r","seq":0"#));
    assert_eq!(&texts[2..], ["2", "3"]);
}

#[test]
fn a_live_token_is_written_from_its_parts_or_queued_whole() {
    let (server, client) = socket_pair();
    let o = framed(1);
    o.attach_socket(server);
    let (layout, token) = (layout(), Token::new(7, "seven"));
    // Parked with an idle socket: straight through, nobody to wake.
    assert!(o.park_if_empty(true));
    assert_eq!(o.queue_live_token(&layout, &token), Ok(false));
    assert!(o.is_empty());
    let mut expected = Vec::new();
    assert!(token_frame(&layout, &token).encode_into(length_prefixed, &mut expected));
    let texts = read_texts(client, 1);
    assert_eq!(texts[0].as_bytes(), &expected[4..]);
    // Awake: queued as a token frame, within the bound.
    o.unpark(false);
    assert_eq!(o.queue_live_token(&layout, &token), Ok(false));
    assert_eq!(o.queue_live_token(&layout, &token), Err(PushError::Full));
    let mut batch = Vec::new();
    o.take_all(&mut batch);
    assert!(matches!(&batch[..], [Frame::Token { token, .. }] if token.seq == 7));
    o.close();
    assert_eq!(o.queue_live_token(&layout, &token), Err(PushError::Closed));
}

fn token_frame(layout: &Arc<TokenLayout>, token: &Token) -> Frame {
    Frame::Token {
        layout: layout.clone(),
        token: token.clone(),
    }
}

#[test]
fn no_write_through_unless_parked_with_an_idle_socket() {
    let (server, _client) = socket_pair();
    let o = framed(8);
    o.attach_socket(server);
    o.push(json("awake")).unwrap();
    assert_eq!(o.len(), 1, "the consumer is awake: it writes");
    let mut batch = Vec::new();
    o.take_all(&mut batch);
    assert!(o.park_if_empty(false));
    o.push(json("busy")).unwrap();
    assert_eq!(
        o.len(),
        1,
        "the consumer has bytes pending: queue behind them"
    );
    o.take_all(&mut batch);
    assert!(o.park_if_empty(true));
    o.unpark(false);
    o.push(json("unparked")).unwrap();
    assert_eq!(o.len(), 1, "the consumer took the socket back");
    // Replays and closes are the consumer's to write even when it sleeps.
    o.take_all(&mut batch);
    assert!(o.park_if_empty(true));
    o.push(Frame::Close(1000, "bye")).unwrap();
    assert_eq!(o.len(), 1);
}

#[test]
fn a_full_socket_leaves_the_rest_queued_in_order_and_wakes_the_consumer() {
    let (server, client) = socket_pair();
    let o = framed(usize::MAX);
    o.attach_socket(server.clone());
    // Big frames fill the kernel's buffers while nobody reads.
    let big = |i: usize| json(&format!("{i:05}{}", "x".repeat(64 * 1024)));
    let mut pushed = 0;
    assert!(o.park_if_empty(true));
    while o.is_empty() {
        o.push(big(pushed)).unwrap();
        pushed += 1;
        assert!(pushed < 10_000, "the socket never filled");
    }
    let mut batch = Vec::new();
    o.take_all(&mut batch);
    assert!(
        matches!(batch.first(), Some(Frame::Encoded(_))),
        "the unwritten rest of a frame comes first"
    );
    let mut fds = [PollFd::new(&o.waker, PollFlags::IN)];
    assert_eq!(poll(&mut fds, None).unwrap(), 1, "the consumer was woken");
    let reader = std::thread::spawn(move || read_texts(client, pushed));
    // What a connection thread does with the queued rest.
    let mut rest = Vec::new();
    for f in batch {
        assert!(f.encode_into(length_prefixed, &mut rest));
    }
    let mut written = 0;
    while written < rest.len() {
        match (&*server).write(&rest[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => panic!("{e}"),
        }
    }
    let texts = reader.join().unwrap();
    for (i, text) in texts.iter().enumerate() {
        assert!(
            text.starts_with(&format!("{i:05}")),
            "frame {i} out of order"
        );
        assert_eq!(text.len(), 5 + 64 * 1024);
    }
}

/// Producers push from many threads while a consumer parks and unparks
/// the way a connection thread does, deferring frames of its own; the
/// client must read every frame whole, and each pusher's frames in its
/// own order.
#[test]
fn stress_write_through_and_queue_interleave_without_loss_or_reordering() {
    const PRODUCERS: usize = 8;
    const EACH: usize = 2_000;
    // The consumer's own frames are numbered as pusher PRODUCERS.
    const OWN: usize = 500;
    let (server, client) = socket_pair();
    let o = Arc::new(framed(usize::MAX));
    o.attach_socket(server.clone());
    let reader = std::thread::spawn(move || read_texts(client, PRODUCERS * EACH + OWN));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let consumer = {
        let (o, done) = (o.clone(), done.clone());
        std::thread::spawn(move || {
            let mut pending: Vec<u8> = Vec::new();
            let mut batch = Vec::new();
            let mut own = 0;
            loop {
                batch.clear();
                o.take_all(&mut batch);
                for f in batch.drain(..) {
                    assert!(f.encode_into(length_prefixed, &mut pending));
                }
                while !pending.is_empty() {
                    match (&*server).write(&pending) {
                        Ok(n) => drop(pending.drain(..n)),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::yield_now()
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                if own < OWN {
                    o.push_deferred([format!("{PRODUCERS}:{own}").into_bytes()]);
                    own += 1;
                }
                let finished = done.load(std::sync::atomic::Ordering::Acquire);
                if o.park_if_empty(true) {
                    if finished && own == OWN && o.is_empty() {
                        return;
                    }
                    let mut fds = [PollFd::new(&o.waker, PollFlags::IN)];
                    let short = rustix::event::Timespec {
                        tv_sec: 0,
                        tv_nsec: 200_000,
                    };
                    poll(&mut fds, Some(&short)).unwrap();
                    let woken = fds[0].revents().contains(PollFlags::IN);
                    o.unpark(woken);
                }
            }
        })
    };
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let o = o.clone();
            std::thread::spawn(move || {
                // A live token from this layout reads "p:i" and its JSON text.
                let live = Arc::new(TokenLayout {
                    head: format!("{p}:").into_bytes().into(),
                    mid: b"".as_slice().into(),
                    tail: b"".as_slice().into(),
                });
                for i in 0..EACH {
                    let text = format!("{p}:{i}");
                    match i % 3 {
                        0 => o.push_token(Frame::Message(text.into_bytes())).unwrap(),
                        1 => {
                            if o.queue_live_token(&live, &Token::new(i as u64, "x"))
                                .unwrap()
                            {
                                o.wake();
                            }
                        }
                        _ => o.push(json(&text)).unwrap(),
                    }
                }
            })
        })
        .collect();
    for p in producers {
        p.join().unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    o.wake();
    consumer.join().unwrap();
    let texts = reader.join().unwrap();
    let mut next = [0usize; PRODUCERS + 1];
    for text in texts {
        let (p, i) = text.split_once(':').unwrap();
        // A live token's JSON text follows its number.
        let i = i.strip_suffix("\"x\"").unwrap_or(i);
        let (p, i): (usize, usize) = (p.parse().unwrap(), i.parse().unwrap());
        assert_eq!(i, next[p], "pusher {p}'s frames out of order");
        next[p] += 1;
    }
    let mut expected = [EACH; PRODUCERS + 1];
    expected[PRODUCERS] = OWN;
    assert_eq!(next, expected);
}

#[test]
fn deferred_frames_ride_along_with_the_next_producer_write() {
    let (server, client) = socket_pair();
    let o = framed(8);
    o.attach_socket(server);
    o.push_deferred([b"accepted".to_vec(), b"state".to_vec()]);
    assert!(
        o.park_if_empty(true),
        "only deferred frames: the consumer may sleep"
    );
    o.push(json("answer")).unwrap();
    assert!(o.is_empty());
    let mut fds = [PollFd::new(&o.waker, PollFlags::IN)];
    let now = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    assert_eq!(poll(&mut fds, Some(&now)).unwrap(), 0, "nobody was woken");
    assert_eq!(read_texts(client, 3), ["accepted", "state", "answer"]);
}

/// `accepted` comes from the history writer once the question is stored,
/// after the connection thread went to sleep: it must still ride along
/// with the answer, not wake the consumer (that cost a wake-up per cache
/// hit).
#[test]
fn deferred_frames_pushed_while_the_consumer_sleeps_ride_along_too() {
    let (server, client) = socket_pair();
    let o = framed(8);
    o.attach_socket(server);
    assert!(o.park_if_empty(true));
    o.push_deferred([b"accepted".to_vec(), b"state".to_vec()]);
    o.push(json("answer")).unwrap();
    assert!(o.is_empty(), "the answer's write carried everything");
    let mut fds = [PollFd::new(&o.waker, PollFlags::IN)];
    let now = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    assert_eq!(poll(&mut fds, Some(&now)).unwrap(), 0, "nobody was woken");
    assert_eq!(read_texts(client, 3), ["accepted", "state", "answer"]);
    // With no producer after them, the janitor's release wakes the consumer.
    let o = framed(8);
    let (server, _client) = socket_pair();
    o.attach_socket(server);
    assert!(o.park_if_empty(true));
    o.push_deferred([b"accepted".to_vec()]);
    o.release_deferred();
    let mut fds = [PollFd::new(&o.waker, PollFlags::IN)];
    assert_eq!(poll(&mut fds, Some(&now)).unwrap(), 1);
}

#[test]
fn release_deferred_wakes_a_lingering_consumer_only() {
    let (server, _client) = socket_pair();
    let o = framed(8);
    o.attach_socket(server);
    let now = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let woken = |o: &Outbox| {
        let mut fds = [PollFd::new(&o.waker, PollFlags::IN)];
        poll(&mut fds, Some(&now)).unwrap() == 1
    };
    assert!(o.park_if_empty(true));
    o.release_deferred();
    assert!(!woken(&o), "nothing was deferred");
    o.unpark(false);
    o.push_deferred([b"accepted".to_vec()]);
    assert!(o.park_if_empty(true));
    o.release_deferred();
    assert!(woken(&o));
    o.unpark(true);
    assert_eq!(o.len(), 1, "the consumer writes it itself now");
}

#[test]
fn deferred_frames_do_not_linger_behind_other_frames_or_a_busy_socket() {
    let (server, _client) = socket_pair();
    let o = framed(8);
    o.attach_socket(server);
    o.push(json("token from a worker")).unwrap();
    o.push_deferred([b"accepted".to_vec()]);
    assert!(!o.park_if_empty(true), "a worker's frame must not wait");
    let mut batch = Vec::new();
    o.take_all(&mut batch);
    o.push_deferred([b"accepted".to_vec()]);
    assert!(
        !o.park_if_empty(false),
        "the consumer's own bytes are pending"
    );
    // Without a socket nobody else could write them.
    let unattached = framed(8);
    unattached.push_deferred([b"accepted".to_vec()]);
    assert!(!unattached.park_if_empty(true));
}

/// Producers of tokens of many sizes race a consumer that takes in small
/// byte budgets and reports what it holds unwritten: the bytes waiting plus
/// the consumer's never pass the bound, and every frame is either taken
/// or refused.
#[test]
fn stress_the_byte_bound_holds_under_many_producers() {
    const PRODUCERS: usize = 8;
    const EACH: usize = 2_000;
    const MAX: usize = 64 * 1024;
    let o = Arc::new(
        Outbox::bounded(usize::MAX, MAX)
            .unwrap()
            .framed(length_prefixed),
    );
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let o = o.clone();
            std::thread::spawn(move || {
                let mut accepted = 0;
                for i in 0..EACH {
                    let size = 1 + (p * 7919 + i * 104_729) % 8192;
                    if o.push_token(Frame::Message(vec![b'x'; size])).is_ok() {
                        accepted += 1;
                    }
                }
                accepted
            })
        })
        .collect();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let consumer = {
        let (o, done) = (o.clone(), done.clone());
        std::thread::spawn(move || {
            let mut taken = 0;
            let mut batch = Vec::new();
            loop {
                let finished = done.load(std::sync::atomic::Ordering::Acquire);
                batch.clear();
                o.take_some(&mut batch, 16, 16 * 1024);
                let held: usize = batch.iter().map(Frame::encoded_len).sum();
                o.set_unwritten(held);
                assert!(o.queued_bytes() + held <= MAX, "the bound was passed");
                taken += batch.len();
                std::thread::yield_now();
                o.set_unwritten(0);
                if finished && o.is_empty() {
                    return taken;
                }
            }
        })
    };
    let accepted: usize = producers.into_iter().map(|p| p.join().unwrap()).sum();
    done.store(true, std::sync::atomic::Ordering::Release);
    let taken = consumer.join().unwrap();
    assert_eq!(taken, accepted);
    assert!(accepted < PRODUCERS * EACH, "the bound refused some");
}
