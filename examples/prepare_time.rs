//! Grows one conversation on a running chorus and prints the preparation
//! time (`done.timings.prepare_ms`) of its chats as it grows: the cost of
//! reading the history for the prompt.
//!
//! ```text
//! cargo run --release -- --config prepare.toml --bind 127.0.0.1:8099
//! cargo run --release --example prepare_time -- 127.0.0.1:8099 150
//! ```
//!
//! with `prepare.toml` making big answers quickly (about 62 KB each):
//!
//! ```toml
//! [llm.simulated]
//! first_token_ms = 0
//! token_interval_ms = 0
//! tokens = 16
//! token_bytes = 3900
//! ```
//!
//! One thread, one WebSocket, one chat at a time.

use std::net::TcpStream;

use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

fn next_end(ws: &mut WebSocket<TcpStream>, request: &str) -> Value {
    loop {
        let Ok(Message::Text(text)) = ws.read() else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
            continue;
        };
        if v["request"] == request && (v["type"] == "done" || v["type"] == "error") {
            return v;
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8080".into());
    let chats: usize = args.next().map_or(Ok(150), |n| n.parse())?;
    let tcp = TcpStream::connect(&addr)?;
    let (mut ws, _) = tungstenite::client::client(format!("ws://{addr}/ws"), tcp)?;
    let mut conversation: Option<String> = None;
    let mut window = Vec::new();
    println!("messages_before  prepare_ms (median of the last 10 chats)");
    for i in 0..chats {
        let mut chat =
            json!({"type": "chat", "id": format!("c{i}"), "message": format!("question {i}")});
        if let Some(c) = &conversation {
            chat["conversation"] = json!(c);
        }
        ws.send(Message::text(chat.to_string()))?;
        let accepted = loop {
            let Message::Text(text) = ws.read()? else {
                continue;
            };
            let v: Value = serde_json::from_str(text.as_str())?;
            if v["id"] == format!("c{i}").as_str() {
                break v;
            }
        };
        let request = accepted["request"]
            .as_str()
            .ok_or("chat refused")?
            .to_owned();
        conversation = accepted["conversation"].as_str().map(str::to_owned);
        let end = next_end(&mut ws, &request);
        window.push(end["timings"]["prepare_ms"].as_f64().unwrap_or(f64::NAN));
        if window.len() == 10 {
            window.sort_by(f64::total_cmp);
            println!("{:>15}  {:.2}", 2 * (i - 9), window[5]);
            window.clear();
        }
    }
    Ok(())
}
