//! The `history` answer: the newest messages of a conversation that fit one
//! answer's byte bound, with a cursor to page back.
//!
//! Runs on the connection thread that read the `history` request, on the
//! stored history the pipeline hands it once the conversation's pending
//! writes are committed ([`crate::pipeline::Pipeline::stored_history`]). The
//! messages are read newest first ([`History::newest_first`]) and reading
//! stops at the first one that does not fit, so a long conversation is
//! neither read nor held whole for one answer.

use super::encode::{self, HistoryMessage};
use crate::history::{History, HistoryError, Take};

/// Answers smaller than this are not worth sending: the connection is not
/// reading what it already has.
pub(crate) const MIN_ANSWER_BYTES: usize = 1024;

/// Bytes `c` takes inside a JSON string, as serde_json escapes it.
fn escaped_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{08}' | '\u{0c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// The longest prefix of `text` whose JSON escaping takes at most `max` bytes.
fn json_prefix(text: &str, max: usize) -> &str {
    let mut used = 0;
    for (at, c) in text.char_indices() {
        used += escaped_len(c);
        if used > max {
            return &text[..at];
        }
    }
    text
}

/// The encoded `history` frame for up to `limit` messages before `before`
/// (the newest when `None`), at most `max_bytes` long. `Ok(None)` when the
/// conversation is unknown. The newest message alone is cut to fit, and
/// marked `truncated`, when it is larger than the whole bound.
pub(crate) fn history_answer(
    history: &History,
    conversation: &str,
    limit: usize,
    before: Option<u64>,
    max_bytes: usize,
) -> Result<Option<Vec<u8>>, HistoryError> {
    // The envelope at its largest: a cursor of twenty digits.
    let envelope = encode::history(conversation, &[], Some(u64::MAX)).len();
    let mut room = max_bytes.saturating_sub(envelope);
    // Owned rows newest first; the frame borrows from them afterwards.
    let mut kept: Vec<(crate::history::Message, bool)> = Vec::new();
    let walk = history.newest_first(conversation, before, |_, mut message| {
        if kept.len() >= limit {
            return Take::Refuse;
        }
        // Everything but the content, plus one for the comma between messages.
        let overhead = |truncated: bool| {
            serde_json::to_vec(&HistoryMessage {
                role: message.role.as_str(),
                content: "",
                at: message.at_rfc3339(),
                truncated,
                partial: message.partial,
            })
            .map_or(usize::MAX, |v| v.len() + 1)
        };
        let content: usize = message.content.chars().map(escaped_len).sum();
        let whole = overhead(false).saturating_add(content);
        if whole <= room {
            room -= whole;
            kept.push((message, false));
            return Take::More;
        }
        if !kept.is_empty() {
            return Take::Refuse;
        }
        // The newest message is larger than a whole answer: send its start.
        let Some(space) = room.checked_sub(overhead(true)) else {
            return Take::Refuse;
        };
        let cut = json_prefix(&message.content, space).len();
        message.content.truncate(cut);
        kept.push((message, true));
        Take::Last
    })?;
    let Some(walk) = walk else {
        return Ok(None);
    };
    let messages: Vec<HistoryMessage<'_>> = kept
        .iter()
        .rev()
        .map(|(m, truncated)| HistoryMessage {
            role: m.role.as_str(),
            content: &m.content,
            at: m.at_rfc3339(),
            truncated: *truncated,
            partial: m.partial,
        })
        .collect();
    let more = (walk.first_kept > 0).then_some(walk.first_kept);
    Ok(Some(encode::history(conversation, &messages, more)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Role;

    fn store(messages: &[&str]) -> (tempfile::TempDir, History) {
        let dir = tempfile::tempdir().unwrap();
        let history = History::open(&dir.path().join("h.db"), 2).unwrap();
        let messages = messages
            .iter()
            .map(|m| (Role::User, (*m).to_owned()))
            .collect();
        history.write_all("c", messages, |_| {});
        history.sync().unwrap();
        (dir, history)
    }

    fn answer(
        history: &History,
        limit: usize,
        before: Option<u64>,
        max: usize,
    ) -> serde_json::Value {
        let bytes = history_answer(history, "c", limit, before, max)
            .unwrap()
            .unwrap();
        assert!(bytes.len() <= max, "{} bytes over {max}", bytes.len());
        serde_json::from_slice(&bytes).unwrap()
    }

    fn contents(v: &serde_json::Value) -> Vec<String> {
        v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["content"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn small_history_fits_whole_with_no_cursor() {
        let (_dir, h) = store(&["a", "b", "c"]);
        let v = answer(&h, 50, None, 4096);
        assert_eq!(contents(&v), ["a", "b", "c"]);
        assert_eq!(v["more"], false);
        assert!(v.get("before").is_none());
        let limited = answer(&h, 2, None, 4096);
        assert_eq!(contents(&limited), ["b", "c"]);
        assert_eq!(
            (limited["more"].clone(), limited["before"].clone()),
            (true.into(), 1.into())
        );
        let older = answer(&h, 2, Some(1), 4096);
        assert_eq!(contents(&older), ["a"]);
        assert_eq!(older["more"], false);
    }

    #[test]
    fn the_byte_bound_keeps_the_newest_and_escaping_counts() {
        let quotes = "\"".repeat(300);
        let (_dir, h) = store(&[&quotes, &quotes, &quotes]);
        // Each message takes about 600 escaped bytes: two fit in 1500.
        let v = answer(&h, 50, None, 1500);
        assert_eq!(contents(&v).len(), 2);
        assert_eq!(v["before"], 1);
    }

    #[test]
    fn a_message_larger_than_the_bound_is_cut_and_marked() {
        let big = "é\n".repeat(5000);
        let (_dir, h) = store(&["old", &big]);
        let v = answer(&h, 50, None, 2048);
        let messages = v["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0]["truncated"], true);
        let cut = messages[0]["content"].as_str().unwrap();
        assert!(!cut.is_empty() && big.starts_with(cut));
        assert_eq!(
            v["before"], 1,
            "the older message is still there to page to"
        );
        // Unknown conversations are told apart.
        assert!(history_answer(&h, "other", 50, None, 2048)
            .unwrap()
            .is_none());
    }
}
