//! Tests of the OpenAI wire format: every refusal of a request, and every
//! encoder read back with serde_json.

mod request;
mod response;
