//! Every bad input of the protocol page gets its documented error code, and
//! the connection, the other users and the stored history are unaffected.

use crate::common;
use crate::common::{Client, Server, FAST};
use serde_json::json;
use tungstenite::Message;

fn assert_still_works(c: &mut Client) {
    let a = c.ask_and_wait(None, "are you still there?");
    assert!(a.is_done(), "{:?}", a.end);
}

#[test]
fn every_malformed_frame_is_bad_request_and_the_connection_stays_open() {
    let server = Server::start(FAST);
    let mut c = server.client();
    // A bystander on another connection must not notice anything.
    let mut bystander = server.client();
    let (bystander_request, _) = bystander.ask(None, "bystander question");
    let cases: Vec<(Message, Option<&str>)> = vec![
        (Message::text("not json at all"), None),
        (Message::text("[1,2,3]"), None),
        (Message::text("\"a string\""), None),
        (Message::text(r#"{"no_type":1}"#), None),
        (Message::text(r#"{"type":"dance","id":"x1"}"#), Some("x1")),
        (Message::text(r#"{"type":"chat","id":"x2"}"#), Some("x2")),
        (
            Message::text(r#"{"type":"chat","id":"x3","message":42}"#),
            Some("x3"),
        ),
        (
            Message::text(r#"{"type":"chat","id":"x4","message":""}"#),
            Some("x4"),
        ),
        (
            Message::text(r#"{"type":"chat","id":"x5","message":"   "}"#),
            Some("x5"),
        ),
        (Message::text(r#"{"type":"chat","message":"no id"}"#), None),
        (
            Message::text(r#"{"type":"chat","id":7,"message":"numeric id"}"#),
            None,
        ),
        (
            Message::text(
                r#"{"type":"chat","id":"x6","message":"hi","options":{"max_tokens":"ten"}}"#,
            ),
            Some("x6"),
        ),
        (
            Message::text(
                r#"{"type":"chat","id":"x7","message":"hi","options":{"temperature":5}}"#,
            ),
            Some("x7"),
        ),
        (
            Message::text(r#"{"type":"chat","id":"x8","message":"hi","conversation":""}"#),
            Some("x8"),
        ),
        (Message::text(r#"{"type":"cancel"}"#), None),
        (
            Message::text(r#"{"type":"resume","request":"r","from":"zero"}"#),
            None,
        ),
        (Message::text(r#"{"type":"history"}"#), None),
        (Message::binary(vec![1u8, 2, 3]), None),
    ];
    for (frame, id) in cases {
        let shown = format!("{frame:?}");
        c.send_raw(frame);
        let e = c.recv_matching(|v| v["type"] == "error");
        assert_eq!(e["code"], "bad_request", "{shown} -> {e}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
        match id {
            Some(id) => assert_eq!(e["id"], id, "{shown} -> {e}"),
            None => assert!(e["id"].is_null(), "{shown} -> {e}"),
        }
    }
    let long_id = "i".repeat(65);
    let e = c.expect_error(json!({"type": "chat", "id": long_id, "message": "hi"}));
    assert_eq!(e["code"], "bad_request");
    assert_still_works(&mut c);
    let b = bystander.answer(&bystander_request);
    assert!(b.is_done());
    b.assert_contiguous();
}

#[test]
fn oversized_frames_and_messages_are_too_large_and_the_connection_stays_open() {
    let server = Server::start(&format!(
        "{FAST}\n[server]\nws_max_message_bytes = 1024\nmax_message_chars = 100\n"
    ));
    let mut c = server.client();
    let big = "x".repeat(2000);
    let e = c.expect_error(json!({"type": "chat", "id": "big", "message": big}));
    assert_eq!(e["code"], "too_large", "{e}");
    c.send_raw(Message::binary(vec![7u8; 2000]));
    let e = c.recv_matching(|v| v["type"] == "error");
    assert_eq!(e["code"], "too_large", "an oversized binary frame: {e}");
    let e = c.expect_error(json!({"type": "chat", "id": "long", "message": "y".repeat(101)}));
    assert_eq!(e["code"], "too_large", "{e}");
    assert_eq!(e["id"], "long");
    assert_still_works(&mut c);
    // Nothing of the refused chats reached the history.
    let (request, conversation) = c.ask(Some("kept"), "short");
    c.answer(&request);
    c.send(json!({"type": "history", "conversation": conversation}));
    let h = c.recv_matching(|v| v["type"] == "history");
    assert_eq!(h["messages"].as_array().unwrap().len(), 2);
}

#[test]
fn a_frame_beyond_the_hard_limit_closes_with_1009() {
    let server = Server::start(&format!("{FAST}\n[server]\nws_max_message_bytes = 1024\n"));
    let mut c = server.client();
    // 16x the limit, and at least 1 MiB, is where the server stops reading.
    c.send_raw(Message::text("z".repeat(2 << 20)));
    let close = c.recv_matching(|v| v["type"] == "close");
    assert_eq!(close["code"], 1009);
    // Other connections are unaffected.
    assert_still_works(&mut server.client());
}

#[test]
fn history_of_an_unknown_conversation_is_not_found() {
    let server = Server::start(FAST);
    let mut c = server.client();
    let e = c.expect_error(json!({"type": "history", "conversation": "never-seen"}));
    assert_eq!(e["code"], "not_found");
    assert_still_works(&mut c);
}

#[test]
fn new_chats_during_shutdown_get_shutting_down() {
    let mut server = Server::start(
        r#"
[timeouts]
drain_ms = 3000
[llm.simulated]
first_token_ms = 10
token_interval_ms = 50
tokens = 30
"#,
    );
    let mut c = server.client();
    let (request, _) = c.ask(None, "long running");
    c.recv_matching(|v| v["request"] == request.as_str() && v["type"] == "token");
    let addr = server.addr;
    let terminator = std::thread::spawn(move || server.terminate());
    // Keep asking until the drain is visible.
    let mut refused = None;
    for _ in 0..200 {
        let v = c.chat(None, "one more?", json!({}));
        if v["type"] == "error" {
            refused = Some(v);
            break;
        }
        let r = v["request"].as_str().unwrap().to_owned();
        c.answer(&r);
    }
    let refused = refused.expect("a chat was refused during the drain");
    assert_eq!(refused["code"], "shutting_down");
    let (status, _, body) = common::raw_http(
        addr,
        &format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n"),
    );
    assert_eq!(status, 503);
    assert!(body.contains("draining"));
    // The running stream finishes within the drain deadline.
    let a = c.answer(&request);
    assert_eq!(a.finish(), "stop");
    let close = c.recv_matching(|v| v["type"] == "close");
    assert_eq!(close["code"], 1001);
    let status = terminator.join().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn chats_beyond_the_per_connection_rate_get_rate_limited() {
    let server = Server::start(&format!("{FAST}\n[server]\nmax_chats_per_minute = 2\n"));
    let mut c = server.client();
    c.ask_and_wait(None, "one");
    c.ask_and_wait(None, "two");
    let refused = c.chat(None, "three", json!({}));
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["code"], "rate_limited");
    assert!(refused["request"].is_null());
    // The connection still works, and other connections have their own budget.
    let e = c.expect_error(json!({"type": "history", "conversation": "nope"}));
    assert_eq!(e["code"], "not_found");
    assert_still_works(&mut server.client());
}
