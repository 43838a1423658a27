//! Encoding of server-to-client WebSocket frames (RFC 6455 §5.2).
//!
//! Server frames are never masked, so a text frame is a 2-to-10-byte header
//! followed by the payload. Encoding them here, straight into the
//! connection's write buffer, lets a token frame be written as the
//! request's prefix plus the generation's shared tail with no intermediate
//! allocation. Reading (client frames, which are masked) stays with
//! tungstenite.

/// The close codes chorus sends (RFC 6455 §7.4.1), named once.
pub mod close {
    /// The server is shutting down, or a dead peer is dropped (no pong).
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the framing protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// A frame too big to read, or to skip, safely.
    pub const TOO_BIG: u16 = 1009;
}

/// Appends one final text frame whose payload is the concatenation of `parts`.
pub fn encode_text(out: &mut Vec<u8>, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    header(out, 0x1, len);
    for part in parts {
        out.extend_from_slice(part);
    }
}

/// Appends a close frame with `code` and a short `reason` (cut to fit the
/// 125-byte control frame limit).
pub fn encode_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut reason = reason.as_bytes();
    if reason.len() > 123 {
        reason = &reason[..123];
    }
    header(out, 0x8, 2 + reason.len());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(reason);
}

/// Appends a ping with an empty payload.
pub fn encode_ping(out: &mut Vec<u8>) {
    header(out, 0x9, 0);
}

fn header(out: &mut Vec<u8>, opcode: u8, len: usize) {
    out.push(0x80 | opcode);
    if len < 126 {
        out.push(len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use tungstenite::protocol::Role;
    use tungstenite::{Message, WebSocket};

    /// Decodes bytes with tungstenite acting as the client, the same parser
    /// real clients use.
    fn decode(bytes: Vec<u8>) -> Vec<Message> {
        let mut ws = WebSocket::from_raw_socket(Cursor::new(bytes), Role::Client, None);
        let mut out = Vec::new();
        while let Ok(m) = ws.read() {
            out.push(m);
        }
        out
    }

    #[test]
    fn text_frames_of_every_length_class_decode() {
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 200_000] {
            let payload = "x".repeat(len);
            let mut out = Vec::new();
            let (a, b) = payload.as_bytes().split_at(len / 2);
            encode_text(&mut out, &[a, b]);
            let msgs = decode(out);
            assert_eq!(msgs, vec![Message::text(payload)], "length {len}");
        }
    }

    #[test]
    fn close_frame_carries_code_and_reason() {
        let mut out = Vec::new();
        encode_close(&mut out, close::GOING_AWAY, "going away");
        match &decode(out)[0] {
            Message::Close(Some(frame)) => {
                assert_eq!(u16::from(frame.code), close::GOING_AWAY);
                assert_eq!(frame.reason.as_str(), "going away");
            }
            other => panic!("expected close, got {other:?}"),
        }
    }

    #[test]
    fn ping_decodes() {
        let mut out = Vec::new();
        encode_ping(&mut out);
        assert_eq!(decode(out), vec![Message::Ping(Vec::new().into())]);
    }

    #[test]
    fn several_frames_back_to_back() {
        let mut out = Vec::new();
        encode_text(&mut out, &[b"one"]);
        encode_text(&mut out, &[b"t", b"wo"]);
        assert_eq!(
            decode(out),
            vec![Message::text("one"), Message::text("two")]
        );
    }
}
