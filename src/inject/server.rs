//! The injector's HTTPS server: `POST /mutate` answers admission reviews,
//! `GET /healthz` answers probes. The certificate and key are read from
//! files and read again when they change (`transport::tls::server`), so a
//! rotation needs no restart.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::Settings;
use crate::body::{self, Body};
use crate::transport::tls::server::ServerTls;
pub use crate::transport::tls::server::{TlsError, TlsFiles};

/// Largest review accepted (a pod spec with large env or annotations).
const MAX_REVIEW_BYTES: usize = 3 << 20;

/// Serves the injector on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    files: TlsFiles,
    settings: Arc<Settings>,
    stop: watch::Receiver<bool>,
) -> Result<(), TlsError> {
    let tls = ServerTls::load(files)?;
    tls.keep_fresh();
    let service = hyper::service::service_fn(move |request| {
        let settings = settings.clone();
        async move { Ok::<_, Infallible>(answer(request, &settings).await) }
    });
    let graceful = Arc::new(hyper_util::server::graceful::GracefulShutdown::new());
    let builder =
        hyper_util::server::conn::auto::Builder::new(crate::transport::server::StreamExecutor);
    crate::transport::server::serve(
        listener,
        service,
        builder,
        graceful,
        stop,
        Some(tls),
        Default::default(),
    )
    .await;
    Ok(())
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
