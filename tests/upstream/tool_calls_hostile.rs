//! Hostile tool calls, end to end: the real chorus binary with
//! `provider = "openai"` against a real HTTP server on loopback that
//! streams scripted tool-call deltas (`common::upstream`). A call to an
//! unknown tool, arguments that are not JSON or too long, calls beyond the
//! limit, and calls whose `index` jumps or repeats each become an `error:`
//! result, shown to the client and sent back upstream as that call's
//! `tool` message, while the other calls of the round still run; none of
//! them fails the request. The well-behaved rounds are in `tool_rounds.rs`.

use crate::common::tool_rounds::{
    added_messages, answer_of, answer_round, ask, assert_done, calculator, chorus, expression,
    frames_of, sorted, texts, tool_frames, CALC_ARGS, CALC_RESULT,
};
use crate::common::upstream::{Script, ScriptedCall, Upstream};

/// What a call's result must be.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    /// This exact text.
    Is(&'static str),
    /// Text starting with `error:`.
    Error,
}

/// Streams `round` (finish `tool_calls`) to a chorus configured with
/// `extra`, then a final round, and checks that each call got the result
/// `expected` (by call id, in call order): as `tool` result frames, and as
/// `tool` messages in the next request. The request must end with `done`.
/// Returns the texts of the error results.
fn hostile_round(extra: &str, round: Script, expected: &[(&str, Outcome)]) -> Vec<String> {
    let upstream = Upstream::start();
    upstream.push(round.reply("tool_calls"));
    upstream.push(answer_round(&["Sorry", " about", " that."]));
    let server = chorus(&upstream, extra);
    let mut c = server.client();
    let request = ask(&mut c, "Try something odd");
    let frames = frames_of(&mut c, &request);
    let answer = answer_of(&request, &frames);
    assert_done(&answer);
    assert_eq!(answer.text, "Sorry about that.");

    // One result per call; the refused ones are errors, the others ran.
    let results = texts(&tool_frames(&frames, "result"));
    assert_eq!(results.len(), expected.len(), "{frames:#?}");
    let (errors, values): (Vec<String>, Vec<String>) =
        results.into_iter().partition(|t| t.starts_with("error:"));
    let expected_values: Vec<String> = expected
        .iter()
        .filter_map(|(_, o)| match o {
            Outcome::Is(text) => Some((*text).to_owned()),
            Outcome::Error => None,
        })
        .collect();
    assert_eq!(errors.len(), expected.len() - expected_values.len());
    assert_eq!(sorted(values), sorted(expected_values), "{frames:#?}");

    let requests = upstream.requests();
    assert_eq!(requests.len(), 2, "the request goes on to the next round");
    let added = added_messages(&requests[0], &requests[1], 1 + expected.len());
    assert_eq!(added[0]["role"], "assistant", "{:#?}", added[0]);
    let ids: Vec<&str> = added[0]["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("no tool_calls: {}", added[0]))
        .iter()
        .map(|c| c["id"].as_str().expect("a call id"))
        .collect();
    let expected_ids: Vec<&str> = expected.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, expected_ids);
    for ((id, outcome), message) in expected.iter().zip(&added[1..]) {
        assert_eq!(message["role"], "tool", "{message}");
        assert_eq!(message["tool_call_id"], *id, "{message}");
        let content = message["content"].as_str().expect("a content");
        match outcome {
            Outcome::Is(text) => assert_eq!(content, *text, "{message}"),
            Outcome::Error => assert!(content.starts_with("error:"), "{message}"),
        }
    }
    errors
}

#[test]
fn a_call_to_an_unknown_tool_gets_an_error_result() {
    let round = Script::new().call(
        &ScriptedCall::new(0, "call_1", "teleport", r#"{"to":"mars"}"#),
        4,
    );
    hostile_round("", round, &[("call_1", Outcome::Error)]);
}

#[test]
fn arguments_that_are_not_json_get_an_error_result() {
    let round = Script::new().call(&calculator(0, "call_1", "not json"), 2);
    hostile_round("", round, &[("call_1", Outcome::Error)]);
}

#[test]
fn arguments_over_max_argument_bytes_get_an_error_result() {
    let long = expression(&format!("{}1", "1+".repeat(40)));
    assert!(long.len() > 64);
    let round = Script::new().calls(
        &[
            calculator(0, "call_long", &long),
            calculator(1, "call_short", CALC_ARGS),
        ],
        8,
    );
    hostile_round(
        "[tools]\nmax_argument_bytes = 64\n",
        round,
        &[
            ("call_long", Outcome::Error),
            ("call_short", Outcome::Is(CALC_RESULT)),
        ],
    );
}

#[test]
fn calls_beyond_max_calls_get_an_error_result_naming_the_limit() {
    let round = Script::new().calls(
        &[
            calculator(0, "call_1", &expression("3*3")),
            calculator(1, "call_2", &expression("4*4")),
            calculator(2, "call_3", &expression("5*5")),
        ],
        64,
    );
    let errors = hostile_round(
        "[tools]\nmax_calls = 2\n",
        round,
        &[
            ("call_1", Outcome::Is("9")),
            ("call_2", Outcome::Is("16")),
            ("call_3", Outcome::Error),
        ],
    );
    assert!(
        errors[0].contains('2'),
        "the limit is not named: {errors:?}"
    );
}

#[test]
fn a_call_whose_index_jumps_gets_an_error_result() {
    let round = Script::new()
        .call(&calculator(0, "call_1", CALC_ARGS), 4)
        .call(&calculator(5, "call_2", &expression("1+1")), 4);
    hostile_round(
        "",
        round,
        &[
            ("call_1", Outcome::Is(CALC_RESULT)),
            ("call_2", Outcome::Error),
        ],
    );
}

#[test]
fn a_second_call_at_a_used_index_gets_an_error_result() {
    let round = Script::new()
        .call(&calculator(0, "call_1", CALC_ARGS), 4)
        .call_head(0, "call_2", "calculator", &expression("1+1"));
    hostile_round(
        "",
        round,
        &[
            ("call_1", Outcome::Is(CALC_RESULT)),
            ("call_2", Outcome::Error),
        ],
    );
}
