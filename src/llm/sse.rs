//! An incremental parser of Server-Sent Events (the `text/event-stream`
//! format an OpenAI-compatible server streams completions in).
//!
//! Bytes are fed as they arrive, in pieces of any size, split anywhere
//! (inside a line, inside a UTF-8 character, between `\r` and `\n`); each
//! event is handed out as soon as its terminating blank line is complete.
//! It follows the WHATWG rules that matter for model servers: lines end in
//! `\n`, `\r\n` or `\r`; `data:` lines of one event are joined with `\n`;
//! one space after the colon is dropped; lines starting with `:` are
//! comments (keep-alives); `event:` names the event; other fields are
//! ignored; an event with no `data` is not dispatched.
//!
//! The maintained SSE crates are built on async streams; a parser this
//! size is easier to check than an adapter, and it is fuzzed by a property
//! test below (every split of a stream gives the same events).
//!
//! Threads: a parser belongs to the one streaming thread reading a response.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// Why a stream cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SseError {
    /// A line longer than the parser's limit: refuse to buffer without bound.
    #[error("an event-stream line is longer than {0} bytes")]
    LineTooLong(usize),
    /// An event whose `data:` lines together exceed the parser's limit.
    #[error("an event-stream event is longer than {0} bytes")]
    EventTooLarge(usize),
    /// A line that is not UTF-8.
    #[error("the event stream is not UTF-8")]
    NotUtf8,
}

/// The parser state between pieces of input.
///
/// ```
/// use chorus::llm::sse::SseParser;
/// let mut parser = SseParser::new(1 << 16);
/// let mut events = Vec::new();
/// parser.feed(b"data: {\"a\"", &mut |e| events.push(e)).unwrap();
/// parser.feed(b":1}\r\n\r\ndata: [DONE]\n\n", &mut |e| events.push(e)).unwrap();
/// assert_eq!(events[0].data, "{\"a\":1}");
/// assert_eq!(events[1].data, "[DONE]");
/// ```
#[derive(Debug)]
pub struct SseParser {
    max_line: usize,
    /// The current, unfinished line.
    line: Vec<u8>,
    /// The last byte fed was `\r`: a `\n` right after it is part of that line end.
    after_cr: bool,
    event: Option<String>,
    data: String,
    has_data: bool,
}

impl SseParser {
    /// A parser refusing lines, and events, longer than `max_line` bytes.
    pub fn new(max_line: usize) -> SseParser {
        SseParser {
            max_line,
            line: Vec::new(),
            after_cr: false,
            event: None,
            data: String::new(),
            has_data: false,
        }
    }

    /// Parses `bytes`, calling `on_event` for every event they complete.
    pub fn feed(&mut self, bytes: &[u8], on_event: &mut dyn FnMut(Event)) -> Result<(), SseError> {
        let mut rest = bytes;
        while let Some(&first) = rest.first() {
            if std::mem::take(&mut self.after_cr) && first == b'\n' {
                // The `\n` of a `\r\n` split between two pieces.
                rest = &rest[1..];
                continue;
            }
            match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(end) => {
                    self.extend_line(&rest[..end])?;
                    self.after_cr = rest[end] == b'\r';
                    if self.after_cr && rest.get(end + 1) == Some(&b'\n') {
                        rest = &rest[end + 2..];
                        self.after_cr = false;
                    } else {
                        rest = &rest[end + 1..];
                    }
                    self.end_line(on_event)?;
                }
                None => {
                    self.extend_line(rest)?;
                    rest = &[];
                }
            }
        }
        Ok(())
    }

    fn extend_line(&mut self, piece: &[u8]) -> Result<(), SseError> {
        if self.line.len() + piece.len() > self.max_line {
            return Err(SseError::LineTooLong(self.max_line));
        }
        self.line.extend_from_slice(piece);
        Ok(())
    }

    fn end_line(&mut self, on_event: &mut dyn FnMut(Event)) -> Result<(), SseError> {
        if self.line.is_empty() {
            if self.has_data {
                // The next event's data will be about this size.
                let next = String::with_capacity(self.data.len());
                on_event(Event {
                    event: self.event.take(),
                    data: std::mem::replace(&mut self.data, next),
                });
            }
            self.event = None;
            self.data.clear();
            self.has_data = false;
            return Ok(());
        }
        let line = std::str::from_utf8(&self.line).map_err(|_| SseError::NotUtf8)?;
        if !line.starts_with(':') {
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (line, ""),
            };
            match field {
                "data" => {
                    // Several `data:` lines make one event: bound the whole.
                    if self.data.len() + value.len() + 1 > self.max_line {
                        return Err(SseError::EventTooLarge(self.max_line));
                    }
                    if self.has_data {
                        self.data.push('\n');
                    }
                    self.data.push_str(value);
                    self.has_data = true;
                }
                "event" => self.event = Some(value.to_owned()),
                _ => {}
            }
        }
        self.line.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_pieces(input: &[u8], cuts: &[usize]) -> Result<Vec<Event>, SseError> {
        let mut parser = SseParser::new(4096);
        let mut events = Vec::new();
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            let cut = cut.clamp(start, input.len());
            parser.feed(&input[start..cut], &mut |e| events.push(e))?;
            start = cut;
        }
        Ok(events)
    }

    fn data(events: &[Event]) -> Vec<&str> {
        events.iter().map(|e| e.data.as_str()).collect()
    }

    #[test]
    fn the_openai_shape() {
        let stream = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n\
                       : keep-alive\n\n\
                       data: [DONE]\n\n";
        let events = parse_in_pieces(stream, &[]).unwrap();
        assert_eq!(
            data(&events),
            ["{\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}", "[DONE]"]
        );
    }

    #[test]
    fn line_ends_fields_and_multi_line_data() {
        let stream = b"event: delta\r\ndata:a\rdata:  b\r\nid: 7\nretry: 10\nnonsense\n\ndata\n\n";
        let events = parse_in_pieces(stream, &[]).unwrap();
        assert_eq!(events[0].event.as_deref(), Some("delta"));
        assert_eq!(events[0].data, "a\n b");
        // `data` with no colon is a data line with an empty value.
        assert_eq!(events[1].data, "");
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn no_data_no_event_and_an_unfinished_event_waits() {
        let events = parse_in_pieces(b"event: x\n\n: c\n\ndata: half", &[]).unwrap();
        assert!(events.is_empty());
    }

    #[test]
    fn limits_and_bad_bytes_are_errors() {
        let mut parser = SseParser::new(8);
        assert_eq!(
            parser.feed(b"data: 123456789", &mut |_| {}),
            Err(SseError::LineTooLong(8))
        );
        let mut parser = SseParser::new(64);
        assert_eq!(
            parser.feed(b"data: \xff\xfe\n", &mut |_| {}),
            Err(SseError::NotUtf8)
        );
        // Many short `data:` lines of one event may not add up past the
        // limit either: nothing is dispatched and memory stays bounded.
        let mut parser = SseParser::new(64);
        let mut events = 0;
        let mut result = Ok(());
        for _ in 0..100 {
            result = parser.feed(b"data: 0123456789\n", &mut |_| events += 1);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(SseError::EventTooLarge(64)));
        assert_eq!(events, 0);
        assert!(parser.data.len() <= 64);
    }

    /// A small deterministic generator, so the property test needs no crate
    /// and a failure can be replayed from its seed.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Random streams (random fields, line ends, comments, multi-byte text)
    /// cut at random places give exactly the events of the uncut stream, and
    /// those are the events the generator meant.
    #[test]
    fn property_any_split_gives_the_same_events() {
        const PIECES: [&str; 8] = ["a", "é", "€", "🦀", " ", ":", "{\"x\":1}", "[DONE]"];
        const ENDS: [&str; 3] = ["\n", "\r\n", "\r"];
        for seed in 1..=500u64 {
            let mut rng = XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut stream = String::new();
            let mut expected = Vec::new();
            for _ in 0..rng.below(6) + 1 {
                if rng.below(3) == 0 {
                    stream.push_str(": comment");
                    stream.push_str(ENDS[rng.below(3)]);
                }
                let lines = rng.below(3) + 1;
                let mut joined = Vec::new();
                for _ in 0..lines {
                    // No leading space: the parser drops one after the colon.
                    let mut value = String::new();
                    for _ in 0..rng.below(5) {
                        value.push_str(PIECES[rng.below(PIECES.len())]);
                    }
                    let value = value.trim_start().to_owned();
                    stream.push_str("data: ");
                    stream.push_str(&value);
                    stream.push_str(ENDS[rng.below(3)]);
                    joined.push(value);
                }
                // A `\r` line end followed by the blank line's `\n` would read
                // as one `\r\n`; end events with `\n\n` to keep them apart.
                stream.push_str("\n\n");
                expected.push(joined.join("\n"));
            }
            let bytes = stream.as_bytes();
            let whole = parse_in_pieces(bytes, &[]).unwrap();
            assert_eq!(data(&whole), expected, "seed {seed}: {stream:?}");
            for _ in 0..20 {
                let mut cuts: Vec<usize> = (0..rng.below(8))
                    .map(|_| rng.below(bytes.len() + 1))
                    .collect();
                cuts.sort_unstable();
                let split = parse_in_pieces(bytes, &cuts).unwrap();
                assert_eq!(split, whole, "seed {seed}, cuts {cuts:?}");
            }
            // Byte by byte, the hardest split of all.
            let cuts: Vec<usize> = (1..bytes.len()).collect();
            assert_eq!(parse_in_pieces(bytes, &cuts).unwrap(), whole);
        }
    }
}
