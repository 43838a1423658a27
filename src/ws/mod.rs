//! WebSocket connections: frame encoding and the per-connection thread loop.
//!
//! Threads: each upgraded connection runs [`serve`] on its own OS thread;
//! see `connection` for how that one thread reads and writes without
//! polling intervals.

mod connection;
pub(crate) mod frame;
mod keepalive;

#[cfg(test)]
pub(crate) use connection::PANIC_FRAME;
pub use connection::{serve, Limits};
