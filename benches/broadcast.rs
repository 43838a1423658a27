//! Fan-out cost of the broadcaster: one producer publishing tokens to 1, 100
//! and 1000 subscribers, each attached through its own WebSocket client
//! and [`Outbox`], as connections are in production.
//!
//! - `publish/S`: the time of one [`Broadcast::publish`] of a short token to
//!   `S` subscribers whose outboxes are large enough never to cut anyone off.
//!   Tokens are published in batches of [`PUBLISH_BATCH`] under the timer;
//!   the outboxes are drained between batches outside it, so queues never
//!   grow without bound. Nobody is parked, so no wake-up is paid: this is
//!   the producer's own cost (encode once, one queue push per subscriber).
//!   Throughput is deliveries (token × subscriber) per second.
//! - `publish_and_deliver/S`: end to end with `S` real consumer threads, each
//!   sleeping in `poll(2)` on its outbox's eventfd and taking frames the way
//!   a connection thread does (`park_if_empty`, `unpark`, `take_some`,
//!   `Frame::Replay` expansion). One iteration is a burst of
//!   [`DELIVER_BATCH`] tokens, timed from the first publish until every
//!   consumer has counted all of them, so the wake-ups and the scheduling of
//!   `S` threads on the machine's cores are included. Throughput is
//!   deliveries per second. The consumer threads are started once per
//!   subscriber count, with small stacks, and joined at the end.
//!
//! - `publish_to_sockets/S`: one publish to `S` connections whose threads
//!   sleep with nothing to write, so the publisher (and, from 64
//!   subscribers on, rayon's pool) writes each frame straight to a real
//!   loopback socket: the production path of a live stream.
//!
//! In every group the generation is replaced by a fresh one (outside the
//! timer) every [`HISTORY_LIMIT`] tokens, since a [`Broadcast`] keeps its
//! whole token history.
//!
//! Run with `cargo bench --bench broadcast`; add `-- --quick` for a faster,
//! rougher pass, or a filter such as `-- publish_and_deliver`.

use std::hint::black_box;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use chorus::broadcast::{Broadcast, Token};
use chorus::delivery::{Attachment, Client};
use chorus::outbox::{Frame, Outbox};
use chorus::ws::WsClient;
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use rustix::event::{poll, PollFd, PollFlags};

/// Subscriber counts measured.
const SUBSCRIBERS: [usize; 3] = [1, 100, 1000];
/// The token published; a typical short piece of text.
const TOKEN: &str = " token";
/// Token frames an outbox admits: far more than a batch, so nobody is cut off.
const OUTBOX_CAPACITY: usize = 1 << 16;
/// Publishes timed back to back before the outboxes are drained.
const PUBLISH_BATCH: u64 = 256;
/// Tokens per end-to-end iteration.
const DELIVER_BATCH: usize = 16;
/// Tokens after which the generation is replaced, bounding its history.
const HISTORY_LIMIT: u64 = 1 << 16;
/// Frames a consumer takes per round, as a connection thread does.
const TAKE: usize = 512;
/// Stack of a consumer thread; it only polls and counts.
const CONSUMER_STACK: usize = 64 * 1024;
/// A burst not delivered within this long means a lost wake-up: fail loudly
/// instead of spinning forever.
const STALL_LIMIT: Duration = Duration::from_secs(30);

/// An attachment to its own request through a WebSocket client writing
/// into `outbox`, as in production.
fn attach(outbox: &Arc<Outbox>, n: usize) -> Arc<Attachment> {
    let client: Arc<dyn Client> = WsClient::new(outbox.clone());
    Attachment::new(&client, &format!("r-{n:032x}"))
}

/// A WebSocket outbox admitting [`OUTBOX_CAPACITY`] token frames.
fn outbox() -> Outbox {
    chorus::ws::outbox(OUTBOX_CAPACITY, usize::MAX).expect("create an outbox eventfd")
}

/// `count` attachments, each to its own request on its own outbox.
fn attachments(count: usize) -> (Vec<Arc<Attachment>>, Vec<Arc<Outbox>>) {
    (0..count)
        .map(|n| {
            let outbox = Arc::new(outbox());
            (attach(&outbox, n), outbox)
        })
        .unzip()
}

/// A new generation with every attachment subscribed live from its start.
fn fresh_broadcast(attachments: &[Arc<Attachment>]) -> Arc<Broadcast<Attachment>> {
    let broadcast = Broadcast::new();
    for attachment in attachments {
        assert!(broadcast.subscribe(attachment, 0).live);
    }
    broadcast
}

/// Replaces the generation once its history reached [`HISTORY_LIMIT`].
fn renew_if_long(broadcast: &mut Arc<Broadcast<Attachment>>, attachments: &[Arc<Attachment>]) {
    if broadcast.token_count() >= HISTORY_LIMIT {
        broadcast.finish();
        *broadcast = fresh_broadcast(attachments);
    }
}

fn publish(c: &mut Criterion) {
    let mut group = c.benchmark_group("publish");
    for subscribers in SUBSCRIBERS {
        let (attachments, outboxes) = attachments(subscribers);
        let mut broadcast = fresh_broadcast(&attachments);
        let mut drained = Vec::new();
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_function(BenchmarkId::from_parameter(subscribers), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let batch = left.min(PUBLISH_BATCH);
                    let start = Instant::now();
                    for _ in 0..batch {
                        black_box(broadcast.publish(black_box(TOKEN)));
                    }
                    timed += start.elapsed();
                    left -= batch;
                    for outbox in &outboxes {
                        drained.clear();
                        outbox.take_all(&mut drained);
                        // Every token reached every outbox: nobody was cut off.
                        assert_eq!(drained.len() as u64, batch);
                    }
                    drained.clear();
                    renew_if_long(&mut broadcast, &attachments);
                }
                timed
            })
        });
        broadcast.finish();
    }
    group.finish();
}

/// Consumer threads, one per attachment, counting the token frames they take.
/// Dropping it stops and joins them.
struct Consumers {
    attachments: Vec<Arc<Attachment>>,
    outboxes: Vec<Arc<Outbox>>,
    /// Token frames taken by all consumers together.
    received: Arc<AtomicUsize>,
    handles: Vec<JoinHandle<()>>,
}

impl Consumers {
    fn spawn(count: usize) -> Consumers {
        let (attachments, outboxes) = attachments(count);
        let received = Arc::new(AtomicUsize::new(0));
        let handles = outboxes
            .iter()
            .enumerate()
            .map(|(n, outbox)| {
                let outbox = outbox.clone();
                let received = received.clone();
                thread::Builder::new()
                    .name(format!("consumer-{n}"))
                    .stack_size(CONSUMER_STACK)
                    .spawn(move || consume(&outbox, &received))
                    .expect("spawn a consumer thread")
            })
            .collect();
        Consumers {
            attachments,
            outboxes,
            received,
            handles,
        }
    }

    /// Spins (yielding the core to the consumers) until `target` frames were taken.
    fn wait_for(&self, target: usize) {
        let deadline = Instant::now() + STALL_LIMIT;
        let mut rounds = 0u32;
        loop {
            let received = self.received.load(Ordering::Acquire);
            if received >= target {
                return;
            }
            rounds = rounds.wrapping_add(1);
            if rounds % 1024 == 0 && Instant::now() > deadline {
                panic!("consumers stalled: {received} of {target} frames after {STALL_LIMIT:?}");
            }
            thread::yield_now();
        }
    }
}

impl Drop for Consumers {
    fn drop(&mut self) {
        // A consumer checks `is_closed` before it parks, and the wake comes
        // after the close, so none can sleep through it.
        for outbox in &self.outboxes {
            outbox.close();
            outbox.wake();
        }
        for handle in self.handles.drain(..) {
            if handle.join().is_err() && !thread::panicking() {
                panic!("a consumer thread panicked");
            }
        }
    }
}

/// A connection thread's outbox loop without the socket: take frames, count
/// the tokens, park on the eventfd when there is nothing left, until closed.
fn consume(outbox: &Outbox, received: &AtomicUsize) {
    let mut batch: Vec<Frame> = Vec::with_capacity(TAKE);
    let mut tokens_of_replay: Vec<Token> = Vec::new();
    loop {
        batch.clear();
        outbox.take_some(&mut batch, TAKE, usize::MAX);
        if batch.is_empty() {
            if outbox.is_closed() {
                return;
            }
            if outbox.park_if_empty(false) {
                let mut fds = [PollFd::from_borrowed_fd(outbox.waker_fd(), PollFlags::IN)];
                match poll(&mut fds, None) {
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => panic!("poll on the outbox waker failed: {e}"),
                }
                if fds[0].revents().contains(PollFlags::IN) {
                    outbox.unpark(true);
                }
            }
            continue;
        }
        let mut tokens = 0;
        for frame in batch.drain(..) {
            match frame {
                Frame::Token { layout, token } => {
                    black_box((&layout, &token));
                    tokens += 1;
                }
                Frame::Replay(replay) => {
                    tokens_of_replay.clear();
                    replay
                        .source
                        .tokens(replay.from, replay.to, &mut tokens_of_replay);
                    black_box(&tokens_of_replay);
                    tokens += tokens_of_replay.len();
                }
                Frame::Message(bytes) | Frame::Encoded(bytes) => {
                    black_box(bytes);
                }
                Frame::Close(..) | Frame::End => return,
            }
        }
        received.fetch_add(tokens, Ordering::Release);
    }
}

fn publish_and_deliver(c: &mut Criterion) {
    let mut group = c.benchmark_group("publish_and_deliver");
    // Iterations take up to ~100 ms at 1000 subscribers: the same count per
    // sample keeps the run within the measurement time.
    group.sampling_mode(SamplingMode::Flat);
    for subscribers in SUBSCRIBERS {
        let consumers = Consumers::spawn(subscribers);
        let mut broadcast = fresh_broadcast(&consumers.attachments);
        let mut expected = 0;
        group.throughput(Throughput::Elements((subscribers * DELIVER_BATCH) as u64));
        group.bench_function(BenchmarkId::from_parameter(subscribers), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    expected += subscribers * DELIVER_BATCH;
                    let start = Instant::now();
                    for _ in 0..DELIVER_BATCH {
                        black_box(broadcast.publish(black_box(TOKEN)));
                    }
                    consumers.wait_for(expected);
                    timed += start.elapsed();
                    renew_if_long(&mut broadcast, &consumers.attachments);
                }
                timed
            })
        });
        broadcast.finish();
        // Nobody was cut off and nothing arrived twice.
        assert_eq!(consumers.received.load(Ordering::Acquire), expected);
        assert!(consumers.attachments.iter().all(|a| !a.is_cut()));
        drop(consumers);
    }
    group.finish();
}

/// Loopback TCP pairs: the server side attached to an outbox whose consumer
/// is parked with an idle socket (as a sleeping connection thread leaves
/// it), the client side kept to be drained.
struct SocketSubscribers {
    attachments: Vec<Arc<Attachment>>,
    outboxes: Vec<Arc<Outbox>>,
    clients: Vec<TcpStream>,
}

impl SocketSubscribers {
    fn connect(count: usize) -> SocketSubscribers {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("listener address");
        let mut attachments = Vec::with_capacity(count);
        let mut outboxes = Vec::with_capacity(count);
        let mut clients = Vec::with_capacity(count);
        for n in 0..count {
            let client = TcpStream::connect(addr).expect("connect loopback");
            let (server, _) = listener.accept().expect("accept loopback");
            server
                .set_nonblocking(true)
                .expect("non-blocking server side");
            client
                .set_nonblocking(true)
                .expect("non-blocking client side");
            let outbox = Arc::new(outbox());
            outbox.attach_socket(Arc::new(server));
            assert!(outbox.park_if_empty(true));
            attachments.push(attach(&outbox, n));
            outboxes.push(outbox);
            clients.push(client);
        }
        SocketSubscribers {
            attachments,
            outboxes,
            clients,
        }
    }

    /// Reads everything the clients have, and returns the byte count.
    fn drain(&mut self) -> usize {
        let mut buf = [0u8; 64 * 1024];
        let mut total = 0;
        for client in &mut self.clients {
            loop {
                match client.read(&mut buf) {
                    Ok(0) => panic!("the server side closed"),
                    Ok(n) => total += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
        }
        total
    }
}

/// `publish_to_sockets/S`: one publish to `S` sleeping connections, each
/// written straight to its loopback socket by the publisher (and, from 64
/// subscribers on, the rayon pool). Per iteration, the time of one token's
/// hand-out including the `S` socket writes; the client sides are drained
/// outside the timer.
fn publish_to_sockets(c: &mut Criterion) {
    let mut group = c.benchmark_group("publish_to_sockets");
    group.sampling_mode(SamplingMode::Flat);
    for subscribers in SUBSCRIBERS {
        let mut sockets = SocketSubscribers::connect(subscribers);
        let mut broadcast = fresh_broadcast(&sockets.attachments);
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_function(BenchmarkId::from_parameter(subscribers), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    black_box(broadcast.publish(black_box(TOKEN)));
                    timed += start.elapsed();
                    // Everything went to the sockets; nothing was queued.
                    assert!(sockets.outboxes.iter().all(|o| o.is_empty()));
                    assert!(sockets.drain() > 0);
                    renew_if_long(&mut broadcast, &sockets.attachments);
                }
                timed
            })
        });
        broadcast.finish();
        sockets.drain();
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = publish, publish_and_deliver, publish_to_sockets
}
criterion_main!(benches);
