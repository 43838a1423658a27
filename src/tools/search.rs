//! `search_history`: full-text search (SQLite FTS5) over the messages of
//! the conversation that asks, and of no other: the conversation id comes
//! from the request, never from the model's arguments.
//!
//! Threads: waits on the history writer and a SQLite read, so it runs on a
//! thread of its own, and streams each match to the clients as it is found.

use serde_json::{json, Value};

use super::{string_arg, Tool, ToolContext, Work};
use crate::llm::ToolSpec;

/// Matches returned at most.
const MAX_HITS: usize = 5;
/// Characters of each match shown.
const EXCERPT_CHARS: usize = 200;

/// The search tool.
pub struct SearchHistory;

impl Tool for SearchHistory {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "search_history",
            description: "Searches the earlier messages of this conversation for words and \
                          returns the best matching messages.",
            parameters: json!({
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "Words to look for"}
                },
                "required": ["query"]
            }),
        }
    }

    fn work(&self) -> Work {
        Work::Blocking
    }

    fn run(&self, args: &Value, ctx: &ToolContext<'_>) -> Result<String, String> {
        let query = string_arg(args, "query")?;
        let hits = ctx
            .history
            .search(ctx.conversation, query, MAX_HITS)
            .map_err(|e| format!("the search failed: {e}"))?;
        if hits.is_empty() {
            return Err(format!("nothing in this conversation matches {query:?}"));
        }
        let mut lines = Vec::with_capacity(hits.len());
        for hit in hits {
            let mut excerpt: String = hit.content.chars().take(EXCERPT_CHARS).collect();
            if excerpt.len() < hit.content.len() {
                excerpt.push('…');
            }
            let line = format!("#{} {}: {}", hit.index, hit.role.as_str(), excerpt);
            (ctx.emit)(&line);
            lines.push(line);
        }
        Ok(lines.join("\n"))
    }
}
