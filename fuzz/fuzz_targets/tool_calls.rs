//! Fuzz target: see `chorus::fuzzing::tool_calls`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chorus::fuzzing::tool_calls(data));
