//! chorus: a self-hosted realtime LLM chat gateway.

pub mod broadcast;
pub mod cache;
pub mod llm;
pub mod outbox;
pub mod protocol;
