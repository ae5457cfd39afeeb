//! Dead letters sealed by the sidecar that captured them, so that the
//! control plane replays only what a sidecar sent: an HMAC-SHA256, with a
//! key the control plane and its sidecars share (`--letter-key-file`,
//! `control_plane.letter_key_file`), over everything a replay sends
//! (upstream, method, target, headers, body) and the letter's identity
//! (source, capture id). A letter enqueued by hand, or altered in the
//! store, carries no seal or a wrong one; the control plane then refuses
//! to replay it unless an operator forces it.
//!
//! What the control plane itself changes on a letter (its id, replay
//! count, last error) is outside the seal.

use std::path::Path;

use bytes::Bytes;
use ring::hmac;

use super::DeadLetter;

/// The shortest key accepted: 32 bytes, as long as the HMAC's output.
const MIN_KEY: usize = 32;

/// The shared key.
#[derive(Clone)]
pub struct LetterKey(hmac::Key);

impl std::fmt::Debug for LetterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LetterKey(..)")
    }
}

/// How a letter's seal reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seal {
    /// Made with this key over this letter.
    Valid,
    /// No seal: enqueued by something other than a sidecar with the key.
    Missing,
    /// A seal that does not match: the letter was altered, or sealed with
    /// another key.
    Invalid,
}

impl LetterKey {
    /// The key in the file at `path` (surrounding whitespace, such as a
    /// final newline, is not part of it); the error names the file.
    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read(path)
            .map_err(|e| format!("cannot read the letter key file {}: {e}", path.display()))?;
        Self::new(text.trim_ascii()).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// A key from its bytes.
    pub fn new(secret: &[u8]) -> Result<Self, String> {
        if secret.len() < MIN_KEY {
            return Err(format!(
                "the letter key is {} bytes; it must be at least {MIN_KEY} \
                 (for example: head -c 32 /dev/urandom | base64 > letter.key)",
                secret.len()
            ));
        }
        Ok(Self(hmac::Key::new(hmac::HMAC_SHA256, secret)))
    }

    /// The seal of `letter`.
    pub fn seal(&self, letter: &DeadLetter) -> Bytes {
        Bytes::copy_from_slice(hmac::sign(&self.0, &sealed_bytes(letter)).as_ref())
    }

    /// Reads `letter`'s seal (in constant time).
    pub fn check(&self, letter: &DeadLetter) -> Seal {
        if letter.seal.is_empty() {
            return Seal::Missing;
        }
        match hmac::verify(&self.0, &sealed_bytes(letter), &letter.seal) {
            Ok(()) => Seal::Valid,
            Err(_) => Seal::Invalid,
        }
    }
}

/// What the seal covers, each field length-prefixed so that no two
/// letters encode the same.
fn sealed_bytes(letter: &DeadLetter) -> Vec<u8> {
    fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    let mut out = Vec::with_capacity(256 + letter.body.len());
    out.extend_from_slice(b"breakwater dead letter v1\0");
    for text in [
        &letter.upstream,
        &letter.source,
        &letter.capture_id,
        &letter.method,
        &letter.uri,
    ] {
        field(&mut out, text.as_bytes());
    }
    out.extend_from_slice(&(letter.headers.len() as u64).to_be_bytes());
    for header in &letter.headers {
        field(&mut out, header.name.as_bytes());
        field(&mut out, &header.value);
    }
    field(&mut out, &letter.body);
    out.push(u8::from(letter.body_truncated));
    out.push(u8::from(letter.grpc));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Header;

    fn letter() -> DeadLetter {
        DeadLetter {
            upstream: "payments".into(),
            source: "agent-7".into(),
            capture_id: "c1".into(),
            method: "POST".into(),
            uri: "/charge".into(),
            headers: vec![Header {
                name: "content-type".into(),
                value: Bytes::from_static(b"application/json"),
            }],
            body: Bytes::from_static(b"{\"amount\":10}"),
            ..Default::default()
        }
    }

    #[test]
    fn a_sealed_letter_checks_and_any_change_breaks_it() {
        let key = LetterKey::new(&[7; 32]).unwrap();
        let mut sealed = letter();
        assert_eq!(key.check(&sealed), Seal::Missing);
        sealed.seal = key.seal(&sealed);
        assert_eq!(key.check(&sealed), Seal::Valid);
        // The control plane's own fields are outside the seal.
        let mut replayed = sealed.clone();
        replayed.id = "12".into();
        replayed.replays = 3;
        replayed.last_replay_error = "http-503".into();
        assert_eq!(key.check(&replayed), Seal::Valid);
        let changes: [fn(&mut DeadLetter); 8] = [
            |l| l.upstream = "refunds".into(),
            |l| l.method = "DELETE".into(),
            |l| l.uri = "/charge?amount=1000".into(),
            |l| l.body = Bytes::from_static(b"{\"amount\":1000}"),
            |l| l.headers[0].value = Bytes::from_static(b"text/plain"),
            |l| {
                l.headers.push(Header {
                    name: "x-admin".into(),
                    value: Bytes::from_static(b"1"),
                })
            },
            |l| l.body_truncated = true,
            |l| l.capture_id = "c2".into(),
        ];
        for (i, change) in changes.iter().enumerate() {
            let mut altered = sealed.clone();
            change(&mut altered);
            assert_eq!(key.check(&altered), Seal::Invalid, "change {i}");
        }
        let other = LetterKey::new(&[8; 32]).unwrap();
        assert_eq!(other.check(&sealed), Seal::Invalid);
    }

    #[test]
    fn fields_cannot_be_shifted_into_each_other() {
        let key = LetterKey::new(&[7; 32]).unwrap();
        let mut a = letter();
        a.method = "POS".into();
        a.uri = "T/charge".into();
        let b = letter();
        assert_ne!(key.seal(&a), key.seal(&b));
    }

    #[test]
    fn short_keys_are_refused() {
        let error = LetterKey::new(b"hunter2").unwrap_err();
        assert!(error.contains("at least 32"), "{error}");
    }
}
