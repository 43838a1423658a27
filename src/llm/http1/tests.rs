//! Tests of the HTTP/1.1 client against raw servers on loopback.
use super::*;
use std::net::TcpListener;
use std::sync::mpsc;
use std::thread::{self, JoinHandle};

const SECOND: Duration = Duration::from_secs(1);

/// A server on loopback playing `script` with raw bytes; its result
/// comes back through the handle.
fn serve<T: Send + 'static>(
    script: impl FnOnce(TcpListener) -> T + Send + 'static,
) -> (Pool, JoinHandle<T>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let target = Target::parse(&format!("http://127.0.0.1:{port}/v1/")).expect("target");
    (
        Pool::new(target, 4, 60 * SECOND),
        thread::spawn(move || script(listener)),
    )
}

/// One request off `conn` (head and `Content-Length` body); `None` at EOF.
fn request(conn: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body).ok()?;
    Some(head + &String::from_utf8_lossy(&body))
}

fn accept(listener: &TcpListener) -> TcpStream {
    listener.accept().expect("accept").0
}

/// Counts the further connections waiting on `listener`.
fn waiting(listener: &TcpListener) -> usize {
    listener.set_nonblocking(true).expect("nonblocking");
    std::iter::from_fn(|| listener.accept().ok()).count()
}

fn post(pool: &Pool, read_timeout: Duration) -> Result<Response, Http1Error> {
    let headers = [("Authorization", "Bearer k")];
    pool.post(
        "/chat/completions",
        &headers,
        b"{}",
        SECOND,
        read_timeout,
        &|_| {},
    )
}

/// The whole body of `response`, read as the upstream reader would.
fn body(response: &mut Response) -> Vec<u8> {
    let mut out = Vec::new();
    let leftover = std::mem::take(&mut response.leftover);
    let mut done = response.body.decode(&leftover, &mut out).expect("decode");
    let mut chunk = [0u8; 512];
    while !done {
        match response.conn.read(&mut chunk).expect("read") {
            0 if response.body.until_close() => break,
            0 => panic!("early EOF"),
            n => done = response.body.decode(&chunk[..n], &mut out).expect("decode"),
        }
    }
    out
}

const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
    e\r\ndata: {\"a\":1}\n\r\n5;ext=1\r\n\ndata\r\n10\r\n: [DONE]\n\n......\r\n\
    0\r\nX-Trailer: t\r\n\r\n";
const PAYLOAD: &[u8] = b"data: {\"a\":1}\n\ndata: [DONE]\n\n......";

#[test]
fn targets_are_parsed_from_plain_http_urls_only() {
    let t = |host: &str, port, prefix: &str| {
        Some(Target {
            host: host.into(),
            port,
            prefix: prefix.into(),
        })
    };
    assert_eq!(Target::parse("http://localhost"), t("localhost", 80, ""));
    assert_eq!(Target::parse("http://h:8080"), t("h", 8080, ""));
    assert_eq!(Target::parse("HTTP://h:8080/v1//"), t("h", 8080, "/v1"));
    assert_eq!(Target::parse(" http://h/a/v1/ "), t("h", 80, "/a/v1"));
    assert_eq!(Target::parse("http://[::1]:9/v1"), t("::1", 9, "/v1"));
    assert_eq!(Target::parse("http://[::1]"), t("::1", 80, ""));
    let host = |t: Option<Target>| t.map(|t| (t.address(), t.host_field()));
    let pair = |a: &str, b: &str| Some((a.to_owned(), b.to_owned()));
    assert_eq!(
        host(Target::parse("http://[::1]")),
        pair("[::1]:80", "[::1]")
    );
    assert_eq!(host(Target::parse("http://h:81")), pair("h:81", "h:81"));
    let bad = "https://h/v1 ftp://h h:80 http:// http://:80 http://h:0 http://h:99999 \
               http://h:x http://u:p@h http://[::1 http://[nope]:1 http://h/v1?q=1 \
               http://h/\u{e9} http://h/<x>";
    for bad in bad.split_whitespace().chain(["http://h/a b"]) {
        assert_eq!(Target::parse(bad), None, "{bad}");
    }
}

#[test]
fn the_request_is_sent_and_a_content_length_body_read() {
    let (pool, server) = serve(|listener| {
        let mut conn = accept(&listener);
        let seen = request(&mut conn);
        let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
        conn.write_all(reply).expect("write");
        seen
    });
    let mut response = post(&pool, SECOND).expect("post");
    assert_eq!((response.status, response.reused), (200, false));
    assert!(!response.keep_alive, "Connection: close");
    assert_eq!(body(&mut response), b"hello");
    assert!(response.body.is_complete() && !response.body.until_close());
    let port = pool.target().port;
    assert_eq!(
        server.join().expect("server").expect("request"),
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
             Content-Type: application/json\r\nContent-Length: 2\r\n\
             Accept: text/event-stream\r\nAuthorization: Bearer k\r\n\r\n{{}}"
        )
    );
}

#[test]
fn a_chunked_stream_split_anywhere_reads_the_same_on_one_connection() {
    let (pool, server) = serve(|listener| {
        let mut conn = accept(&listener);
        // Or the second write waits for the first one's delayed ACK.
        conn.set_nodelay(true).expect("nodelay");
        for split in 0..=CHUNKED.len() {
            request(&mut conn).expect("request");
            conn.write_all(&CHUNKED[..split]).expect("write");
            thread::sleep(Duration::from_millis(1));
            conn.write_all(&CHUNKED[split..]).expect("write");
        }
        waiting(&listener)
    });
    for split in 0..=CHUNKED.len() {
        let mut response = post(&pool, SECOND).expect("post");
        assert_eq!(response.reused, split > 0, "split at {split}");
        assert!(response.keep_alive);
        assert_eq!(body(&mut response), PAYLOAD, "split at {split}");
        pool.give_back(response.conn);
    }
    assert_eq!(server.join().expect("server"), 0, "one connection only");
}

#[test]
fn chunked_bodies_fed_in_random_pieces_decode_the_same() {
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |below: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % below as u64) as usize
    };
    for round in 0..400 {
        let (mut wire, mut payload) = (Vec::new(), Vec::new());
        for _ in 0..next(6) {
            let chunk: Vec<u8> = (0..1 + next(300)).map(|_| next(256) as u8).collect();
            let extension = if next(3) == 0 { ";name=\"v\"" } else { "" };
            wire.extend(format!("{:X}{extension}\r\n", chunk.len()).bytes());
            wire.extend(&chunk);
            wire.extend(b"\r\n");
            payload.extend(chunk);
        }
        wire.extend(b"0\r\n");
        if next(2) == 0 {
            wire.extend(b"Trailer-One: 1\r\nTrailer-Two: 2\r\n");
        }
        wire.extend(b"\r\n");
        let mut decoder = BodyDecoder {
            framing: Framing::Chunked(Chunked::default()),
        };
        let (mut out, mut at) = (Vec::new(), 0);
        while at < wire.len() {
            let piece = if round % 4 == 0 { 1 } else { 1 + next(64) };
            let end = (at + piece).min(wire.len());
            let done = decoder.decode(&wire[at..end], &mut out).expect("decode");
            assert_eq!(done, end == wire.len(), "round {round}: done at {end}");
            at = end;
        }
        assert_eq!(out, payload, "round {round}");
        assert!(decoder.is_complete());
        assert!(
            decoder.decode(b"x", &mut out).is_err(),
            "bytes after the end"
        );
    }
}

#[test]
fn broken_framing_is_refused() {
    let chunked = |wire: &[u8]| {
        let mut decoder = BodyDecoder {
            framing: Framing::Chunked(Chunked::default()),
        };
        decoder.decode(wire, &mut Vec::new())
    };
    assert!(chunked(b"zz\r\n").is_err());
    assert!(chunked(b"\r\n").is_err());
    assert!(chunked(b"3\r\nabcd\r\n").is_err(), "longer than its size");
    assert!(chunked(b"11111111111111111\r\n").is_err(), "over u64");
    assert!(chunked(&[b'1'; 5000]).is_err(), "unbounded size line");
    assert!(chunked(b"0\r\n\r\nHTTP").is_err(), "bytes after the end");
    let mut length = BodyDecoder {
        framing: Framing::Length(3),
    };
    assert_eq!(length.decode(b"ab", &mut Vec::new()), Ok(false));
    assert!(length.decode(b"cd", &mut Vec::new()).is_err());
}

#[test]
fn a_body_without_framing_ends_at_close() {
    let (pool, _server) = serve(|listener| {
        let mut conn = accept(&listener);
        request(&mut conn);
        conn.write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
    });
    let mut response = post(&pool, SECOND).expect("post");
    assert!(response.body.until_close() && !response.keep_alive);
    assert_eq!(body(&mut response), b"until the end");
}

#[test]
fn an_error_answer_is_read_with_its_retry_after() {
    let (pool, _server) = serve(|listener| {
        let mut conn = accept(&listener);
        request(&mut conn);
        let json = r#"{"error":{"message":"slow down"}}"#;
        let reply = format!(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 429 Too Many Requests\r\n\
             Retry-After: 7\r\nContent-Length: {}\r\n\r\n{json}",
            json.len()
        );
        conn.write_all(reply.as_bytes())
    });
    let response = post(&pool, SECOND).expect("post");
    assert_eq!(response.status, 429);
    assert_eq!(response.retry_after, Some(Duration::from_secs(7)));
    assert_eq!(
        response.read_body(1024),
        r#"{"error":{"message":"slow down"}}"#
    );
    // The limit holds, even with the rest never coming.
    let (pool, _server) = serve(|listener| {
        let mut conn = accept(&listener);
        request(&mut conn);
        let reply = b"HTTP/1.0 503 Busy\r\nRetry-After: soon\r\nContent-Length: 99\r\n\r\n";
        conn.write_all(reply)?;
        conn.write_all(&[b'x'; 20])?;
        thread::sleep(5 * SECOND);
        Ok::<_, io::Error>(())
    });
    let response = post(&pool, SECOND).expect("post");
    assert_eq!((response.retry_after, response.keep_alive), (None, false));
    assert_eq!(response.read_body(10), "x".repeat(10));
}

#[test]
fn a_kept_connection_the_upstream_closed_is_replaced() {
    let (done, closed) = mpsc::channel();
    let (pool, server) = serve(move |listener| {
        for _ in 0..2 {
            let mut conn = accept(&listener);
            request(&mut conn);
            conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .expect("write");
            drop(conn);
            let _ = done.send(());
        }
        waiting(&listener)
    });
    let mut first = post(&pool, SECOND).expect("post");
    assert_eq!(body(&mut first), b"ok");
    pool.give_back(first.conn);
    closed.recv().expect("closed");
    // The FIN crosses loopback with the close; a moment for good measure.
    thread::sleep(Duration::from_millis(20));
    let mut second = post(&pool, SECOND).expect("second post");
    assert!(
        !second.reused,
        "the closed connection was found by the peek"
    );
    assert_eq!(body(&mut second), b"ok");
    assert_eq!(server.join().expect("server"), 0);
}

#[test]
fn a_close_the_peek_cannot_see_leaves_the_request_unanswered() {
    let (pool, _server) = serve(|listener| {
        let mut conn = accept(&listener);
        request(&mut conn);
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")?;
        // The next request arrives, and the upstream closes instead.
        request(&mut conn);
        Ok::<_, io::Error>(())
    });
    let mut first = post(&pool, SECOND).expect("post");
    assert_eq!(body(&mut first), b"ok");
    pool.give_back(first.conn);
    match post(&pool, SECOND) {
        Err(Http1Error::Unanswered { reused: true, .. }) => {}
        other => panic!("expected an unanswered kept connection, got {other:?}"),
    }
}

#[test]
fn connections_past_their_idle_age_are_not_reused() {
    let (pool, server) = serve(|listener| {
        // Kept open, so only the age can rule the first one out.
        let mut open = Vec::new();
        for _ in 0..2 {
            let mut conn = accept(&listener);
            request(&mut conn);
            conn.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .expect("write");
            open.push(conn);
        }
        open
    });
    let pool = Pool::new(pool.target().clone(), 4, Duration::ZERO);
    let first = post(&pool, SECOND).expect("post");
    assert!(first.body.is_complete() && first.keep_alive);
    pool.give_back(first.conn);
    thread::sleep(Duration::from_millis(2));
    assert!(!post(&pool, SECOND).expect("post").reused);
    server.join().expect("server");
}

#[test]
fn failures_before_a_response_are_told_apart() {
    let closed = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let pool = Pool::new(Target::parse(&url).expect("target"), 1, SECOND);
    let error = post(&pool, SECOND).expect_err("refused");
    assert!(matches!(error, Http1Error::Connect(_)), "{error:?}");
    assert!(
        error.to_string().starts_with("cannot reach 127.0.0.1:"),
        "{error}"
    );
    let sneaky = pool.post("/x", &[("X", "a\r\nB: c")], b"", SECOND, SECOND, &|_| {});
    assert!(
        matches!(sneaky, Err(Http1Error::Connect(e)) if e.kind() == io::ErrorKind::InvalidInput)
    );

    let (pool, _server) = serve(|listener| {
        let mut conn = accept(&listener);
        request(&mut conn);
        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nX-Long: ");
        let _ = conn.write_all(&vec![b'a'; 70 * 1024]);
    });
    let error = post(&pool, SECOND).expect_err("long head");
    assert!(matches!(error, Http1Error::BadResponse(_)), "{error:?}");

    let (pool, _server) = serve(|listener| {
        let mut conn = accept(&listener);
        request(&mut conn);
        thread::sleep(5 * SECOND);
    });
    let start = Instant::now();
    let error = post(&pool, Duration::from_millis(200)).expect_err("silent");
    assert!(matches!(error, Http1Error::Timeout(_)), "{error:?}");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(200) && waited < SECOND,
        "{waited:?}"
    );
}
