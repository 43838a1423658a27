//! chorus against an OpenAI-compatible upstream (the loopback fake of
//! `tests/common/upstream/`): the `openai` provider, its tools and tool
//! rounds, its connections and self-check, and chorus's own
//! OpenAI-compatible HTTP API seen on the wire. One test binary, so the
//! shared fixtures of `tests/common/` are compiled and linked once for all
//! of them. (The same API driven by the official Python SDK is
//! `tests/http_api_sdk.rs`, a binary of its own since it needs the SDK's
//! virtual environment.)

#[path = "../common/mod.rs"]
mod common;

mod http_api;
mod http_api_raw;
mod openai;
mod tool_calls_hostile;
mod tool_rounds;
mod tools;
mod upstream_connections;
mod upstream_selfcheck;
mod upstream_selfcheck_connections;
