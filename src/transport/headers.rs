//! Hop-by-hop header handling (RFC 9110 §7.6.1).
//!
//! A proxy must not forward the headers that describe one connection: the
//! fixed list below and every header the `Connection` header names. The one
//! exception is `te: trailers`, which HTTP/2 and gRPC peers need to see end
//! to end and which the HTTP/2 spec allows.

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};

/// Headers that are hop-by-hop whatever `Connection` says.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Removes hop-by-hop headers from a request or response. `TE` is kept only
/// as `te: trailers`. `Expect` is answered by the sidecar itself (hyper
/// sends `100 Continue` when the body is read), so it is not forwarded.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry no hop-by-hop header (gRPC ones only
    // `te: trailers`): one pass over the names is cheaper than a hash
    // lookup per listed name.
    let clean = headers
        .iter()
        .all(|(name, value)| !is_hop_by_hop(name) || (name == header::TE && value == "trailers"));
    if clean {
        return;
    }
    if let Some(connection) = headers.get(header::CONNECTION) {
        let named: Vec<HeaderName> = connection
            .to_str()
            .unwrap_or("")
            .split(',')
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        if headers.contains_key(name) {
            headers.remove(name);
        }
    }
    if headers.contains_key(header::EXPECT) {
        headers.remove(header::EXPECT);
    }
    if let Some(te) = headers.get(header::TE) {
        let trailers = te
            .to_str()
            .unwrap_or("")
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
        headers.remove(header::TE);
        if trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
}

/// Whether a header may be hop-by-hop (`TE` and `Expect` included: both
/// need a closer look).
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "expect"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_fixed_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-session"));
        h.insert("x-session", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("te", HeaderValue::from_static("gzip, trailers"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["te", "x-keep"]);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn leaves_end_to_end_headers_and_te_trailers_alone() {
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("content-type", HeaderValue::from_static("application/grpc"));
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }

    #[test]
    fn drops_te_without_trailers() {
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
    }
}
