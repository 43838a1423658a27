//! `clock`: the current date and time in UTC. Its answer changes every
//! second, so an answer that used it is never cached.
//!
//! Threads: trivial computation, run on rayon's pool.

use serde_json::{json, Value};

use super::{Tool, ToolContext, Work};
use crate::llm::ToolSpec;

/// The clock tool.
pub struct Clock;

impl Tool for Clock {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "clock",
            description: "Tells the current date and time in UTC.",
            parameters: json!({"type": "object", "properties": {}}),
        }
    }

    fn work(&self) -> Work {
        Work::Cpu
    }

    fn cacheable(&self) -> bool {
        false
    }

    fn run(&self, _args: &Value, _ctx: &ToolContext<'_>) -> Result<String, String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| "the system clock is before 1970".to_owned())?;
        let ms = i64::try_from(now.as_millis()).map_err(|_| "the clock is out of range")?;
        Ok(format!(
            "It is {} (UTC).",
            crate::history::rfc3339_seconds(ms)
        ))
    }
}
