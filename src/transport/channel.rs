//! The gRPC channel to the control plane, for the sidecar's dead-letter
//! shipper and the CLI: over TLS when the URL says `https://` (trusting
//! `ca_file`, or Mozilla's roots), never in plaintext then. A TLS
//! handshake that fails says why, in words, and an `https://` URL that
//! reaches a plaintext port says that.

use std::path::Path;
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use tonic::transport::{Channel, Endpoint};

use super::tls::{HttpsConnector, Tls, TlsParams};

/// How a client reaches the control plane.
#[derive(Debug, Clone)]
pub struct ControlChannel {
    endpoint: Endpoint,
    tls: Option<Tls>,
}

impl ControlChannel {
    /// The channel for `url` (`http://` or `https://host:port`), each
    /// connection within `connect_timeout` and each call within `timeout`
    /// if given. The error says what is wrong with the URL or the CA file.
    pub fn new(
        url: &str,
        ca_file: Option<&Path>,
        connect_timeout: Duration,
        timeout: Option<Duration>,
    ) -> Result<Self, String> {
        crate::api::check_url(url)?;
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| format!("invalid URL {url:?}: {e}"))?
            .connect_timeout(connect_timeout);
        if let Some(timeout) = timeout {
            endpoint = endpoint.timeout(timeout);
        }
        let uri = endpoint.uri();
        let tls = match uri.scheme_str() {
            Some("https") => {
                let params = TlsParams {
                    ca_file: ca_file.map(Path::to_path_buf),
                    ..TlsParams::default()
                };
                let host = uri.host().unwrap_or_default();
                Some(Tls::new(&params, host, true)?)
            }
            _ if ca_file.is_some() => {
                return Err(format!(
                    "a CA file is given but {url:?} is http://: the calls would be plaintext; \
                     use https://"
                ));
            }
            _ => None,
        };
        Ok(Self { endpoint, tls })
    }

    /// Whether calls go over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Connects now.
    pub async fn connect(&self) -> Result<Channel, String> {
        let connected = match &self.tls {
            None => self.endpoint.connect().await,
            Some(tls) => {
                self.endpoint
                    .connect_with_connector(self.connector(tls.clone()))
                    .await
            }
        };
        connected.map_err(|e| describe(&e))
    }

    /// A channel that connects on its first call (and again after a
    /// failure).
    pub fn connect_lazy(&self) -> Channel {
        match &self.tls {
            None => self.endpoint.connect_lazy(),
            Some(tls) => self
                .endpoint
                .connect_with_connector_lazy(self.connector(tls.clone())),
        }
    }

    fn connector(&self, tls: Tls) -> HttpsConnector {
        let mut http = HttpConnector::new();
        // The URI says https: the TLS is ours, the TCP connector's only.
        http.enforce_http(false);
        http.set_nodelay(true);
        HttpsConnector::new(http, tls)
    }
}

/// Why a connection or call to the control plane failed, in words: a TLS
/// handshake's cause when it was one.
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    super::tls::handshake_failure_with(error, super::tls::Peer::ControlPlane)
        .unwrap_or_else(|| crate::error::error_text(error))
}
