//! WebSocket connections: the protocol's messages, frame encoding, the
//! pipeline's handle on a connection ([`WsClient`]) and the per-connection
//! thread loop.
//!
//! Threads: each upgraded connection runs [`serve`] on its own OS thread;
//! see `connection` for how that one thread reads and writes without
//! polling intervals.

mod client;
mod connection;
pub mod encode;
pub(crate) mod frame;
mod history_page;
mod keepalive;

pub use client::{outbox, WsClient};
#[cfg(test)]
pub(crate) use connection::PANIC_FRAME;
pub use connection::{serve, Limits};
pub use frame::close;
