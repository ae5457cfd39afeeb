//! The blocks of an upstream that reach outside the policy file: its TLS
//! (certificate files), its credentials (files, environment) and its
//! failover list (the other upstreams), its fallback (a body file) and
//! its dead letters (the control plane), each checked with the position
//! of what is wrong.

use std::collections::HashMap;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{HeaderMap, StatusCode};
use serde_saphyr::Spanned;

use super::DeadLetterPolicy;
use super::check::{Checker, relative_to};
use super::raw::{RawConfig, RawFallback};
use crate::resilience::fallback::{Criticality, Fallback};

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
        check.warn(
            block,
            format!("{prefix}.tls.insecure_skip_verify"),
            "the upstream's certificate is not verified: for development only",
        );
    }
    match Tls::new(&params, address.host(), protocol.is_http2()) {
        Ok(client) => Some(UpstreamTls::new(params, client)),
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
        let header = match settable_header(name) {
            Ok(h) => h,
            Err(message) => {
                check.error(value, field, message);
                continue;
            }
        };
        let (text, source, path) = match &value.value {
            RawInjected::Value(text) => (Ok(text.clone()), "value".to_owned(), None),
            RawInjected::FromFile { from_file } => {
                let full = relative_to(file, from_file);
                let text = std::fs::read_to_string(&full)
                    .map(|t| t.trim().to_owned())
                    .map_err(|e| format!("cannot read {}: {e}", full.display()));
                (text, format!("from_file: {}", full.display()), Some(full))
            }
            RawInjected::FromEnv { from_env } => {
                let text = std::env::var(from_env)
                    .map_err(|_| format!("the environment variable {from_env} is not set"));
                (text, format!("from_env: {from_env}"), None)
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
                    file: path,
                });
            }
            Err(message) => check.error(value, field, message),
        }
    }
    headers
}

/// A header name the policy may set on requests: valid, and not one the
/// sidecar sets itself (hop-by-hop headers, `host`).
fn settable_header(name: &str) -> Result<HeaderName, String> {
    match HeaderName::from_bytes(name.as_bytes()) {
        Ok(h) if !crate::transport::headers::is_hop_by_hop(&h) && h != http::header::HOST => Ok(h),
        Ok(_) => Err("this header is set by the sidecar itself".to_owned()),
        Err(_) => Err(format!("{name:?} is not a valid header name")),
    }
}

/// Each upstream's failover list, in the order of `raw.upstreams`.
/// Targets must be other upstreams of the file, no chain may come back to
/// where it started, and a rewrite must be one that can be applied.
pub(super) fn resolve_failover(
    check: &mut Checker,
    raw: &RawConfig,
) -> Vec<Vec<super::FailoverTarget>> {
    let names: HashMap<&str, usize> = raw
        .upstreams
        .0
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (name.as_str(), i))
        .collect();
    let mut lists = Vec::with_capacity(raw.upstreams.0.len());
    for (name, up) in &raw.upstreams.0 {
        let mut list = Vec::new();
        for (j, entry) in up.failover.iter().enumerate() {
            let field = format!("upstreams.{name}.failover[{j}]");
            let target = &entry.value.upstream;
            let Some(&i) = names.get(target.as_str()) else {
                check.error(
                    entry,
                    field,
                    format!("there is no upstream {target:?} to fail over to"),
                );
                continue;
            };
            if target == name.as_str() {
                check.error(entry, field, "an upstream cannot fail over to itself");
                continue;
            }
            if leads_back(raw, &names, target, name) {
                check.error(
                    entry,
                    field,
                    format!("failing over to {target:?} comes back to {name:?}: a failover cycle"),
                );
                continue;
            }
            let grpc = raw.upstreams.0[i].1.protocol == Some(super::raw::RawProtocol::Grpc);
            let rewrite = entry
                .value
                .rewrite
                .as_ref()
                .and_then(|r| resolve_rewrite(check, r, grpc, &field));
            list.push(super::FailoverTarget {
                upstream: target.as_str().into(),
                rewrite,
            });
        }
        lists.push(list);
    }
    lists
}

/// Checks a failover target's `rewrite`: settable headers with valid
/// values; body fields only for a target that speaks JSON (not gRPC).
fn resolve_rewrite(
    check: &mut Checker,
    raw: &super::raw::RawRewrite,
    grpc: bool,
    field: &str,
) -> Option<std::sync::Arc<super::Rewrite>> {
    let before = check.diagnostics.len();
    let mut headers = Vec::new();
    for (name, value) in &raw.headers.0 {
        let at = format!("{field}.rewrite.headers.{}", name.value);
        match settable_header(&name.value) {
            Ok(header) => match HeaderValue::from_str(&value.value) {
                Ok(v) => headers.push((header, v)),
                Err(_) => check.error(value, at, "not a valid header value"),
            },
            Err(message) => check.error(name, at, message),
        }
    }
    let mut json_body = Vec::new();
    for (key, value) in &raw.json_body.0 {
        let at = format!("{field}.rewrite.json_body.{}", key.value);
        if grpc {
            check.error(
                key,
                at,
                "a gRPC upstream's requests have no JSON body to rewrite",
            );
        } else {
            json_body.push((key.value.clone(), value.to_string()));
        }
    }
    (check.diagnostics.len() == before && !(headers.is_empty() && json_body.is_empty()))
        .then(|| std::sync::Arc::new(super::Rewrite { headers, json_body }))
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
                    .map(|t| t.value.upstream.clone()),
            );
        }
    }
    false
}

/// An upstream's fallback: only an optional upstream has one (empty when
/// it declares none).
pub(super) fn resolve_degradation(
    check: &mut Checker,
    file: &str,
    fallback: Option<&Spanned<RawFallback>>,
    criticality: Criticality,
    prefix: &str,
) -> Option<Fallback> {
    match (fallback, criticality) {
        (Some(block), Criticality::Critical) => {
            check.error(
                block,
                format!("{prefix}.fallback"),
                "a critical upstream never degrades: set criticality: optional to use a fallback",
            );
            None
        }
        (Some(block), Criticality::Optional) => {
            resolve_fallback(check, file, &block.value, &format!("{prefix}.fallback"))
        }
        (None, Criticality::Optional) => Some(Fallback::default()),
        (None, Criticality::Critical) => None,
    }
}

/// An upstream's `dead_letter` block; it needs the control plane.
pub(super) fn resolve_dead_letter(
    check: &mut Checker,
    raw: &RawConfig,
    dead_letter: Option<&Spanned<super::raw::RawDeadLetter>>,
    prefix: &str,
) -> Option<DeadLetterPolicy> {
    let d = dead_letter.filter(|d| d.value.enabled)?;
    if raw.control_plane.is_none() {
        check.error(
            d,
            format!("{prefix}.dead_letter"),
            "dead letters go to the control plane: set control_plane.url",
        );
    }
    Some(DeadLetterPolicy {
        max_body: d
            .value
            .max_body
            .map_or(super::DEFAULT_DEAD_LETTER_MAX_BODY, |b| b.0),
        durable: d.value.durable,
    })
}

/// Checks a `fallback` block and reads its `body_file` (relative to the
/// policy file's directory).
fn resolve_fallback(
    check: &mut Checker,
    file: &str,
    raw: &RawFallback,
    prefix: &str,
) -> Option<Fallback> {
    let before = check.diagnostics.len();
    let headers = fallback_headers(check, raw, prefix);
    let body = fallback_body(check, file, raw, prefix);
    let status = match &raw.status {
        None if body.is_empty() => StatusCode::NO_CONTENT,
        None => StatusCode::OK,
        Some(code) => match StatusCode::from_u16(code.value) {
            Ok(status) if (200..600).contains(&code.value) => status,
            _ => {
                check.error(
                    code,
                    format!("{prefix}.status"),
                    format!("{} is not an HTTP status between 200 and 599", code.value),
                );
                StatusCode::OK
            }
        },
    };
    let message = match &raw.message_base64 {
        None => Bytes::new(),
        Some(text) => {
            use base64::Engine as _;
            match base64::engine::general_purpose::STANDARD.decode(text.value.trim()) {
                Ok(bytes) => Bytes::from(bytes),
                Err(e) => {
                    check.error(
                        text,
                        format!("{prefix}.message_base64"),
                        format!("not valid base64: {e}"),
                    );
                    Bytes::new()
                }
            }
        }
    };
    (check.diagnostics.len() == before).then(|| Fallback::new(status, headers, body, message))
}

/// A fallback's headers: valid, and none the sidecar sets itself.
fn fallback_headers(check: &mut Checker, raw: &RawFallback, prefix: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in &raw.headers.0 {
        let field = format!("{prefix}.headers.{name}");
        let Ok(header) = HeaderName::from_bytes(name.as_bytes()) else {
            check.error(value, field, format!("{name:?} is not a valid header name"));
            continue;
        };
        if header == CONTENT_LENGTH || crate::transport::headers::is_hop_by_hop(&header) {
            check.error(
                value,
                field,
                "this header is set by the sidecar, not by a fallback",
            );
            continue;
        }
        match HeaderValue::from_str(&value.value) {
            Ok(v) => {
                headers.append(header, v);
            }
            Err(_) => check.error(value, field, "not a valid header value"),
        }
    }
    headers
}

/// A fallback's body: `body`, or the bytes of `body_file`, not both.
fn fallback_body(check: &mut Checker, file: &str, raw: &RawFallback, prefix: &str) -> Bytes {
    match (&raw.body, &raw.body_file) {
        (Some(_), Some(path)) => {
            check.error(
                path,
                format!("{prefix}.body_file"),
                "give either body or body_file, not both",
            );
            Bytes::new()
        }
        (Some(text), None) => Bytes::from(text.clone()),
        (None, Some(path)) => {
            let full = relative_to(file, &path.value);
            match std::fs::read(&full) {
                Ok(bytes) => Bytes::from(bytes),
                Err(e) => {
                    check.error(
                        path,
                        format!("{prefix}.body_file"),
                        format!("cannot read {}: {e}", full.display()),
                    );
                    Bytes::new()
                }
            }
        }
        (None, None) => Bytes::new(),
    }
}
