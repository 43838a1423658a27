//! A panic inside a pool job fails that request with `internal`, and the
//! worker goes on with the next job. The panic comes from a provider made
//! for this test, run by a real pipeline on its streaming pool.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::Pipeline;
use crate::cache::MemoryCache;
use crate::config::Config;
use crate::history::History;
use crate::llm::{AbortSignal, Ask, LlmError, Provider, Simulated, TokenSink, Turn};
use crate::metrics::Metrics;
use crate::outbox::{Frame, Outbox};
use crate::protocol::{Chat, ChatOptions};

/// The simulated model, except that it panics when asked to.
struct PanicsOnCue(Simulated);

impl Provider for PanicsOnCue {
    fn name(&self) -> &str {
        "panics-on-cue"
    }

    fn stream(
        &self,
        ask: &Ask<'_>,
        abort: &AbortSignal,
        sink: &TokenSink,
    ) -> Result<Turn, LlmError> {
        if ask.prompt.messages.iter().any(|m| m.content == "panic now") {
            panic!("the provider panics on purpose (test)");
        }
        self.0.stream(ask, abort, sink)
    }
}

/// The ending frame (`done` or `error`) of `request` in `outbox`.
fn ending(outbox: &Outbox, request: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut frames = VecDeque::new();
    while Instant::now() < deadline {
        outbox.take_some(&mut frames, 64, usize::MAX);
        // Nothing is written to a socket here: all taken is gone.
        outbox.set_unwritten(0);
        for frame in frames.drain(..) {
            let texts = match frame {
                Frame::Json(bytes) => vec![bytes],
                // Endings may come already encoded as WebSocket frames.
                Frame::Encoded(bytes) => decode(bytes),
                _ => continue,
            };
            for text in texts {
                let v: Value = serde_json::from_slice(&text).expect("JSON frame");
                let end = v["type"] == "done" || v["type"] == "error";
                if end && v["request"] == request {
                    return v;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("no ending for {request}");
}

/// The text payloads of encoded server frames, read the way a client reads them.
fn decode(bytes: Vec<u8>) -> Vec<Vec<u8>> {
    let socket = std::io::Cursor::new(bytes);
    let mut ws =
        tungstenite::WebSocket::from_raw_socket(socket, tungstenite::protocol::Role::Client, None);
    let mut out = Vec::new();
    while let Ok(message) = ws.read() {
        if let tungstenite::Message::Text(t) = message {
            out.push(t.as_bytes().to_vec());
        }
    }
    out
}

fn chat(id: &str, message: &str) -> Chat {
    Chat {
        id: id.to_owned(),
        conversation: None,
        message: message.to_owned(),
        options: ChatOptions::default(),
    }
}

#[test]
fn a_panicking_job_fails_its_request_with_internal_and_the_worker_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    // One streaming worker: the request after the panic needs the same one.
    config.workers.max_concurrent_llm_streams = 1;
    config.tools.enabled = false;
    let provider = PanicsOnCue(Simulated {
        first_token: Duration::from_millis(1),
        token_interval: Duration::from_millis(1),
        tokens: 3,
        token_bytes: 0,
    });
    let history = History::open(&dir.path().join("chat.db"), 1).unwrap();
    let cache = Arc::new(MemoryCache::new(16, Duration::from_secs(60)));
    let pipeline = Pipeline::start(
        Arc::new(config),
        history.clone(),
        cache,
        Arc::new(provider),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let outbox = Arc::new(Outbox::new(1024).unwrap());
    for round in 0..3 {
        let request = pipeline
            .submit(&outbox, chat(&format!("p{round}"), "panic now"))
            .unwrap();
        let end = ending(&outbox, &request);
        assert_eq!(end["type"], "error", "{end}");
        assert_eq!(end["code"], "internal", "{end}");
        let request = pipeline
            .submit(
                &outbox,
                chat(&format!("ok{round}"), &format!("hello {round}")),
            )
            .unwrap();
        let end = ending(&outbox, &request);
        assert_eq!(end["type"], "done", "{end}");
    }
    // `done` goes out before the answer's commit, which ends the request.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pipeline.live_requests() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(pipeline.live_requests(), 0);
    assert_eq!(pipeline.generations(), 0);
    pipeline.shutdown();
    history.shutdown();
}
