//! Races between cancel, followers joining, the end of a generation and
//! resume. The first two run many short rounds so that cancels land in every
//! stage of a request, including right at the generation's end; the windows
//! they guard are narrow, so they make the bad interleavings likely, not
//! certain. The resume test is deterministic.

use crate::common::Server;
use serde_json::json;

/// Short answers with tokens close together: the end of a generation and a
/// cancel land near each other often.
const QUICK: &str = r#"
[llm.simulated]
first_token_ms = 2
token_interval_ms = 1
tokens = 6
"#;

#[test]
fn a_follower_never_inherits_its_leaders_cancel() {
    let server = Server::start(QUICK);
    let mut leader = server.client();
    let mut follower = server.client();
    for round in 0..40 {
        let question = format!("round {round}");
        let (leader_request, _) = leader.ask(None, &question);
        let (follower_request, _) = follower.ask(None, &question);
        // The leader gives up at once, whatever stage things are in.
        leader.send(json!({"type": "cancel", "request": leader_request}));
        let gone = leader.answer(&leader_request);
        assert!(
            gone.end["finish"] == "cancelled" || gone.end["code"] == "cancelled" || gone.is_done(),
            "round {round}: {}",
            gone.end
        );
        let a = follower.answer(&follower_request);
        assert!(a.is_done(), "round {round}: {}", a.end);
        assert_ne!(
            a.finish(),
            "cancelled",
            "round {round}: the follower did not cancel"
        );
        a.assert_contiguous();
        assert_eq!(a.seqs.len() as u64, a.end["tokens"].as_u64().unwrap());
    }
}

#[test]
fn a_cancel_near_the_end_counts_exactly_the_tokens_sent() {
    let server = Server::start(QUICK);
    let mut c = server.client();
    for round in 0..60 {
        let (request, conversation) = c.ask(None, &format!("cancel me {round}"));
        // Cancel after a varying number of tokens, sometimes after the last.
        let wait_for = round % 8;
        let mut seen = 0;
        let mut text = String::new();
        while seen < wait_for {
            let v = c.recv_matching(|v| v["request"] == request.as_str());
            match v["type"].as_str().unwrap() {
                "token" => {
                    seen += 1;
                    text.push_str(v["text"].as_str().unwrap());
                }
                "done" => {
                    // Finished before we cancelled; nothing to check this round.
                    seen = usize::MAX;
                }
                _ => {}
            }
        }
        if seen == usize::MAX {
            continue;
        }
        c.send(json!({"type": "cancel", "request": request}));
        let rest = c.answer(&request);
        let tokens = rest.end["tokens"].as_u64().unwrap_or(0);
        assert_eq!(
            tokens,
            (seen + rest.seqs.len()) as u64,
            "round {round}: done counts what was sent: {}",
            rest.end
        );
        text.push_str(&rest.text);
        // What was stored is what was sent.
        c.send(json!({"type": "history", "conversation": conversation}));
        let h = c.recv_matching(|v| v["type"] == "history");
        let stored = h["messages"]
            .as_array()
            .unwrap()
            .get(1)
            .and_then(|m| m["content"].as_str())
            .unwrap_or("");
        assert_eq!(stored, text, "round {round}");
    }
}

#[test]
fn resuming_on_the_same_connection_gives_one_end() {
    let server = Server::start(
        r#"
[llm.simulated]
first_token_ms = 5
token_interval_ms = 20
tokens = 20
"#,
    );
    let mut c = server.client();
    let (request, _) = c.ask(None, "resume where I am");
    let first = c.recv_matching(|v| v["request"] == request.as_str() && v["type"] == "token");
    assert_eq!(first["seq"], 0);
    c.send(json!({"type": "resume", "request": request, "from": 1}));
    let mut dones = 0;
    let mut seqs = vec![0];
    loop {
        let v = c.recv_matching(|v| v["request"] == request.as_str());
        match v["type"].as_str().unwrap() {
            "token" => seqs.push(v["seq"].as_u64().unwrap()),
            "done" | "error" => {
                dones += 1;
                break;
            }
            _ => {}
        }
    }
    assert_eq!(dones, 1);
    // Every seq arrives, in order; the resume replaced the old attachment.
    let mut sorted = seqs.clone();
    sorted.dedup();
    assert_eq!(sorted, (0..20).collect::<Vec<u64>>(), "{seqs:?}");
    c.send(json!({"type": "history", "conversation": "none"}));
    let next = c.recv();
    assert_eq!(next["code"], "not_found", "a second end arrived: {next}");
}
