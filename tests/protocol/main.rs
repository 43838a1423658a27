//! The server seen from its clients: the WebSocket protocol (chats, cancel
//! and resume, bad input, edge cases, limits, races), the process (start,
//! shutdown, what stays counted as running), and the checks that the
//! documents and the module map match the code. One test binary, so the
//! shared fixtures of `tests/common/` are compiled and linked once for all
//! of them.
//!
//! Not here, because they measure something process-wide that tests running
//! beside them on the harness's other threads would change: `start_failure`
//! (counts this process's threads), `memory_bounds` (reads SQLite's global
//! memory counter, which any in-process SQLite connection moves, as
//! `server`'s does) and `answer_memory` (counts every allocation).

#[path = "../common/mod.rs"]
mod common;

mod architecture;
mod bad_input;
mod cancel_resume;
mod chat;
mod docs;
mod edge;
mod generation_leaks;
mod limits;
mod races;
mod server;
