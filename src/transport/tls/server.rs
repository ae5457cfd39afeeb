//! TLS for the servers that speak it: the control plane's gRPC and JSON
//! listeners and the injector. The certificate chain and key are read
//! from PEM files, and read again when they change (cert-manager and the
//! chart's Secrets rotate them in place), so a rotation needs no restart;
//! a bad new pair is logged and the old one kept. ALPN offers `h2` and
//! `http/1.1`. Every handshake runs in its own task, bounded by
//! [`HANDSHAKE_TIMEOUT`], so a client that connects and says nothing holds
//! no one else up.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client may take over its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the certificate files are checked for a change.
const RELOAD_EVERY: Duration = Duration::from_secs(30);

/// Where a server's certificate chain and key are (PEM).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
}

/// Why a certificate cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The key does not suit the certificate, or is of an unknown kind.
    #[error("the key does not fit the certificate: {0}")]
    Key(String),
}

impl TlsFiles {
    fn load(&self) -> Result<CertifiedKey, TlsError> {
        let file_error = |path: &PathBuf, message: String| TlsError::File {
            path: path.clone(),
            message,
        };
        let certs = super::certificates(&self.cert).map_err(|m| file_error(&self.cert, m))?;
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| file_error(&self.key, format!("no private key: {e}")))?;
        let provider = rustls::crypto::ring::default_provider();
        CertifiedKey::from_der(certs, key, &provider).map_err(|e| TlsError::Key(e.to_string()))
    }

    fn modified(&self) -> Option<(SystemTime, SystemTime)> {
        let at = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        Some((at(&self.cert)?, at(&self.key)?))
    }
}

/// The current certificate, swapped when the files change.
#[derive(Debug)]
struct Certificate(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// A server's certificate, ready to accept.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
    files: TlsFiles,
    certificate: Arc<Certificate>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads the certificate chain and the private key. The error names
    /// the file that is wrong, and why.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let certificate = Arc::new(Certificate(ArcSwap::from_pointee(files.load()?)));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Key(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(certificate.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            files,
            certificate,
        })
    }

    /// Reads the files again whenever they change, from a task of its own
    /// that ends when the last clone of this is dropped. Call it once,
    /// within the runtime.
    pub fn keep_fresh(&self) {
        let files = self.files.clone();
        let certificate: Weak<Certificate> = Arc::downgrade(&self.certificate);
        tokio::spawn(async move {
            let mut seen = files.modified();
            loop {
                tokio::time::sleep(RELOAD_EVERY).await;
                let Some(certificate) = certificate.upgrade() else {
                    return;
                };
                let now = files.modified();
                if now == seen {
                    continue;
                }
                match files.load() {
                    Ok(key) => {
                        certificate.0.store(Arc::new(key));
                        seen = now;
                        tracing::info!(cert = %files.cert.display(), "the certificate was reloaded");
                    }
                    Err(error) => {
                        tracing::error!(%error, "the new certificate is unusable; keeping the old one");
                    }
                }
            }
        });
    }

    /// Runs the handshake on an accepted connection, within
    /// [`HANDSHAKE_TIMEOUT`].
    pub async fn accept(&self, stream: TcpStream) -> io::Result<Accepted> {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(stream)).await {
            Ok(result) => result.map(Accepted),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not finish its TLS handshake in time",
            )),
        }
    }
}

/// An accepted TLS connection.
#[derive(Debug)]
pub struct Accepted(TlsStream<TcpStream>);

impl tonic::transport::server::Connected for Accepted {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl AsyncRead for Accepted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Accepted {
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

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}
