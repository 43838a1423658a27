//! Fuzz target: see `chorus::fuzzing::http_head`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chorus::fuzzing::http_head(data));
