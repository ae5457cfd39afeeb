//! The control plane's API, shared by its servers and its clients: the
//! code generated from `proto/breakwater/v1` (messages, gRPC servers and
//! clients), the JSON shapes of its records ([`json`]) and the bearer
//! token ([`token`]).

#![allow(missing_docs, clippy::all)]

pub mod json;
pub mod token;

/// Checks a control plane URL before anything is sent to it: `http://`
/// only. The control plane does not speak TLS yet, and a client must not
/// send its bearer token in the clear to a URL that says `https://`.
pub fn check_url(url: &str) -> Result<(), String> {
    match url
        .split_once("://")
        .map(|(scheme, _)| scheme.to_ascii_lowercase())
    {
        Some(scheme) if scheme == "http" => Ok(()),
        Some(scheme) if scheme == "https" => Err(format!(
            "{url:?}: https is not supported yet: the control plane speaks plaintext gRPC and \
             JSON; reach it with http:// on the pod network (or through a TLS-terminating \
             proxy), never with a token sent in the clear to an https URL"
        )),
        _ => Err(format!("invalid URL {url:?}: expected http://host:port")),
    }
}

tonic::include_proto!("breakwater.v1");

/// Every message and service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/breakwater_descriptor.bin"));

#[cfg(test)]
mod tests {
    #[test]
    fn only_plaintext_urls_until_the_control_plane_speaks_tls() {
        assert!(super::check_url("http://cp:7070").is_ok());
        let https = super::check_url("HTTPS://cp:7070").unwrap_err();
        assert!(https.contains("https is not supported yet"), "{https}");
        assert!(
            super::check_url("cp:7070")
                .unwrap_err()
                .contains("expected http://")
        );
    }
}
