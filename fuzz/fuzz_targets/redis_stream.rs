//! Fuzz target: see `chorus::fuzzing::redis_stream`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chorus::fuzzing::redis_stream(data));
