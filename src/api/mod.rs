//! The control plane's API, shared by its servers and its clients: the
//! code generated from `proto/breakwater/v1` (messages, gRPC servers and
//! clients), the JSON shapes of its records ([`json`]), the bearer
//! token ([`token`]) and the seal on dead letters ([`seal`]).

#![allow(missing_docs, clippy::all)]

pub mod json;
pub mod seal;
pub mod token;

/// Checks a control plane URL before anything is sent to it: `http://`
/// (plaintext) or `https://` (TLS, never plaintext then).
pub fn check_url(url: &str) -> Result<(), String> {
    match url
        .split_once("://")
        .map(|(scheme, _)| scheme.to_ascii_lowercase())
    {
        Some(scheme) if scheme == "http" || scheme == "https" => Ok(()),
        _ => Err(format!(
            "invalid URL {url:?}: expected http://host:port or https://host:port"
        )),
    }
}

tonic::include_proto!("breakwater.v1");

/// Every message and service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/breakwater_descriptor.bin"));

#[cfg(test)]
mod tests {
    #[test]
    fn http_and_https_urls_only() {
        assert!(super::check_url("http://cp:7070").is_ok());
        assert!(super::check_url("HTTPS://cp:7070").is_ok());
        assert!(super::check_url("grpc://cp:7070").is_err());
        assert!(
            super::check_url("cp:7070")
                .unwrap_err()
                .contains("expected http://")
        );
    }
}
