//! Tools end to end with the simulated model, which picks tools by
//! keywords: the `tool` frames clients see, results reaching the answer,
//! direct tools, the cache rule for the clock, and search isolation.

use crate::common::tool_rounds::frames_of;
use crate::common::{Server, FAST};
use serde_json::Value;

fn tool_frames<'a>(frames: &'a [Value], phase: &str) -> Vec<&'a Value> {
    frames
        .iter()
        .filter(|f| f["type"] == "tool" && f["phase"] == phase)
        .collect()
}

fn text(frames: &[Value]) -> String {
    frames
        .iter()
        .filter(|f| f["type"] == "token")
        .map(|f| f["text"].as_str().unwrap())
        .collect()
}

#[test]
fn the_calculator_result_is_shown_and_reaches_the_answer() {
    let server = Server::start(FAST);
    let mut c = server.client();
    let (request, _) = c.ask(None, "Please calculate 2+3*4?");
    let frames = frames_of(&mut c, &request);
    let calls = tool_frames(&frames, "call");
    assert_eq!(calls.len(), 1, "{frames:#?}");
    assert_eq!(calls[0]["name"], "calculator");
    let args: Value = serde_json::from_str(calls[0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(args["expression"], "2+3*4");
    let results = tool_frames(&frames, "result");
    assert_eq!(results[0]["text"], "14");
    // Tool frames come before the answer's first token.
    let first_token = frames.iter().position(|f| f["type"] == "token").unwrap();
    let last_tool = frames.iter().rposition(|f| f["type"] == "tool").unwrap();
    assert!(last_tool < first_token);
    // The simulated model quotes the tool results it was given.
    assert!(
        text(&frames).starts_with("calculator says: 14."),
        "{}",
        text(&frames)
    );
    assert_eq!(frames.last().unwrap()["type"], "done");
    // One call per round: the one that asked for the tool, the one that answered.
    assert_eq!(server.stats()["upstream"]["calls"], 2);
}

#[test]
fn bad_tool_arguments_become_an_error_result_not_a_failure() {
    let server = Server::start(FAST);
    let mut c = server.client();
    let (request, _) = c.ask(None, "calculate 2+*3");
    let frames = frames_of(&mut c, &request);
    let result = tool_frames(&frames, "result")[0]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(result.starts_with("error: cannot evaluate"), "{result}");
    assert_eq!(frames.last().unwrap()["type"], "done");
    assert!(text(&frames).starts_with("calculator says: error"));
    // The connection and the server are fine.
    assert!(c.ask_and_wait(None, "And now a plain question").is_done());
}

#[test]
fn the_clock_answers_directly_and_is_never_cached() {
    let server = Server::start(FAST);
    let mut c = server.client();
    let (request, _) = c.ask(None, "What time is it?");
    let frames = frames_of(&mut c, &request);
    assert_eq!(tool_frames(&frames, "call")[0]["name"], "clock");
    let result = tool_frames(&frames, "result")[0]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        result.starts_with("It is 20") && result.ends_with("Z (UTC)."),
        "{result}"
    );
    // Direct: the tool's output is the answer, and the model is not asked
    // again after the round that called the tool.
    assert_eq!(text(&frames), result);
    assert_eq!(frames.last().unwrap()["finish"], "stop");
    assert_eq!(server.stats()["upstream"]["calls"], 1);
    // The same first question again is not a cache hit: time moves on.
    let again = c.ask_and_wait(None, "What time is it?");
    assert_eq!(again.role.as_deref(), Some("leader"));
    assert_eq!(server.stats()["cache"]["hits"], 0);
}

#[test]
fn search_history_finds_this_conversations_messages_only() {
    let server = Server::start(FAST);
    let mut mine = server.client();
    let mut theirs = server.client();
    let (first, conversation) = mine.ask(None, "My favourite fruit is mango");
    assert!(mine.answer(&first).is_done());
    let (second, _) = mine.ask(Some(&conversation), "I also like kiwi");
    assert!(mine.answer(&second).is_done());
    let (r, _) = theirs.ask(None, "I eat mango in Brazil every summer");
    theirs.answer(&r);
    let (request, _) = mine.ask(Some(&conversation), "Search my history for mango");
    let frames = frames_of(&mut mine, &request);
    assert_eq!(tool_frames(&frames, "call")[0]["name"], "search_history");
    // Each match is streamed as output before the result.
    let outputs = tool_frames(&frames, "output");
    assert!(!outputs.is_empty(), "{frames:#?}");
    let result = tool_frames(&frames, "result")[0]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(result.contains("My favourite fruit is mango"), "{result}");
    assert!(
        !result.contains("Brazil"),
        "another conversation leaked: {result}"
    );
    assert!(
        !result.contains("kiwi"),
        "a message without the word matched: {result}"
    );
    assert_eq!(frames.last().unwrap()["type"], "done");
}

#[test]
fn tools_can_be_switched_off() {
    let server = Server::start(&format!("{FAST}\n[tools]\nenabled = false\n"));
    let mut c = server.client();
    let (request, _) = c.ask(None, "Please calculate 2+3*4");
    let frames = frames_of(&mut c, &request);
    assert!(frames.iter().all(|f| f["type"] != "tool"));
    assert_eq!(frames.last().unwrap()["type"], "done");
}
