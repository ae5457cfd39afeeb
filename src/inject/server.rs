//! The injector's HTTPS server: `POST /mutate` answers admission reviews,
//! `GET /healthz` answers probes. The certificate and key are read from
//! files and read again when they change (cert-manager and the chart's
//! Secret both rotate them in place), so a rotation needs no restart.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::Settings;
use crate::body::{self, Body};

/// Largest review accepted (a pod spec with large env or annotations).
const MAX_REVIEW_BYTES: usize = 3 << 20;
/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the certificate files are checked for a change.
const RELOAD_EVERY: Duration = Duration::from_secs(30);

/// Where the certificate chain and key are (PEM).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
}

/// Why the injector cannot serve.
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
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert)
            .map_err(|e| file_error(&self.cert, e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| file_error(&self.cert, e.to_string()))?;
        if certs.is_empty() {
            return Err(file_error(&self.cert, "no certificate in it".into()));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| file_error(&self.key, e.to_string()))?;
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

/// Serves the injector on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    files: TlsFiles,
    settings: Arc<Settings>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), TlsError> {
    let certificate = Arc::new(Certificate(ArcSwap::from_pointee(files.load()?)));
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TlsError::Key(e.to_string()))?
    .with_no_client_auth()
    .with_cert_resolver(certificate.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    tokio::spawn(reload(files, certificate, stop.clone()));
    loop {
        let (stream, peer) = tokio::select! {
            () = stopped(&mut stop) => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (acceptor, settings) = (acceptor.clone(), settings.clone());
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let service = hyper::service::service_fn(move |request| {
                let settings = settings.clone();
                async move { Ok::<_, Infallible>(answer(request, &settings).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Resolves once `stop` turns true (the guard `wait_for` returns is not
/// `Send`, so it is dropped here).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Reads the files again whenever they change; a bad new pair is logged
/// and the old one kept.
async fn reload(files: TlsFiles, certificate: Arc<Certificate>, mut stop: watch::Receiver<bool>) {
    let mut seen = files.modified();
    loop {
        tokio::select! {
            () = stopped(&mut stop) => return,
            () = tokio::time::sleep(RELOAD_EVERY) => {}
        }
        let now = files.modified();
        if now == seen {
            continue;
        }
        match files.load() {
            Ok(key) => {
                certificate.0.store(Arc::new(key));
                seen = now;
                tracing::info!("the injector's certificate was reloaded");
            }
            Err(error) => {
                tracing::error!(%error, "the new certificate is unusable; keeping the old one")
            }
        }
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<bytes::Bytes>,
) -> Response<Body> {
    body::typed(status, content_type, body)
}

async fn answer(request: Request<Incoming>, settings: &Settings) -> Response<Body> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz" | "/readyz") => reply(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::POST, "/mutate") => {
            let bytes = match Limited::new(request.into_body(), MAX_REVIEW_BYTES)
                .collect()
                .await
            {
                Ok(collected) => collected.to_bytes(),
                Err(_) => {
                    return error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "the review is too large, or was cut short",
                    );
                }
            };
            match super::review(&bytes, settings) {
                Ok(review) => reply(
                    StatusCode::OK,
                    "application/json",
                    serde_json::to_vec(&review).expect("reviews serialize"),
                ),
                Err(bad) => error(StatusCode::BAD_REQUEST, &bad.0),
            }
        }
        _ => error(StatusCode::NOT_FOUND, "try POST /mutate or GET /healthz"),
    }
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({"error": {"message": message}});
    reply(
        status,
        "application/json",
        serde_json::to_vec(&body).expect("JSON"),
    )
}
