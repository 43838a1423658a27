//! Time to first token at many concurrent streams.

use std::sync::{Arc, Barrier};

use serde_json::{json, Value};

use crate::client::{chat, Client, Observed};
use crate::measure::{stats, summary};
use crate::{ms, spawn, Args};

/// model's own first-token delay: what the server adds.
pub fn ttft(args: &Args) -> Result<Value, String> {
    let connections = if args.connections == 0 {
        200
    } else {
        args.connections
    };
    let mut client_overhead = Vec::new();
    let mut server_overhead = Vec::new();
    let clients: Vec<Client> = (0..connections)
        .map(|_| Client::connect(args.addr))
        .collect::<Result<_, _>>()?;
    let mut clients: Vec<Option<Client>> = clients.into_iter().map(Some).collect();
    for round in 0..args.rounds {
        let barrier = Arc::new(Barrier::new(connections));
        let handles: Vec<_> = clients
            .iter_mut()
            .enumerate()
            .map(|(i, slot)| {
                let mut c = slot.take().ok_or("client lost")?;
                let barrier = barrier.clone();
                Ok(spawn(move || -> Result<(Client, Observed), String> {
                    barrier.wait();
                    // Distinct questions: every one is a leader with its own stream.
                    let o = chat(
                        &mut c,
                        &format!("t{round}-{i}"),
                        &format!("round {round} question {i}"),
                    )?;
                    Ok((c, o))
                }))
            })
            .collect::<Result<_, String>>()?;
        for (slot, h) in clients.iter_mut().zip(handles) {
            let (c, o) = h.join().map_err(|_| "client thread panicked")??;
            *slot = Some(c);
            if let Some(first) = o.first_token {
                client_overhead.push(ms(first - o.sent) - args.first_token_ms);
            }
            if let Some(t) = o.end["timings"]["ttft_ms"].as_f64() {
                server_overhead.push(t - args.first_token_ms);
            }
        }
    }
    let s = stats(args.addr)?;
    Ok(json!({
        "scenario": "ttft",
        "concurrent_streams": connections,
        "rounds": args.rounds,
        "simulated_first_token_ms": args.first_token_ms,
        "server_added_ms (done.timings.ttft_ms - first_token_ms)": summary(server_overhead),
        "client_seen_added_ms (send to first token - first_token_ms)": summary(client_overhead),
        "upstream_calls": s["upstream"]["calls"],
    }))
}
