//! The control plane's bearer token, as both sides read it: the server
//! (`breakwater control-plane --token-file`) and its clients (the CLI, a
//! sidecar shipping dead letters) read the same file the same way.

use std::path::Path;

use tonic::metadata::{Ascii, MetadataValue};

/// The token in the file at `path`, trimmed; the error names the file.
pub fn read(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
    Ok(text.trim().to_owned())
}

/// Adds `authorization: Bearer <token>` to every gRPC call.
#[derive(Debug, Clone)]
pub struct Authorization(Token);

#[derive(Debug, Clone)]
enum Token {
    None,
    Read(MetadataValue<Ascii>),
    /// Read again at every call: a file that is missing now may be
    /// mounted later, or rotated.
    File(std::sync::Arc<Path>),
}

fn bearer(path: &Path) -> Result<MetadataValue<Ascii>, String> {
    format!("Bearer {}", read(path)?)
        .parse()
        .map_err(|_| "the token is not valid header text".to_owned())
}

impl Authorization {
    /// Sends the token in `path`, or nothing without a file.
    pub fn from_token_file(path: Option<&Path>) -> Result<Self, String> {
        match path {
            None => Ok(Self(Token::None)),
            Some(path) => Ok(Self(Token::Read(bearer(path)?))),
        }
    }

    /// Sends the token in `path` as it is at each call; a call made while
    /// it cannot be read fails `UNAUTHENTICATED` here, saying why.
    pub fn reading(path: Option<&Path>) -> Self {
        Self(path.map_or(Token::None, |p| Token::File(p.into())))
    }
}

impl tonic::service::Interceptor for Authorization {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let value = match &self.0 {
            Token::None => return Ok(request),
            Token::Read(value) => value.clone(),
            Token::File(path) => bearer(path).map_err(tonic::Status::unauthenticated)?,
        };
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}
