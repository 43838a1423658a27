//! What clients ask of the pipeline, on their connection threads: admitting
//! a chat (`accepted`, or a refusal before anything is stored), `cancel` and
//! `resume`.
//!
//! Threads: every function here runs on the connection thread that read
//! the client's frame. None of them blocks on a queue; they take the active
//! map's lock briefly and a request's lock (with, nested inside it, its
//! generation's and broadcast's locks).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::ending::end_event;
use super::failures::history_failure;
use super::key::{self, identical_request_key, KeyInput};
use super::records::{Generation, Phase, Request, Source};
use super::shared::{IntakeJob, RequestTicket, Shared, STORE_WAIT};
use super::work::{GivenPrompt, Work};

use crate::broadcast::TokenSource;
use crate::delivery::Attachment;
use crate::delivery::{Client, Event};
use crate::history;
use crate::protocol::{self, Chat, ErrorCode, Failure, Finish};

impl Shared {
    // -- admission (connection thread) -------------------------------------

    pub(super) fn submit(
        self: &Arc<Self>,
        client: &Arc<dyn Client>,
        chat: Chat,
    ) -> Result<String, Failure> {
        if self.draining.load(Ordering::Acquire) {
            return Err(Failure::new(
                ErrorCode::ShuttingDown,
                "the server is shutting down",
            ));
        }
        if let Some(model) = chat.options.model.as_deref() {
            if !self.config.llm.model_allowed(model) {
                return Err(Failure::new(
                    ErrorCode::BadRequest,
                    format!("`options.model` \"{model}\" is not offered by this server"),
                ));
            }
        }
        // A conversation id made here is new by construction: it has no
        // stored history to read.
        let is_new = chat.conversation.is_none();
        let conversation = chat
            .conversation
            .clone()
            .unwrap_or_else(protocol::conversation_id);
        // The model sees, and the history keeps, the message as the
        // identical-request key defines it: without surrounding whitespace.
        let message = chat.message.trim().to_owned();
        let llm = &self.config.llm;
        let model = chat
            .options
            .model
            .clone()
            .unwrap_or_else(|| llm.model.clone());
        let request = Request::new(chat.id.clone(), conversation.clone(), model.clone());
        self.claim_conversation(&request)?;
        let head = match if is_new {
            Ok(None)
        } else {
            self.history.head(&conversation)
        } {
            Ok(head) => head.unwrap_or(history::Head::EMPTY),
            Err(e) => {
                self.unregister(&request);
                return Err(history_failure(&e));
            }
        };
        let max_tokens = chat.options.max_tokens.unwrap_or(llm.max_tokens);
        let key = identical_request_key(&KeyInput {
            model: &model,
            temperature: chat.options.temperature,
            top_p: chat.options.top_p,
            max_tokens: Some(max_tokens),
            stop: &[],
            seed: None,
            input: key::Input::Turn {
                system_prompt: &llm.system_prompt,
                history_digest: &head.digest,
                message: &message,
            },
        });
        let work = Work {
            key,
            fresh: chat.options.fresh,
            history_len: head.len,
            cache_writes_seen: 0,
            message,
            model,
            temperature: chat.options.temperature,
            top_p: chat.options.top_p,
            max_tokens,
            given: None,
        };
        self.admit(client, request, work)
    }

    /// Admits a request that brings its whole prompt (the HTTP API): no
    /// conversation, no stored history, no tools of chorus's own. Keyed
    /// like a chat when its messages have a chat turn's shape, so the two
    /// share generations and cache entries.
    pub(super) fn submit_prompt(
        self: &Arc<Self>,
        client: &Arc<dyn Client>,
        given: GivenPrompt,
    ) -> Result<String, Failure> {
        if self.draining.load(Ordering::Acquire) {
            return Err(Failure::new(
                ErrorCode::ShuttingDown,
                "the server is shutting down",
            ));
        }
        let mut prompt = given.prompt;
        if prompt.model.is_empty() {
            prompt.model = self.config.llm.model.clone();
        }
        if !self.config.llm.model_allowed(&prompt.model) {
            return Err(Failure::new(
                ErrorCode::BadRequest,
                format!("`model` \"{}\" is not offered by this server", prompt.model),
            ));
        }
        let list;
        let input = match key::turn_of(&prompt.messages) {
            Some((system_prompt, ref history_digest, message)) => {
                list = *history_digest;
                key::Input::Turn {
                    system_prompt,
                    history_digest: &list,
                    message,
                }
            }
            None => {
                list = key::list_digest(&prompt.messages);
                key::Input::List(&list)
            }
        };
        let key = identical_request_key(&KeyInput {
            model: &prompt.model,
            temperature: prompt.temperature,
            top_p: prompt.top_p,
            max_tokens: prompt.max_tokens,
            stop: &prompt.stop,
            seed: prompt.seed,
            input,
        });
        let request = Request::stateless(given.id, prompt.model.clone());
        let work = Work {
            key,
            fresh: given.fresh,
            history_len: 0,
            cache_writes_seen: 0,
            message: String::new(),
            model: prompt.model.clone(),
            temperature: prompt.temperature,
            top_p: prompt.top_p,
            max_tokens: prompt.max_tokens.unwrap_or(0),
            given: Some(Box::new(prompt)),
        };
        self.admit(client, request, work)
    }

    /// Reserves an intake slot for `request` (or refuses it with
    /// `overloaded`, leaving no trace), attaches `client`, lists it and
    /// queues it for the cache lane.
    fn admit(
        self: &Arc<Self>,
        client: &Arc<dyn Client>,
        request: Arc<Request>,
        work: Work,
    ) -> Result<String, Failure> {
        // Reserve an intake slot before anything is stored, so an overloaded
        // chat leaves no trace; the channel itself can then never be full.
        let capacity = self.config.workers.intake_queue;
        let position = self.intake_reserved.fetch_add(1, Ordering::AcqRel);
        if position >= capacity {
            self.intake_reserved.fetch_sub(1, Ordering::AcqRel);
            self.unregister(&request);
            self.metrics.count_failure(ErrorCode::Overloaded);
            return Err(Failure::new(
                ErrorCode::Overloaded,
                "the intake queue is full; try again shortly",
            ));
        }
        self.live_requests.fetch_add(1, Ordering::AcqRel);
        self.metrics.accepted.inc();
        let attachment = Attachment::new(client, &request.id);
        request.state.lock().attachments.push(attachment);
        // `accepted` goes out later, from the cache lane, once the question
        // is stored (see `announce`). Visible to the janitor and shutdown
        // only now that the request is counted and attached: whatever ends
        // it from here on has an attachment to tell and a count to settle.
        self.registry.admit(&request);
        let id = request.id.to_string();
        let job = IntakeJob {
            position,
            stored: false,
            hit: None,
            ticket: RequestTicket {
                shared: self.clone(),
                request: Some(request),
            },
            work,
        };
        if let Err((job, _)) = self.send(|c| &c.intake, job, "the intake queue is full") {
            // The reservation makes a full channel impossible; a closed one
            // means shutdown. Either way the dropped ticket ends the request.
            self.intake_reserved.fetch_sub(1, Ordering::AcqRel);
            drop(job);
        }
        Ok(id)
    }

    /// Makes `request` the one request in flight in its conversation. A
    /// previous request that has already ended and is only being stored
    /// (its client may have its `done` already) is waited for, briefly,
    /// instead of refusing with `conversation_busy`.
    fn claim_conversation(&self, request: &Arc<Request>) -> Result<(), Failure> {
        loop {
            let Err(holder) = self.registry.claim_conversation(request) else {
                return Ok(());
            };
            if !holder.is_ending() || !holder.wait_stored(STORE_WAIT) {
                return Err(Failure::new(
                    ErrorCode::ConversationBusy,
                    "this conversation already has a request in flight",
                ));
            }
        }
    }

    /// Waits (briefly) until the request that ended last in `conversation`
    /// is stored, so a `history` sent right after a `done` includes it.
    pub(super) fn await_stored(&self, conversation: &str) {
        if let Some(holder) = self
            .registry
            .conversation_holder(conversation)
            .filter(|h| h.is_ending())
        {
            holder.wait_stored(STORE_WAIT);
        }
    }

    /// Undoes admission of a request refused before `accepted`.
    pub(super) fn unregister(&self, request: &Arc<Request>) {
        self.release_conversation(request);
    }

    /// Frees `request`'s conversation, if `request` is the one holding it.
    pub(super) fn release_conversation(&self, request: &Arc<Request>) {
        self.registry.release_conversation(request);
    }

    // -- client operations -------------------------------------------------

    /// The model `request` asked for, if this node knows it.
    pub(super) fn model_of(&self, request: &str) -> Option<String> {
        let model = self.registry.get(request)?.model.clone();
        (!model.is_empty()).then_some(model)
    }

    pub(super) fn lookup(&self, request: &str) -> Result<Arc<Request>, Failure> {
        self.registry
            .get(request)
            .ok_or_else(|| Failure::new(ErrorCode::NotFound, "no such request, or it expired"))
    }

    pub(super) fn cancel(self: &Arc<Self>, id: &str) -> Result<(), Failure> {
        let request = self.lookup(id)?;
        let mut left: Option<Arc<Generation>> = None;
        // Everything under the request's lock (generation and broadcast locks
        // nest inside it): no worker can make the request a member meanwhile,
        // and the tokens counted are exactly those it was sent.
        self.end_request(&request, |st, phase| {
            let Some(Source::Generation(generation)) = st.source.clone() else {
                // Still in the intake queue (a cached answer is never cancelled:
                // it is already ending when it gets its source).
                return Some((Ok(Finish::Cancelled), "".into(), 0));
            };
            if generation.leave(&request) {
                left = Some(generation.clone());
            }
            if phase != Phase::Running {
                // A follower still waiting for a worker: it was sent nothing.
                return Some((Ok(Finish::Cancelled), "".into(), 0));
            }
            // Running (even if the generation just ended and took its
            // members): detach and count what it was sent.
            let produced = generation.broadcast.detach(&st.attachments);
            let tokens = produced.ends.len() as u64;
            Some((Ok(Finish::Cancelled), produced.text.into(), tokens))
        });
        if let Some(generation) = left {
            if generation.is_unwanted()
                && !self.config.cache.complete_orphans
                && !self.cluster_watched(&generation)
            {
                self.finish_generation(&generation, Ok(Finish::Cancelled));
            }
        }
        Ok(())
    }

    pub(super) fn resume(
        self: &Arc<Self>,
        client: &Arc<dyn Client>,
        id: &str,
        from: u64,
    ) -> Result<(), Failure> {
        let request = match self.lookup(id) {
            Ok(request) => request,
            // Maybe another node of the cluster accepted it.
            Err(not_found) => return self.cluster_resume(client, id, from).map_err(|_| not_found),
        };
        let attachment = Attachment::new(client, id);
        let mut st = request.state.lock();
        let start = st.role.map(|role| Event::Start { role });
        if let Some(end) = &st.end {
            // Ended (or being stored): replay exactly what it was sent, then
            // its end. Never live: the generation may go on for others.
            let mut events: Vec<Event<'_>> = start.into_iter().collect();
            let source: Option<Arc<dyn TokenSource>> = match &st.source {
                Some(Source::Generation(g)) => Some(g.broadcast.clone()),
                Some(Source::Cached(answer)) => Some(answer.clone()),
                None => None,
            };
            if let Some(source) = source.filter(|_| from < end.tokens) {
                events.push(Event::Tokens {
                    source,
                    from,
                    to: end.tokens,
                });
            }
            events.push(end_event(&request, end, st.role));
            attachment.send(&events);
            return Ok(());
        }
        // A connection resuming a request it is still attached to replaces
        // that attachment, so it never gets the stream, or the end, twice.
        if let Some(i) = st
            .attachments
            .iter()
            .position(|a| a.is_of(client) && a.is_live())
        {
            let old = st.attachments.swap_remove(i);
            if let Some(Source::Generation(g)) = &st.source {
                g.broadcast.unsubscribe(&old);
            }
        }
        if let (Phase::Running, Some(Source::Generation(g))) = (&st.phase, &st.source) {
            // Live: its tokens from `from` on, its end from `complete_request`.
            if let Some(start) = start {
                attachment.send(&[start]);
            }
            g.broadcast.subscribe(&attachment, from);
        }
        // Still queued: `start` and the stream come when it gets a role
        // (a request resumed from another node: when its record is found,
        // replayed from the latest resume's `from`).
        if request.remote {
            st.resume_from = from;
        }
        st.attachments.push(attachment);
        Ok(())
    }

    pub(super) fn abort_all(self: &Arc<Self>, failure: Failure) {
        let (requests, generations) = self.registry.snapshot();
        for g in generations {
            self.finish_generation(&g, Err(failure.clone()));
        }
        // Whatever the generations did not end: requests still queued.
        for r in requests {
            self.end_request(&r, |st, phase| match (&st.source, phase) {
                (Some(Source::Generation(g)), Phase::Running) => {
                    let produced = g.broadcast.detach(&st.attachments);
                    let tokens = produced.ends.len() as u64;
                    Some((Err(failure.clone()), produced.text.into(), tokens))
                }
                _ => Some((Err(failure.clone()), "".into(), 0)),
            });
        }
    }
}
