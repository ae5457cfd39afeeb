//! The server name a TLS client asks for (SNI), read from its first
//! record, the ClientHello, without terminating its TLS.
//!
//! Only what routing needs is read: the record header, the handshake
//! header, and the `server_name` extension (RFC 6066, section 3). Anything
//! malformed or absent is `None`, and the connection is routed by where it
//! was going instead.

use tokio::io::{AsyncRead, AsyncReadExt};

/// A TLS record's header: type, version, length.
const HEADER: usize = 5;
/// The largest record payload TLS allows (RFC 8446, section 5.1).
const MAX_RECORD: usize = 16_384;
const HANDSHAKE: u8 = 0x16;
const CLIENT_HELLO: u8 = 0x01;
const SERVER_NAME: u16 = 0x0000;
const HOST_NAME: u8 = 0x00;

/// Reads the first TLS record of `stream` into `into` (which then holds
/// every byte read, to be sent on before the rest). `false` when the
/// stream ended first or the first bytes are not a handshake record.
pub async fn read_first_record<S: AsyncRead + Unpin>(
    stream: &mut S,
    into: &mut Vec<u8>,
) -> std::io::Result<bool> {
    while into.len() < HEADER {
        if stream.read_buf(into).await? == 0 {
            return Ok(false);
        }
    }
    if into[0] != HANDSHAKE {
        return Ok(false);
    }
    let length = usize::from(u16::from_be_bytes([into[3], into[4]]));
    if length > MAX_RECORD {
        return Ok(false);
    }
    while into.len() < HEADER + length {
        if stream.read_buf(into).await? == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The host name in a ClientHello record, lowercased, if it has one.
pub fn server_name(record: &[u8]) -> Option<String> {
    let mut r = Reader(record);
    if r.u8()? != HANDSHAKE {
        return None;
    }
    r.skip(2)?; // record version
    let mut payload = Reader(r.vec16()?);
    if payload.u8()? != CLIENT_HELLO {
        return None;
    }
    let length = usize::try_from(payload.u24()?).ok()?;
    // A ClientHello split over records: its start must hold the name.
    let mut hello = Reader(payload.0.get(..length).unwrap_or(payload.0));
    hello.skip(2 + 32)?; // version, random
    hello.vec8()?; // session id
    hello.vec16()?; // cipher suites
    hello.vec8()?; // compression methods
    let mut extensions = Reader(hello.vec16()?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let data = extensions.vec16()?;
        if kind != SERVER_NAME {
            continue;
        }
        let mut names = Reader(Reader(data).vec16()?);
        while !names.0.is_empty() {
            let name_type = names.u8()?;
            let name = names.vec16()?;
            if name_type == HOST_NAME {
                let name = std::str::from_utf8(name).ok()?;
                return Some(name.trim_end_matches('.').to_ascii_lowercase());
            }
        }
        return None;
    }
    None
}

/// Big-endian fields off the front of a byte slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(drop)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u24(&mut self) -> Option<u32> {
        self.take(3)
            .map(|b| u32::from_be_bytes([0, b[0], b[1], b[2]]))
    }

    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// The first record a real rustls client sends for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        client.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn the_name_of_a_real_client_hello_is_read() {
        assert_eq!(
            server_name(&client_hello("API.example.com")).as_deref(),
            Some("api.example.com")
        );
    }

    #[tokio::test]
    async fn the_first_record_is_read_whole_and_kept() {
        let hello = client_hello("api.example.com");
        let mut sent = hello.clone();
        sent.extend_from_slice(b"after");
        let mut kept = Vec::new();
        assert!(
            read_first_record(&mut sent.as_slice(), &mut kept)
                .await
                .unwrap()
        );
        assert!(kept.starts_with(&hello), "every byte read is kept");
        assert_eq!(server_name(&kept).as_deref(), Some("api.example.com"));
        // Not TLS, or cut short: no record.
        let mut kept = Vec::new();
        assert!(
            !read_first_record(&mut &b"GET / HTTP/1.1\r\n"[..], &mut kept)
                .await
                .unwrap()
        );
        let mut kept = Vec::new();
        assert!(
            !read_first_record(&mut &hello[..40], &mut kept)
                .await
                .unwrap()
        );
    }

    #[test]
    fn no_name_or_a_broken_hello_is_none() {
        // An IP address: rustls sends no SNI for it.
        assert_eq!(server_name(&client_hello("10.0.0.1")), None);
        let hello = client_hello("api.example.com");
        for cut in [0, 5, 9, 43, 60, hello.len() - 1] {
            let mut broken = hello[..cut].to_vec();
            // Keep the lengths claiming the whole: reads must stay in bounds.
            broken.resize(cut, 0);
            assert_eq!(server_name(&broken), None, "cut at {cut}");
        }
        assert_eq!(server_name(b"\x17\x03\x03\x00\x00"), None);
    }
}
