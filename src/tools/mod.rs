//! Tools the model may call while it answers: the streamed call of a round
//! offers their specs and ends with the calls the model made
//! ([`crate::llm::Turn`]); chorus runs them on the streaming worker, and
//! their results go back to the model in the next round (see
//! [`round_messages`]), or, for a `direct` tool, become the answer.
//!
//! Built in: `calculator` (arithmetic, parsed by a maintained expression
//! crate; nothing is ever executed as code), `clock` (the current UTC
//! time; an answer that used it is never cached) and `search`
//! (`search_history`: full-text search over the asking conversation's own
//! messages).
//!
//! Threads: [`Toolbox::run`] is called on a streaming worker and returns
//! when every call has finished. Independent calls run at the same time:
//! CPU-bound tools on rayon's pool, tools that wait on I/O or stream their
//! own output each on a scoped thread of their own, so rayon's threads
//! never block. A tool reports output as it goes through the `emit`
//! callback, which may be called from any of those threads.

mod calculator;
mod clock;
mod search;

use std::sync::Arc;

use rayon::prelude::*;
use serde_json::Value;

use crate::history::History;
use crate::llm::{PromptMessage, ToolCall, ToolSpec};

/// What a running tool can see and do.
pub struct ToolContext<'a> {
    /// The conversation the question belongs to.
    pub conversation: &'a str,
    /// Its history (for `search_history`).
    pub history: &'a History,
    /// Sends a piece of the tool's output to the clients as it is made.
    pub emit: &'a (dyn Fn(&str) + Sync),
}

/// How a tool runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Pure computation: runs on rayon's pool.
    Cpu,
    /// Waits on I/O or streams output: runs on a thread of its own.
    Blocking,
}

/// One tool.
pub trait Tool: Send + Sync {
    /// Name, description and argument schema for the model.
    fn spec(&self) -> ToolSpec;
    /// Where it runs.
    fn work(&self) -> Work;
    /// False when its result changes from one moment to the next, so an
    /// answer that used it must not be cached.
    fn cacheable(&self) -> bool {
        true
    }
    /// Runs the tool. `Err` is a message for the model (bad arguments,
    /// nothing found), never a crash.
    fn run(&self, args: &Value, ctx: &ToolContext<'_>) -> Result<String, String>;
}

/// The outcome of one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolResult {
    /// The call it answers.
    pub call: ToolCall,
    /// What the tool returned, or why it failed.
    pub result: Result<String, String>,
    /// The tool's output is the answer (its call skips the second model call).
    pub direct: bool,
    /// See [`Tool::cacheable`].
    pub cacheable: bool,
}

impl ToolResult {
    /// The text the model and the clients see.
    pub fn text(&self) -> String {
        match &self.result {
            Ok(text) => text.clone(),
            Err(e) => format!("error: {e}"),
        }
    }
}

struct Entry {
    /// `tool.spec().name`, kept so that finding a tool builds no spec.
    name: &'static str,
    tool: Arc<dyn Tool>,
    direct: bool,
}

/// The enabled tools.
pub struct Toolbox {
    entries: Vec<Entry>,
    /// Their specs, built once: every round offers them.
    specs: Vec<ToolSpec>,
}

/// Why a toolbox cannot be built from the configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ToolsError {
    /// A name in `tools.builtins` or `tools.direct` is not a built-in tool.
    #[error("unknown tool {0:?} (built in: calculator, clock, search_history)")]
    Unknown(String),
}

impl Toolbox {
    /// The built-ins named in `builtins`; those also in `direct` answer
    /// directly.
    pub fn new(builtins: &[String], direct: &[String]) -> Result<Toolbox, ToolsError> {
        if let Some(unknown) = direct.iter().find(|d| !builtins.contains(d)) {
            return Err(ToolsError::Unknown(unknown.clone()));
        }
        let entries = builtins
            .iter()
            .map(|name| {
                let tool: Arc<dyn Tool> = match name.as_str() {
                    "calculator" => Arc::new(calculator::Calculator),
                    "clock" => Arc::new(clock::Clock),
                    "search_history" => Arc::new(search::SearchHistory),
                    other => return Err(ToolsError::Unknown(other.to_owned())),
                };
                Ok(Entry {
                    name: tool.spec().name,
                    tool,
                    direct: direct.contains(name),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Toolbox::from_entries(entries))
    }

    fn from_entries(entries: Vec<Entry>) -> Toolbox {
        let specs = entries.iter().map(|e| e.tool.spec()).collect();
        Toolbox { entries, specs }
    }

    /// A toolbox of arbitrary tools (name → tool, direct or not).
    #[cfg(test)]
    fn of(tools: Vec<(Arc<dyn Tool>, bool)>) -> Toolbox {
        Toolbox::from_entries(
            tools
                .into_iter()
                .map(|(tool, direct)| Entry {
                    name: tool.spec().name,
                    tool,
                    direct,
                })
                .collect(),
        )
    }

    /// The specs offered to the model.
    pub fn specs(&self) -> &[ToolSpec] {
        &self.specs
    }

    fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// True when no tool is enabled.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Runs `calls` at the same time and returns their results in call
    /// order; a call the upstream sent malformed ([`ToolCall::refused`])
    /// or that names no tool gets an error result and does not run.
    /// `emit(call, text)` reports output as a tool produces it.
    pub fn run(
        &self,
        calls: &[ToolCall],
        conversation: &str,
        history: &History,
        emit: &(dyn Fn(&ToolCall, &str) + Sync),
    ) -> Vec<ToolResult> {
        let run_one = |call: &ToolCall| -> ToolResult {
            let refused = |why: String| ToolResult {
                call: call.clone(),
                result: Err(why),
                direct: false,
                cacheable: true,
            };
            if let Some(why) = &call.refused {
                return refused(why.clone());
            }
            let Some(entry) = self.entry(&call.name) else {
                return refused(format!("there is no tool named {:?}", call.name));
            };
            let ctx = ToolContext {
                conversation,
                history,
                emit: &|text| emit(call, text),
            };
            let result = match parse_arguments(&call.arguments) {
                Ok(args) => entry.tool.run(&args, &ctx),
                Err(e) => Err(e),
            };
            ToolResult {
                call: call.clone(),
                result,
                direct: entry.direct,
                cacheable: entry.tool.cacheable(),
            }
        };
        let is_cpu = |call: &ToolCall| {
            call.refused.is_some()
                || self
                    .entry(&call.name)
                    .is_none_or(|e| e.tool.work() == Work::Cpu)
        };
        let mut results: Vec<Option<ToolResult>> = vec![None; calls.len()];
        std::thread::scope(|scope| {
            let blocking: Vec<_> = calls
                .iter()
                .enumerate()
                .filter(|(_, c)| !is_cpu(c))
                .map(|(i, c)| (i, scope.spawn(move || run_one(c))))
                .collect();
            let cpu: Vec<(usize, ToolResult)> = calls
                .par_iter()
                .enumerate()
                .filter(|(_, c)| is_cpu(c))
                .map(|(i, c)| (i, run_one(c)))
                .collect();
            for (i, result) in cpu {
                results[i] = Some(result);
            }
            for (i, handle) in blocking {
                results[i] = Some(handle.join().unwrap_or_else(|_| ToolResult {
                    call: calls[i].clone(),
                    result: Err("the tool failed unexpectedly".into()),
                    direct: false,
                    cacheable: false,
                }));
            }
        });
        results.into_iter().flatten().collect()
    }
}

/// Tool arguments are a JSON object; an empty string counts as `{}`.
fn parse_arguments(text: &str) -> Result<Value, String> {
    if text.trim().is_empty() {
        return Ok(Value::Object(Default::default()));
    }
    match serde_json::from_str::<Value>(text) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err("the arguments must be a JSON object".into()),
        Err(e) => Err(format!("the arguments are not valid JSON: {e}")),
    }
}

/// The messages a tool round adds to the prompt, in OpenAI's shape: the
/// assistant message with what the model said in that round and the calls
/// it made, then one `tool` message per call with its result.
pub fn round_messages(content: String, results: &[ToolResult]) -> Vec<PromptMessage> {
    let mut messages = Vec::with_capacity(results.len() + 1);
    messages.push(PromptMessage {
        tool_calls: results.iter().map(|r| r.call.clone()).collect(),
        ..PromptMessage::new("assistant", content)
    });
    messages.extend(results.iter().map(|r| PromptMessage {
        tool_call_id: Some(r.call.id.clone()),
        ..PromptMessage::new("tool", r.text())
    }));
    messages
}

/// A string argument, or a message for the model saying what is missing.
fn string_arg<'a>(args: &'a Value, name: &str) -> Result<&'a str, String> {
    args.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("missing string argument {name:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, arguments: &str) -> ToolCall {
        ToolCall {
            id: format!("call-{name}"),
            name: name.into(),
            arguments: arguments.into(),
            refused: None,
        }
    }

    fn history() -> (tempfile::TempDir, History) {
        let dir = tempfile::tempdir().unwrap();
        let history = History::open(&dir.path().join("h.db"), 2).unwrap();
        (dir, history)
    }

    #[test]
    fn unknown_names_are_refused() {
        assert!(Toolbox::new(&["abacus".into()], &[]).is_err());
        assert!(Toolbox::new(&["clock".into()], &["calculator".into()]).is_err());
        let all = ["calculator", "clock", "search_history"].map(String::from);
        let toolbox = Toolbox::new(&all, &["clock".into()]).unwrap();
        assert_eq!(toolbox.specs().len(), 3);
    }

    #[test]
    fn calls_run_together_and_come_back_in_order_with_errors_as_results() {
        let (_dir, history) = history();
        let all = ["calculator", "clock", "search_history"].map(String::from);
        let toolbox = Toolbox::new(&all, &["clock".into()]).unwrap();
        let calls = [
            call("calculator", r#"{"expression": "2+3*4"}"#),
            call("clock", ""),
            call("calculator", "not json"),
            call("calculator", r#"{"expression": "2+*"}"#),
            call("teleport", "{}"),
            call("search_history", r#"{"query": "anything"}"#),
            ToolCall {
                refused: Some("the arguments are longer than 10 bytes".into()),
                ..call("calculator", "")
            },
        ];
        let emitted = std::sync::Mutex::new(Vec::new());
        let results = toolbox.run(&calls, "c-none", &history, &|c, text| {
            emitted
                .lock()
                .unwrap()
                .push((c.name.clone(), text.to_owned()))
        });
        assert_eq!(results.len(), calls.len());
        assert_eq!(results[0].result, Ok("14".into()));
        assert!(results[1].direct && !results[1].cacheable);
        assert!(results[1].result.as_ref().unwrap().contains("UTC"));
        assert!(results[2].text().contains("not valid JSON"));
        assert!(results[3].result.is_err());
        assert!(results[4].text().contains("no tool named"));
        assert!(results[5].result.is_err(), "{:?}", results[5]);
        assert_eq!(
            results[6].text(),
            "error: the arguments are longer than 10 bytes"
        );
        for (r, c) in results.iter().zip(&calls) {
            assert_eq!(&r.call, c);
        }
    }

    #[test]
    fn a_round_adds_the_calls_and_one_result_per_call() {
        let results = [
            ToolResult {
                call: call("calculator", r#"{"expression":"1+1"}"#),
                result: Ok("2".into()),
                direct: false,
                cacheable: true,
            },
            ToolResult {
                call: call("teleport", "{}"),
                result: Err("there is no tool named \"teleport\"".into()),
                direct: false,
                cacheable: true,
            },
        ];
        let messages = round_messages("Let me see.".into(), &results);
        assert_eq!(messages.len(), 3);
        assert_eq!(
            (messages[0].role, messages[0].content.as_str()),
            ("assistant", "Let me see.")
        );
        assert_eq!(messages[0].tool_calls.len(), 2);
        assert_eq!(messages[1].tool_call_id.as_deref(), Some("call-calculator"));
        assert_eq!(messages[1].content, "2");
        assert_eq!(messages[2].role, "tool");
        assert!(messages[2].content.starts_with("error: there is no tool"));
    }

    /// A tool that waits, like one doing I/O, and reports when it ran.
    struct Sleeper {
        name: &'static str,
        work: Work,
        running: Arc<std::sync::atomic::AtomicUsize>,
        peak: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Tool for Sleeper {
        fn spec(&self) -> ToolSpec {
            ToolSpec {
                name: self.name,
                description: "sleeps",
                parameters: serde_json::json!({"type": "object"}),
            }
        }
        fn work(&self) -> Work {
            self.work
        }
        fn run(&self, _args: &Value, ctx: &ToolContext<'_>) -> Result<String, String> {
            use std::sync::atomic::Ordering::SeqCst;
            let now = self.running.fetch_add(1, SeqCst) + 1;
            self.peak.fetch_max(now, SeqCst);
            (ctx.emit)("working");
            std::thread::sleep(std::time::Duration::from_millis(100));
            self.running.fetch_sub(1, SeqCst);
            Ok(self.name.to_owned())
        }
    }

    #[test]
    fn independent_calls_run_at_the_same_time() {
        let (_dir, history) = history();
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let sleeper = |name, work| -> (Arc<dyn Tool>, bool) {
            (
                Arc::new(Sleeper {
                    name,
                    work,
                    running: running.clone(),
                    peak: peak.clone(),
                }),
                false,
            )
        };
        let toolbox = Toolbox::of(vec![
            sleeper("io_a", Work::Blocking),
            sleeper("io_b", Work::Blocking),
            sleeper("io_c", Work::Blocking),
            sleeper("cpu", Work::Cpu),
        ]);
        let calls = ["io_a", "io_b", "io_c", "cpu"].map(|n| call(n, "{}"));
        let outputs = std::sync::Mutex::new(Vec::new());
        let results = toolbox.run(&calls, "c", &history, &|c, text| {
            outputs.lock().unwrap().push(format!("{}:{text}", c.name))
        });
        let names: Vec<String> = results.iter().map(|r| r.text()).collect();
        assert_eq!(names, ["io_a", "io_b", "io_c", "cpu"]);
        // Four calls of 100 ms each overlapped instead of taking turns.
        assert!(peak.load(std::sync::atomic::Ordering::SeqCst) >= 3);
        assert_eq!(outputs.lock().unwrap().len(), 4);
    }
}
