//! A panicking connection thread gives back everything it holds: the
//! server runs in this process, so the tests can read its counters and
//! make a connection thread panic with hooks that exist only in unit tests
//! ([`PANIC_PATH`] and `ws::PANIC_FRAME`); the `chorus` binary has neither.
//!
//! Threads: each test starts a server in this process and drives it over
//! loopback from the test's own thread.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tungstenite::Message;

use super::Server;
use crate::config::Config;
use crate::net::PANIC_PATH;

fn start(dir: &std::path::Path) -> Server {
    let mut config = Config::default();
    config.server.bind = "127.0.0.1:0".to_owned();
    config.history.sqlite_path = dir.join("chat.db").to_string_lossy().into_owned();
    config.timeouts.orphan_grace_ms = 50;
    config.timeouts.drain_ms = 200;
    config.llm.simulated.first_token_ms = 5;
    config.llm.simulated.token_interval_ms = 20;
    config.llm.simulated.tokens = 100_000;
    Server::start(config).expect("server starts")
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out waiting for: {what}");
}

#[test]
fn a_panicking_http_thread_gives_back_its_thread_slot() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path());
    let addr = server.local_addr();
    for _ in 0..3 {
        let mut tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(tcp, "GET {PANIC_PATH} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut answer = Vec::new();
        // The thread died without answering: the socket just ends.
        let _ = tcp.read_to_end(&mut answer);
        assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    }
    let shared = server.shared.clone();
    eventually("every connection thread is given back", || {
        shared.connection_threads() == 0
    });
    server.shutdown();
}

#[test]
fn a_panicking_websocket_thread_gives_back_everything_and_detaches_its_requests() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path());
    let addr = server.local_addr();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let (mut ws, _) = tungstenite::client::client(format!("ws://{addr}/ws"), tcp).unwrap();
    let chat = r#"{"type":"chat","id":"c1","message":"an endless answer"}"#;
    ws.send(Message::text(chat)).unwrap();
    // Wait for the first token: the generation is running for this client.
    loop {
        match ws.read().unwrap() {
            Message::Text(t) if t.as_str().contains(r#""type":"token""#) => break,
            _ => {}
        }
    }
    let shared = server.shared.clone();
    assert_eq!(shared.websockets(), 1);
    assert_eq!(shared.pipeline.generations(), 1);
    ws.send(Message::text(crate::ws::PANIC_FRAME)).unwrap();
    eventually("the panicked connection's bookkeeping is undone", || {
        shared.websockets() == 0
            && shared.connection_threads() == 0
            && shared.registered_websockets() == 0
            && shared.metrics().connections.get() == 0
    });
    // Its request was detached like on a close: the generation lost its
    // only client and is aborted after the orphan grace.
    eventually("the orphaned generation is aborted", || {
        shared.pipeline.generations() == 0 && shared.pipeline.live_requests() == 0
    });
    // The server still serves.
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let (mut ws, _) = tungstenite::client::client(format!("ws://{addr}/ws"), tcp).unwrap();
    ws.send(Message::text(
        r#"{"type":"chat","id":"c2","message":"hello","options":{"max_tokens":2}}"#,
    ))
    .unwrap();
    loop {
        if let Message::Text(t) = ws.read().unwrap() {
            if t.as_str().contains(r#""type":"accepted""#) {
                break;
            }
        }
    }
    drop(ws);
    server.shutdown();
}
