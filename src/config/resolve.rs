//! From the raw model to a validated [`Config`]: the checks serde cannot
//! express (addresses, ports, host claims), all reported with the
//! position of the offending value.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{HeaderMap, StatusCode};
use serde_saphyr::Spanned;

use super::check::{
    Checker, check_listens, parse_address, parse_host, relative_to, unit, valid_name,
};
use super::raw::{RawConfig, RawFallback};
use super::upstream::{resolve_failover, resolve_injected, resolve_tls};
use super::{
    AdminConfig, Config, ConfigError, ControlPlaneConfig, DEFAULT_ADMIN_LISTEN,
    DEFAULT_PROXY_LISTEN, DeadLetterPolicy, DeadLettersConfig, ProxyConfig, UpstreamConfig,
};
use crate::resilience::fallback::{Criticality, Fallback};
use crate::resilience::faults::FaultSpec;
use crate::values::Merge;

/// An upstream being resolved.
struct Pending {
    name: Spanned<String>,
    address: Option<Authority>,
    protocol: super::Protocol,
    listen: Option<SocketAddr>,
    /// Explicit claims first: the name, then `hosts`.
    hosts: Vec<String>,
    policy: crate::resilience::policy::Policy,
    criticality: Criticality,
    fallback: Option<Arc<Fallback>>,
    faults: Option<FaultSpec>,
    dead_letter: Option<DeadLetterPolicy>,
    tls: Option<crate::transport::tls::UpstreamTls>,
    request_headers: Vec<super::InjectedHeader>,
}

/// Validates the raw model and resolves it into the runtime [`Config`].
pub(super) fn resolve(file: &str, raw: RawConfig) -> Result<Config, ConfigError> {
    let mut check = Checker::default();
    let admin = check.listen(
        raw.admin.as_ref().and_then(|b| b.listen.as_ref()),
        "admin.listen",
        DEFAULT_ADMIN_LISTEN,
    );
    let proxy = check.listen(
        raw.proxy.as_ref().and_then(|b| b.listen.as_ref()),
        "proxy.listen",
        DEFAULT_PROXY_LISTEN,
    );
    let probes = raw
        .admin
        .as_ref()
        .and_then(|b| b.probes_listen.as_ref())
        .and_then(|s| Some((check.socket_addr(s, "admin.probes_listen")?, Some(unit(s)))));
    let mut listens: Vec<(SocketAddr, String, Option<Spanned<()>>)> = Vec::new();
    for (addr, field) in [
        (&admin, "admin.listen"),
        (&proxy, "proxy.listen"),
        (&probes, "admin.probes_listen"),
    ] {
        if let Some((addr, at)) = addr {
            listens.push((*addr, field.to_owned(), at.clone()));
        }
    }
    let pending: Vec<Pending> = (0..raw.upstreams.0.len())
        .map(|i| resolve_upstream(&mut check, file, &raw, i, &mut listens))
        .collect();
    check_listens(&mut check, &listens);
    let control_plane = raw.control_plane.as_ref().and_then(|c| {
        let url = &c.value.url;
        let has_authority = url
            .value
            .parse::<http::Uri>()
            .is_ok_and(|uri| uri.authority().is_some());
        match crate::api::check_url(&url.value) {
            Err(why) if has_authority => {
                check.error(url, "control_plane.url", why);
                None
            }
            Ok(()) if has_authority => {
                let ca_file = c.value.ca_file.as_ref().map(|f| relative_to(file, f));
                // Reads the CA file: a bad one is an error of the file.
                let channel = crate::transport::channel::ControlChannel::new(
                    &url.value,
                    ca_file.as_deref(),
                    std::time::Duration::from_secs(5),
                    None,
                );
                let letter_key_file = c
                    .value
                    .letter_key_file
                    .as_ref()
                    .map(|f| relative_to(file, f));
                // Read now, so that a short or missing key is an error of
                // the file, not of the first dead letter.
                let key = letter_key_file
                    .as_deref()
                    .map(crate::api::seal::LetterKey::read)
                    .transpose();
                let token_file = c.value.token_file.as_ref().map(|f| relative_to(file, f));
                // A token missing now may be mounted later (a Secret): the
                // sidecar starts and reads it again at each delivery.
                if let Some(Err(why)) = token_file.as_deref().map(crate::api::token::read) {
                    check.warn(
                        url,
                        "control_plane.token_file",
                        format!("{why}; dead letters wait in the spool until it can be read"),
                    );
                }
                match (channel, key) {
                    (Ok(_), Ok(_)) => Some(ControlPlaneConfig {
                        url: url.value.clone(),
                        token_file,
                        ca_file,
                        letter_key_file,
                    }),
                    (Err(why), _) => {
                        check.error(url, "control_plane.ca_file", why);
                        None
                    }
                    (_, Err(why)) => {
                        check.error(url, "control_plane.letter_key_file", why);
                        None
                    }
                }
            }
            _ => {
                check.error(
                    url,
                    "control_plane.url",
                    format!("invalid URL {:?}: expected http://host:port", url.value),
                );
                None
            }
        }
    });
    let dead_letters = resolve_dead_letters(&mut check, file, raw.dead_letters.as_ref());
    check_claims(&mut check, &raw, &pending);
    let failovers = resolve_failover(&mut check, &raw);
    let implicit = implicit_hosts(&mut check, &pending);

    if !check.diagnostics.is_empty() {
        check.diagnostics.sort_by_key(|d| (d.line, d.column));
        return Err(ConfigError {
            file: file.to_owned(),
            diagnostics: check.diagnostics,
        });
    }
    let mut upstreams: Vec<Arc<UpstreamConfig>> = pending
        .into_iter()
        .zip(implicit)
        .zip(failovers)
        .map(|((mut p, (mut extra, address_host)), failover)| {
            extra.sort();
            p.hosts.extend(extra);
            Arc::new(UpstreamConfig {
                name: Arc::from(p.name.value.as_str()),
                address: p.address.expect("checked above"),
                protocol: p.protocol,
                listen: p.listen,
                hosts: p.hosts,
                address_host,
                policy: p.policy,
                criticality: p.criticality,
                fallback: p.fallback,
                faults: p.faults,
                dead_letter: p.dead_letter,
                tls: p.tls,
                request_headers: p.request_headers,
                failover,
            })
        })
        .collect();
    upstreams.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Config {
        source: file.to_owned(),
        admin: AdminConfig {
            listen: admin.expect("checked above").0,
            probes_listen: probes.map(|p| p.0),
        },
        proxy: ProxyConfig {
            listen: proxy.expect("checked above").0,
            header_read_timeout: raw
                .proxy
                .as_ref()
                .and_then(|p| p.header_read_timeout)
                .map_or(super::DEFAULT_HEADER_READ_TIMEOUT, |h| h.0),
            max_connections: raw
                .proxy
                .as_ref()
                .and_then(|p| p.max_connections)
                .map(std::num::NonZeroU32::get),
            idle_timeout: match raw.proxy.as_ref().and_then(|p| p.idle_timeout) {
                None => Some(crate::transport::server::IDLE_TIMEOUT),
                Some(h) => Some(h.0).filter(|d| !d.is_zero()),
            },
        },
        upstreams,
        control_plane,
        dead_letters,
        intercept: super::InterceptConfig {
            unmatched: raw
                .intercept
                .as_ref()
                .and_then(|i| i.unmatched)
                .unwrap_or_default(),
        },
        warnings: {
            check.warnings.sort_by_key(|d| (d.line, d.column));
            check.warnings
        },
    })
}

fn resolve_dead_letters(
    check: &mut Checker,
    file: &str,
    raw: Option<&super::raw::RawDeadLetters>,
) -> DeadLettersConfig {
    let mut redact_headers = Vec::new();
    for (i, name) in raw
        .map(|r| r.redact_headers.as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        match HeaderName::from_bytes(name.value.as_bytes()) {
            Ok(header) => redact_headers.push(header.as_str().to_owned()),
            Err(_) => check.error(
                name,
                format!("dead_letters.redact_headers[{i}]"),
                format!("{:?} is not a valid header name", name.value),
            ),
        }
    }
    DeadLettersConfig {
        spool_dir: raw.and_then(|r| r.spool_dir.as_deref()).map_or_else(
            || std::env::temp_dir().join("breakwater-spool"),
            |d| relative_to(file, d),
        ),
        max_spool_bytes: raw
            .and_then(|r| r.max_spool_bytes)
            .map_or(super::DEFAULT_MAX_SPOOL_BYTES, |b| b.0),
        redact_headers,
    }
}

/// Checks and resolves the `i`th upstream, recording its listener.
fn resolve_upstream(
    check: &mut Checker,
    file: &str,
    raw: &RawConfig,
    i: usize,
    listens: &mut Vec<(SocketAddr, String, Option<Spanned<()>>)>,
) -> Pending {
    let (name, up) = &raw.upstreams.0[i];
    let at = &raw.upstream_names[i];
    let name = Spanned {
        value: name.clone(),
        referenced: at.referenced,
        defined: at.defined,
    };
    let prefix = format!("upstreams.{}", name.value);
    if !valid_name(&name.value) {
        check.error(
            &name,
            &prefix,
            "an upstream name must be 1-63 characters of a-z, 0-9, '-', '_' or '.'",
        );
    }
    let address = parse_address(&up.address.value)
        .map_err(|why| check.error(&up.address, format!("{prefix}.address"), why))
        .ok();
    let listen = up.listen.as_ref().and_then(|l| {
        let field = format!("{prefix}.listen");
        let addr = check.socket_addr(l, &field)?;
        listens.push((addr, field, Some(unit(l))));
        Some(addr)
    });
    let mut hosts = vec![name.value.to_ascii_lowercase()];
    for (h, host) in up.hosts.iter().enumerate() {
        match parse_host(&host.value) {
            Ok(host) => hosts.push(host),
            Err(why) => check.error(host, format!("{prefix}.hosts[{h}]"), why),
        }
    }
    let policy = up.policy().merge(&raw.defaults);
    if policy.hedge.as_ref().is_some_and(|h| h.delay.is_none()) {
        check.error(
            &name,
            format!("{prefix}.hedge.delay"),
            "hedging needs a delay, such as 50ms",
        );
    }
    let criticality = up.criticality.as_ref().map(|c| c.value).unwrap_or_default();
    let fallback = resolve_degradation(check, file, up, criticality, &prefix);
    let dead_letter = resolve_dead_letter(check, raw, up, &prefix);
    if let Some(faults) = &up.faults
        && let Err(errors) = faults.value.resolve()
    {
        for (field, message) in errors {
            check.error(faults, format!("{prefix}.faults.{field}"), message);
        }
    }
    let protocol = up.protocol.unwrap_or_default();
    let resolved = policy.resolve();
    super::check::policy_warnings(check, &name, &prefix, &policy, &resolved, protocol);
    let tls = match (&up.tls, &address) {
        (Some(block), Some(address)) => resolve_tls(check, file, block, address, protocol, &prefix),
        _ => None,
    };
    let request_headers = resolve_injected(check, file, &up.request_headers, &prefix);
    Pending {
        request_headers,
        tls,
        dead_letter,
        faults: up.faults.as_ref().map(|f| f.value.clone()),
        address,
        protocol,
        listen,
        hosts,
        policy: resolved,
        criticality,
        fallback: fallback.map(Arc::new),
        name,
    }
}

/// An upstream's fallback: only an optional upstream has one (empty when
/// it declares none).
fn resolve_degradation(
    check: &mut Checker,
    file: &str,
    up: &super::raw::RawUpstream,
    criticality: Criticality,
    prefix: &str,
) -> Option<Fallback> {
    match (&up.fallback, criticality) {
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
fn resolve_dead_letter(
    check: &mut Checker,
    raw: &RawConfig,
    up: &super::raw::RawUpstream,
    prefix: &str,
) -> Option<DeadLetterPolicy> {
    let d = up.dead_letter.as_ref().filter(|d| d.value.enabled)?;
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
    let body = match (&raw.body, &raw.body_file) {
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
    };
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

/// Names and `hosts` are explicit claims on the shared port: two upstreams
/// may not claim one name.
fn check_claims(check: &mut Checker, raw: &RawConfig, pending: &[Pending]) {
    let mut owners: HashMap<&str, usize> = HashMap::new();
    for (i, p) in pending.iter().enumerate() {
        for (h, host) in p.hosts.iter().enumerate() {
            match owners.get(host.as_str()) {
                Some(&owner) if owner != i => {
                    let other = &pending[owner].name.value;
                    let (at, field) = if h == 0 {
                        (unit(&p.name), format!("upstreams.{}", p.name.value))
                    } else {
                        let entry = &raw.upstreams.0[i].1.hosts[h - 1];
                        (
                            unit(entry),
                            format!("upstreams.{}.hosts[{}]", p.name.value, h - 1),
                        )
                    };
                    check.error(
                        &at,
                        field,
                        format!("host {host:?} is already routed to upstream {other:?}"),
                    );
                }
                Some(_) => {}
                None => {
                    owners.insert(host, i);
                }
            }
        }
    }
}

/// An address's `host:port` and bare host are implicit claims: routed only
/// where no other upstream claims them, explicitly or implicitly. Each
/// upstream's, with its bare host among them when it has it (which routes
/// only an authority without a port). A bare host two upstreams share is
/// routed to neither, and `check` warns of it.
fn implicit_hosts(check: &mut Checker, pending: &[Pending]) -> Vec<(Vec<String>, Option<String>)> {
    let explicit: std::collections::HashSet<&str> = pending
        .iter()
        .flat_map(|p| p.hosts.iter().map(String::as_str))
        .collect();
    let mut implicit: HashMap<String, Option<usize>> = HashMap::new();
    for (i, p) in pending.iter().enumerate() {
        let Some(address) = &p.address else { continue };
        for key in [
            address.as_str().to_ascii_lowercase(),
            address.host().to_ascii_lowercase(),
        ] {
            if explicit.contains(key.as_str()) {
                continue;
            }
            implicit
                .entry(key)
                .and_modify(|owner| {
                    if *owner != Some(i) {
                        *owner = None;
                    }
                })
                .or_insert(Some(i));
        }
    }
    let mut hosts = vec![(Vec::new(), None); pending.len()];
    let mut shared: Vec<&str> = Vec::new();
    for (key, owner) in &implicit {
        match owner {
            Some(i) => {
                let address = pending[*i]
                    .address
                    .as_ref()
                    .expect("owners have an address");
                if key.eq_ignore_ascii_case(address.host()) {
                    hosts[*i].1 = Some(key.clone());
                }
                hosts[*i].0.push(key.clone());
            }
            None => shared.push(key),
        }
    }
    shared.sort_unstable();
    for key in shared {
        let sharing: Vec<&Pending> = pending
            .iter()
            .filter(|p| {
                p.address
                    .as_ref()
                    .is_some_and(|a| a.host().eq_ignore_ascii_case(key))
            })
            .collect();
        if let [first, .., last] = sharing.as_slice() {
            check.warn(
                &last.name,
                format!("upstreams.{}.address", last.name.value),
                format!(
                    "{key} is the host of upstream {}'s address too, so neither is routed by {key} alone (only by its host:port); name one in its hosts to route {key} to it",
                    first.name.value
                ),
            );
        }
    }
    hosts
}
