//! The reader under load from many threads, a reader thread that dies,
//! and how often it sleeps: quiet and busy.

use super::*;

/// A small random generator (xorshift), seeded from the clock: the seed is
/// in every failure message.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Rng(nanos | 1)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Chunks of each stream of the stress test (then `[DONE]`, then the terminator).
const CHUNKS: usize = 50;
/// Chunks an aborted stream gets before its upstream goes quiet.
const BEFORE_ABORT: usize = 25;

/// Event `i` of stream `n` in the stress test.
fn event(n: usize, i: usize) -> String {
    format!("data: {{\"stream\":{n},\"chunk\":{i}}}\n\n")
}

/// One upstream thread of the stress test: takes `count` connections off
/// `listener` (shared with other threads), learns from each request which
/// stream it is, and sends every stream its events at random intervals of
/// 0–3 ms, interleaved. The streams in `aborted` get [`BEFORE_ABORT`]
/// events, then silence until the client closes: what each of those saw.
fn upstream(
    listener: TcpListener,
    count: usize,
    aborted: &BTreeSet<usize>,
    mut rng: Rng,
    deadline: Instant,
) -> Vec<(usize, Seen)> {
    struct Upstream {
        conn: TcpStream,
        n: usize,
        sent: usize,
        last: usize,
        next: Instant,
    }
    let mut pause = move || Duration::from_micros(rng.below(3001) as u64);
    let mut streams = Vec::new();
    while streams.len() < count {
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false).expect("blocking");
                conn.set_nodelay(true).expect("nodelay");
                let mut conn = conn;
                let body = request(&mut conn).expect("a request");
                let n: usize = body.parse().expect("a stream number");
                conn.write_all(HEAD).expect("head");
                let last = if aborted.contains(&n) {
                    BEFORE_ABORT
                } else {
                    CHUNKS + 2
                };
                let next = Instant::now() + pause();
                streams.push(Upstream {
                    conn,
                    n,
                    sent: 0,
                    last,
                    next,
                });
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "the clients did not connect");
                thread::sleep(ms(1));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
    while let Some(up) = streams
        .iter_mut()
        .filter(|up| up.sent < up.last)
        .min_by_key(|up| up.next)
    {
        if Instant::now() > deadline {
            break;
        }
        if let Some(wait) = up.next.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let piece = match up.sent {
            i if i < CHUNKS => chunk(&event(up.n, i)),
            i if i == CHUNKS => chunk(DONE),
            _ => LAST_CHUNK.to_vec(),
        };
        let wrote = up.conn.write_all(&piece);
        // An aborted stream may be closed while its events still come.
        assert!(
            wrote.is_ok() || aborted.contains(&up.n),
            "stream {}: {wrote:?}",
            up.n
        );
        up.sent += 1;
        up.next = Instant::now() + pause();
    }
    streams
        .iter_mut()
        .filter(|up| aborted.contains(&up.n))
        .map(|up| {
            let left = deadline.saturating_duration_since(Instant::now());
            (up.n, closed_within(&mut up.conn, left).0)
        })
        .collect()
}

/// Waits until `all` threads have counted themselves in `ready`, or the
/// deadline (then the checks after it fail).
fn gather(ready: &AtomicUsize, all: usize, deadline: Instant) {
    ready.fetch_add(1, Ordering::SeqCst);
    while ready.load(Ordering::SeqCst) < all && Instant::now() < deadline {
        thread::yield_now();
    }
}

#[test]
fn many_streams_added_from_many_threads_end_once_each_and_whole() {
    const STREAMS: usize = 64;
    const SERVERS: usize = 4;
    const CLIENTS: usize = 8;
    const ABORTERS: usize = 2;
    const ABORTED: usize = 8;
    let start = Instant::now();
    let deadline = start + 20 * SECOND;
    let mut rng = Rng::seeded();
    let seed = rng.0;
    let mut aborted = BTreeSet::new();
    while aborted.len() < ABORTED {
        aborted.insert(rng.below(STREAMS));
    }
    let aborted = Arc::new(aborted);

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    // Polled, so that an upstream thread never waits past the deadline.
    listener.set_nonblocking(true).expect("nonblocking");
    let pool = pool(listener.local_addr().expect("addr").port());
    let servers: Vec<JoinHandle<Vec<(usize, Seen)>>> = (0..SERVERS)
        .map(|i| {
            let listener = listener.try_clone().expect("listener");
            let aborted = aborted.clone();
            let rng = Rng(seed.rotate_left(8 * i as u32 + 8) | 1);
            thread::spawn(move || upstream(listener, STREAMS / SERVERS, &aborted, rng, deadline))
        })
        .collect();

    let reader = Reader::start().expect("reader");
    let (ended, ends) = mpsc::channel();
    let records: Vec<Arc<Mutex<Record>>> = (0..STREAMS).map(|_| Arc::default()).collect();
    let ids: Mutex<Vec<Option<StreamId>>> = Mutex::new(vec![None; STREAMS]);
    let ready = AtomicUsize::new(0);
    thread::scope(|scope| {
        for c in 0..CLIENTS {
            let streams: Vec<(usize, Box<dyn Stream>)> = (c..STREAMS)
                .step_by(CLIENTS)
                .map(|n| {
                    let stream = Recorder {
                        key: n,
                        record: records[n].clone(),
                        decide: done_at_done,
                        ended: ended.clone(),
                    };
                    (n, Box::new(stream) as Box<dyn Stream>)
                })
                .collect();
            let (reader, pool, ids, ready) = (&reader, &pool, &ids, &ready);
            scope.spawn(move || {
                let responses: Vec<Response> = streams
                    .iter()
                    .map(|(n, _)| post(pool, &n.to_string()))
                    .collect();
                // All the clients add their streams at the same time.
                gather(ready, CLIENTS, deadline);
                for ((n, stream), response) in streams.into_iter().zip(responses) {
                    let id = add(reader, response, LONG, stream);
                    ids.lock()[n] = Some(id);
                }
            });
        }
        for a in 0..ABORTERS {
            let mine: Vec<usize> = aborted.iter().copied().skip(a).step_by(ABORTERS).collect();
            let aborter = reader.aborter();
            let (records, ids) = (&records, &ids);
            let mut rng = Rng(seed.rotate_right(8 * a as u32 + 8) | 1);
            scope.spawn(move || {
                for n in mine {
                    // Midway: after some of the events before the silence.
                    let after = 1 + rng.below(BEFORE_ABORT);
                    while Instant::now() < deadline {
                        let id = ids.lock()[n];
                        let events = {
                            let record = records[n].lock();
                            record.payload.windows(2).filter(|w| w == b"\n\n").count()
                        };
                        if let (Some(id), true) = (id, events >= after) {
                            aborter.abort(id);
                            break;
                        }
                        thread::sleep(ms(1));
                    }
                }
            });
        }
    });
    drop(ended);

    let mut count = vec![0usize; STREAMS];
    for got in 0..STREAMS {
        let left = deadline.saturating_duration_since(Instant::now());
        match ends.recv_timeout(left) {
            Ok(n) => count[n] += 1,
            Err(e) => panic!("seed {seed}: {got} of {STREAMS} streams ended within 20 s ({e})"),
        }
    }
    // Joins the thread: every end it would ever send is sent by then.
    drop(reader);
    assert!(
        ends.try_recv().is_err(),
        "seed {seed}: a stream ended twice"
    );
    for (n, record) in records.iter().enumerate() {
        let record = record.lock();
        let expected: String = (0..CHUNKS)
            .map(|i| event(n, i))
            .chain([DONE.into()])
            .collect();
        assert_eq!(
            (count[n], record.ends),
            (1, 1),
            "seed {seed}: stream {n}'s ends"
        );
        assert_eq!(
            record.elsewhere, 0,
            "seed {seed}: stream {n}: off the thread"
        );
        let end = record.end.as_ref().expect("an end");
        if aborted.contains(&n) {
            assert!(
                matches!(end, End::Aborted),
                "seed {seed}: stream {n}: {end:?}"
            );
            assert!(
                expected.as_bytes().starts_with(&record.payload)
                    && record.payload.len() < expected.len(),
                "seed {seed}: stream {n} got {:?}",
                String::from_utf8_lossy(&record.payload)
            );
        } else {
            assert!(
                matches!(end, End::Finished { .. }),
                "seed {seed}: stream {n}: {end:?}"
            );
            assert!(
                record.payload == expected.as_bytes(),
                "seed {seed}: stream {n} got {:?}",
                String::from_utf8_lossy(&record.payload)
            );
        }
    }
    for server in servers {
        for (n, seen) in server.join().expect("upstream") {
            assert_ne!(
                seen,
                Seen::Nothing,
                "seed {seed}: stream {n}'s upstream saw no close"
            );
        }
    }
    assert!(start.elapsed() < 20 * SECOND, "{:?}", start.elapsed());
}

/// A stream that panics on its first bytes: a bug elsewhere that takes the
/// reader thread down.
struct Broken;

impl Stream for Broken {
    fn on_body(&mut self, _: &[u8]) -> Step {
        panic!("a broken stream");
    }

    fn on_end(self: Box<Self>, _: End) {}
}

#[test]
fn no_stream_waits_forever_on_a_reader_thread_that_died() {
    let (pool, server) = serve(|listener| {
        let mut conns: Vec<TcpStream> = (0..3)
            .map(|_| {
                let (mut conn, _) = accept(&listener);
                conn.write_all(&[HEAD, &chunk("data: a\n\n")].concat())
                    .expect("write");
                conn
            })
            .collect();
        conns
            .iter_mut()
            .map(|conn| closed_within(conn, 5 * SECOND).0)
            .collect::<Vec<_>>()
    });
    let reader = Reader::start().expect("reader");
    let (stream, before) = recorder(more);
    add(&reader, post(&pool, "{}"), LONG, stream);
    before.wait_for(b"data: a\n\n", 5 * SECOND);
    add(&reader, post(&pool, "{}"), LONG, Box::new(Broken));
    // The registered stream is dropped with the thread, without an end:
    // its channel closes.
    assert_eq!(
        before.ended.recv_timeout(2 * SECOND),
        Err(mpsc::RecvTimeoutError::Disconnected)
    );
    // One handed over afterwards is dropped too, not kept forever.
    let (stream, after) = recorder(more);
    add(&reader, post(&pool, "{}"), LONG, stream);
    assert_eq!(
        after.ended.recv_timeout(2 * SECOND),
        Err(mpsc::RecvTimeoutError::Disconnected)
    );
    assert_eq!(after.record.lock().ends, 0);
    // Dropping the reader of a dead thread returns.
    drop(reader);
    assert_eq!(server.join().expect("server"), [Seen::Eof; 3]);
}

/// Voluntary context switches of the calling thread so far: how often it
/// went to sleep (Linux).
fn sleeps_so_far() -> u64 {
    let status = std::fs::read_to_string("/proc/thread-self/status").expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("voluntary_ctxt_switches")
}

/// A stream that notes, at each call of `on_body`, how often the reader
/// thread has slept so far.
struct Sleeps {
    at: Arc<Mutex<Vec<(usize, u64)>>>,
}

impl Stream for Sleeps {
    fn on_body(&mut self, payload: &[u8]) -> Step {
        let events = payload.windows(2).filter(|w| w == b"\n\n").count();
        self.at.lock().push((events, sleeps_so_far()));
        Step::More
    }

    fn on_end(self: Box<Self>, _: End) {}
}

/// Events every `gap` on `streams` connections, interleaved (`per_stream`
/// each): the events read and the times the reader thread slept between
/// the first and the last read.
fn sleeps_per_event(streams: usize, per_stream: usize, gap: Duration) -> (usize, u64) {
    let (pool, server) = serve(move |listener| {
        let mut conns: Vec<TcpStream> = (0..streams)
            .map(|_| {
                let (mut conn, _) = accept(&listener);
                conn.write_all(HEAD).expect("head");
                conn
            })
            .collect();
        for i in 0..per_stream {
            for conn in &mut conns {
                thread::sleep(gap);
                conn.write_all(&chunk(&format!("data: {i}\n\n")))
                    .expect("chunk");
            }
        }
        for conn in &mut conns {
            conn.write_all(LAST_CHUNK).expect("last chunk");
        }
    });
    let reader = Reader::start().expect("reader");
    let at = Arc::new(Mutex::new(Vec::new()));
    for _ in 0..streams {
        let stream = Sleeps { at: at.clone() };
        add(&reader, post(&pool, "{}"), LONG, Box::new(stream));
    }
    server.join().expect("server");
    let wanted = streams * per_stream;
    let start = Instant::now();
    while at.lock().iter().map(|(n, _)| n).sum::<usize>() < wanted {
        assert!(start.elapsed() < 5 * SECOND, "the events did not all come");
        thread::sleep(ms(5));
    }
    let at = at.lock();
    let events: usize = at.iter().map(|(n, _)| n).sum();
    let first = at.first().map_or(0, |(_, s)| *s);
    let last = at.last().map_or(0, |(_, s)| *s);
    (events, last - first)
}

#[test]
fn a_quiet_reader_sleeps_once_per_event() {
    let (events, sleeps) = sleeps_per_event(1, 20, ms(20));
    assert_eq!(events, 20);
    // One sleep per event (in `epoll_wait`), not more.
    assert!(sleeps <= 19 * 3 / 2, "{sleeps} sleeps for 19 events");
}
