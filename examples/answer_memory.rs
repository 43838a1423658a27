//! What one big answer costs a running chorus, and whether the memory comes
//! back: prints the server's resident memory (from `/proc/PID/status`)
//! before, right after `CLIENTS` clients (one leader, the rest followers of
//! the same generation) read one answer whole, and then every few seconds
//! while the server is idle.
//!
//! ```text
//! cargo run --release -- --config big.toml --bind 127.0.0.1:8098 &
//! cargo run --release --example answer_memory -- 127.0.0.1:8098 $! 4 30
//! ```
//!
//! with `big.toml` making one answer of 4,000 tokens of 4 KiB (16 MiB) and
//! a short replay window:
//!
//! ```toml
//! [llm]
//! max_tokens = 4000
//! [llm.simulated]
//! first_token_ms = 300
//! token_interval_ms = 0
//! tokens = 4000
//! token_bytes = 4096
//! [timeouts]
//! replay_window_ms = 5000
//! ```

use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Asks `message` and reads until its end; returns the answer's bytes.
fn ask(ws: &mut WebSocket<TcpStream>, message: &str) -> Result<usize, Box<dyn std::error::Error>> {
    let chat = json!({"type": "chat", "id": "c", "message": message});
    ws.send(Message::text(chat.to_string()))?;
    let mut bytes = 0;
    loop {
        let Message::Text(text) = ws.read()? else {
            continue;
        };
        let v: Value = serde_json::from_str(text.as_str())?;
        match v["type"].as_str() {
            Some("token") => bytes += v["text"].as_str().map_or(0, str::len),
            Some("done") => return Ok(bytes),
            Some("error") => return Err(format!("{v}").into()),
            _ => {}
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr = args
        .first()
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let pid: u32 = args
        .get(1)
        .ok_or("usage: ADDR PID [CLIENTS] [IDLE_SECONDS]")?
        .parse()?;
    let clients: usize = args.get(2).map_or(Ok(4), |n| n.parse())?;
    let idle: u64 = args.get(3).map_or(Ok(30), |n| n.parse())?;
    let start = rss_kib(pid);
    println!("rss before: {} MiB", start / 1024);
    let question = format!("a big answer please {}", std::process::id());
    let readers: Vec<_> = (0..clients)
        .map(|_| {
            let (addr, question) = (addr.clone(), question.clone());
            std::thread::spawn(move || -> Result<usize, String> {
                let tcp = TcpStream::connect(&addr).map_err(|e| e.to_string())?;
                let (mut ws, _) = tungstenite::client::client(format!("ws://{addr}/ws"), tcp)
                    .map_err(|e| e.to_string())?;
                ask(&mut ws, &question).map_err(|e| e.to_string())
            })
        })
        .collect();
    let mut peak = 0;
    let mut answer = 0;
    for r in readers {
        while !r.is_finished() {
            peak = peak.max(rss_kib(pid));
            std::thread::sleep(Duration::from_millis(20));
        }
        answer = r.join().map_err(|_| "reader panicked")??;
    }
    let after = rss_kib(pid);
    println!(
        "answer: {} MiB to each of {clients} clients; rss peak {} MiB (+{}), right after {} MiB (+{})",
        answer >> 20,
        peak / 1024,
        peak.saturating_sub(start) / 1024,
        after / 1024,
        after.saturating_sub(start) / 1024
    );
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(idle) {
        std::thread::sleep(Duration::from_secs(5));
        let now = rss_kib(pid);
        println!(
            "idle {:>3} s: rss {} MiB (+{})",
            began.elapsed().as_secs(),
            now / 1024,
            now.saturating_sub(start) / 1024
        );
    }
    Ok(())
}
