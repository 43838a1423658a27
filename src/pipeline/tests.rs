//! A panic inside a pool job fails that request with `internal`, and the
//! worker goes on with the next job. The panic comes from a provider made
//! for this test, run by a real pipeline on its streaming pool.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};

use super::Pipeline;
use crate::broadcast::{Token, TokenSource};
use crate::cache::MemoryCache;
use crate::config::Config;
use crate::delivery::{Attachment, Client, Event, PushError, TokenLayout};
use crate::history::History;
use crate::llm::{AbortSignal, Ask, LlmError, Provider, Simulated, TokenSink, Turn};
use crate::metrics::Metrics;
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

/// A client that keeps how each of its requests ended, as a test reads it.
#[derive(Default)]
struct Endings(Mutex<Vec<Value>>);

impl Client for Endings {
    fn token_layout(&self, _: &str) -> TokenLayout {
        TokenLayout {
            head: Box::default(),
            mid: Box::default(),
            tail: Box::default(),
        }
    }

    fn send(&self, to: &Attachment, events: &[Event<'_>]) -> Result<(), PushError> {
        for event in events {
            let end = match event {
                Event::Done { .. } => json!({"type": "done", "request": &*to.request}),
                Event::Error { failure, .. } | Event::Refused { failure, .. } => {
                    json!({"type": "error", "request": &*to.request, "code": failure.code.as_str()})
                }
                _ => continue,
            };
            self.0.lock().push(end);
        }
        Ok(())
    }

    fn send_deferred(&self, to: &Attachment, events: &[Event<'_>]) {
        let _ = self.send(to, events);
    }

    fn release_deferred(&self) {}

    fn token(&self, _: &Attachment, _: &Token) -> Result<bool, PushError> {
        Ok(false)
    }

    fn replay(
        &self,
        _: &Attachment,
        _: Arc<dyn TokenSource>,
        _: u64,
        _: u64,
    ) -> Result<(), PushError> {
        Ok(())
    }

    fn wake(&self) {}

    fn is_closed(&self) -> bool {
        false
    }
}

/// How `request` ended for `client`, waiting for it.
fn ending(client: &Endings, request: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(end) = client.0.lock().iter().find(|e| e["request"] == request) {
            return end.clone();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("no ending for {request}");
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
    let endings = Arc::new(Endings::default());
    let client: Arc<dyn Client> = endings.clone();
    for round in 0..3 {
        let request = pipeline
            .submit(&client, chat(&format!("p{round}"), "panic now"))
            .unwrap();
        let end = ending(&endings, &request);
        assert_eq!(end["type"], "error", "{end}");
        assert_eq!(end["code"], "internal", "{end}");
        let request = pipeline
            .submit(
                &client,
                chat(&format!("ok{round}"), &format!("hello {round}")),
            )
            .unwrap();
        let end = ending(&endings, &request);
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
