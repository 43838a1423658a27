//! The HTTP side of the port, handshake refusals, configuration errors,
//! and durability across shutdown and restart.

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;

use crate::common;
use crate::common::{raw_http, Client, Server, FAST};
use serde_json::{json, Value};

#[test]
fn http_endpoints_answer_as_documented() {
    let server = Server::start(FAST);
    let (status, head, body) = server.get("/");
    assert_eq!(status, 200);
    assert!(head.contains("Content-Type: text/html"), "{head}");
    assert!(body.contains("<html"), "{body}");
    let (status, head, _) = server.get("/static/index.html");
    assert_eq!(status, 200);
    assert!(head.contains("text/html"));
    let (status, _, body) = server.get("/healthz");
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "ok");
    let stats = server.stats();
    for stage in ["intake", "cache", "prepare", "follow", "stream"] {
        for field in ["workers", "busy", "queue", "capacity"] {
            assert!(
                stats["stages"][stage][field].is_u64(),
                "{stage}.{field} in {stats}"
            );
        }
    }
    for path in [
        "/nope",
        "/static/missing.css",
        "/static/../Cargo.toml",
        "/static/%2e%2e/Cargo.toml",
        "/static/..%2fCargo.toml",
        "/static//etc/passwd",
    ] {
        let (status, _, _) = server.get(path);
        assert_eq!(status, 404, "{path}");
    }
    let (status, head, _) = raw_http(
        server.addr,
        &format!(
            "POST /healthz HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\n\r\n",
            server.addr
        ),
    );
    assert_eq!(status, 405);
    assert!(head.contains("Allow: GET"));
    // HEAD gets GET's head and no body.
    let (status, head, body) = raw_http(
        server.addr,
        &format!("HEAD /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", server.addr),
    );
    assert_eq!(status, 200);
    assert!(head.contains("Content-Length: "), "{head}");
    assert_eq!(body, "");
    let (status, _, _) = raw_http(server.addr, "GARBAGE\r\n\r\n");
    assert_eq!(status, 400);
    // A plain GET on /ws (no upgrade) is refused clearly.
    let (status, _, _) = server.get("/ws");
    assert_eq!(status, 426);
}

fn handshake(server: &Server, extra: &str, target: &str) -> u16 {
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n",
        server.addr
    );
    let mut tcp = TcpStream::connect(server.addr).unwrap();
    tcp.set_read_timeout(Some(common::WAIT)).unwrap();
    tcp.write_all(request.as_bytes()).unwrap();
    let mut buf = [0u8; 256];
    let n = std::io::Read::read(&mut tcp, &mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn handshake_refusals_are_plain_http_answers() {
    let server = Server::start(&format!(
        "{FAST}\n[server]\nauth_tokens = [\"s3cret\"]\nmax_connections = 1\n"
    ));
    assert_eq!(handshake(&server, "", "/ws"), 401);
    assert_eq!(
        handshake(&server, "Authorization: Bearer wrong\r\n", "/ws"),
        401
    );
    assert_eq!(
        handshake(
            &server,
            "Authorization: Bearer s3cret\r\nOrigin: http://evil.example\r\n",
            "/ws"
        ),
        403
    );
    let origin = format!("Origin: http://{}\r\n", server.addr);
    // The first connection takes the only slot; keep it open.
    let mut first = TcpStream::connect(server.addr).unwrap();
    first
        .write_all(
            format!(
                "GET /ws?token=s3cret HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{origin}\r\n",
                server.addr
            )
            .as_bytes(),
        )
        .unwrap();
    let mut buf = [0u8; 256];
    let n = std::io::Read::read(&mut first, &mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"));
    assert_eq!(handshake(&server, "", "/ws?token=s3cret"), 503);
    drop(first);
    common::eventually("the slot is free again", || {
        handshake(&server, "", "/ws?token=s3cret") == 101
    });
}

#[test]
fn an_invalid_config_exits_non_zero_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[workers]\ncache_workers = 0\n", "workers.cache_workers"),
        ("[workers]\ncache_worker = 2\n", "cache_worker"),
        ("[server]\nbind = \"not an address\"\n", "server.bind"),
        ("[cache]\nbackend = \"disk\"\n", "cache.backend"),
    ];
    for (toml, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, toml).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_chorus"))
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{toml}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(key),
            "{toml}: stderr does not name {key}: {stderr}"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .env("CHORUS_WORKERS_MAX_CONCURRENT_LLM_STREAMS", "many")
        .arg("--bind")
        .arg("127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("CHORUS_WORKERS_MAX_CONCURRENT_LLM_STREAMS"),
        "{stderr}"
    );
}

#[test]
fn environment_overrides_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_env(
        dir.path(),
        "[workers]\nmax_concurrent_llm_streams = 2\n",
        &[("CHORUS_WORKERS_MAX_CONCURRENT_LLM_STREAMS", "3")],
    );
    assert_eq!(server.stats()["stages"]["stream"]["workers"], 3);
}

#[test]
fn shutdown_keeps_sqlite_intact_and_history_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(dir.path(), FAST);
    let mut c = server.client();
    let first = c.ask_and_wait(Some("durable"), "remember this");
    let second = c.ask_and_wait(Some("durable"), "and this");
    drop(c);
    let status = server.terminate();
    assert!(status.success(), "exit status {status:?}");
    // The database is a valid SQLite file after a clean stop.
    let check = rusqlite::Connection::open(dir.path().join("chat.db")).unwrap();
    let ok: String = check
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    drop(check);
    let server = Server::start_in(dir.path(), FAST);
    let mut c = server.client();
    c.send(json!({"type": "history", "conversation": "durable", "limit": 10}));
    let h = c.recv_matching(|v| v["type"] == "history");
    let contents: Vec<&str> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        contents,
        vec![
            "remember this",
            first.text.as_str(),
            "and this",
            second.text.as_str()
        ]
    );
    // The restarted server continues the same conversation with its history.
    let third = c.ask_and_wait(Some("durable"), "what did I say?");
    assert!(third.is_done());
    let limited = {
        c.send(json!({"type": "history", "conversation": "durable", "limit": 2}));
        c.recv_matching(|v| v["type"] == "history")
    };
    assert_eq!(limited["messages"].as_array().unwrap().len(), 2);
    assert_eq!(limited["messages"][1]["content"], third.text.as_str());
}

#[test]
fn shutdown_closes_every_websocket_with_1001() {
    let mut server = Server::start(FAST);
    let mut clients: Vec<Client> = (0..3).map(|_| server.client()).collect();
    clients[0].ask_and_wait(None, "hello");
    let status = server.terminate();
    assert!(status.success());
    for c in clients.iter_mut() {
        let close = c.recv_matching(|v| v["type"] == "close");
        assert_eq!(close["code"], 1001);
    }
}

#[test]
fn sockets_that_never_send_a_request_cannot_exhaust_threads() {
    let server = Server::start(&format!("{FAST}\n[server]\nmax_connections = 4\n"));
    // max_connections + 256 connection threads may read HTTP heads at once.
    let idle: Vec<TcpStream> = (0..260)
        .map(|_| TcpStream::connect(server.addr).unwrap())
        .collect();
    common::eventually("the extra socket is refused with 503", || {
        let (status, _, body) = server.get("/healthz");
        status == 503 && body.contains("too many connections")
    });
    drop(idle);
    common::eventually("the server answers again", || {
        server.get("/healthz").0 == 200
    });
}

/// Every method on every kind of path, with the status, `Allow` header and
/// body presence it gets; a request whose `Host` is not allowed gets 421
/// whatever it asks.
#[test]
fn each_method_and_path_gets_its_answer() {
    let server = Server::start(FAST);
    let both = Some("GET, HEAD");
    #[rustfmt::skip]
    let table: &[(&str, &str, u16, Option<&str>)] = &[
        ("GET", "/", 200, None),
        ("HEAD", "/", 200, None),
        ("POST", "/", 405, both),
        ("GET", "/healthz", 200, None),
        ("HEAD", "/healthz", 200, None),
        ("DELETE", "/healthz", 405, both),
        ("GET", "/metrics", 200, None),
        ("HEAD", "/metrics", 200, None),
        ("PUT", "/metrics", 405, both),
        ("GET", "/api/stats", 200, None),
        ("HEAD", "/api/stats", 200, None),
        ("POST", "/api/stats", 405, both),
        ("GET", "/static/index.html", 200, None),
        ("HEAD", "/static/index.html", 200, None),
        ("OPTIONS", "/static/index.html", 405, both),
        ("GET", "/static/missing.css", 404, None),
        ("POST", "/static/missing.css", 405, both),
        ("GET", "/static/", 404, None),
        ("HEAD", "/static/../Cargo.toml", 404, None),
        ("POST", "/static/../Cargo.toml", 405, both),
        // No upgrade headers: refused by the handshake, not the router.
        ("GET", "/ws", 426, None),
        ("HEAD", "/ws", 405, Some("GET")),
        ("POST", "/ws", 405, Some("GET")),
        // Methods are case-sensitive.
        ("get", "/healthz", 405, both),
        ("get", "/nope", 404, None),
        ("GET", "/nope", 404, None),
        ("HEAD", "/nope", 404, None),
        ("POST", "/nope", 404, None),
        ("GET", "/static", 404, None),
        ("GET", "/wsx", 404, None),
        ("GET", "/api/stats/", 404, None),
    ];
    for &(method, path, status, allow) in table {
        for host in [server.addr.to_string(), "evil.example".to_owned()] {
            let request =
                format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n");
            let (got, head, body) = raw_http(server.addr, &request);
            let what = format!("{method} {path} (Host: {host}): {head}");
            if host == "evil.example" {
                assert_eq!(got, 421, "{what}");
                continue;
            }
            assert_eq!(got, status, "{what}");
            let allow_header = head
                .lines()
                .find_map(|l| l.strip_prefix("Allow: "))
                .map(str::to_owned);
            assert_eq!(allow_header.as_deref(), allow, "{what}");
            if method == "HEAD" {
                assert_eq!(body, "", "{what}");
                assert!(head.contains("Content-Length: "), "{what}");
            } else {
                assert!(!body.is_empty(), "{what}");
            }
        }
    }
}
