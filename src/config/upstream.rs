//! The blocks of an upstream that reach outside the policy file: its TLS
//! (certificate files), its credentials (files, environment) and its
//! failover list (the other upstreams), each checked with the position of
//! what is wrong.

use std::collections::HashMap;

use http::header::{HeaderName, HeaderValue};
use http::uri::Authority;
use serde_saphyr::Spanned;

use super::check::{Checker, relative_to};
use super::raw::RawConfig;

/// Checks a `tls` block by building its client: the files it names are
/// read (relative to the policy file's directory) and must hold what they
/// should.
pub(super) fn resolve_tls(
    check: &mut Checker,
    file: &str,
    block: &Spanned<super::raw::RawTls>,
    address: &Authority,
    protocol: super::Protocol,
    prefix: &str,
) -> Option<crate::transport::tls::UpstreamTls> {
    use crate::transport::tls::{Tls, TlsParams, UpstreamTls};
    let raw = &block.value;
    let path = |p: &Option<String>| p.as_deref().map(|p| relative_to(file, p));
    let params = TlsParams {
        ca_file: path(&raw.ca_file),
        server_name: raw.server_name.clone(),
        client_cert_file: path(&raw.client_cert_file),
        client_key_file: path(&raw.client_key_file),
        insecure_skip_verify: raw.insecure_skip_verify,
    };
    if params.insecure_skip_verify && params.ca_file.is_some() {
        check.error(
            block,
            format!("{prefix}.tls.insecure_skip_verify"),
            "insecure_skip_verify ignores ca_file: give one or the other",
        );
        return None;
    }
    if params.insecure_skip_verify {
        tracing::warn!(field = %format!("{prefix}.tls"), "insecure_skip_verify: the upstream's certificate is not verified");
    }
    match Tls::new(&params, address.host(), protocol.is_http2()) {
        Ok(client) => Some(UpstreamTls { params, client }),
        Err(message) => {
            check.error(block, format!("{prefix}.tls"), message);
            None
        }
    }
}

/// Reads the headers an upstream's requests get (`request_headers`): a
/// value, a file's content (trimmed, as a Secret holds it) or an
/// environment variable.
pub(super) fn resolve_injected(
    check: &mut Checker,
    file: &str,
    raw: &super::raw::Entries<String, Spanned<super::raw::RawInjected>>,
    prefix: &str,
) -> Vec<super::InjectedHeader> {
    use super::raw::RawInjected;
    let mut headers = Vec::new();
    for (name, value) in &raw.0 {
        let field = format!("{prefix}.request_headers.{name}");
        let header = match HeaderName::from_bytes(name.as_bytes()) {
            Ok(h) if !crate::transport::headers::is_hop_by_hop(&h) && h != http::header::HOST => h,
            Ok(_) => {
                check.error(value, field, "this header is set by the sidecar itself");
                continue;
            }
            Err(_) => {
                check.error(value, field, format!("{name:?} is not a valid header name"));
                continue;
            }
        };
        let (text, source) = match &value.value {
            RawInjected::Value(text) => (Ok(text.clone()), "value".to_owned()),
            RawInjected::FromFile { from_file } => {
                let full = relative_to(file, from_file);
                let text = std::fs::read_to_string(&full)
                    .map(|t| t.trim().to_owned())
                    .map_err(|e| format!("cannot read {}: {e}", full.display()));
                (text, format!("from_file: {}", full.display()))
            }
            RawInjected::FromEnv { from_env } => {
                let text = std::env::var(from_env)
                    .map_err(|_| format!("the environment variable {from_env} is not set"));
                (text, format!("from_env: {from_env}"))
            }
        };
        match text.and_then(|t| {
            HeaderValue::from_str(&t).map_err(|_| "not a valid header value".to_owned())
        }) {
            Ok(mut value) => {
                value.set_sensitive(true);
                headers.push(super::InjectedHeader {
                    name: header,
                    value,
                    source,
                });
            }
            Err(message) => check.error(value, field, message),
        }
    }
    headers
}

/// Failover targets must be other upstreams of the file, and no chain may
/// come back to where it started.
pub(super) fn check_failover(check: &mut Checker, raw: &RawConfig) {
    let names: HashMap<&str, usize> = raw
        .upstreams
        .0
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (name.as_str(), i))
        .collect();
    for (name, up) in &raw.upstreams.0 {
        for (j, target) in up.failover.iter().enumerate() {
            let field = format!("upstreams.{name}.failover[{j}]");
            if target.value == *name {
                check.error(target, field, "an upstream cannot fail over to itself");
            } else if !names.contains_key(target.value.as_str()) {
                check.error(
                    target,
                    field,
                    format!("there is no upstream {:?} to fail over to", target.value),
                );
            } else if leads_back(raw, &names, &target.value, name) {
                check.error(
                    target,
                    field,
                    format!(
                        "failing over to {:?} comes back to {name:?}: a failover cycle",
                        target.value
                    ),
                );
            }
        }
    }
}

/// Whether the failover chains from `from` reach `to`.
fn leads_back(raw: &RawConfig, names: &HashMap<&str, usize>, from: &str, to: &str) -> bool {
    let mut seen = std::collections::HashSet::new();
    let mut todo = vec![from.to_owned()];
    while let Some(name) = todo.pop() {
        if name == to {
            return true;
        }
        if !seen.insert(name.clone()) {
            continue;
        }
        if let Some(&i) = names.get(name.as_str()) {
            todo.extend(
                raw.upstreams.0[i]
                    .1
                    .failover
                    .iter()
                    .map(|t| t.value.clone()),
            );
        }
    }
    false
}
