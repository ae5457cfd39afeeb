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
pub struct Authorization(Option<MetadataValue<Ascii>>);

impl Authorization {
    /// Sends the token in `path`, or nothing without a file.
    pub fn from_token_file(path: Option<&Path>) -> Result<Self, String> {
        let Some(path) = path else {
            return Ok(Self(None));
        };
        let value = format!("Bearer {}", read(path)?)
            .parse()
            .map_err(|_| "the token is not valid header text".to_owned())?;
        Ok(Self(Some(value)))
    }
}

impl tonic::service::Interceptor for Authorization {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}
