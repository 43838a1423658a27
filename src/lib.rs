//! chorus: a self-hosted realtime LLM chat gateway.
