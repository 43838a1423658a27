//! The edge of the server: which `Host` and `Origin` may reach it (DNS
//! rebinding), the details of HTTP and WebSocket answers a hostile or
//! sloppy client meets, running out of descriptors, and dead peers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::common;
use crate::common::{raw_http, Client, Server, FAST, WAIT};
use serde_json::json;
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::Frame;
use tungstenite::Message;

const KEY_HEADERS: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

/// Sends a WebSocket handshake with `Host: host` and `extra` headers and
/// returns the status of the answer (the socket is dropped afterwards).
fn handshake(addr: SocketAddr, host: &str, extra: &str) -> u16 {
    let (status, _) = handshake_keep(addr, host, extra);
    status
}

/// Like [`handshake`], and keeps the socket (open WebSocket on 101).
fn handshake_keep(addr: SocketAddr, host: &str, extra: &str) -> (u16, TcpStream) {
    let mut tcp = TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let request = format!("GET /ws HTTP/1.1\r\nHost: {host}\r\n{KEY_HEADERS}{extra}\r\n");
    tcp.write_all(request.as_bytes()).unwrap();
    (read_status(&mut tcp), tcp)
}

/// Reads an HTTP answer's head byte by byte (so nothing after it is
/// consumed) and returns its status; 0 when the socket ended first.
fn read_status(tcp: &mut TcpStream) -> u16 {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tcp.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return 0,
        }
    }
    let head = String::from_utf8_lossy(&head);
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn get_with_host(addr: SocketAddr, method: &str, path: &str, host: &str) -> (u16, String, String) {
    raw_http(
        addr,
        &format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
    )
}

// -- DNS rebinding: Host and Origin ------------------------------------------

#[test]
fn a_foreign_host_is_refused_on_every_path_and_the_handshake() {
    let server = Server::start(FAST);
    let addr = server.addr;
    let port = addr.port();
    let evil = format!("rebind.evil.example:{port}");
    for path in [
        "/",
        "/static/app.js",
        "/healthz",
        "/api/stats",
        "/metrics",
        "/nope",
        "/ws",
    ] {
        let (status, head, body) = get_with_host(addr, "GET", path, &evil);
        assert_eq!(status, 421, "{path}: {head}");
        assert!(body.contains("host"), "{path}: {body}");
        let (status, _, body) = get_with_host(addr, "HEAD", path, &evil);
        assert_eq!(status, 421, "HEAD {path}");
        assert_eq!(body, "", "HEAD {path}");
    }
    // The attack itself: a page on the rebound name opens a WebSocket.
    let origin = format!("Origin: http://{evil}\r\n");
    assert_eq!(handshake(addr, &evil, &origin), 421);
    // The loopback names and the bound address pass, with or without a port.
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("LocalHost:{port}"),
        "localhost".to_owned(),
        format!("[::1]:{port}"),
    ] {
        let (status, _, _) = get_with_host(addr, "GET", "/healthz", &host);
        assert_eq!(status, 200, "{host}");
    }
    assert_eq!(
        handshake(
            addr,
            &format!("localhost:{port}"),
            &format!("Origin: http://localhost:{port}\r\n")
        ),
        101
    );
    // A client without Host (HTTP/1.0 tools) is not a browser: allowed.
    let (status, _, _) = raw_http(addr, "GET /healthz HTTP/1.0\r\n\r\n");
    assert_eq!(status, 200);
}

#[test]
fn an_origin_is_compared_by_scheme_host_and_port() {
    let server = Server::start(FAST);
    let addr = server.addr;
    let port = addr.port();
    let host = format!("127.0.0.1:{port}");
    for (origin, expected) in [
        (format!("http://127.0.0.1:{port}"), 101),
        (format!("https://127.0.0.1:{port}"), 101),
        (format!("HTTP://127.0.0.1:{port}"), 101),
        (format!("ftp://127.0.0.1:{port}"), 403),
        (format!("file://127.0.0.1:{port}"), 403),
        (format!("127.0.0.1:{port}"), 403),
        (format!("http://127.0.0.1:{}", port ^ 1), 403),
        ("http://127.0.0.1".to_owned(), 403),
        (format!("http://localhost:{port}"), 403),
        (format!("http://127.0.0.1:{port}/path"), 403),
        ("null".to_owned(), 403),
    ] {
        let status = handshake(addr, &host, &format!("Origin: {origin}\r\n"));
        assert_eq!(status, expected, "Origin {origin} with Host {host}");
    }
    // Without a port, each scheme's default port is meant.
    let status = handshake(addr, "localhost", "Origin: http://localhost:80\r\n");
    assert_eq!(status, 101);
    let status = handshake(addr, "localhost", "Origin: https://localhost\r\n");
    assert_eq!(status, 101);
    let status = handshake(addr, "localhost", "Origin: https://localhost:80\r\n");
    assert_eq!(status, 403);
}

#[test]
fn allowed_hosts_replaces_the_defaults_and_star_allows_any() {
    let server = Server::start(&format!(
        "{FAST}\n[server]\nallowed_hosts = [\"chat.example\", \"pinned.example:8443\"]\n\
         allowed_origins = [\"https://chat.example\"]\n"
    ));
    let addr = server.addr;
    let port = addr.port();
    for (host, expected) in [
        (format!("chat.example:{port}"), 200),
        ("CHAT.example".to_owned(), 200),
        ("chat.example.".to_owned(), 200),
        ("pinned.example:8443".to_owned(), 200),
        (format!("pinned.example:{port}"), 421),
        ("pinned.example".to_owned(), 421),
        (format!("127.0.0.1:{port}"), 421),
        ("evil.chat.example".to_owned(), 421),
    ] {
        let (status, _, _) = get_with_host(addr, "GET", "/api/stats", &host);
        assert_eq!(status, expected, "Host {host}");
    }
    // The origin list is compared the same way: scheme, host and port.
    for (origin, expected) in [
        ("https://chat.example", 101),
        ("https://chat.example:443", 101),
        ("http://chat.example", 403),
        ("https://chat.example:8443", 403),
    ] {
        let status = handshake(addr, "chat.example", &format!("Origin: {origin}\r\n"));
        assert_eq!(status, expected, "Origin {origin}");
    }
    drop(server);

    let server = Server::start(&format!("{FAST}\n[server]\nallowed_hosts = [\"*\"]\n"));
    let (status, _, _) = get_with_host(server.addr, "GET", "/metrics", "anything.example");
    assert_eq!(status, 200);
}

#[test]
fn a_bad_allowed_hosts_entry_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[server]\nallowed_hosts = [\"http://x.example/\"]\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("server.allowed_hosts"), "{stderr}");
}

// -- protocol details ----------------------------------------------------------

#[test]
fn invalid_utf8_in_a_text_frame_closes_with_1007() {
    let server = Server::start(FAST);
    let mut c = server.client();
    let frame = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    c.send_raw(Message::Frame(frame));
    let close = c.recv_matching(|v| v["type"] == "close");
    assert_eq!(close["code"], 1007, "{close}");
    // Nobody else noticed.
    let a = server.client().ask_and_wait(None, "still fine?");
    assert!(a.is_done(), "{:?}", a.end);
}

#[test]
fn head_answers_never_carry_a_body() {
    let server = Server::start(FAST);
    let host = server.addr.to_string();
    for (path, expected) in [("/nope", 404), ("/ws", 405), ("/static/missing.js", 404)] {
        let (status, head, body) = get_with_host(server.addr, "HEAD", path, &host);
        assert_eq!(status, expected, "HEAD {path}: {head}");
        assert!(head.contains("Content-Length: "), "{head}");
        assert_eq!(body, "", "HEAD {path} carried a body");
    }
}

/// Writes `request` from another thread (it may be larger than the socket
/// buffers) and reads the whole answer, which must end with a clean EOF.
fn send_and_read_cleanly(addr: SocketAddr, request: Vec<u8>) -> String {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let mut writer = tcp.try_clone().unwrap();
    let sending = std::thread::spawn(move || {
        // The server may stop reading; the write then fails, which is fine.
        let _ = writer.write_all(&request);
    });
    let mut raw = Vec::new();
    let mut reader = &tcp;
    let read = reader.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    assert!(
        read.is_ok(),
        "the answer must end with a clean close, got {read:?} after {text:?}"
    );
    drop(tcp);
    let _ = sending.join();
    text
}

#[test]
fn answers_given_before_the_request_was_read_close_without_a_reset() {
    let server = Server::start(FAST);
    let host = server.addr.to_string();
    // 405 to a request with a body that is never read.
    let mut request =
        format!("POST /healthz HTTP/1.1\r\nHost: {host}\r\nContent-Length: 262144\r\n\r\n")
            .into_bytes();
    request.extend(std::iter::repeat_n(b'x', 262_144));
    let answer = send_and_read_cleanly(server.addr, request);
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    // 413 to a head that never ends.
    let mut request = format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\nX-Pad: ").into_bytes();
    request.extend(std::iter::repeat_n(b'a', 200_000));
    let answer = send_and_read_cleanly(server.addr, request);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // Pipelined requests: the first is answered, the rest is not, cleanly.
    let one = format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let request = one.repeat(200).into_bytes();
    let answer = send_and_read_cleanly(server.addr, request);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer}");
}

#[test]
fn the_bearer_scheme_is_case_insensitive() {
    let server = Server::start(&format!("{FAST}\n[server]\nauth_tokens = [\"s3cret\"]\n"));
    let host = server.addr.to_string();
    for header in [
        "Authorization: Bearer s3cret\r\n",
        "Authorization: BEARER s3cret\r\n",
        "Authorization: bEaReR   s3cret\r\n",
    ] {
        assert_eq!(handshake(server.addr, &host, header), 101, "{header}");
    }
    for header in [
        "Authorization: Basic s3cret\r\n",
        "Authorization: Bearers3cret\r\n",
        "Authorization: BEARER wrong\r\n",
    ] {
        assert_eq!(handshake(server.addr, &host, header), 401, "{header}");
    }
}

// -- dead peers ----------------------------------------------------------------

#[test]
fn a_peer_that_never_answers_pings_is_closed_and_its_requests_detached() {
    let server = Server::start(
        "[server]\nping_interval_ms = 100\npong_timeout_ms = 1000\n\
         [timeouts]\norphan_grace_ms = 100\n\
         [llm.simulated]\nfirst_token_ms = 10\ntoken_interval_ms = 50\ntokens = 100000\n",
    );
    // A live client reads all the time, so tungstenite answers every ping
    // (the pong timeout leaves room for a busy test machine).
    let mut live = server.client();
    live.ws
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    // The dead one starts a long answer, then never reads or answers again.
    let (status, mut dead) = handshake_keep(server.addr, &server.addr.to_string(), "");
    assert_eq!(status, 101);
    let chat = json!({"type": "chat", "id": "c1", "message": "a very long answer"}).to_string();
    let masked = client_text_frame(chat.as_bytes());
    dead.write_all(&masked).unwrap();
    common::eventually("the dead peer's chat is running", || {
        server.stats()["upstream"]["in_flight"] == 1
    });
    let mut pings = 0;
    common::eventually("the dead peer is closed", || {
        match live.ws.read() {
            Ok(Message::Ping(_)) => pings += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("the live client was closed: {e}"),
        }
        server.stats()["connections"] == 1
    });
    assert!(pings >= 1, "the live client saw no ping");
    // Its generation lost its only client and is aborted after the grace.
    common::eventually("the orphaned generation is aborted", || {
        let s = server.stats();
        s["upstream"]["in_flight"] == 0 && s["upstream"]["aborted"] == 1
    });
    // The dead socket was closed by the server.
    dead.set_read_timeout(Some(WAIT)).unwrap();
    let mut rest = Vec::new();
    let _ = dead.read_to_end(&mut rest);
    // The live one is still open and works.
    live.ws.get_mut().set_read_timeout(Some(WAIT)).unwrap();
    let v = live.chat(None, "are you there?", json!({"max_tokens": 3}));
    assert_eq!(v["type"], "accepted", "{v}");
}

#[test]
fn a_slow_reader_that_never_answers_pings_is_not_taken_for_dead() {
    let server = Server::start(
        "[server]\nping_interval_ms = 250\npong_timeout_ms = 1000\nsend_buffer_bytes = 4096\n\
         [llm.simulated]\nfirst_token_ms = 1\ntoken_interval_ms = 1\ntokens = 100000\n",
    );
    // A small receive buffer, so the server's writes block while this
    // client reads slowly: its TCP acknowledges, its WebSocket never pongs.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let mut tcp: TcpStream = socket.into();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\n{KEY_HEADERS}\r\n",
        server.addr
    );
    tcp.write_all(request.as_bytes()).unwrap();
    assert_eq!(read_status(&mut tcp), 101);
    let chat = json!({"type": "chat", "id": "c1", "message": "stream to a slow reader"});
    tcp.write_all(&client_text_frame(chat.to_string().as_bytes()))
        .unwrap();
    // About 25 KB/s against a model that makes more: for three pong
    // timeouts the server has more to send than this client takes. (The
    // timeout is a second, not less: on a busy machine this thread can
    // miss its 20 ms turn for a few hundred milliseconds, and a reader
    // that stops reading for a whole pong timeout is rightly taken for
    // dead.)
    let mut received = 0;
    let mut chunk = [0u8; 512];
    let until = std::time::Instant::now() + Duration::from_millis(3000);
    while std::time::Instant::now() < until {
        let n = tcp
            .read(&mut chunk)
            .expect("the server closed a slow reader");
        assert!(
            n > 0,
            "the server closed a slow reader after {received} bytes"
        );
        received += n;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server.stats()["connections"], 1);
    assert!(received > 10_000, "only {received} bytes arrived");
}

/// One masked client text frame (RFC 6455 §5.2, §5.3), short payloads only.
fn client_text_frame(payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let key = [0x12u8, 0x34, 0x56, 0x78];
    let mut out = vec![0x81, 0x80 | payload.len() as u8];
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}

// -- running out of descriptors -----------------------------------------------

#[test]
fn handshakes_beyond_the_descriptor_limit_get_503_and_the_warning_backs_off() {
    let server = Server::start_nofile(FAST, 96);
    let host = server.addr.to_string();
    let mut open = Vec::new();
    let mut refused = 0;
    // Open WebSockets until the process runs out of descriptors; every
    // handshake must be answered, never dropped.
    while refused < 30 {
        assert!(open.len() < 200, "the descriptor limit was never reached");
        let (status, tcp) = handshake_keep(server.addr, &host, "");
        match status {
            101 => open.push(tcp),
            503 => refused += 1,
            other => panic!("handshake answered {other} after {} open", open.len()),
        }
    }
    let warnings = server
        .log()
        .lines()
        .filter(|l| {
            l.contains("WARN")
                && (l.contains("descriptor")
                    || l.contains("accept failed")
                    || l.contains("open files"))
        })
        .count();
    assert!(
        (1..=3).contains(&warnings),
        "{warnings} descriptor warnings for {refused} refusals:\n{}",
        server.log()
    );
    // Closing connections makes room again.
    open.truncate(open.len().saturating_sub(4));
    common::eventually("a handshake succeeds again", || {
        let (status, tcp) = handshake_keep(server.addr, &host, "");
        if status == 101 {
            open.push(tcp);
        }
        status == 101
    });
    let mut c = Client::connect(server.addr);
    drop(open.pop());
    let a = c.ask_and_wait(None, "hello after the storm");
    assert!(a.is_done(), "{:?}", a.end);
}
