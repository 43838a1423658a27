//! `calculator`: evaluates an arithmetic expression with the `exmex`
//! crate, which parses it into an expression tree of numbers, operators
//! and math functions. Nothing is ever run as code.
//!
//! Threads: pure computation, run on rayon's pool.

use serde_json::{json, Value};

use super::{string_arg, Tool, ToolContext, Work};
use crate::llm::ToolSpec;

/// Longest expression accepted: arithmetic, not a program.
const MAX_EXPRESSION: usize = 500;

/// The calculator tool.
pub struct Calculator;

impl Tool for Calculator {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "calculator",
            description: "Evaluates an arithmetic expression exactly, e.g. \"2+3*4\" or \
                          \"sqrt(2)/3\". Supports + - * / ^, parentheses and common math \
                          functions.",
            parameters: json!({
                "type": "object",
                "properties": {
                    "expression": {"type": "string", "description": "The expression to evaluate"}
                },
                "required": ["expression"]
            }),
        }
    }

    fn work(&self) -> Work {
        Work::Cpu
    }

    fn run(&self, args: &Value, _ctx: &ToolContext<'_>) -> Result<String, String> {
        let expression = string_arg(args, "expression")?.trim();
        if expression.is_empty() {
            return Err("the expression is empty".into());
        }
        if expression.len() > MAX_EXPRESSION {
            return Err(format!(
                "the expression is longer than {MAX_EXPRESSION} characters"
            ));
        }
        // People write × and ÷ and ** too.
        let normalized = expression
            .replace('×', "*")
            .replace('÷', "/")
            .replace("**", "^");
        let value = exmex::eval_str::<f64>(&normalized)
            .map_err(|e| format!("cannot evaluate {expression:?}: {e}"))?;
        if !value.is_finite() {
            return Err(format!("{expression} is not a finite number"));
        }
        Ok(format_number(value))
    }
}

/// Whole numbers without a fraction, others to 12 significant digits.
fn format_number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        let text = format!("{value:.12}");
        let text = text.trim_end_matches('0').trim_end_matches('.');
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::History;

    fn calc(expression: &str) -> Result<String, String> {
        let dir = tempfile::tempdir().unwrap();
        let history = History::open(&dir.path().join("h.db"), 1).unwrap();
        let ctx = ToolContext {
            conversation: "c",
            history: &history,
            emit: &|_| {},
        };
        Calculator.run(&json!({ "expression": expression }), &ctx)
    }

    #[test]
    fn arithmetic() {
        assert_eq!(calc("2+3*4").unwrap(), "14");
        assert_eq!(calc("7/2").unwrap(), "3.5");
        assert_eq!(calc("2**10").unwrap(), "1024");
        assert_eq!(calc("(1+2)×3").unwrap(), "9");
        assert_eq!(calc("1/3").unwrap(), "0.333333333333");
    }

    #[test]
    fn mistakes_are_messages_not_crashes() {
        assert!(calc("").is_err());
        assert!(calc("2+*3").is_err());
        assert!(calc("1/0").is_err());
        assert!(calc("rm -rf /").is_err());
        assert!(calc(&"1+".repeat(400)).is_err());
    }
}
