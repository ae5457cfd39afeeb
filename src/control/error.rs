//! What a control-plane operation fails with, in terms both faces (gRPC
//! and JSON/HTTP) can answer, and the paging rules they share.

use super::store::StoreError;

const DEFAULT_PAGE_SIZE: u32 = 50;
const MAX_PAGE_SIZE: u32 = 1000;

/// What went wrong, in terms both faces can answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// The request is malformed or breaks a limit (400 / `INVALID_ARGUMENT`).
    Invalid(String),
    /// No such thing (404 / `NOT_FOUND`).
    NotFound(String),
    /// A compare-and-swap lost (409 / `ABORTED`).
    Conflict {
        /// What happened.
        message: String,
        /// The latest version.
        current: u64,
    },
    /// The request cannot be served as things are (400 /
    /// `FAILED_PRECONDITION`), such as a replay with no policy for the
    /// letter's upstream.
    Precondition(String),
    /// No or a wrong token (401 / `UNAUTHENTICATED`).
    Unauthenticated,
    /// The read-only token, for a call that changes something (403 /
    /// `PERMISSION_DENIED`).
    ReadOnly,
    /// Refused for who is asking, such as a browser page of another
    /// origin (403 / `PERMISSION_DENIED`).
    Forbidden(String),
    /// The store failed (500 / `INTERNAL`); nothing was acknowledged.
    Internal(String),
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiError::Invalid(m)
            | ApiError::NotFound(m)
            | ApiError::Precondition(m)
            | ApiError::Forbidden(m)
            | ApiError::Internal(m) => f.write_str(m),
            ApiError::Conflict { message, .. } => f.write_str(message),
            ApiError::Unauthenticated => {
                f.write_str("missing or wrong token: send authorization: Bearer <token>")
            }
            ApiError::ReadOnly => {
                f.write_str("this token is read-only: changing something needs the operator token")
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => ApiError::NotFound(m),
            StoreError::Conflict { expected, current } => ApiError::Conflict {
                message: format!(
                    "version conflict: expected version {expected}, the latest is {current}"
                ),
                current,
            },
            StoreError::Precondition(m) => ApiError::Precondition(m),
            StoreError::Storage(m) => ApiError::Internal(m),
        }
    }
}

/// The page size to serve for a requested one (0: the default; capped).
pub(crate) fn page_size(size: u32) -> usize {
    (if size == 0 {
        DEFAULT_PAGE_SIZE
    } else {
        size.min(MAX_PAGE_SIZE)
    }) as usize
}

/// Page tokens that continue a listing by id: the last id served, in
/// URL-safe base64 (an id may hold any printable character).
const ID_TOKEN: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The token that continues after `id`.
pub(crate) fn id_token(id: &str) -> String {
    base64::Engine::encode(&ID_TOKEN, id)
}

/// The id a token continues after (`None`: from the start).
pub(crate) fn after_id(token: &str) -> Result<Option<String>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    base64::Engine::decode(&ID_TOKEN, token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .map(Some)
        .ok_or_else(|| ApiError::Invalid(format!("page_token {token:?} is not one this API gave")))
}
