//! Fuzz target: see `chorus::fuzzing::client_frame`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chorus::fuzzing::client_frame(data));
