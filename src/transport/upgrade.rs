//! HTTP/1.1 upgrades (WebSocket) relayed: the caller's upgrade request is
//! sent on its own connection to the upstream, and once the upstream
//! answers `101 Switching Protocols` the two upgraded connections are
//! joined byte for byte until either side ends.
//!
//! Only what the sidecar can judge is judged (see `Upstream::upgrade`):
//! the connect, and the time to the upstream's answer. Frames inside the
//! upgraded connection are the caller's and the upstream's.

use http::header::{CONNECTION, HeaderValue, UPGRADE};
use http::{HeaderMap, Request, Response};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::body::Body;

/// The protocol an HTTP/1.1 request asks to switch to, if it asks for one
/// the sidecar relays: an `Upgrade` other than `h2c` (which RFC 9113 let
/// servers ignore: the request is then served as plain HTTP/1.1), with
/// `upgrade` among the `Connection` tokens.
pub fn requested(headers: &HeaderMap) -> Option<&HeaderValue> {
    let upgrade = headers.get(UPGRADE)?;
    let asked = headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
    (asked && !upgrade.as_bytes().eq_ignore_ascii_case(b"h2c")).then_some(upgrade)
}

/// Puts back on a request prepared for the upstream (hop-by-hop headers
/// removed) the two that ask for `protocol`, and makes its target
/// origin-form, as sent on a connection of its own.
pub fn restore(request: &mut Request<Body>, protocol: HeaderValue) {
    let headers = request.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, protocol);
    let path = request
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), ToString::to_string);
    *request.uri_mut() = path.parse().expect("a path and query is a URI");
}

/// Anything a connection can run over: TCP, or TLS over it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Sends `request` on `io`, a connection of its own, and returns the
/// upstream's answer; the connection lives on for the upgrade.
pub async fn send(
    io: Box<dyn Io>,
    request: Request<Body>,
) -> Result<Response<Incoming>, hyper::Error> {
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(%error, "an upgrade's upstream connection ended");
        }
    });
    sender.send_request(request).await
}

/// Joins the caller's upgraded connection to the upstream's once both are
/// ready (the caller's once the `101` has been written to it), until
/// either side ends.
pub fn join(caller: OnUpgrade, upstream: OnUpgrade) {
    tokio::spawn(async move {
        let (caller, upstream) = match tokio::try_join!(caller, upstream) {
            Ok(both) => both,
            Err(error) => {
                tracing::debug!(%error, "an upgrade did not complete");
                return;
            }
        };
        let (mut caller, mut upstream) = (TokioIo::new(caller), TokioIo::new(upstream));
        let _ = tokio::io::copy_bidirectional(&mut caller, &mut upstream).await;
    });
}
