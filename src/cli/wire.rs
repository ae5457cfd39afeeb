//! A letter's body as a person can read it: text as it is; a gRPC body's
//! messages by their field names where the method's descriptors are at
//! hand (a `FileDescriptorSet`, as `buf build -o` or `protoc
//! --include_imports -o` write it), else in protobuf's wire format with
//! field numbers (as `protoc --decode_raw` prints them: the letter does
//! not carry its message type); other bytes in hex, with their length.

use std::fmt::Write as _;

use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};

/// Message types, from a descriptor set.
#[derive(Debug)]
pub struct Descriptors(DescriptorPool);

impl Descriptors {
    /// Reads a binary `FileDescriptorSet`.
    pub fn read(path: &std::path::Path) -> Result<Self, String> {
        let bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read the descriptors {}: {e}", path.display()))?;
        DescriptorPool::decode(bytes.as_slice())
            .map(Self)
            .map_err(|e| {
                format!(
                    "{} is not a FileDescriptorSet ({e}): write one with `buf build -o FILE` \
                     or `protoc --include_imports -o FILE`",
                    path.display()
                )
            })
    }

    /// The request type of the method a gRPC letter's URI calls
    /// (`/package.Service/Method`).
    pub fn request_of(&self, uri: &str) -> Result<MessageDescriptor, String> {
        let path = uri
            .parse::<http::Uri>()
            .map_or_else(|_| uri.to_owned(), |u| u.path().to_owned());
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .ok_or_else(|| format!("{path} is not a gRPC method's path"))?;
        let service = self
            .0
            .get_service_by_name(service)
            .ok_or_else(|| format!("the descriptors have no service {service}"))?;
        service
            .methods()
            .find(|m| m.name() == method)
            .map(|m| m.input())
            .ok_or_else(|| format!("service {} has no method {method}", service.full_name()))
    }
}

/// `bytes` as text, decoded gRPC messages (of type `request`, when
/// known) or hex.
pub fn body(bytes: &[u8], grpc: bool, request: Option<&MessageDescriptor>) -> String {
    if grpc && let Some(messages) = grpc_messages(bytes, request) {
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
fn grpc_messages(mut bytes: &[u8], request: Option<&MessageDescriptor>) -> Option<String> {
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
        } else if let Some(typed) = request.and_then(|r| named(r, message)) {
            let _ = write!(out, ", {})", request.expect("decoded with it").full_name());
            out.push_str(&typed);
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

/// A message by its field names, in protobuf's text format, one field a
/// line; `None` when it does not decode as `request`.
fn named(request: &MessageDescriptor, message: &[u8]) -> Option<String> {
    let decoded = DynamicMessage::decode(request.clone(), message).ok()?;
    let text = decoded.to_text_format_with_options(
        &prost_reflect::text_format::FormatOptions::new().pretty(true),
    );
    let mut out = String::new();
    for line in text.lines() {
        let _ = write!(out, "\n    {line}");
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
            super::body(&body, true, None),
            "\n  message 0 (11 bytes)\n    1: \"hi\"\n    2: 150\n    3: {\n      1: 7\n    }\n  message 1 (2 bytes, compressed) ff fe"
        );
    }

    #[test]
    fn with_its_descriptors_a_message_is_shown_by_field_names() {
        let pool = Descriptors(DescriptorPool::decode(crate::EXAMPLE_DESCRIPTOR_SET).unwrap());
        let request = pool
            .request_of("http://echo:50051/breakwater.echo.v1.Echo/Unary")
            .unwrap();
        assert_eq!(request.full_name(), "breakwater.echo.v1.EchoRequest");
        let message = prost::Message::encode_to_vec(&crate::echo::EchoRequest {
            payload: bytes::Bytes::from_static(b"hi"),
            repeat: 3,
            ..Default::default()
        });
        let mut framed = vec![0, 0, 0, 0, message.len() as u8];
        framed.extend_from_slice(&message);
        assert_eq!(
            body(&framed, true, Some(&request)),
            format!(
                "\n  message 0 ({} bytes, breakwater.echo.v1.EchoRequest)\n    payload: \"hi\"\n    repeat: 3",
                message.len()
            )
        );
        assert!(
            pool.request_of("/breakwater.echo.v1.Echo/Nope")
                .unwrap_err()
                .contains("has no method Nope")
        );
        assert!(
            pool.request_of("/other.Svc/Unary")
                .unwrap_err()
                .contains("no service other.Svc")
        );
    }

    #[test]
    fn text_stays_text_and_other_bytes_are_hex_with_their_length() {
        assert_eq!(body(b"{\"po\": 1}\n", false, None), "{\"po\": 1}\n");
        assert_eq!(body(&[0, 1, 0xff], false, None), "(3 bytes) 00 01 ff");
        assert_eq!(
            body(b"\x00\x00\x00\x00\x09cut", true, None),
            "(8 bytes) 00 00 00 00 09 63 75 74"
        );
    }
}
