//! Generations never stay counted as running: a leader cancelled by its
//! only client while the cache lane is still making it the leader ends
//! and leaves `/api/stats` (`upstream.in_flight` back to 0), and the
//! janitor reclaims whatever outlives `request_ms`.
//!
//! The cancel race is narrow (between the leader joining its generation
//! and the generation being listed), so the test makes it likely, not
//! certain: many clients cancel each chat the moment it is accepted.

use std::time::Duration;

use crate::common;
use crate::common::{eventually, Server};
use serde_json::json;

#[test]
fn cancels_right_after_chat_leave_no_generation_in_flight() {
    let server = Server::start(
        r#"
[llm.simulated]
first_token_ms = 2000
token_interval_ms = 20
tokens = 10

[workers]
cache_workers = 8
max_concurrent_leaders = 64
"#,
    );
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let addr = server.addr;
            std::thread::spawn(move || {
                let mut c = common::Client::connect(addr);
                for i in 0..150 {
                    let accepted = c.chat(None, &format!("leak {t} {i}"), json!({}));
                    let request = accepted["request"].as_str().unwrap_or_default().to_owned();
                    c.send(json!({"type": "cancel", "request": request}));
                    let end = c.answer(&request);
                    assert!(end.is_cancelled(), "{}", end.end);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    // The janitor ends orphans within a tick or two; a listed generation
    // nobody can end would stay for ever (request_ms is 5 minutes here).
    let mut last = serde_json::Value::Null;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        last = server.stats();
        if last["upstream"]["in_flight"] == 0 && last["requests"]["in_flight"] == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("generations still counted as running: {}", last);
}

#[test]
fn the_janitor_ends_what_outlives_request_ms() {
    // Never a first token within request_ms, and no idle or preparation
    // timeout shorter than it.
    let server = Server::start(
        r#"
[llm.simulated]
first_token_ms = 60000

[timeouts]
request_ms = 400
stream_idle_ms = 60000
prepare_ms = 60000
queue_ms = 60000
"#,
    );
    let mut c = server.client();
    let answer = c.ask_and_wait(None, "Too slow");
    assert_eq!(answer.code(), "processing_timeout", "{}", answer.end);
    eventually("nothing in flight", || {
        let stats = server.stats();
        stats["upstream"]["in_flight"] == 0 && stats["requests"]["in_flight"] == 0
    });
}
