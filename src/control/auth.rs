//! Bearer tokens: with a token file, every call but health checks must
//! carry `authorization: Bearer <token>`.

use std::sync::Arc;

use http::HeaderMap;

use super::error::ApiError;

/// The token check; open when no token is configured.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    token: Option<Arc<[u8]>>,
}

impl Auth {
    /// Requires `token` (surrounding whitespace, such as the newline a
    /// file ends with, is not part of it).
    pub fn with_token(token: &str) -> Result<Self, String> {
        let token = token.trim();
        if token.is_empty() {
            return Err("the token file is empty".into());
        }
        Ok(Self {
            token: Some(Arc::from(token.as_bytes())),
        })
    }

    /// No token: every call is let through.
    pub fn open() -> Self {
        Self::default()
    }

    /// Whether calls need a token.
    pub fn is_open(&self) -> bool {
        self.token.is_none()
    }

    /// Checks a request's `authorization` header.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let given = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| bearer(v.as_bytes()))
            .unwrap_or_default();
        if constant_time_eq(given, token) {
            Ok(())
        } else {
            Err(ApiError::Unauthenticated)
        }
    }

    /// The check as a tonic interceptor.
    #[allow(clippy::result_large_err)]
    pub fn check_grpc(
        &self,
        request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let Some(token) = &self.token else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| bearer(v.as_bytes()))
            .unwrap_or_default();
        if constant_time_eq(given, token) {
            Ok(request)
        } else {
            Err(ApiError::Unauthenticated.into())
        }
    }
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

    #[test]
    fn only_the_exact_bearer_token_passes() {
        let auth = Auth::with_token("s3cret\n").unwrap();
        let mut headers = HeaderMap::new();
        assert_eq!(auth.check(&headers), Err(ApiError::Unauthenticated));
        headers.insert("authorization", "Bearer s3cre".parse().unwrap());
        assert_eq!(auth.check(&headers), Err(ApiError::Unauthenticated));
        headers.insert("authorization", "Basic s3cret".parse().unwrap());
        assert_eq!(auth.check(&headers), Err(ApiError::Unauthenticated));
        headers.insert("authorization", "Bearer s3cret".parse().unwrap());
        assert_eq!(auth.check(&headers), Ok(()));
        assert!(Auth::open().check(&HeaderMap::new()).is_ok());
        assert!(Auth::with_token("  \n").is_err());
    }
}

#[cfg(test)]
mod bearer_tests {
    #[test]
    fn the_scheme_is_case_insensitive() {
        assert_eq!(super::bearer(b"Bearer t0k"), Some(&b"t0k"[..]));
        assert_eq!(super::bearer(b"bearer t0k"), Some(&b"t0k"[..]));
        assert_eq!(super::bearer(b"BEARER  t0k"), Some(&b"t0k"[..]));
        assert_eq!(super::bearer(b"Basic dXNlcg=="), None);
        assert_eq!(super::bearer(b"Bearer"), None);
    }
}
