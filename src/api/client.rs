//! One HTTP response as the pipeline's [`Client`]: events become an
//! OpenAI answer. Streamed, the response head goes out with `start` (it
//! carries the role), then a `chat.completion.chunk` event per token, in
//! chunked transfer encoding, through the response's bounded [`Outbox`];
//! not streamed, the tokens are collected (up to a byte bound) and the
//! whole `chat.completion` goes out with `done`. An end before `start` is
//! an HTTP error answer; after it, an error event.
//!
//! Threads: called by whichever thread sends to the request (pipeline
//! workers, the history writer, the janitor, rayon's pool during a big
//! fan-out); the outbox's consumer is the HTTP connection's thread.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::broadcast::{Produced, Token, TokenSource};
use crate::delivery::{Attachment, Client, Event, PushError, TokenLayout};
use crate::openai::{self, ApiError, Completion, FinishReason, Usage};
use crate::outbox::{Frame, Outbox, Replay};
use crate::protocol::{ErrorCode, Failure, Role};

/// What ends a chunked body.
const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Frames one message as an HTTP/1.1 chunk. Nothing is written for an
/// empty message: an empty chunk would end the body.
pub fn chunked(out: &mut Vec<u8>, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len == 0 {
        return;
    }
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{len:x}\r\n");
    for part in parts {
        out.extend_from_slice(part);
    }
    out.extend_from_slice(b"\r\n");
}

/// How the client asked for its answer.
#[derive(Debug, Clone)]
pub struct Asked {
    /// `"stream": true`.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// The model named in every chunk.
    pub model: String,
    /// Unix seconds, named in every chunk.
    pub created: u64,
    /// The connection stays open after the answer.
    pub keep_alive: bool,
    /// Bytes of answer a non-streamed response may collect.
    pub max_answer_bytes: usize,
}

/// Where a non-streamed answer's tokens are until it ends.
enum Piece {
    Token(Token),
    Range(Arc<dyn TokenSource>, u64, u64),
}

#[derive(Default)]
struct State {
    /// Where the answer comes from, once `start` said so.
    role: Option<Role>,
    /// The response head went out (streamed answers).
    head_sent: bool,
    /// The answer ended (an `End` frame is queued): nothing more goes out.
    ended: bool,
    /// A non-streamed answer's tokens so far.
    pieces: Vec<Piece>,
    collected: usize,
}

/// The pipeline's handle on one HTTP response.
pub struct HttpClient {
    outbox: Arc<Outbox>,
    asked: Asked,
    state: Mutex<State>,
    /// `State::head_sent`, readable without the lock on the token path.
    head_sent: AtomicBool,
    /// `State::ended`, likewise: nothing may follow the answer's end on a
    /// connection that goes on with its next request.
    ended: AtomicBool,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("stream", &self.asked.stream)
            .finish()
    }
}

impl HttpClient {
    /// The client of one response, writing into `outbox` (framed with
    /// [`chunked`] for a streamed answer).
    pub fn new(outbox: Arc<Outbox>, asked: Asked) -> Arc<HttpClient> {
        Arc::new(HttpClient {
            outbox,
            asked,
            state: Mutex::new(State::default()),
            head_sent: AtomicBool::new(false),
            ended: AtomicBool::new(false),
        })
    }

    fn completion<'a>(&'a self, request: &'a str) -> Completion<'a> {
        Completion {
            request,
            created: self.asked.created,
            model: &self.asked.model,
        }
    }

    /// The head of a successful response.
    fn head(&self, request: &str, role: Role, body: Option<usize>) -> Vec<u8> {
        let mut head = Vec::with_capacity(256);
        let _ = write!(head, "HTTP/1.1 200 OK\r\n");
        match body {
            Some(len) => {
                let _ = write!(
                    head,
                    "Content-Type: application/json\r\nContent-Length: {len}\r\n"
                );
            }
            None => head.extend_from_slice(
                b"Content-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n",
            ),
        }
        let _ = write!(
            head,
            "X-Chorus-Request: {request}\r\nX-Chorus-Role: {}\r\n{}X-Content-Type-Options: nosniff\r\n\r\n",
            role.as_str(),
            self.connection_header()
        );
        head
    }

    fn connection_header(&self) -> &'static str {
        if self.asked.keep_alive {
            ""
        } else {
            "Connection: close\r\n"
        }
    }

    /// A whole error answer, for an end before the response began.
    fn error_response(&self, request: Option<&str>, failure: &Failure) -> Vec<u8> {
        error_response(request, failure, self.asked.keep_alive)
    }

    /// The response head and the first chunk (the role), once: they go out
    /// with the first token (or the end), not at `start`, so that a request
    /// that fails before its first token gets an HTTP error status (a `429`
    /// for an overloaded stage, a `502` for an upstream that refused) rather
    /// than a `200` and an error event.
    fn begin(&self, request: &str, st: &mut State, frames: &mut Vec<Frame>) {
        if st.head_sent {
            return;
        }
        st.head_sent = true;
        self.head_sent.store(true, Ordering::Release);
        let role = st.role.unwrap_or(Role::Leader);
        frames.push(Frame::Encoded(self.head(request, role, None)));
        let mut first = Vec::new();
        self.completion(request).chunks().role(&mut first);
        frames.push(Frame::Message(first));
    }

    /// Streamed: sends the head first if no token did yet. Err when the
    /// answer already ended.
    fn begin_for_token(&self, to: &Attachment) -> Result<(), PushError> {
        if self.ended.load(Ordering::Acquire) {
            return Err(PushError::Closed);
        }
        if self.head_sent.load(Ordering::Acquire) {
            return Ok(());
        }
        let frames = {
            let mut st = self.state.lock();
            if st.ended {
                return Err(PushError::Closed);
            }
            let mut frames = Vec::new();
            self.begin(&to.request, &mut st, &mut frames);
            frames
        };
        if frames.is_empty() {
            Ok(())
        } else {
            self.outbox.push_all(frames)
        }
    }

    fn end(&self, st: &mut State) {
        st.ended = true;
        self.ended.store(true, Ordering::Release);
    }

    /// The frames of `events` for a streamed answer.
    fn streamed(&self, to: &Attachment, st: &mut State, events: &[Event<'_>]) -> Vec<Frame> {
        let mut frames = Vec::new();
        let chunks = self.completion(&to.request).chunks();
        for event in events {
            if st.ended {
                break;
            }
            match event {
                Event::Start { role } => st.role = Some(*role),
                Event::Tokens {
                    source,
                    from,
                    to: until,
                } => {
                    if let Some(tokens) =
                        self.outbox.tokens_frame(&to.layout, source, *from, *until)
                    {
                        self.begin(&to.request, st, &mut frames);
                        frames.push(tokens);
                    }
                }
                Event::Done {
                    finish,
                    tokens,
                    role,
                    usage: reported,
                    ..
                } => {
                    st.role.get_or_insert(*role);
                    self.begin(&to.request, st, &mut frames);
                    let mut end = Vec::new();
                    match FinishReason::from_finish(*finish) {
                        Some(reason) => {
                            let usage = self.asked.include_usage.then(|| usage(*reported, *tokens));
                            chunks.end(&mut end, reason, usage.as_ref());
                        }
                        None => openai::error_event(
                            &mut end,
                            ApiError::Code(ErrorCode::Cancelled),
                            "the request was cancelled",
                        ),
                    }
                    frames.push(Frame::Message(end));
                    frames.push(Frame::Encoded(LAST_CHUNK.to_vec()));
                    frames.push(Frame::End);
                    self.end(st);
                }
                Event::Error { failure, .. } | Event::Refused { failure, .. } => {
                    if st.head_sent {
                        let mut end = Vec::new();
                        openai::error_event(&mut end, failure.code.into(), &failure.message);
                        frames.push(Frame::Message(end));
                        frames.push(Frame::Encoded(LAST_CHUNK.to_vec()));
                    } else {
                        let request = matches!(event, Event::Error { .. }).then_some(&*to.request);
                        frames.push(Frame::Encoded(self.error_response(request, failure)));
                    }
                    frames.push(Frame::End);
                    self.end(st);
                }
                // Nothing of these reaches an OpenAI client.
                Event::Accepted { .. } | Event::State { .. } | Event::Tool { .. } => {}
            }
        }
        frames
    }

    /// The frames of `events` for an answer sent whole at its end.
    fn collected(&self, to: &Attachment, st: &mut State, events: &[Event<'_>]) -> Vec<Frame> {
        let mut frames = Vec::new();
        for event in events {
            if st.ended {
                break;
            }
            match event {
                Event::Tokens {
                    source,
                    from,
                    to: until,
                } => {
                    st.pieces.push(Piece::Range(source.clone(), *from, *until));
                }
                Event::Done {
                    finish,
                    tokens,
                    role,
                    usage: reported,
                    ..
                } => {
                    let mut all = Vec::new();
                    for piece in std::mem::take(&mut st.pieces) {
                        match piece {
                            Piece::Token(t) => all.push(t),
                            Piece::Range(source, from, until) => {
                                source.tokens(from, until, &mut all)
                            }
                        }
                    }
                    // A late joiner's replayed part counts too: the whole
                    // answer is held here until it is written.
                    let held: usize = all.iter().map(Token::json_len).sum();
                    let too_big = held > self.asked.max_answer_bytes;
                    let text = if too_big {
                        String::new()
                    } else {
                        Produced::of(&all).text
                    };
                    let bytes = match FinishReason::from_finish(*finish) {
                        _ if too_big => self.error_response(
                            Some(&to.request),
                            &Failure::new(
                                ErrorCode::SlowConsumer,
                                "the answer is larger than a response may hold (server.outbox_bytes); ask with \"stream\": true",
                            ),
                        ),
                        Some(reason) => {
                            let mut body = Vec::with_capacity(text.len() + 512);
                            self.completion(&to.request).write_object(
                                &mut body,
                                &text,
                                reason,
                                &usage(*reported, *tokens),
                            );
                            let mut bytes = self.head(&to.request, *role, Some(body.len()));
                            bytes.extend_from_slice(&body);
                            bytes
                        }
                        None => self.error_response(
                            Some(&to.request),
                            &Failure::new(ErrorCode::Cancelled, "the request was cancelled"),
                        ),
                    };
                    frames.push(Frame::Encoded(bytes));
                    frames.push(Frame::End);
                    self.end(st);
                }
                Event::Error { failure, .. } | Event::Refused { failure, .. } => {
                    let request = matches!(event, Event::Error { .. }).then_some(&*to.request);
                    frames.push(Frame::Encoded(self.error_response(request, failure)));
                    frames.push(Frame::End);
                    self.end(st);
                }
                Event::Start { .. }
                | Event::Accepted { .. }
                | Event::State { .. }
                | Event::Tool { .. } => {}
            }
        }
        frames
    }
}

/// The token counts to report: the upstream's, or, from an upstream that
/// reports none, the tokens streamed and an unknown (0) prompt count.
fn usage(reported: Option<Usage>, tokens: u64) -> Usage {
    reported.unwrap_or(Usage {
        prompt_tokens: 0,
        completion_tokens: tokens,
    })
}

/// A whole HTTP error answer in OpenAI's shape for `failure`.
pub fn error_response(request: Option<&str>, failure: &Failure, keep_alive: bool) -> Vec<u8> {
    api_error_response(
        request,
        failure.code.into(),
        &failure.message,
        None,
        keep_alive,
    )
}

/// A whole HTTP error answer in OpenAI's shape.
pub fn api_error_response(
    request: Option<&str>,
    error: ApiError,
    message: &str,
    param: Option<&str>,
    keep_alive: bool,
) -> Vec<u8> {
    let mut body = Vec::new();
    let status = openai::error_body(&mut body, error, message, param);
    let mut out = Vec::with_capacity(body.len() + 256);
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n",
        status.status,
        reason(status.status),
        body.len()
    );
    if status.retry_after {
        out.extend_from_slice(b"Retry-After: 1\r\n");
    }
    if let Some(request) = request {
        let _ = write!(out, "X-Chorus-Request: {request}\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    out
}

/// The reason phrase of the statuses the API answers with.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        421 => "Misdirected Request",
        429 => "Too Many Requests",
        499 => "Client Closed Request",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

impl Client for HttpClient {
    fn token_layout(&self, request: &str) -> TokenLayout {
        if self.asked.stream {
            self.completion(request).chunks().layout()
        } else {
            // Collected as tokens; never laid out.
            TokenLayout {
                head: Box::default(),
                mid: Box::default(),
                tail: Box::default(),
            }
        }
    }

    fn send(&self, to: &Attachment, events: &[Event<'_>]) -> Result<(), PushError> {
        let frames = {
            let mut st = self.state.lock();
            if self.asked.stream {
                self.streamed(to, &mut st, events)
            } else {
                self.collected(to, &mut st, events)
            }
        };
        if frames.is_empty() {
            return Ok(());
        }
        self.outbox.push_all(frames)
    }

    fn send_deferred(&self, _: &Attachment, _: &[Event<'_>]) {
        // `accepted` and `state` have no OpenAI form: nothing to send.
    }

    fn release_deferred(&self) {}

    fn token(&self, to: &Attachment, token: &Token) -> Result<bool, PushError> {
        if self.asked.stream {
            self.begin_for_token(to)?;
            return self.outbox.queue_live_token(&to.layout, token);
        }
        let mut st = self.state.lock();
        if self.outbox.is_closed() {
            return Err(PushError::Closed);
        }
        st.collected += token.json_len();
        if st.collected > self.asked.max_answer_bytes {
            return Err(PushError::Full);
        }
        st.pieces.push(Piece::Token(token.clone()));
        Ok(false)
    }

    fn replay(
        &self,
        to: &Attachment,
        source: Arc<dyn TokenSource>,
        from: u64,
        until: u64,
    ) -> Result<(), PushError> {
        if self.asked.stream {
            self.begin_for_token(to)?;
            return self.outbox.push_token(Frame::Replay(Replay {
                source,
                layout: to.layout.clone(),
                from,
                to: until,
            }));
        }
        if self.outbox.is_closed() {
            return Err(PushError::Closed);
        }
        self.state
            .lock()
            .pieces
            .push(Piece::Range(source, from, until));
        Ok(())
    }

    fn wake(&self) {
        self.outbox.wake();
    }

    fn is_closed(&self) -> bool {
        self.outbox.is_closed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_carry_their_length_and_empty_ones_vanish() {
        let mut out = Vec::new();
        chunked(&mut out, &[b"hello ", b"world"]);
        chunked(&mut out, &[b"", b""]);
        assert_eq!(out, b"b\r\nhello world\r\n");
    }

    #[test]
    fn error_answers_carry_status_retry_after_and_the_body() {
        let failure = Failure::new(ErrorCode::Overloaded, "full");
        let bytes = error_response(Some("r-1"), &failure, true);
        let text = String::from_utf8(bytes).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nRetry-After: 1\r\n"));
        assert!(text.contains("\r\nX-Chorus-Request: r-1\r\n"));
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "overloaded");
        let len: usize = text
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, body.len());
    }
}
