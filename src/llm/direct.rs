//! Calls to plain `http://` upstreams without ureq: the streaming worker
//! sends the request and reads the response head over a kept connection
//! ([`super::http1`]), then hands the socket to the upstream reader thread
//! ([`super::reader`]) and sleeps until the round is over, so a stream's
//! tokens wake one shared thread instead of one worker per token.
//!
//! Threads: [`Direct::call`] runs on a streaming worker and blocks it until
//! the round ends; the body is read and parsed on the `chorus-upstream`
//! thread, which also hands the content to the round's sink; an abort may
//! come from any thread.

use std::cell::Cell;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::http1::{Http1Error, Pool, Target};
use super::reader::{End, Reader, Step, Stream};
use super::stream::{status_failure, CallError, Fed, StreamState};
use super::{AbortSignal, Finish, LlmError, Turn};
use crate::oneshot;

/// Kept connections per endpoint: one per streaming worker is what a busy
/// gateway reuses; more only sit idle.
const MAX_IDLE: usize = 256;
/// How long a kept connection may sit idle before it is closed.
const IDLE_AGE: Duration = Duration::from_secs(15);
/// Most bytes of an error body read to find its message.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// The reader and a pool per endpoint (`None` for `https://` ones).
pub(super) struct Direct {
    reader: Reader,
    pools: Vec<Option<Pool>>,
    /// The reader thread is gone (it can only have panicked): calls go
    /// through ureq from then on rather than fail.
    lost: AtomicBool,
}

/// How one round ended, as the reader thread hands it back.
struct Ended {
    result: Result<Turn, CallError>,
    usage: (u64, u64),
    emitted: bool,
    conn: Option<TcpStream>,
}

/// What the worker learns of a call.
pub(super) struct Called {
    /// The round, or why it failed.
    pub result: Result<Turn, CallError>,
    /// Token usage reported: prompt, completion.
    pub usage: (u64, u64),
    /// Something reached a client.
    pub emitted: bool,
}

impl Direct {
    /// Starts the reader when some of `base_urls` are plain `http://`.
    pub fn start<'a>(base_urls: impl Iterator<Item = &'a str>) -> Option<Direct> {
        // An endpoint reached through a proxy from the environment
        // (`HTTP_PROXY`, `ALL_PROXY`, minus `NO_PROXY`) stays on ureq,
        // which honours it; this client speaks to the upstream directly.
        let proxy = ureq::Proxy::try_from_env();
        let proxied = |url: &str| {
            proxy.as_ref().is_some_and(|proxy| {
                url.parse::<ureq::http::Uri>()
                    .map_or(true, |uri| !proxy.is_no_proxy(&uri))
            })
        };
        let pools: Vec<Option<Pool>> = base_urls
            .map(|url| {
                Target::parse(url)
                    .filter(|_| !proxied(url))
                    .map(|t| Pool::new(t, MAX_IDLE, IDLE_AGE))
            })
            .collect();
        if pools.iter().all(Option::is_none) {
            return None;
        }
        match Reader::start() {
            Ok(reader) => Some(Direct {
                reader,
                pools,
                lost: AtomicBool::new(false),
            }),
            Err(e) => {
                log::warn!("cannot start the upstream reader ({e}); reading upstreams blocking");
                None
            }
        }
    }

    /// The pool of endpoint `i`, when it is a plain `http://` one.
    pub fn pool(&self, i: usize) -> Option<&Pool> {
        if self.lost.load(Ordering::Relaxed) {
            return None;
        }
        self.pools.get(i).and_then(Option::as_ref)
    }

    /// One round: `POST {prefix}/chat/completions` with `body`, the stream
    /// fed into `state`. Blocks until the round ends or `abort` fires.
    #[allow(clippy::too_many_arguments)]
    pub fn call(
        &self,
        pool: &Pool,
        name: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        connect_timeout: Duration,
        read_timeout: Duration,
        state: StreamState,
        abort: &AbortSignal,
    ) -> Called {
        let fail = |state: &StreamState, error: CallError| Called {
            result: Err(error),
            usage: (0, 0),
            emitted: state.emitted(),
        };
        // Until the reader has the socket, an abort closes it under the
        // worker's blocking read of the head.
        let hook = Cell::new(None);
        let watch = |conn: &TcpStream| {
            if let Ok(clone) = conn.try_clone() {
                hook.set(Some(abort.on_abort(move || {
                    let _ = clone.shutdown(Shutdown::Both);
                })));
            }
        };
        let sent = pool.post(
            "/chat/completions",
            headers,
            body,
            connect_timeout,
            read_timeout,
            &watch,
        );
        if let Some(id) = hook.take() {
            abort.forget(id);
        }
        let response = match sent {
            Ok(response) => response,
            Err(e) => return fail(&state, http1_failure(name, e)),
        };
        if !(200..300).contains(&response.status) {
            let status = response.status;
            let retry_after = response.retry_after;
            let text = response.read_body(MAX_ERROR_BODY);
            return fail(&state, status_failure(name, status, retry_after, &text));
        }
        // The end is a second or more away: a wait that sleeps at once.
        let (tx, rx) = oneshot::channel();
        let feeding = Feeding {
            state: Some(state),
            failure: None,
            done: false,
            timeout: read_timeout,
            tx,
        };
        let id = self.reader.add(
            response.conn,
            response.body,
            response.leftover,
            response.keep_alive,
            read_timeout,
            Box::new(feeding),
        );
        let aborter = self.reader.aborter();
        let hook = abort.on_abort(move || aborter.abort(id));
        let ended = rx.recv();
        abort.forget(hook);
        match ended {
            Ok(ended) => {
                if let Some(conn) = ended.conn {
                    pool.give_back(conn);
                }
                Called {
                    result: ended.result,
                    usage: ended.usage,
                    emitted: ended.emitted,
                }
            }
            Err(_) => {
                if !self.lost.swap(true, Ordering::Relaxed) {
                    log::error!(
                        "the upstream reader is gone; reading upstreams blocking from now on"
                    );
                }
                Called {
                    result: Err(CallError::fatal(LlmError::upstream(
                        name,
                        format!("the stream from {name} was lost by the upstream reader"),
                    ))),
                    usage: (0, 0),
                    emitted: true,
                }
            }
        }
    }
}

/// A [`StreamState`] fed by the reader thread.
struct Feeding {
    state: Option<StreamState>,
    failure: Option<CallError>,
    /// `[DONE]` came.
    done: bool,
    timeout: Duration,
    tx: oneshot::Sender<Ended>,
}

impl Stream for Feeding {
    fn on_body(&mut self, payload: &[u8]) -> Step {
        let Some(state) = self.state.as_mut() else {
            return Step::Stop;
        };
        match state.feed(payload) {
            Ok(Fed::More) => Step::More,
            Ok(Fed::Done) => {
                self.done = true;
                Step::Done
            }
            Ok(Fed::Stopped) => Step::Stop,
            Err(failure) => {
                self.failure = Some(failure);
                Step::Stop
            }
        }
    }

    fn on_end(mut self: Box<Self>, end: End) {
        let Some(state) = self.state.take() else {
            return;
        };
        let emitted = state.emitted();
        let usage = state.usage;
        let (result, conn) = match (self.failure.take(), end) {
            (Some(failure), _) => (Err(failure), None),
            (None, End::Finished { conn }) => (state.end(), conn),
            // Broken after `[DONE]`: the answer was whole.
            (None, End::Failed(_)) if self.done => (state.end(), None),
            (None, End::Failed(e)) => (Err(state.broke(&e)), None),
            (None, End::TimedOut) => (Err(state.timed_out(self.timeout)), None),
            (None, End::Aborted) => (Ok(Turn::answer(Finish::Cancelled)), None),
        };
        let _ = self.tx.send(Ended {
            result,
            usage,
            emitted,
            conn,
        });
    }
}

/// A request that got no answer, as a call failure.
fn http1_failure(name: &str, e: Http1Error) -> CallError {
    match e {
        Http1Error::Connect(e) => CallError::retryable(LlmError::upstream(
            name,
            format!("cannot reach {name}: {e}"),
        )),
        Http1Error::Unanswered { reused, error } => CallError {
            // On a kept connection: the upstream closed it while idle, and
            // the request never reached it.
            unanswered: reused,
            ..CallError::retryable(LlmError::upstream(
                name,
                format!("{name} closed the connection: {error}"),
            ))
        },
        Http1Error::Timeout(why) => CallError::retryable(LlmError::timeout(
            name,
            format!("{name} did not answer in time: {why}"),
        )),
        Http1Error::BadResponse(why) => CallError::fatal(LlmError::upstream(
            name,
            format!("{name} sent a bad response: {why}"),
        )),
    }
}
