//! TLS to upstreams: the client side of an upstream's `tls` block (and of
//! an `https://` control plane URL); [`server`] is the control plane's
//! side.
//!
//! Verification is on unless `insecure_skip_verify` says otherwise (and
//! that is logged at every load). The trust is Mozilla's roots, embedded
//! (`webpki-roots`: the distroless image has no system store), or the
//! upstream's own `ca_file`; the name verified and sent as SNI is the
//! address's host unless `server_name` says otherwise; a client
//! certificate is sent when one is given (mTLS). ALPN offers `h2` to
//! HTTP/2 and gRPC upstreams and `http/1.1` to the others.
//!
//! A handshake that fails is told apart from a refused connection
//! ([`handshake_failure`]): its answer says `tls-handshake` and why, in
//! words (the certificate's issuer is not trusted, it is not valid for the
//! name, it expired, the upstream wants a client certificate).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::body::BoxError;

pub mod server;

/// An upstream's TLS client beside the block it was built from: equal when
/// the blocks and the content of the files they name are (a rotated
/// certificate is a new client), shown as the block.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// The block.
    pub params: TlsParams,
    /// The client built from it when the config loaded.
    pub client: Tls,
    /// A hash of the files' content when the client was built.
    files: u64,
}

impl UpstreamTls {
    /// The client `client`, built from `params` just now.
    pub fn new(params: TlsParams, client: Tls) -> Self {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for file in [
            &params.ca_file,
            &params.client_cert_file,
            &params.client_key_file,
        ]
        .into_iter()
        .flatten()
        {
            std::fs::read(file).ok().hash(&mut hasher);
        }
        Self {
            files: hasher.finish(),
            params,
            client,
        }
    }
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        self.params == other.params && self.files == other.files
    }
}

impl Serialize for UpstreamTls {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.params.serialize(s)
    }
}

/// An upstream's `tls` block, resolved: what to trust and what to send.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TlsParams {
    /// Trust only the CAs in this PEM file (default: Mozilla's roots).
    pub ca_file: Option<PathBuf>,
    /// The name verified and sent as SNI (default: the address's host).
    pub server_name: Option<String>,
    /// A client certificate chain (PEM), for upstreams that require mTLS.
    pub client_cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    pub client_key_file: Option<PathBuf>,
    /// Accept any certificate: for development only.
    pub insecure_skip_verify: bool,
}

/// A ready TLS client for one upstream.
#[derive(Clone)]
pub struct Tls {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the files `params` names and builds the client for an upstream
    /// whose address's host is `host` (`http2`: offer `h2` in ALPN). The
    /// error names the file or value that is wrong.
    pub fn new(params: &TlsParams, host: &str, http2: bool) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = if params.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        } else {
            builder.with_root_certificates(roots(params.ca_file.as_deref())?)
        };
        let mut config = match (&params.client_cert_file, &params.client_key_file) {
            (Some(cert), Some(key)) => {
                let chain = certificates(cert)?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("{}: no private key: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("the client certificate and key do not match: {e}"))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err("give client_cert_file and client_key_file together".into()),
        };
        config.alpn_protocols = vec![if http2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        let name = params.server_name.as_deref().unwrap_or(host);
        let name = name.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(name.to_owned())
            .map_err(|_| format!("{name:?} is not a valid server name"))?;
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// Runs the handshake on a connected stream.
    pub async fn connect(&self, stream: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        self.connector
            .connect(self.server_name.clone(), stream)
            .await
    }
}

fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(file) => {
            for cert in certificates(file)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: not a CA certificate: {e}", file.display()))?;
            }
        }
    }
    Ok(roots)
}

fn certificates(file: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(file)
        .map_err(|e| format!("{}: {e}", file.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", file.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", file.display()));
    }
    Ok(certs)
}

/// Who is on the other side of a handshake, for the words of its failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// An upstream (its `tls` block).
    Upstream,
    /// The control plane (an `https://` URL).
    ControlPlane,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Upstream => "upstream",
            Peer::ControlPlane => "control plane",
        }
    }

    fn ca_hint(self) -> &'static str {
        match self {
            Peer::Upstream => "set tls.ca_file",
            Peer::ControlPlane => "give its CA with --ca-file, or control_plane.ca_file",
        }
    }
}

/// Why a connection's TLS handshake with an upstream failed, in words, if
/// that is what `error` (or one of its causes) is.
pub fn handshake_failure(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    handshake_failure_with(error, Peer::Upstream)
}

/// [`handshake_failure`], for any peer.
pub fn handshake_failure_with(
    error: &(dyn std::error::Error + 'static),
    peer: Peer,
) -> Option<String> {
    let mut source = Some(error);
    while let Some(e) = source {
        let tls = e
            .downcast_ref::<rustls::Error>()
            .or_else(|| e.downcast_ref::<io::Error>()?.get_ref()?.downcast_ref());
        if let Some(tls) = tls {
            return Some(describe(tls, peer));
        }
        if let Some(io) = e.downcast_ref::<io::Error>()
            && io.kind() == io::ErrorKind::UnexpectedEof
            && io.to_string().contains("handshake")
        {
            return Some(format!(
                "the {} closed the connection during the TLS handshake: does its port speak \
                 plaintext (http://)?",
                peer.name()
            ));
        }
        source = e.source();
    }
    None
}

fn describe(error: &rustls::Error, peer: Peer) -> String {
    use rustls::AlertDescription as Alert;
    let who = peer.name();
    match error {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => format!(
                "the {who}'s certificate is not signed by a trusted CA ({})",
                peer.ca_hint()
            ),
            CertificateError::BadSignature => format!(
                "the {who}'s certificate is not signed by a trusted CA: its signature does not \
                 verify against the trusted CA of that name"
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("the {who}'s certificate is not valid for its name ({error})")
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("the {who}'s certificate has expired ({error})")
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!("the {who}'s certificate is not valid yet ({error})")
            }
            _ => format!("the {who}'s certificate is invalid: {error}"),
        },
        rustls::Error::AlertReceived(Alert::CertificateRequired | Alert::HandshakeFailure) => {
            format!(
                "the {who} refused the handshake ({error}); does it require a client certificate?"
            )
        }
        rustls::Error::AlertReceived(Alert::UnknownCA | Alert::BadCertificate) => {
            format!("the {who} refused the client certificate ({error})")
        }
        rustls::Error::InvalidMessage(_) => format!(
            "the {who} did not answer in TLS ({error}): does its port speak plaintext (http://)?"
        ),
        other => format!("TLS handshake failed: {other}"),
    }
}

/// The verifier of `insecure_skip_verify`: any certificate is accepted,
/// but the handshake's signatures are still checked.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Connects HTTP/1.1 upstreams over TLS, for the pooled client: TCP as
/// `HttpConnector` does (timeout, `TCP_NODELAY`), then the handshake.
#[derive(Debug, Clone)]
pub struct HttpsConnector {
    http: HttpConnector,
    tls: Tls,
}

impl HttpsConnector {
    /// TLS with `tls` over the connections of `http`.
    pub fn new(http: HttpConnector, tls: Tls) -> Self {
        Self { http, tls }
    }
}

impl tower::Service<Uri> for HttpsConnector {
    type Response = TlsIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<TlsIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.http.call(uri);
        let tls = self.tls.clone();
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            Ok(TlsIo(TokioIo::new(tls.connect(tcp).await?)))
        })
    }
}

/// A TLS connection to an upstream, as hyper reads and writes it.
#[derive(Debug)]
pub struct TlsIo(TokioIo<TlsStream<TcpStream>>);

impl Connection for TlsIo {
    fn connected(&self) -> Connected {
        self.0.inner().get_ref().0.connected()
    }
}

impl hyper::rt::Read for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}
