//! Real TLS peers: a CA made in the test (rcgen), certificates signed by it
//! (valid, for another name, expired, for clients), and an HTTP/1.1 + HTTP/2
//! upstream behind rustls that records what each connection negotiated.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use breakwater::body::{self, Body};
use breakwater::grpc;
use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A certificate authority and the files it signed, in a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
    /// The CA's certificate (PEM): what a client trusts.
    pub ca_file: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// A certificate and its key, as PEM files.
pub struct Signed {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Breakwater test CA");
        let ca = params.self_signed(&key).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        Self {
            dir,
            ca_file,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A certificate for `names`, expired when `expired`, as `name.pem`
    /// and `name.key`.
    pub fn sign(&self, name: &str, names: &[&str], expired: bool) -> Signed {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let signed = Signed {
            cert_file: self.dir.path().join(format!("{name}.pem")),
            key_file: self.dir.path().join(format!("{name}.key")),
        };
        std::fs::write(&signed.cert_file, cert.pem()).unwrap();
        std::fs::write(&signed.key_file, key.serialize_pem()).unwrap();
        signed
    }

    /// A server config presenting `signed`; with `require_client`, clients must
    /// show a certificate signed by this CA.
    pub fn server_config(&self, signed: &Signed, require_client: bool) -> rustls::ServerConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if require_client {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_file(&self.ca_file).unwrap())
                .unwrap();
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let chain = CertificateDer::pem_file_iter(&signed.cert_file)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&signed.key_file).unwrap();
        let mut config = builder.with_single_cert(chain, key).unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config
    }
}

/// What one TLS connection to the upstream negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub alpn: Option<String>,
    pub sni: Option<String>,
    pub client_certificate: bool,
}

/// An HTTP/1.1 and HTTP/2 upstream over TLS: answers `over tls` with the
/// HTTP version, and a gRPC call (`content-type: application/grpc`) with
/// one message and `grpc-status: 0` in trailers.
pub struct TlsUpstream {
    pub addr: SocketAddr,
    /// Each handshake that completed, in order.
    pub negotiated: Arc<Mutex<Vec<Negotiated>>>,
    /// Handshakes that failed, with the server's view of why.
    pub refused: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl TlsUpstream {
    pub async fn start(config: rustls::ServerConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let negotiated = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(Vec::new()));
        let (n, r) = (negotiated.clone(), refused.clone());
        let task = tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (acceptor, n, r) = (acceptor.clone(), n.clone(), r.clone());
                tokio::spawn(async move {
                    let tls = match acceptor.accept(stream).await {
                        Ok(tls) => tls,
                        Err(e) => {
                            r.lock().unwrap().push(e.to_string());
                            return;
                        }
                    };
                    let (_, session) = tls.get_ref();
                    n.lock().unwrap().push(Negotiated {
                        alpn: session
                            .alpn_protocol()
                            .map(|p| String::from_utf8_lossy(p).into_owned()),
                        sni: session.server_name().map(str::to_owned),
                        client_certificate: session.peer_certificates().is_some(),
                    });
                    let service = hyper::service::service_fn(|request: Request<Incoming>| async {
                        Ok::<_, Infallible>(answer(request).await)
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            negotiated,
            refused,
            task,
        }
    }

    pub fn negotiated(&self) -> Vec<Negotiated> {
        self.negotiated.lock().unwrap().clone()
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(request: Request<Incoming>) -> Response<Body> {
    let version = format!("{:?}", request.version());
    let is_grpc = grpc::is_grpc(request.headers());
    let _ = request.into_body().collect().await;
    if !is_grpc {
        return Response::new(body::full(format!("over tls, {version}")));
    }
    let mut trailers = HeaderMap::new();
    trailers.insert(grpc::STATUS, "0".parse().unwrap());
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
        Ok(Frame::data(grpc::frame(b"\x0a\x02ok"))),
        Ok(Frame::trailers(trailers)),
    ];
    let mut response = Response::new(body::boxed(StreamBody::new(tokio_stream::iter(frames))));
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, grpc::CONTENT_TYPE_GRPC);
    response
}
