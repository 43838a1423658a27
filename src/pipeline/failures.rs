//! The one place the layers' errors become the protocol's error codes.
//! (Cache errors never do: a failing cache is a miss, see `answers`.)
//!
//! Threads: called on whichever thread meets the error.

use crate::history;
use crate::protocol::{ErrorCode, Failure};

/// A provider failure as the clients of its generation see it.
/// The detail (the upstream's own words) goes to the log only, where the
/// caller writes it.
pub(super) fn llm_failure(e: &crate::llm::LlmError) -> Failure {
    let code = match e {
        crate::llm::LlmError::Timeout { .. } => ErrorCode::ProcessingTimeout,
        _ => ErrorCode::UpstreamError,
    };
    Failure::new(code, e.client_message())
}

/// A history failure as the client sees it: a read pool that stays busy
/// is overload, anything else is internal.
pub fn history_failure(e: &history::HistoryError) -> Failure {
    match e {
        history::HistoryError::Pool(_) => Failure::new(
            ErrorCode::Overloaded,
            "the history database is busy; try again shortly",
        ),
        other => internal(other),
    }
}

pub(super) fn internal(e: &dyn std::fmt::Display) -> Failure {
    log::error!("internal error: {e}");
    Failure::new(
        ErrorCode::Internal,
        "internal error; the request was not processed",
    )
}
