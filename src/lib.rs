//! chorus: a self-hosted realtime LLM chat gateway.
//!
//! Browsers and other WebSocket clients connect to one port and chat with a
//! model. chorus sits between many users and an expensive, slow upstream
//! model and makes that upstream go as far as possible: identical questions
//! asked at the same time share one generation ([`singleflight`]), complete
//! answers are cached and served on their own lane ([`cache`]), and tokens
//! fan out live to every interested client ([`broadcast`]).
//!
//! The core is synchronous by design: OS thread pools ([`pool`]) sized by
//! the concurrency limits, connected by bounded crossbeam channels
//! ([`pipeline`]), one thread per WebSocket connection ([`ws`]).
//!
//! Reading order for newcomers: [`protocol`] (what clients send and get),
//! [`pipeline`] (the heart), [`broadcast`] and [`outbox`] (how a token
//! reaches a socket), then [`net`] (the port: accepting, HTTP, routing,
//! the WebSocket upgrade), [`ws`] (a WebSocket's own thread) and
//! [`server`] (how it is all started and stopped).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod authority;
pub mod breaker;
pub mod broadcast;
pub mod cache;
pub mod cluster;
pub mod config;
pub mod delivery;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod history;
pub mod llm;
pub mod memory;
pub mod metrics;
pub mod net;
pub mod openai;
pub mod outbox;
pub mod pipeline;
pub mod pool;
pub mod protocol;
pub mod redis_pool;
pub mod server;
pub mod singleflight;
pub mod threads;
pub mod tools;
pub mod ws;
