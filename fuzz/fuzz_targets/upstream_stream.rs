//! Fuzz target: see `chorus::fuzzing::upstream_stream`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chorus::fuzzing::upstream_stream(data));
