//! Fuzz target: see `chorus::fuzzing::openai_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chorus::fuzzing::openai_request(data));
