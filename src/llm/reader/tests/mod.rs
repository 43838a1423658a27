//! Tests of the upstream reader against raw servers on loopback: a thread
//! plays the upstream with raw bytes, a real [`Pool::post`] sends the
//! request and reads the response head, and the response is handed to a
//! [`Reader`] with a [`Recorder`], which keeps what the reader gives it.
//!
//! Every wait is bounded: a test that goes wrong fails, it does not hang.

use super::*;
use std::collections::BTreeSet;
use std::io::Write;
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};

use crate::llm::http1::{Pool, Response, Target};

const SECOND: Duration = Duration::from_secs(1);
/// A read timeout that no test reaches unless it means to.
const LONG: Duration = Duration::from_secs(10);

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The head of a chunked event stream.
const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
    Transfer-Encoding: chunked\r\n\r\n";
/// The last chunk of a chunked body, without trailers: the terminator.
const LAST_CHUNK: &[u8] = b"0\r\n\r\n";
/// The event that ends a chat completion stream.
const DONE: &str = "data: [DONE]\n\n";

/// `data` as one chunk of a chunked body.
fn chunk(data: &str) -> Vec<u8> {
    format!("{:x}\r\n{data}\r\n", data.len()).into_bytes()
}

/// A server on loopback playing `script` with raw bytes, and a pool of
/// connections to it; the script's result comes back through the handle.
fn serve<T: Send + 'static>(
    script: impl FnOnce(TcpListener) -> T + Send + 'static,
) -> (Pool, JoinHandle<T>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    (pool(port), thread::spawn(move || script(listener)))
}

fn pool(port: u16) -> Pool {
    let target = Target::parse(&format!("http://127.0.0.1:{port}/v1")).expect("target");
    Pool::new(target, 64, 60 * SECOND)
}

/// Accepts a connection and reads its request: the connection and the
/// request's body.
fn accept(listener: &TcpListener) -> (TcpStream, String) {
    let (mut conn, _) = listener.accept().expect("accept");
    conn.set_nonblocking(false).expect("blocking");
    // Or a write waits for the delayed ACK of the one before.
    conn.set_nodelay(true).expect("nodelay");
    let body = request(&mut conn).expect("a request");
    (conn, body)
}

/// One request off `conn` (head, then a `Content-Length` body): its body;
/// `None` at EOF or after 5 s of silence.
fn request(conn: &mut TcpStream) -> Option<String> {
    conn.set_read_timeout(Some(5 * SECOND)).ok()?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&head);
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body).ok()?;
    String::from_utf8(body).ok()
}

/// What the server side of a connection saw of the client's close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// A read returned 0: the client closed.
    Eof,
    /// The client closed with bytes unread, which resets the connection.
    Reset,
    /// Nothing within the bound.
    Nothing,
}

/// Waits up to `bound` for the client to close `conn` (bytes that come
/// first are skipped): what was seen, and when.
fn closed_within(conn: &mut TcpStream, bound: Duration) -> (Seen, Duration) {
    let start = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        let Some(left) = bound.checked_sub(start.elapsed()).filter(|d| !d.is_zero()) else {
            return (Seen::Nothing, start.elapsed());
        };
        if conn.set_read_timeout(Some(left)).is_err() {
            return (Seen::Nothing, start.elapsed());
        }
        match conn.read(&mut buf) {
            Ok(0) => return (Seen::Eof, start.elapsed()),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                return (Seen::Reset, start.elapsed())
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return (Seen::Nothing, start.elapsed()),
        }
    }
}

/// Sends a request through `pool` (the body tells the server which stream
/// it is) and reads the head of a `200` answer.
fn post(pool: &Pool, body: &str) -> Response {
    let response = pool
        .post(
            "/chat/completions",
            &[],
            body.as_bytes(),
            SECOND,
            5 * SECOND,
            &|_| {},
        )
        .expect("post");
    assert_eq!(response.status, 200);
    response
}

/// Hands `response`'s body to `reader`, as a streaming worker does.
fn add(
    reader: &Reader,
    response: Response,
    timeout: Duration,
    stream: Box<dyn Stream>,
) -> StreamId {
    reader.add(
        response.conn,
        response.body,
        response.leftover,
        response.keep_alive,
        timeout,
        stream,
    )
}

/// What a [`Recorder`] was given.
#[derive(Default)]
struct Record {
    payload: Vec<u8>,
    /// Calls that came on another thread than `chorus-upstream`.
    elsewhere: usize,
    /// When the stream first answered [`Step::Done`] or [`Step::Stop`].
    decided: Option<Instant>,
    /// How many times it ended.
    ends: usize,
    end: Option<End>,
    ended: Option<Instant>,
}

/// A [`Stream`] that records its payload and its end, answers what
/// `decide` says of the payload so far, and sends `key` on `ended` at the
/// end.
struct Recorder {
    key: usize,
    record: Arc<Mutex<Record>>,
    decide: fn(&[u8]) -> Step,
    ended: mpsc::Sender<usize>,
}

fn on_reader_thread() -> bool {
    thread::current().name() == Some("chorus-upstream")
}

impl Stream for Recorder {
    fn on_body(&mut self, payload: &[u8]) -> Step {
        let mut record = self.record.lock();
        record.elsewhere += usize::from(!on_reader_thread());
        record.payload.extend_from_slice(payload);
        let step = (self.decide)(&record.payload);
        if step != Step::More {
            record.decided.get_or_insert_with(Instant::now);
        }
        step
    }

    fn on_end(self: Box<Self>, end: End) {
        let mut record = self.record.lock();
        record.elsewhere += usize::from(!on_reader_thread());
        record.ends += 1;
        record.end = Some(end);
        record.ended = Some(Instant::now());
        drop(record);
        let _ = self.ended.send(self.key);
    }
}

/// Reads on, whatever comes.
fn more(_: &[u8]) -> Step {
    Step::More
}

/// Has all it needs once `[DONE]` came, as a chat completion stream does.
fn done_at_done(payload: &[u8]) -> Step {
    if payload.ends_with(DONE.as_bytes()) {
        Step::Done
    } else {
        Step::More
    }
}

/// Wants no more once `data: stop` came, as when the clients are gone.
fn stop_at_stop(payload: &[u8]) -> Step {
    if payload.ends_with(b"data: stop\n\n") {
        Step::Stop
    } else {
        Step::More
    }
}

/// The test's side of one [`Recorder`].
struct Watch {
    record: Arc<Mutex<Record>>,
    ended: mpsc::Receiver<usize>,
}

fn recorder(decide: fn(&[u8]) -> Step) -> (Box<dyn Stream>, Watch) {
    let (tx, rx) = mpsc::channel();
    let record = Arc::new(Mutex::new(Record::default()));
    let stream = Recorder {
        key: 0,
        record: record.clone(),
        decide,
        ended: tx,
    };
    (Box::new(stream), Watch { record, ended: rx })
}

impl Watch {
    /// The stream's end, awaited at most `bound`; checks that it came once
    /// and that every call came on the reader thread.
    fn end(&self, bound: Duration) -> End {
        if let Err(e) = self.ended.recv_timeout(bound) {
            panic!("no end within {bound:?}: {e}");
        }
        let mut record = self.record.lock();
        assert_eq!(record.ends, 1, "ends");
        assert_eq!(record.elsewhere, 0, "calls off the reader thread");
        record.end.take().expect("the end")
    }

    fn payload(&self) -> Vec<u8> {
        self.record.lock().payload.clone()
    }

    /// Waits (at most `bound`) until the payload so far ends with `tail`.
    fn wait_for(&self, tail: &[u8], bound: Duration) {
        let start = Instant::now();
        while !self.record.lock().payload.ends_with(tail) {
            assert!(
                start.elapsed() < bound,
                "{:?} did not come within {bound:?}; came: {:?}",
                String::from_utf8_lossy(tail),
                String::from_utf8_lossy(&self.payload())
            );
            thread::sleep(ms(1));
        }
    }

    /// From the stream's `Done` or `Stop` to its end.
    fn decided_to_end(&self) -> Duration {
        let record = self.record.lock();
        let (decided, ended) = record.decided.zip(record.ended).expect("decided and ended");
        ended.duration_since(decided)
    }
}

/// The round trip a streaming worker makes, and the way to use the reader:
/// post the request and read the head on the worker (`Pool::post`), hand the
/// body to the reader with a `Stream` of one's own, sleep until the stream's
/// end comes back through a channel, and give a kept connection back to the
/// pool. (`llm::direct` does this for every plain `http://` call.)
#[test]
fn example_one_stream_end_to_end() {
    // The upstream: answers one chat completion with three events.
    let (pool, server) = serve(|listener| {
        let (mut conn, _request) = accept(&listener);
        conn.write_all(HEAD).expect("head");
        for event in ["data: Hel\n\n", "data: lo\n\n", DONE] {
            thread::sleep(ms(10));
            conn.write_all(&chunk(event)).expect("chunk");
        }
        conn.write_all(LAST_CHUNK).expect("last chunk");
        // Kept open until the client lets the connection go.
        closed_within(&mut conn, 5 * SECOND).0
    });

    // The stream: runs on the reader thread; collects the text and sends
    // it with the end to the waiting worker.
    struct Collect {
        text: Vec<u8>,
        done: mpsc::Sender<(Vec<u8>, End)>,
    }
    impl Stream for Collect {
        fn on_body(&mut self, payload: &[u8]) -> Step {
            self.text.extend_from_slice(payload);
            if self.text.ends_with(DONE.as_bytes()) {
                Step::Done
            } else {
                Step::More
            }
        }
        fn on_end(self: Box<Self>, end: End) {
            let _ = self.done.send((self.text, end));
        }
    }

    // One reader for the whole process.
    let reader = Reader::start().expect("the reader thread");
    // On the worker: the request and the head...
    let response = pool
        .post("/chat/completions", &[], b"{}", SECOND, 5 * SECOND, &|_| {})
        .expect("post");
    assert_eq!(response.status, 200);
    // ...then the body goes to the reader, and the worker sleeps.
    let (done, ended) = mpsc::channel();
    let stream = Collect {
        text: Vec::new(),
        done,
    };
    // `add` returns the stream's id: until the end, any thread may stop
    // the stream with `reader.aborter().abort(id)` (a cancel, the janitor).
    reader.add(
        response.conn,
        response.body,
        response.leftover,
        response.keep_alive,
        LONG,
        Box::new(stream),
    );
    let (text, end) = ended.recv_timeout(5 * SECOND).expect("the end");
    assert_eq!(text, b"data: Hel\n\ndata: lo\n\ndata: [DONE]\n\n");
    match end {
        // The body was read to its end: the connection may serve again.
        End::Finished { conn: Some(conn) } => pool.give_back(conn),
        other => panic!("expected a kept connection, got {other:?}"),
    }
    // Closing the pool closes the kept connection.
    drop(pool);
    assert_eq!(server.join().expect("server"), Seen::Eof);
}

#[test]
fn a_chunked_stream_arrives_whole_and_hands_its_connection_back_blocking() {
    let events = ["data: {\"a\":1}\n\n", "data: {\"b\":22}\n\n", DONE];
    let wire: Vec<u8> = events.iter().flat_map(|e| chunk(e)).collect();
    let (go, told) = mpsc::channel::<()>();
    let (pool, server) = serve(move |listener| {
        let (mut conn, _) = accept(&listener);
        conn.write_all(HEAD).expect("head");
        // Split anywhere: in a size line, in an event, between CR and LF.
        for piece in wire.chunks(7) {
            thread::sleep(ms(5));
            conn.write_all(piece).expect("write");
        }
        // The terminator only once the stream has said `Done`.
        told.recv_timeout(5 * SECOND).expect("told to end the body");
        conn.write_all(LAST_CHUNK).expect("last chunk");
        // The connection carries the next request.
        request(&mut conn).expect("a second request");
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .expect("write");
        closed_within(&mut conn, 5 * SECOND).0
    });
    let reader = Reader::start().expect("reader");
    let (stream, watch) = recorder(done_at_done);
    add(&reader, post(&pool, "{}"), LONG, stream);
    watch.wait_for(DONE.as_bytes(), 5 * SECOND);
    thread::sleep(ms(20));
    assert_eq!(watch.record.lock().ends, 0, "the end awaits the terminator");
    go.send(()).expect("go");
    let mut conn = match watch.end(5 * SECOND) {
        End::Finished { conn: Some(conn) } => conn,
        other => panic!("expected a kept connection, got {other:?}"),
    };
    assert!(watch.decided_to_end() >= ms(20));
    assert_eq!(watch.payload(), events.concat().as_bytes());
    // Blocking again: a read waits for its timeout instead of failing at once.
    conn.set_read_timeout(Some(ms(100))).expect("read timeout");
    let start = Instant::now();
    let error = conn.read(&mut [0u8; 16]).expect_err("nothing to read");
    assert!(
        matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{error:?}"
    );
    assert!(start.elapsed() >= ms(80), "{:?}", start.elapsed());
    // And it is good for the next request.
    pool.give_back(conn);
    let second = post(&pool, "{}");
    assert!(second.reused);
    let (stream, watch) = recorder(more);
    add(&reader, second, LONG, stream);
    let end = watch.end(5 * SECOND);
    assert!(matches!(end, End::Finished { conn: Some(_) }), "{end:?}");
    assert_eq!(watch.payload(), b"ok");
    drop(end);
    assert_eq!(server.join().expect("server"), Seen::Eof);
}

#[test]
fn a_terminator_that_never_comes_costs_the_connection_not_the_read_timeout() {
    let (pool, server) = serve(|listener| {
        let (mut conn, _) = accept(&listener);
        let reply = [HEAD, &chunk("data: x\n\n"), &chunk(DONE)].concat();
        conn.write_all(&reply).expect("write");
        // Open and silent.
        closed_within(&mut conn, 5 * SECOND).0
    });
    let reader = Reader::start().expect("reader");
    let (stream, watch) = recorder(done_at_done);
    add(&reader, post(&pool, "{}"), LONG, stream);
    let end = watch.end(5 * SECOND);
    assert!(matches!(end, End::Finished { conn: None }), "{end:?}");
    assert_eq!(watch.payload(), [b"data: x\n\n", DONE.as_bytes()].concat());
    let waited = watch.decided_to_end();
    assert!(
        waited >= DRAIN_GRACE && waited < DRAIN_GRACE + TIMEOUT_CHECK + ms(300),
        "{waited:?}"
    );
    assert_eq!(server.join().expect("server"), Seen::Eof);
}

#[test]
fn a_done_stream_without_keep_alive_ends_at_once() {
    let (pool, server) = serve(|listener| {
        let (mut conn, _) = accept(&listener);
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
        conn.write_all(&[head, &chunk(DONE)[..]].concat())
            .expect("write");
        closed_within(&mut conn, 5 * SECOND).0
    });
    let reader = Reader::start().expect("reader");
    let response = post(&pool, "{}");
    assert!(!response.keep_alive);
    let (stream, watch) = recorder(done_at_done);
    add(&reader, response, LONG, stream);
    let end = watch.end(5 * SECOND);
    assert!(matches!(end, End::Finished { conn: None }), "{end:?}");
    // No terminator awaited: the connection is not kept anyway.
    assert!(watch.decided_to_end() < DRAIN_GRACE / 2);
    assert_eq!(server.join().expect("server"), Seen::Eof);
}

#[test]
fn a_stream_that_stops_closes_its_connection() {
    let (pool, server) = serve(|listener| {
        let (mut conn, _) = accept(&listener);
        conn.write_all(&[HEAD, &chunk("data: a\n\n")].concat())
            .expect("write");
        thread::sleep(ms(10));
        conn.write_all(&chunk("data: stop\n\n")).expect("write");
        closed_within(&mut conn, SECOND)
    });
    let reader = Reader::start().expect("reader");
    let (stream, watch) = recorder(stop_at_stop);
    add(&reader, post(&pool, "{}"), LONG, stream);
    let end = watch.end(5 * SECOND);
    assert!(matches!(end, End::Finished { conn: None }), "{end:?}");
    assert_eq!(watch.payload(), b"data: a\n\ndata: stop\n\n");
    let (seen, after) = server.join().expect("server");
    assert_eq!(seen, Seen::Eof, "within 1 s ({after:?})");
}

#[test]
fn an_abort_from_another_thread_ends_a_silent_stream_at_once() {
    let (pool, server) = serve(|listener| {
        let (mut conn, _) = accept(&listener);
        conn.write_all(&[HEAD, &chunk("data: a\n\n")].concat())
            .expect("write");
        let first = closed_within(&mut conn, 5 * SECOND).0;
        // A second stream, after the abort, on a new connection.
        let (mut conn, _) = accept(&listener);
        let reply = [HEAD, &chunk("data: b\n\n"), LAST_CHUNK].concat();
        conn.write_all(&reply).expect("write");
        (first, closed_within(&mut conn, 5 * SECOND).0)
    });
    let reader = Reader::start().expect("reader");
    let (stream, watch) = recorder(more);
    let id = add(&reader, post(&pool, "{}"), LONG, stream);
    watch.wait_for(b"data: a\n\n", 5 * SECOND);
    let aborter = reader.aborter();
    let start = Instant::now();
    thread::spawn(move || aborter.abort(id))
        .join()
        .expect("abort");
    let end = watch.end(SECOND);
    let waited = start.elapsed();
    assert!(matches!(end, End::Aborted), "{end:?}");
    assert!(waited < ms(500), "{waited:?}");
    // Aborting it again, or a stream never known, changes nothing.
    reader.aborter().abort(id);
    reader.aborter().abort(StreamId(u64::MAX));
    let (stream, second) = recorder(more);
    add(&reader, post(&pool, "{}"), LONG, stream);
    let end = second.end(5 * SECOND);
    assert!(matches!(end, End::Finished { conn: Some(_) }), "{end:?}");
    assert_eq!(second.payload(), b"data: b\n\n");
    drop(end);
    assert_eq!(watch.record.lock().ends, 1);
    assert_eq!(server.join().expect("server"), (Seen::Eof, Seen::Eof));
}

#[test]
fn a_silent_upstream_times_out_after_the_read_timeout() {
    let (pool, server) = serve(|listener| {
        let (mut conn, _) = accept(&listener);
        conn.write_all(HEAD).expect("head");
        closed_within(&mut conn, 5 * SECOND).0
    });
    let reader = Reader::start().expect("reader");
    let (stream, watch) = recorder(more);
    let start = Instant::now();
    add(&reader, post(&pool, "{}"), ms(300), stream);
    let end = watch.end(5 * SECOND);
    let waited = start.elapsed();
    assert!(matches!(end, End::TimedOut), "{end:?}");
    assert!(waited >= ms(300) && waited < SECOND, "{waited:?}");
    assert_eq!(server.join().expect("server"), Seen::Eof);
}

#[test]
fn a_stream_that_keeps_talking_does_not_time_out() {
    let (pool, server) = serve(|listener| {
        let (mut conn, _) = accept(&listener);
        conn.write_all(HEAD).expect("head");
        for i in 0..6 {
            thread::sleep(ms(150));
            conn.write_all(&chunk(&format!("data: {i}\n\n")))
                .expect("chunk");
        }
        conn.write_all(LAST_CHUNK).expect("last chunk");
        closed_within(&mut conn, 5 * SECOND).0
    });
    let reader = Reader::start().expect("reader");
    let (stream, watch) = recorder(more);
    // Twice the gap between chunks, a third of the whole body's time.
    add(&reader, post(&pool, "{}"), ms(300), stream);
    let end = watch.end(5 * SECOND);
    assert!(matches!(end, End::Finished { conn: Some(_) }), "{end:?}");
    let expected: String = (0..6).map(|i| format!("data: {i}\n\n")).collect();
    assert_eq!(watch.payload(), expected.as_bytes());
    drop(end);
    assert_eq!(server.join().expect("server"), Seen::Eof);
}

#[test]
fn a_close_before_the_end_of_the_framing_fails_the_stream() {
    let (pool, _server) = serve(|listener| {
        let (mut conn, _) = accept(&listener);
        // A chunk, then half of the next one.
        let reply = [HEAD, &chunk("data: a\n\n"), b"10\r\ndata"].concat();
        conn.write_all(&reply).expect("write");
        thread::sleep(ms(20));
    });
    let reader = Reader::start().expect("reader");
    let (stream, watch) = recorder(more);
    add(&reader, post(&pool, "{}"), LONG, stream);
    match watch.end(5 * SECOND) {
        End::Failed(e) => assert_eq!(e.kind(), ErrorKind::UnexpectedEof, "{e}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    assert_eq!(watch.payload(), b"data: a\n\ndata");
}

#[test]
fn a_body_without_framing_ends_at_the_close() {
    let (pool, _server) = serve(|listener| {
        let (mut conn, _) = accept(&listener);
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
            .expect("head");
        for event in ["data: a\n\n", "data: b\n\n"] {
            thread::sleep(ms(10));
            conn.write_all(event.as_bytes()).expect("write");
        }
    });
    let reader = Reader::start().expect("reader");
    let response = post(&pool, "{}");
    assert!(response.body.until_close() && !response.keep_alive);
    let (stream, watch) = recorder(more);
    add(&reader, response, LONG, stream);
    let end = watch.end(5 * SECOND);
    assert!(matches!(end, End::Finished { conn: None }), "{end:?}");
    assert_eq!(watch.payload(), b"data: a\n\ndata: b\n\n");
}

#[test]
fn broken_framing_fails_the_stream() {
    let (pool, server) = serve(|listener| {
        let (mut conn, _) = accept(&listener);
        conn.write_all(&[HEAD, &chunk("data: a\n\n")].concat())
            .expect("write");
        thread::sleep(ms(10));
        conn.write_all(b"zz\r\n").expect("write");
        closed_within(&mut conn, 5 * SECOND).0
    });
    let reader = Reader::start().expect("reader");
    let (stream, watch) = recorder(more);
    add(&reader, post(&pool, "{}"), LONG, stream);
    match watch.end(5 * SECOND) {
        End::Failed(e) => assert_eq!(e.kind(), ErrorKind::InvalidData, "{e}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    assert_eq!(watch.payload(), b"data: a\n\n");
    assert_eq!(server.join().expect("server"), Seen::Eof);
}

#[test]
fn bytes_read_with_the_head_come_first_and_in_order() {
    let (pool, server) = serve(|listener| {
        let (mut conn, _) = accept(&listener);
        // One write: the head and two chunks reach the client together.
        let first = [HEAD, &chunk("data: 1\n\n"), &chunk("data: 2\n\n")].concat();
        conn.write_all(&first).expect("write");
        thread::sleep(ms(30));
        conn.write_all(&chunk("data: 3\n\n")).expect("write");
        thread::sleep(ms(10));
        conn.write_all(&[&chunk(DONE)[..], LAST_CHUNK].concat())
            .expect("write");
        closed_within(&mut conn, 5 * SECOND).0
    });
    let reader = Reader::start().expect("reader");
    let response = post(&pool, "{}");
    assert_eq!(
        response.leftover,
        [chunk("data: 1\n\n"), chunk("data: 2\n\n")].concat(),
        "one write on loopback arrives in one read"
    );
    let (stream, watch) = recorder(done_at_done);
    add(&reader, response, LONG, stream);
    let end = watch.end(5 * SECOND);
    assert!(matches!(end, End::Finished { conn: Some(_) }), "{end:?}");
    let expected = ["data: 1\n\n", "data: 2\n\n", "data: 3\n\n", DONE].concat();
    assert_eq!(watch.payload(), expected.as_bytes());
    drop(end);
    assert_eq!(server.join().expect("server"), Seen::Eof);
}

#[test]
fn a_body_read_whole_with_the_head_ends_without_another_read() {
    let (pool, server) = serve(|listener| {
        let (mut conn, _) = accept(&listener);
        let reply = [HEAD, &chunk("data: 1\n\n"), &chunk(DONE), LAST_CHUNK].concat();
        conn.write_all(&reply).expect("write");
        // The next request comes on the same connection.
        request(&mut conn).expect("a second request");
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            .expect("write");
        closed_within(&mut conn, 5 * SECOND).0
    });
    let reader = Reader::start().expect("reader");
    for (decide, expected) in [
        (
            done_at_done as fn(&[u8]) -> Step,
            ["data: 1\n\n", DONE].concat(),
        ),
        (more, "hello".to_owned()),
    ] {
        let response = post(&pool, "{}");
        let (stream, watch) = recorder(decide);
        add(&reader, response, LONG, stream);
        match watch.end(5 * SECOND) {
            End::Finished { conn: Some(conn) } => pool.give_back(conn),
            other => panic!("expected a kept connection, got {other:?}"),
        }
        assert_eq!(watch.payload(), expected.as_bytes());
    }
    drop(pool);
    assert_eq!(server.join().expect("server"), Seen::Eof);
}

#[test]
fn dropping_the_reader_aborts_every_stream_and_ends_the_thread() {
    const STREAMS: usize = 3;
    let (pool, server) = serve(|listener| {
        let mut conns: Vec<TcpStream> = (0..STREAMS)
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
    let watches: Vec<Watch> = (0..STREAMS)
        .map(|_| {
            let (stream, watch) = recorder(more);
            add(&reader, post(&pool, "{}"), LONG, stream);
            watch
        })
        .collect();
    for watch in &watches {
        watch.wait_for(b"data: a\n\n", 5 * SECOND);
    }
    let aborter = reader.aborter();
    let (dropped, gone) = mpsc::channel();
    thread::spawn(move || {
        // Joins the thread.
        drop(reader);
        let _ = dropped.send(());
    });
    gone.recv_timeout(2 * SECOND)
        .expect("the reader thread ended");
    for watch in &watches {
        let end = watch.end(ms(100));
        assert!(matches!(end, End::Aborted), "{end:?}");
    }
    // An abort hook that fires late finds nobody, and nothing breaks.
    aborter.abort(StreamId(1));
    assert_eq!(server.join().expect("server"), [Seen::Eof; STREAMS]);
}

mod stress;
