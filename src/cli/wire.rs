//! A letter's body as a person can read it: text as it is; a gRPC body's
//! messages in protobuf's wire format, with field numbers and no names
//! (as `protoc --decode_raw` prints them: the letter does not say which
//! message type it is); other bytes in hex, with their length.

use std::fmt::Write as _;

/// `bytes` as text, decoded gRPC messages or hex.
pub fn body(bytes: &[u8], grpc: bool) -> String {
    if grpc && let Some(messages) = grpc_messages(bytes) {
        return messages;
    }
    match std::str::from_utf8(bytes) {
        Ok(text) if printable(text) => text.to_owned(),
        _ => format!("({} bytes) {}", bytes.len(), hex(bytes)),
    }
}

fn printable(text: &str) -> bool {
    !text
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 3);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Each length-prefixed message of a gRPC body, decoded; `None` when the
/// body is not whole frames.
fn grpc_messages(mut bytes: &[u8]) -> Option<String> {
    let mut out = String::new();
    let mut n = 0;
    while !bytes.is_empty() {
        let (header, rest) = bytes.split_at_checked(5)?;
        let len = u32::from_be_bytes(header[1..5].try_into().ok()?) as usize;
        let (message, rest) = rest.split_at_checked(len)?;
        let _ = write!(out, "\n  message {n} ({len} bytes");
        if header[0] == 1 {
            // Compressed: the bytes say nothing by themselves.
            let _ = write!(out, ", compressed) {}", hex(message));
        } else {
            out.push(')');
            match fields(message, 2) {
                Some(fields) => out.push_str(&fields),
                None => {
                    let _ = write!(out, " {}", hex(message));
                }
            }
        }
        bytes = rest;
        n += 1;
    }
    Some(out)
}

fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// A message's fields, one per line at `depth`; `None` when the bytes are
/// not a protobuf message.
fn fields(mut bytes: &[u8], depth: usize) -> Option<String> {
    let pad = "  ".repeat(depth);
    let mut out = String::new();
    while !bytes.is_empty() {
        let key = varint(&mut bytes)?;
        let (number, wire) = (key >> 3, key & 7);
        if number == 0 {
            return None;
        }
        let _ = write!(out, "\n{pad}{number}: ");
        match wire {
            0 => {
                let _ = write!(out, "{}", varint(&mut bytes)?);
            }
            1 => {
                let (value, rest) = bytes.split_at_checked(8)?;
                bytes = rest;
                let _ = write!(out, "0x{:016x}", u64::from_le_bytes(value.try_into().ok()?));
            }
            5 => {
                let (value, rest) = bytes.split_at_checked(4)?;
                bytes = rest;
                let _ = write!(out, "0x{:08x}", u32::from_le_bytes(value.try_into().ok()?));
            }
            2 => {
                let len = usize::try_from(varint(&mut bytes)?).ok()?;
                let (value, rest) = bytes.split_at_checked(len)?;
                bytes = rest;
                match std::str::from_utf8(value) {
                    Ok(text) if printable(text) => {
                        let _ = write!(out, "{text:?}");
                    }
                    _ => match fields(value, depth + 1) {
                        Some(nested) if !value.is_empty() => {
                            let _ = write!(out, "{{{nested}\n{pad}}}");
                        }
                        _ => out.push_str(&hex(value)),
                    },
                }
            }
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grpc_body_is_shown_field_by_field() {
        // message 0: {1: "hi", 2: 150, 3: {1: 7}}; message 1: compressed.
        let message = [
            0x0a, 0x02, b'h', b'i', 0x10, 0x96, 0x01, 0x1a, 0x02, 0x08, 0x07,
        ];
        let mut body = vec![0, 0, 0, 0, message.len() as u8];
        body.extend_from_slice(&message);
        body.extend_from_slice(&[1, 0, 0, 0, 2, 0xff, 0xfe]);
        assert_eq!(
            super::body(&body, true),
            "\n  message 0 (11 bytes)\n    1: \"hi\"\n    2: 150\n    3: {\n      1: 7\n    }\n  message 1 (2 bytes, compressed) ff fe"
        );
    }

    #[test]
    fn text_stays_text_and_other_bytes_are_hex_with_their_length() {
        assert_eq!(body(b"{\"po\": 1}\n", false), "{\"po\": 1}\n");
        assert_eq!(body(&[0, 1, 0xff], false), "(3 bytes) 00 01 ff");
        assert_eq!(
            body(b"\x00\x00\x00\x00\x09cut", true),
            "(8 bytes) 00 00 00 00 09 63 75 74"
        );
    }
}
