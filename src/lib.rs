//! chorus: a self-hosted realtime LLM chat gateway.
//!
//! Browsers and other WebSocket clients connect to one port and chat with a
//! model. chorus sits between many users and an expensive, slow upstream
//! model and makes that upstream go as far as possible: identical questions
//! asked at the same time share one generation ([`singleflight`]), complete
//! answers are cached and served on their own lane (`cache`), and tokens
//! fan out live to every interested client ([`broadcast`]).
//!
//! The core is synchronous by design: OS thread pools ([`pool`]) sized by
//! the concurrency limits, connected by bounded crossbeam channels
//! (`pipeline`), one thread per WebSocket connection ([`ws`]).
//!
//! Reading order for newcomers: [`protocol`] (what clients send and get),
//! `pipeline` (the heart), [`broadcast`] and [`outbox`] (how a token
//! reaches a socket), then `net` (the port: accepting, HTTP, routing,
//! the WebSocket upgrade), [`ws`] (a WebSocket's own thread) and
//! [`server`] (how it is all started and stopped).
//!
//! # What is public
//!
//! An embedder runs a [`Server`] from a [`Config`] (read from a file,
//! the environment and flags with [`config::Config::load`], or built in
//! code) and stops it with [`Server::shutdown`]; the wire vocabulary is
//! [`protocol`]. A model provider is an [`llm::Provider`]. The building
//! blocks are public too, each usable and tested on its own:
//! [`singleflight`], [`broadcast`], [`outbox`], [`delivery`], [`pool`],
//! [`threads`], [`oneshot`], [`memory`], [`breaker`], [`history`],
//! [`cluster`], [`request_key`], [`redis_pool`], and [`ws`]'s client
//! (benchmarks drive it). Everything that only wires chorus together is private: the
//! pipeline, the accept side and its HTTP API, the OpenAI wire format, the
//! cache backends, the tools, the metrics and the `Host` check.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub use config::{Config, ConfigError};
pub use protocol::{ErrorCode, Failure, Finish, Outcome};
pub use server::{Server, ServerError};

mod api;
mod authority;
pub mod breaker;
pub mod broadcast;
mod cache;
pub mod cluster;
pub mod config;
pub mod delivery;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod history;
pub mod llm;
pub mod memory;
mod metrics;
mod net;
pub mod oneshot;
mod openai;
pub mod outbox;
mod pipeline;
pub mod pool;
pub mod protocol;
pub mod redis_pool;
pub mod request_key;
pub mod server;
pub mod singleflight;
pub mod threads;
mod tools;
pub mod ws;
