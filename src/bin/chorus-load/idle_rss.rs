//! Resident memory per idle connection.

use std::time::Duration;

use serde_json::{json, Value};

use crate::client::Client;
use crate::measure::{rss_kib, stats};
use crate::Args;

/// Resident memory per idle WebSocket connection.
pub fn idle_rss(args: &Args) -> Result<Value, String> {
    let pid = args.pid.ok_or("idle-rss needs --pid")?;
    let connections = if args.connections == 0 {
        2000
    } else {
        args.connections
    };
    // One connection first, so one-time allocations are not counted per connection.
    let warm = Client::connect(args.addr)?;
    std::thread::sleep(Duration::from_millis(500));
    let before = rss_kib(pid)?;
    let clients: Vec<Client> = (0..connections)
        .map(|_| Client::connect(args.addr))
        .collect::<Result<_, _>>()?;
    std::thread::sleep(Duration::from_secs(1));
    let after = rss_kib(pid)?;
    let s = stats(args.addr)?;
    drop(clients);
    drop(warm);
    Ok(json!({
        "scenario": "idle-rss",
        "connections": connections,
        "server_connections_seen": s["connections"],
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_idle_connection": (after - before) / connections as f64,
    }))
}
