//! The accept side of the single port: everything between a TCP connection
//! and the WebSocket loop of [`crate::ws`].
//!
//! Threads: see each submodule.

pub mod descriptors;
pub mod http;
pub(crate) mod static_files;
