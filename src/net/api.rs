//! The OpenAI-compatible HTTP API's side of a connection: reading each
//! request (head and body, within bounds), checking it (`Host`, the bearer
//! token, the route), handing it to the pipeline with an
//! [`HttpClient`](crate::api::HttpClient), writing its response, and then
//! the next request on the same connection (HTTP/1.1 keep-alive).
//!
//! Threads: runs on the connection thread the accept thread started for
//! the socket, from the first `/v1/` request to the connection's end. One
//! thread per HTTP connection, as for WebSockets; its connection counts
//! against `server.max_connections` like a WebSocket's.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::http::{self, Request};
use super::upgrade::ConnectionSlot;
use super::Shared;
use crate::api::{self, Asked, Ended, HttpClient};
use crate::delivery::Client;
use crate::openai::{self, ApiError};
use crate::outbox::Outbox;
use crate::pipeline::GivenPrompt;
use crate::protocol::{ErrorCode, Failure};

/// How long a kept-alive connection may sit idle before its next request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a client may take to send one request's head and body.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of a pipelined next request kept while a response is written.
const MAX_PIPELINED: usize = 16 * 1024;
/// Largest request head (as for every HTTP request of the port).
const MAX_HEAD: usize = 16 * 1024;

/// What to do with the connection after one request.
enum Next {
    KeepAlive,
    Close,
}

/// Serves `first` and every later request of the connection. Returns the
/// socket when it should end with a lingering close.
pub(super) fn serve(tcp: TcpStream, first: Request, shared: &Arc<Shared>) -> Option<TcpStream> {
    let Some(_slot) = ConnectionSlot::take(shared) else {
        let failure = Failure::new(
            ErrorCode::Overloaded,
            "too many connections (server.max_connections); try again shortly",
        );
        let _ = (&tcp).write_all(&api::error_response(None, &failure, false));
        return Some(tcp);
    };
    let tcp = Arc::new(tcp);
    let mut input = first.leftover.clone();
    let mut request = Some(first);
    loop {
        let req = match request.take() {
            Some(req) => req,
            None => next_request(&tcp, &mut input)?,
        };
        input = req.leftover.clone();
        match handle(&tcp, req, &mut input, shared) {
            Next::KeepAlive => {}
            Next::Close => return Arc::try_unwrap(tcp).ok(),
        }
    }
}

/// Reads the next request head of a kept-alive connection, starting with
/// the bytes already read. `None` when the client closed, stayed idle too
/// long, or sent something that is not a request (it is told so first).
fn next_request(tcp: &TcpStream, input: &mut Vec<u8>) -> Option<Request> {
    let _ = tcp.set_nonblocking(false);
    let deadline = Instant::now() + IDLE_TIMEOUT;
    loop {
        match http::parse_head(input) {
            Ok(Some(req)) => return Some(req),
            Ok(None) => {}
            Err(e) => {
                let (status, message) = match e {
                    http::HttpError::TooLarge => (413, "request head too large".to_owned()),
                    e => (400, e.to_string()),
                };
                let error = if status == 413 {
                    ErrorCode::TooLarge
                } else {
                    ErrorCode::BadRequest
                };
                let _ = (&*tcp).write_all(&api::error_response(
                    None,
                    &Failure::new(error, message),
                    false,
                ));
                http::linger_close(tcp);
                return None;
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || tcp.set_read_timeout(Some(left)).is_err() {
            return None;
        }
        let mut chunk = [0u8; 4096];
        let room = MAX_HEAD.saturating_sub(input.len()).clamp(1, chunk.len());
        match (&*tcp).read(&mut chunk[..room]) {
            Ok(0) | Err(_) => return None,
            Ok(n) => input.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The client wants the connection kept after this request.
fn keep_alive(req: &Request) -> bool {
    !req.header_has_token("connection", "close")
}

/// Answers one request. `input` holds the bytes read past its head.
fn handle(tcp: &Arc<TcpStream>, req: Request, input: &mut Vec<u8>, shared: &Arc<Shared>) -> Next {
    let keep = keep_alive(&req);
    if !shared.hosts.allows(req.header("host")) {
        // As for every request of the port, before anything else.
        let _ = http::respond_error(
            &mut &**tcp,
            421,
            "host not allowed (see server.allowed_hosts)",
        );
        return Next::Close;
    }
    let path = req.path.clone();
    let route = match (req.method.as_str(), path.as_str()) {
        ("POST", "/v1/chat/completions") => Route::Completions,
        ("GET", "/v1/models") => Route::Models,
        ("GET", p) if p.starts_with("/v1/chorus/streams/") => Route::Stream,
        (_, "/v1/chat/completions") => Route::WrongMethod("POST"),
        (_, "/v1/models") => Route::WrongMethod("GET"),
        (_, p) if p.starts_with("/v1/chorus/streams/") => Route::WrongMethod("GET"),
        _ => Route::NotFound,
    };
    if !http::authorized(&req, &shared.config.server.auth_tokens) {
        // The body is not read: the connection cannot be reused.
        write_error(
            tcp,
            ApiError::Unauthorized,
            "a valid `Authorization: Bearer` token is required",
            false,
        );
        return Next::Close;
    }
    match route {
        Route::Completions => completions(tcp, &req, input, keep, shared),
        Route::Models => {
            let mut models: Vec<&str> = vec![shared.config.llm.model.as_str()];
            for p in &shared.config.llm.providers {
                if !models.contains(&p.model.as_str()) {
                    models.push(&p.model);
                }
            }
            for m in &shared.config.llm.allowed_models {
                if m != "*" && !models.contains(&m.as_str()) {
                    models.push(m);
                }
            }
            let mut body = Vec::new();
            openai::models_body(&mut body, models);
            write_json(tcp, 200, &body, keep);
            next(keep)
        }
        Route::Stream => stream(tcp, &req, input, keep, shared),
        Route::WrongMethod(allow) => {
            let mut bytes = api::api_error_response(
                None,
                ApiError::MethodNotAllowed,
                &format!("{} {} is not allowed; use {allow}", req.method, req.path),
                None,
                false,
            );
            insert_header(&mut bytes, &format!("Allow: {allow}"));
            let _ = (&**tcp).write_all(&bytes);
            Next::Close
        }
        Route::NotFound => {
            write_error(
                tcp,
                ErrorCode::NotFound.into(),
                &format!("no such endpoint: {} {}", req.method, req.path),
                false,
            );
            Next::Close
        }
    }
}

enum Route {
    Completions,
    Models,
    Stream,
    WrongMethod(&'static str),
    NotFound,
}

fn next(keep: bool) -> Next {
    if keep {
        Next::KeepAlive
    } else {
        Next::Close
    }
}

fn write_error(tcp: &TcpStream, error: ApiError, message: &str, keep: bool) {
    let _ = (&*tcp).write_all(&api::api_error_response(None, error, message, None, keep));
}

fn write_json(tcp: &TcpStream, status: u16, body: &[u8], keep: bool) {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nCache-Control: no-store\r\n{}\r\n",
        api::reason(status),
        body.len(),
        if keep { "" } else { "Connection: close\r\n" }
    )
    .into_bytes();
    out.extend_from_slice(body);
    let _ = (&*tcp).write_all(&out);
}

/// Adds a header line to a whole response written by [`api`].
fn insert_header(response: &mut Vec<u8>, header: &str) {
    if let Some(at) = response.windows(4).position(|w| w == b"\r\n\r\n") {
        let line = format!("\r\n{header}");
        response.splice(at..at, line.into_bytes());
    }
}

/// Reads the request body (its `Content-Length` bytes, the first of them
/// already in `input`). The error is the answer to send.
fn read_body(
    tcp: &TcpStream,
    req: &Request,
    input: &mut Vec<u8>,
    max: usize,
) -> Result<Vec<u8>, (ApiError, String)> {
    if req.header("transfer-encoding").is_some() {
        return Err((
            ErrorCode::BadRequest.into(),
            "a chunked request body is not supported; send Content-Length".to_owned(),
        ));
    }
    let len: usize = match req.header("content-length").map(|v| v.trim().parse()) {
        Some(Ok(len)) => len,
        None => 0,
        Some(Err(_)) => {
            return Err((
                ErrorCode::BadRequest.into(),
                "Content-Length is not a number".to_owned(),
            ))
        }
    };
    if len > max {
        return Err((
            ErrorCode::TooLarge.into(),
            format!(
                "the request body has {len} bytes, the limit is {max} (server.http_max_body_bytes)"
            ),
        ));
    }
    // The socket is blocking here: a request is read before its response
    // makes it non-blocking, and `next_request` makes it blocking again.
    if input.len() < len && req.header_has_token("expect", "100-continue") {
        // curl waits for this before it sends a body over 1 KiB.
        let _ = (&*tcp).write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut chunk = [0u8; 16 * 1024];
    while input.len() < len {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || tcp.set_read_timeout(Some(left)).is_err() {
            return Err((
                ErrorCode::BadRequest.into(),
                "the request body did not arrive in time".to_owned(),
            ));
        }
        let want = (len - input.len()).min(chunk.len());
        match (&*tcp).read(&mut chunk[..want]) {
            Ok(0) | Err(_) => {
                return Err((
                    ErrorCode::BadRequest.into(),
                    "the request body ended early".to_owned(),
                ))
            }
            Ok(n) => input.extend_from_slice(&chunk[..n]),
        }
    }
    let rest = input.split_off(len);
    Ok(std::mem::replace(input, rest))
}

/// A new response's outbox and client, and its socket made ready for it.
fn open_response(
    tcp: &Arc<TcpStream>,
    asked: Asked,
    shared: &Shared,
) -> io::Result<(Arc<Outbox>, Arc<dyn Client>)> {
    let server = &shared.config.server;
    let outbox =
        Arc::new(Outbox::bounded(server.outbox_frames, server.outbox_bytes)?.framed(api::chunked));
    tcp.set_nonblocking(true)?;
    let _ = tcp.set_nodelay(true);
    if server.send_buffer_bytes > 0 {
        socket2::SockRef::from(&**tcp).set_send_buffer_size(server.send_buffer_bytes)?;
    }
    outbox.attach_socket(tcp.clone());
    let client: Arc<dyn Client> = HttpClient::new(outbox.clone(), asked);
    Ok((outbox, client))
}

/// Writes the response of `request` and tells what comes next.
fn finish_response(
    tcp: &Arc<TcpStream>,
    outbox: &Outbox,
    request: &str,
    input: &mut Vec<u8>,
    keep: bool,
    shared: &Shared,
) -> Next {
    let ended = api::write_response(tcp, outbox, input, MAX_PIPELINED);
    // Whatever comes later for this request has nobody to go to.
    outbox.close();
    match ended {
        Ended::Answered => next(keep),
        Ended::ClientGone => {
            // Detached like a WebSocket that closes: the upstream call is
            // aborted once nobody else follows it.
            shared.pipeline.connection_closed(&[request.to_owned()]);
            Next::Close
        }
    }
}

/// Opens a response, hands its client to the pipeline with `start` (which
/// returns the request id, or why it refused), and writes the response or
/// the refusal.
fn respond(
    tcp: &Arc<TcpStream>,
    asked: Asked,
    input: &mut Vec<u8>,
    keep: bool,
    shared: &Shared,
    start: impl FnOnce(&Arc<dyn Client>) -> Result<String, Failure>,
) -> Next {
    let (outbox, client) = match open_response(tcp, asked, shared) {
        Ok(opened) => opened,
        Err(e) => {
            log::warn!("cannot open an HTTP response: {e}");
            return Next::Close;
        }
    };
    match start(&client) {
        Ok(request) => finish_response(tcp, &outbox, &request, input, keep, shared),
        Err(failure) => {
            outbox.close();
            let _ = tcp.set_nonblocking(false);
            let _ = (&**tcp).write_all(&api::error_response(None, &failure, keep));
            next(keep)
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `POST /v1/chat/completions`.
fn completions(
    tcp: &Arc<TcpStream>,
    req: &Request,
    input: &mut Vec<u8>,
    keep: bool,
    shared: &Arc<Shared>,
) -> Next {
    let body = match read_body(tcp, req, input, shared.config.server.http_max_body_bytes) {
        Ok(body) => body,
        Err((error, message)) => {
            // The body was not read: the connection cannot be reused.
            write_error(tcp, error, &message, false);
            return Next::Close;
        }
    };
    let parsed = match openai::parse_chat_request(&body) {
        Ok(parsed) => parsed,
        Err(e) => {
            let _ = (&**tcp).write_all(&api::api_error_response(
                None,
                ErrorCode::BadRequest.into(),
                &e.message,
                e.param.as_deref(),
                keep,
            ));
            return next(keep);
        }
    };
    let asked = Asked {
        stream: parsed.stream,
        include_usage: parsed.include_usage,
        model: parsed
            .model
            .clone()
            .unwrap_or_else(|| shared.config.llm.model.clone()),
        created: unix_now(),
        keep_alive: keep,
        max_answer_bytes: shared.config.server.outbox_bytes,
    };
    let fresh = req.header_has_token("cache-control", "no-cache");
    let given = GivenPrompt {
        id: String::new(),
        prompt: parsed.into_prompt(&shared.config.llm.model),
        fresh,
    };
    respond(tcp, asked, input, keep, shared, |client| {
        shared.pipeline.submit_prompt(client, given)
    })
}

/// `GET /v1/chorus/streams/{request}`: the stream of a running or recently
/// finished request, from the token after `Last-Event-ID` (or `?from=N`).
fn stream(
    tcp: &Arc<TcpStream>,
    req: &Request,
    input: &mut Vec<u8>,
    keep: bool,
    shared: &Arc<Shared>,
) -> Next {
    let id = req
        .path
        .strip_prefix("/v1/chorus/streams/")
        .unwrap_or_default()
        .to_owned();
    let from = match (req.header("last-event-id"), req.query_param("from")) {
        (Some(last), _) => last.trim().parse::<u64>().map(|n| n.saturating_add(1)),
        (None, Some(from)) => from.trim().parse::<u64>(),
        (None, None) => Ok(0),
    };
    let Ok(from) = from else {
        write_error(
            tcp,
            ErrorCode::BadRequest.into(),
            "Last-Event-ID (or from) must be a token number",
            keep,
        );
        return next(keep);
    };
    let asked = Asked {
        stream: true,
        include_usage: false,
        model: shared
            .pipeline
            .model_of(&id)
            .unwrap_or_else(|| shared.config.llm.model.clone()),
        created: unix_now(),
        keep_alive: keep,
        max_answer_bytes: shared.config.server.outbox_bytes,
    };
    respond(tcp, asked, input, keep, shared, |client| {
        shared
            .pipeline
            .resume(client, &id, from)
            .map(|()| id.clone())
    })
}
