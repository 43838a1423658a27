//! The OpenAI-compatible HTTP API as a transport: the pipeline's client
//! for one HTTP response ([`HttpClient`]: events become a streamed or a
//! whole OpenAI answer) and the loop that writes a response while watching
//! its connection ([`write_response`]). Reading requests, routing and
//! keep-alive are the accept side's (`net::api`).
//!
//! Threads: an HTTP connection's own thread consumes its response's
//! outbox; the pipeline's threads send to its client.

mod client;
mod response;

pub use client::{api_error_response, chunked, error_response, reason, Asked, HttpClient};
pub use response::{write_response, Ended};
