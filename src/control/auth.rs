//! Bearer tokens, in two roles: with a token file, every call but health
//! checks must carry `authorization: Bearer <token>`. The operator token
//! (`--token-file`) may do everything; a read-only token
//! (`--read-token-file`) may only look: the gRPC methods `Get`, `List`
//! and `Watch` (and reflection), the JSON API's `GET`s. A read-only token
//! used to change something is answered `PERMISSION_DENIED` (403), so a
//! dashboard or an on-call laptop can hold a token that cannot replay,
//! purge, abort or write.

use std::sync::Arc;

use http::HeaderMap;

use super::error::ApiError;

/// What a call does, and so which token it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads: either token.
    Read,
    /// Changes something: the operator token.
    Operate,
}

impl Access {
    /// What a gRPC method needs, from its path (`/package.Service/Method`);
    /// `None` for health checks, which need no token.
    pub fn of_grpc(path: &str) -> Option<Self> {
        let Some((service, method)) = path.trim_start_matches('/').rsplit_once('/') else {
            return Some(Access::Operate);
        };
        if service == "grpc.health.v1.Health" {
            return None;
        }
        Some(match method {
            _ if service.starts_with("grpc.reflection.") => Access::Read,
            "Get" | "List" | "Watch" => Access::Read,
            _ => Access::Operate,
        })
    }

    /// What a JSON API call needs, from its method.
    pub fn of_http(method: &http::Method) -> Self {
        match *method {
            http::Method::GET | http::Method::HEAD => Access::Read,
            _ => Access::Operate,
        }
    }
}

/// The token check; open when no token is configured.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    operator: Option<Arc<[u8]>>,
    reader: Option<Arc<[u8]>>,
}

impl Auth {
    /// Requires `token` (surrounding whitespace, such as the newline a
    /// file ends with, is not part of it) for everything.
    pub fn with_token(token: &str) -> Result<Self, String> {
        Ok(Self {
            operator: Some(non_empty(token)?),
            reader: None,
        })
    }

    /// Also lets `token` read (and only read).
    pub fn with_read_token(self, token: &str) -> Result<Self, String> {
        if self.operator.is_none() {
            return Err(
                "a read-only token needs an operator token too (--token-file): \
                 without one every call is let through"
                    .into(),
            );
        }
        let reader = non_empty(token)?;
        if self.operator.as_deref() == Some(&*reader) {
            return Err("the read-only token is the operator token: give it its own".into());
        }
        Ok(Self {
            reader: Some(reader),
            ..self
        })
    }

    /// No token: every call is let through.
    pub fn open() -> Self {
        Self::default()
    }

    /// Whether calls need a token.
    pub fn is_open(&self) -> bool {
        self.operator.is_none()
    }

    /// Checks a request's `authorization` header for a call that needs
    /// `access`.
    pub fn check(&self, headers: &HeaderMap, access: Access) -> Result<(), ApiError> {
        let Some(operator) = &self.operator else {
            return Ok(());
        };
        let given = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| bearer(v.as_bytes()))
            .unwrap_or_default();
        if constant_time_eq(given, operator) {
            return Ok(());
        }
        match &self.reader {
            Some(reader) if constant_time_eq(given, reader) => match access {
                Access::Read => Ok(()),
                Access::Operate => Err(ApiError::ReadOnly),
            },
            _ => Err(ApiError::Unauthenticated),
        }
    }

    /// The check for a gRPC call, by its path.
    #[allow(clippy::result_large_err)]
    pub fn check_grpc(&self, path: &str, headers: &HeaderMap) -> Result<(), tonic::Status> {
        match Access::of_grpc(path) {
            None => Ok(()),
            Some(access) => self.check(headers, access).map_err(Into::into),
        }
    }
}

fn non_empty(token: &str) -> Result<Arc<[u8]>, String> {
    let token = token.trim();
    if token.is_empty() {
        return Err("the token file is empty".into());
    }
    Ok(Arc::from(token.as_bytes()))
}

/// The token of a `Bearer` credential; the scheme is matched without regard
/// to case (RFC 9110 §11.1), and spaces before the token are skipped.
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at(value.iter().position(|b| *b == b' ')?);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| rest.trim_ascii_start())
}

/// Compares in time that depends only on the lengths, so a caller cannot
/// learn the token byte by byte from answer times.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", value.parse().unwrap());
        headers
    }

    #[test]
    fn only_the_exact_bearer_token_passes() {
        let auth = Auth::with_token("s3cret\n").unwrap();
        let read = Access::Read;
        assert_eq!(
            auth.check(&HeaderMap::new(), read),
            Err(ApiError::Unauthenticated)
        );
        assert_eq!(
            auth.check(&with("Bearer s3cre"), read),
            Err(ApiError::Unauthenticated)
        );
        assert_eq!(
            auth.check(&with("Basic s3cret"), read),
            Err(ApiError::Unauthenticated)
        );
        assert_eq!(auth.check(&with("Bearer s3cret"), Access::Operate), Ok(()));
        assert!(
            Auth::open()
                .check(&HeaderMap::new(), Access::Operate)
                .is_ok()
        );
        assert!(Auth::with_token("  \n").is_err());
    }

    #[test]
    fn a_read_only_token_reads_and_changes_nothing() {
        let auth = Auth::with_token("op")
            .unwrap()
            .with_read_token("viewer\n")
            .unwrap();
        assert_eq!(auth.check(&with("Bearer viewer"), Access::Read), Ok(()));
        assert_eq!(
            auth.check(&with("Bearer viewer"), Access::Operate),
            Err(ApiError::ReadOnly)
        );
        assert_eq!(auth.check(&with("Bearer op"), Access::Operate), Ok(()));
        assert_eq!(
            auth.check(&with("Bearer other"), Access::Read),
            Err(ApiError::Unauthenticated)
        );
        assert!(Auth::open().with_read_token("viewer").is_err());
        assert!(
            Auth::with_token("op")
                .unwrap()
                .with_read_token("op")
                .is_err()
        );
    }

    #[test]
    fn grpc_methods_are_reads_or_changes_by_name() {
        let of = Access::of_grpc;
        assert_eq!(of("/grpc.health.v1.Health/Check"), None);
        assert_eq!(of("/breakwater.v1.DeadLetters/List"), Some(Access::Read));
        assert_eq!(of("/breakwater.v1.DeadLetters/Get"), Some(Access::Read));
        assert_eq!(of("/breakwater.v1.Sagas/Watch"), Some(Access::Read));
        assert_eq!(
            of("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Some(Access::Read)
        );
        for write in [
            "/breakwater.v1.DeadLetters/Replay",
            "/breakwater.v1.DeadLetters/Purge",
            "/breakwater.v1.DeadLetters/Enqueue",
            "/breakwater.v1.Checkpoints/Put",
            "/breakwater.v1.Checkpoints/Delete",
            "/breakwater.v1.Checkpoints/Prune",
            "/breakwater.v1.Sagas/Start",
            "/breakwater.v1.Sagas/Abort",
            "/breakwater.v1.Unknown/Anything",
            "/no-method",
        ] {
            assert_eq!(of(write), Some(Access::Operate), "{write}");
        }
        assert_eq!(Access::of_http(&http::Method::GET), Access::Read);
        assert_eq!(Access::of_http(&http::Method::POST), Access::Operate);
        assert_eq!(Access::of_http(&http::Method::DELETE), Access::Operate);
    }

    #[test]
    fn the_scheme_is_case_insensitive() {
        assert_eq!(bearer(b"Bearer t0k"), Some(&b"t0k"[..]));
        assert_eq!(bearer(b"bearer t0k"), Some(&b"t0k"[..]));
        assert_eq!(bearer(b"BEARER  t0k"), Some(&b"t0k"[..]));
        assert_eq!(bearer(b"Basic dXNlcg=="), None);
        assert_eq!(bearer(b"Bearer"), None);
    }
}
