//! How generations and requests end: exactly once each, with the answer
//! stored before the conversation is released and the clients are told.
//!
//! Threads: `finish_generation` and `end_request` run on whichever thread
//! decides an end (a streaming or preparation worker, the janitor, a
//! connection thread cancelling, the shutdown); `complete_request` runs on
//! the history writer thread after the commit.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::records::{End, Generation, Phase, Request, RequestState, Source};
use super::shared::Shared;

use crate::cache::CachedAnswer;
use crate::delivery::Event;
use crate::history;
use crate::protocol::{self, ErrorCode, Failure, Finish, Outcome, Role, Stage};

/// How a request cancelled before it had a role ends.
static CANCELLED_BEFORE_START: std::sync::LazyLock<Failure> =
    std::sync::LazyLock::new(|| Failure::new(ErrorCode::Cancelled, "cancelled before it started"));

impl Shared {
    // -- ending things -----------------------------------------------------

    /// Ends `generation` with `outcome` (first call wins) and ends every
    /// member request accordingly.
    pub(super) fn finish_generation(
        self: &Arc<Self>,
        generation: &Arc<Generation>,
        outcome: Outcome,
    ) {
        let (members, was_streaming, cacheable) = {
            let mut st = generation.state.lock();
            if st.outcome.is_some() {
                return;
            }
            st.outcome = Some(outcome.clone());
            (
                std::mem::take(&mut st.members),
                st.stage == Stage::Streaming,
                st.cacheable,
            )
        };
        generation.abort.abort();
        self.cluster_finish(generation, &outcome);
        let produced = generation.broadcast.finish();
        let tokens = produced.ends.len() as u64;
        // One copy of the answer for the cache and every member's history write.
        let text: Arc<str> = produced.text.into();
        match &outcome {
            Ok(Finish::Cancelled) | Err(_) if was_streaming => {
                self.metrics.upstream_aborted.inc();
            }
            _ => {}
        }
        if let Err(f) = &outcome {
            if f.code == ErrorCode::UpstreamError {
                self.metrics.upstream_failures.inc();
            }
        }
        self.registry.remove_generation(generation.id);
        let result = outcome.clone();
        for member in members {
            self.end_request(&member, |_, _| Some((result.clone(), text.clone(), tokens)));
        }
        // The cache write comes after the members' ends: a cache that has
        // just become slow (a Redis freezing, not yet known down) must not
        // hold up their `done`. Until the key is forgotten below, an
        // identical chat joins this finished generation and gets its whole
        // answer replayed (see `run_follower`), so the order loses nothing.
        if matches!(outcome, Ok(Finish::Stop)) && cacheable {
            // The broadcast's escaped tokens, shared: the cache holds no
            // second encoding of the answer.
            let answer = Arc::new(CachedAnswer {
                tokens: generation.broadcast.all_tokens(),
                text: text.clone(),
                ends: produced.ends,
                usage: generation.state.lock().usage,
            });
            // Before the key is forgotten: a request that missed the cache
            // before this write and claims the key after the forget sees
            // the count of writes moved and asks the cache again.
            self.answers.store(&generation.key, answer);
        }
        if generation.shared {
            // New identical requests must not join a generation that is over:
            // they find the cache entry written above, or start afresh.
            if let Some(call) = self.flights.get(&generation.key) {
                if Arc::ptr_eq(call.shared(), generation) {
                    self.flights.forget(&generation.key);
                }
            }
        }
    }

    /// Ends `request` exactly once. `decide` runs under the request's lock,
    /// with the phase the request was in, and only if nobody ended it yet; it
    /// returns the result, the answer text to store and the tokens the client
    /// was sent, or `None` to leave the request alone. In the same critical
    /// section the end is recorded (so a concurrent `resume` sees either the
    /// running request or its end, never something in between) and sent to
    /// every attached connection: `done` or `error`, after the whole answer
    /// for a cache hit, all in one push. The answer is then queued for
    /// storage (the question was stored before `accepted`); the conversation is released
    /// once they are stored (`complete_request`), and a chat or `history`
    /// for it arriving in between waits for that instead of being refused.
    /// Returns true when this call ended the request.
    pub(super) fn end_request(
        self: &Arc<Self>,
        request: &Arc<Request>,
        decide: impl FnOnce(&mut RequestState, Phase) -> Option<(Outcome, Arc<str>, u64)>,
    ) -> bool {
        let (answer, partial, announced, handover) = {
            let mut st = request.state.lock();
            let phase = st.phase;
            if matches!(phase, Phase::Finishing | Phase::Finished { .. }) {
                return false;
            }
            let Some((result, answer, tokens)) = decide(&mut st, phase) else {
                return false;
            };
            st.phase = Phase::Finishing;
            let timings = self.timings(request, &st, tokens);
            let usage = match &st.source {
                Some(Source::Generation(g)) => g.state.lock().usage,
                Some(Source::Cached(answer)) => answer.usage,
                None => None,
            };
            let end = End {
                result: result.clone(),
                tokens,
                timings,
                usage,
            };
            // Counted before anyone is told, so a client that reads its
            // end and then `/api/stats` finds it there. A request resumed
            // from another node is counted by the node that accepted it.
            if !request.remote {
                self.count_end(&result, st.role, timings);
            }
            let end_event = if st.announced {
                end_event(request, &end, st.role)
            } else {
                refusal_event(request, &end)
            };
            // A cached answer goes out whole with its `start` and its end,
            // in one send (one write, when the connection is idle).
            let mut events = Vec::with_capacity(3);
            if let (Some(Source::Cached(answer)), Ok(_)) = (&st.source, &result) {
                events.push(Event::Start { role: Role::Cache });
                events.push(Event::Tokens {
                    source: answer.clone(),
                    from: 0,
                    to: answer.token_count(),
                });
            }
            events.push(end_event);
            for a in st.attachments.iter().filter(|a| a.is_live()) {
                a.send(&events);
            }
            st.attachments.clear();
            st.end = Some(end);
            // Cut short by chorus, not ended by the model: marked so in the
            // history (`length` is the model's own end).
            let partial = !matches!(result, Ok(Finish::Stop | Finish::Length));
            let handover = std::mem::take(&mut st.handover_pending);
            (answer, partial, st.announced, handover)
        };
        if handover {
            // Its client left before it was findable elsewhere; now it is.
            self.cluster_handover(&[request.id.to_string()]);
        }
        if request.remote {
            // Accepted, counted and stored by the node that accepted it.
            self.complete_remote(request);
            return true;
        }
        if request.stateless {
            // No conversation and nothing to store.
            self.complete_request(request);
            return true;
        }
        if answer.is_empty() && announced {
            // Nothing to store, and the question was committed before
            // `accepted`: no earlier write of this request is pending.
            self.complete_request(request);
            return true;
        }
        let (shared, request2) = (self.clone(), request.clone());
        let then = move |stored: Result<(), history::HistoryError>| {
            if let Err(e) = stored {
                log::error!("storing the answer of {} failed: {e}", request2.id);
            }
            shared.complete_request(&request2);
        };
        if answer.is_empty() {
            // Not announced: its question's write may still be queued, and
            // the conversation is released only after it (a barrier).
            let nothing: Vec<(history::Role, Arc<str>)> = Vec::new();
            self.history.write_all(&request.conversation, nothing, then);
        } else {
            self.history
                .write_answer(&request.conversation, answer, partial, then);
        }
        true
    }

    fn count_end(&self, result: &Outcome, role: Option<Role>, timings: protocol::Timings) {
        match result {
            // Cancelled before it had a role: the client got `error` `cancelled`.
            Ok(_) if role.is_none() => self.metrics.count_outcome(&Ok(Finish::Cancelled)),
            _ => self.metrics.count_outcome(result),
        }
        if let (Some(ttft), Ok(_)) = (timings.ttft_ms, result) {
            self.metrics.observe_ttft_ms(ttft);
        }
    }

    pub(super) fn timings(
        &self,
        request: &Request,
        st: &RequestState,
        tokens: u64,
    ) -> protocol::Timings {
        let (prepare_ms, first_token) = match &st.source {
            Some(Source::Generation(g)) => (g.prepare_ms(), g.broadcast.first_token_at()),
            Some(Source::Cached(_)) => (0.0, Some(Instant::now())),
            None => (0.0, None),
        };
        request.timings(st, prepare_ms, if tokens > 0 { first_token } else { None })
    }

    /// Runs on the history writer thread once the request's messages are
    /// stored: frees its conversation and moves it to the replay window.
    pub(super) fn complete_request(&self, request: &Arc<Request>) {
        self.release_conversation(request);
        self.registry.finish(request);
        self.live_requests.fetch_sub(1, Ordering::AcqRel);
        request.state.lock().phase = Phase::Finished { at: Instant::now() };
        request.stored.notify_all();
    }
}

/// How a request that ended before its `accepted` went out is told: as a
/// refusal of the chat, like any refusal before `accepted`. A cancel cannot
/// come that early (nobody knows the id yet).
fn refusal_event<'a>(request: &'a Request, end: &'a End) -> Event<'a> {
    let failure = match &end.result {
        Err(f) => f,
        Ok(_) => &CANCELLED_BEFORE_START,
    };
    Event::Refused {
        id: &request.client_id,
        failure,
    }
}

impl Shared {
    /// Moves a request resumed from another node to the replay window once
    /// it ended here (nothing to store: its own node does that).
    pub(super) fn complete_remote(&self, request: &Arc<Request>) {
        request.state.lock().phase = Phase::Finished { at: Instant::now() };
        self.registry.finish(request);
    }
}

/// The event that ends a request for one client: `done`, or an error when
/// it failed or was cancelled before it had a role.
pub(super) fn end_event<'a>(request: &'a Request, end: &'a End, role: Option<Role>) -> Event<'a> {
    match (&end.result, role) {
        (Ok(finish), Some(role)) => Event::Done {
            finish: *finish,
            tokens: end.tokens,
            role,
            timings: end.timings,
            usage: end.usage,
        },
        (Ok(_), None) => Event::Error {
            id: Some(&request.client_id),
            failure: &CANCELLED_BEFORE_START,
        },
        (Err(f), _) => Event::Error {
            id: Some(&request.client_id),
            failure: f,
        },
    }
}
