//! Routing on the shared port: from a request's authority to an upstream.
//!
//! The authority comes from the request target when it is absolute
//! (HTTP/1.1 proxy form, as `HTTP_PROXY` clients send it) or from
//! `:authority` (HTTP/2), and otherwise from the `Host` header. An exact
//! `host:port` claim wins over a bare host claim; a `host:port` of another
//! port matches a bare host only where it was claimed by name (the
//! upstream's name, its `hosts`), not where it is only the host of an
//! upstream's address: `127.0.0.1:5555` is not the upstream at
//! `127.0.0.1:18443`. Nothing else is routed: the sidecar is never an
//! open proxy.

use std::collections::HashMap;
use std::sync::Arc;

use http::Request;
use http::header::HOST;

use crate::upstream::Upstream;

/// The host table of the shared port.
#[derive(Debug, Default)]
pub struct Routes {
    by_host: HashMap<String, Arc<Upstream>>,
    /// Bare hosts claimed only as an address's host: not for a
    /// `host:port` of another port.
    address_hosts: std::collections::HashSet<String>,
}

impl Routes {
    /// Builds the table from every upstream's resolved `hosts`.
    pub fn new<'a>(upstreams: impl IntoIterator<Item = &'a Arc<Upstream>>) -> Self {
        let mut by_host = HashMap::new();
        let mut address_hosts = std::collections::HashSet::new();
        for upstream in upstreams {
            for host in &upstream.config.hosts {
                by_host.insert(host.clone(), upstream.clone());
            }
            address_hosts.extend(upstream.config.address_host.clone());
        }
        Self {
            by_host,
            address_hosts,
        }
    }

    /// Finds the upstream for a request, or returns the authority that
    /// matched nothing (`None` when the request names no host at all).
    pub fn find<B>(&self, request: &Request<B>) -> Result<&Arc<Upstream>, Option<String>> {
        let authority = match request.uri().authority() {
            Some(authority) => authority.as_str(),
            None => request
                .headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .ok_or(None)?,
        };
        self.lookup(authority)
            .ok_or_else(|| Some(authority.to_owned()))
    }

    fn lookup(&self, authority: &str) -> Option<&Arc<Upstream>> {
        let lowered;
        let authority = if authority.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = authority.to_ascii_lowercase();
            lowered.as_str()
        } else {
            authority
        };
        if let Some(upstream) = self.by_host.get(authority) {
            return Some(upstream);
        }
        let host = strip_port(authority);
        (host.len() != authority.len() && !self.address_hosts.contains(host))
            .then(|| self.by_host.get(host))
            .flatten()
    }
}

/// `host:port` to `host`, leaving IPv6 literals (`[::1]`) whole.
fn strip_port(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        Some((host, port))
            if !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!host.starts_with('[') || host.ends_with(']')) =>
        {
            host
        }
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_ports_but_not_ipv6_literals() {
        assert_eq!(strip_port("ocr:8080"), "ocr");
        assert_eq!(strip_port("ocr"), "ocr");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("ocr:"), "ocr:");
    }
}
