//! From the raw model to a validated [`Config`]: the checks serde cannot
//! express (addresses, ports, host claims), all reported with the
//! position of the offending value.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::HeaderName;
use http::uri::Authority;
use serde_saphyr::Spanned;

use super::check::{
    Checker, check_listens, parse_address, parse_host, relative_to, unit, valid_name,
};
use super::raw::{RawConfig, RawControlPlane};
use super::upstream::{
    resolve_dead_letter, resolve_degradation, resolve_failover, resolve_injected, resolve_tls,
};
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
    jsonrpc: Option<crate::jsonrpc::Dialect>,
    listen: Option<SocketAddr>,
    /// Explicit claims first: the name, then `hosts`.
    hosts: Vec<String>,
    sni: Vec<String>,
    policy: crate::resilience::policy::Policy,
    criticality: Criticality,
    fallback: Option<Arc<Fallback>>,
    faults: Option<FaultSpec>,
    dead_letter: Option<DeadLetterPolicy>,
    tls: Option<crate::transport::tls::UpstreamTls>,
    request_headers: Vec<super::InjectedHeader>,
    routes: Vec<Arc<super::RouteConfig>>,
}

/// A listener's address, and where the file sets it (`None`: the default).
type Listen = Option<(SocketAddr, Option<Spanned<()>>)>;

/// Every listener the file asks for, with its field, to check for clashes.
type Listens = Vec<(SocketAddr, String, Option<Spanned<()>>)>;

/// Validates the raw model and resolves it into the runtime [`Config`].
pub(super) fn resolve(file: &str, raw: RawConfig) -> Result<Config, ConfigError> {
    let mut check = Checker::default();
    let (admin, proxy, probes, mut listens) = resolve_listens(&mut check, &raw);
    let pending: Vec<Pending> = (0..raw.upstreams.0.len())
        .map(|i| resolve_upstream(&mut check, file, &raw, i, &mut listens))
        .collect();
    check_listens(&mut check, &listens);
    let control_plane = raw
        .control_plane
        .as_ref()
        .and_then(|c| resolve_control_plane(&mut check, file, &c.value));
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
    check.warnings.sort_by_key(|d| (d.line, d.column));
    Ok(Config {
        source: file.to_owned(),
        admin: AdminConfig {
            listen: admin.expect("checked above").0,
            probes_listen: probes.map(|p| p.0),
        },
        proxy: resolve_proxy(&raw, proxy.expect("checked above").0),
        upstreams: finish_upstreams(pending, implicit, failovers),
        control_plane,
        dead_letters,
        intercept: super::InterceptConfig {
            unmatched: raw
                .intercept
                .as_ref()
                .and_then(|i| i.unmatched)
                .unwrap_or_default(),
        },
        warnings: check.warnings,
    })
}

/// The admin, proxy and probes listeners, and the list of all three that
/// the upstreams' own listeners join.
fn resolve_listens(check: &mut Checker, raw: &RawConfig) -> (Listen, Listen, Listen, Listens) {
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
    let mut listens = Vec::new();
    for (addr, field) in [
        (&admin, "admin.listen"),
        (&proxy, "proxy.listen"),
        (&probes, "admin.probes_listen"),
    ] {
        if let Some((addr, at)) = addr {
            listens.push((*addr, field.to_owned(), at.clone()));
        }
    }
    (admin, proxy, probes, listens)
}

/// The shared port's settings.
fn resolve_proxy(raw: &RawConfig, listen: SocketAddr) -> ProxyConfig {
    let proxy = raw.proxy.as_ref();
    ProxyConfig {
        listen,
        header_read_timeout: proxy
            .and_then(|p| p.header_read_timeout)
            .map_or(super::DEFAULT_HEADER_READ_TIMEOUT, |h| h.0),
        max_connections: proxy
            .and_then(|p| p.max_connections)
            .map(std::num::NonZeroU32::get),
        idle_timeout: match proxy.and_then(|p| p.idle_timeout) {
            None => Some(crate::transport::server::IDLE_TIMEOUT),
            Some(h) => Some(h.0).filter(|d| !d.is_zero()),
        },
    }
}

/// The `control_plane` block: its URL, and the files it names, read now so
/// that a bad CA or letter key is an error of the file, not of the first
/// dead letter.
fn resolve_control_plane(
    check: &mut Checker,
    file: &str,
    c: &RawControlPlane,
) -> Option<ControlPlaneConfig> {
    let url = &c.url;
    let has_authority = url
        .value
        .parse::<http::Uri>()
        .is_ok_and(|uri| uri.authority().is_some());
    match crate::api::check_url(&url.value) {
        Ok(()) if has_authority => {}
        Err(why) if has_authority => {
            check.error(url, "control_plane.url", why);
            return None;
        }
        _ => {
            check.error(
                url,
                "control_plane.url",
                format!("invalid URL {:?}: expected http://host:port", url.value),
            );
            return None;
        }
    }
    let ca_file = c.ca_file.as_ref().map(|f| relative_to(file, f));
    let channel = crate::transport::channel::ControlChannel::new(
        &url.value,
        ca_file.as_deref(),
        std::time::Duration::from_secs(5),
        None,
    );
    let letter_key_file = c.letter_key_file.as_ref().map(|f| relative_to(file, f));
    let key = letter_key_file
        .as_deref()
        .map(crate::api::seal::LetterKey::read)
        .transpose();
    let token_file = c.token_file.as_ref().map(|f| relative_to(file, f));
    // A token missing now may be mounted later (a Secret): the sidecar
    // starts and reads it again at each delivery.
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

/// The checked upstreams with their implicit claims and failover lists,
/// sorted by name.
fn finish_upstreams(
    pending: Vec<Pending>,
    implicit: Vec<(Vec<String>, Option<String>)>,
    failovers: Vec<Vec<super::FailoverTarget>>,
) -> Vec<Arc<UpstreamConfig>> {
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
                jsonrpc: p.jsonrpc,
                listen: p.listen,
                hosts: p.hosts,
                address_host,
                sni: p.sni,
                policy: p.policy,
                criticality: p.criticality,
                fallback: p.fallback,
                faults: p.faults,
                dead_letter: p.dead_letter,
                tls: p.tls,
                request_headers: p.request_headers,
                failover,
                routes: p.routes,
            })
        })
        .collect();
    upstreams.sort_by(|a, b| a.name.cmp(&b.name));
    upstreams
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
    let hosts = resolve_hosts(check, &name.value, up, &prefix);
    let sni = resolve_sni(check, up, &prefix);
    let (protocol, jsonrpc) = resolve_protocol(check, up, &prefix);
    let merged = up.policy().merge(&raw.defaults);
    let policy = resolve_policy(check, &merged, &name, protocol, jsonrpc, &prefix);
    let criticality = up.criticality.as_ref().map(|c| c.value).unwrap_or_default();
    let fallback =
        resolve_degradation(check, file, up.fallback.as_ref(), criticality, &prefix).map(Arc::new);
    let dead_letter = resolve_dead_letter(check, raw, up.dead_letter.as_ref(), &prefix);
    if let Some(faults) = &up.faults
        && let Err(errors) = faults.value.resolve()
    {
        for (field, message) in errors {
            check.error(faults, format!("{prefix}.faults.{field}"), message);
        }
    }
    let tls = match (&up.tls, &address) {
        (Some(block), Some(address)) => resolve_tls(check, file, block, address, protocol, &prefix),
        _ => None,
    };
    let request_headers = resolve_injected(check, file, &up.request_headers, &prefix);
    let faults = up.faults.as_ref().map(|f| f.value.clone());
    let inherited = super::routes::Inherited {
        policy: &merged,
        protocol,
        jsonrpc,
        criticality,
        fallback: &fallback,
        faults: &faults,
        dead_letter,
    };
    let routes = super::routes::resolve_routes(check, file, raw, up, &inherited, &prefix);
    Pending {
        routes,
        request_headers,
        tls,
        dead_letter,
        faults,
        address,
        protocol,
        jsonrpc,
        listen,
        hosts,
        sni,
        policy,
        criticality,
        fallback,
        name,
    }
}

/// An upstream's transport and, if it speaks one, its JSON-RPC protocol:
/// `protocol: mcp` and `protocol: a2a` are JSON-RPC over HTTP/1.1;
/// `jsonrpc: true` is plain JSON-RPC over `http1` or `http2`.
fn resolve_protocol(
    check: &mut Checker,
    up: &super::raw::RawUpstream,
    prefix: &str,
) -> (super::Protocol, Option<crate::jsonrpc::Dialect>) {
    use super::Protocol;
    use super::raw::RawProtocol;
    use crate::jsonrpc::Dialect;
    let (protocol, dialect) = match up.protocol.unwrap_or(RawProtocol::Http1) {
        RawProtocol::Http1 => (Protocol::Http1, None),
        RawProtocol::Http2 => (Protocol::Http2, None),
        RawProtocol::Grpc => (Protocol::Grpc, None),
        RawProtocol::Mcp => (Protocol::Http1, Some(Dialect::Mcp)),
        RawProtocol::A2a => (Protocol::Http1, Some(Dialect::A2a)),
    };
    match &up.jsonrpc {
        Some(on) if on.value && dialect.is_some() => {
            check.error(
                on,
                format!("{prefix}.jsonrpc"),
                "this protocol is JSON-RPC already: remove jsonrpc",
            );
            (protocol, dialect)
        }
        Some(on) if on.value && protocol == Protocol::Grpc => {
            check.error(
                on,
                format!("{prefix}.jsonrpc"),
                "a gRPC upstream does not speak JSON-RPC: use protocol http1 or http2",
            );
            (protocol, None)
        }
        Some(on) if on.value => (protocol, Some(Dialect::Jsonrpc)),
        _ => (protocol, dialect),
    }
}

/// An upstream's explicit claims: its name, then its `hosts`.
fn resolve_hosts(
    check: &mut Checker,
    name: &str,
    up: &super::raw::RawUpstream,
    prefix: &str,
) -> Vec<String> {
    let mut hosts = vec![name.to_ascii_lowercase()];
    for (h, host) in up.hosts.iter().enumerate() {
        match parse_host(&host.value) {
            Ok(host) => hosts.push(host),
            Err(why) => check.error(host, format!("{prefix}.hosts[{h}]"), why),
        }
    }
    hosts
}

/// An upstream's `sni`: host names, without a port.
fn resolve_sni(check: &mut Checker, up: &super::raw::RawUpstream, prefix: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (i, name) in up.sni.iter().enumerate() {
        match parse_host(&name.value) {
            Ok(host) if !host.contains(':') => names.push(host.trim_end_matches('.').to_owned()),
            _ => check.error(
                name,
                format!("{prefix}.sni[{i}]"),
                format!("invalid server name {:?}: expected a host name such as api.example.com, without a port", name.value),
            ),
        }
    }
    names
}

/// An upstream's policy merged over the defaults, checked, and
/// warned of where it can never apply.
fn resolve_policy(
    check: &mut Checker,
    policy: &crate::resilience::policy::RawPolicy,
    name: &Spanned<String>,
    protocol: super::Protocol,
    jsonrpc: Option<crate::jsonrpc::Dialect>,
    prefix: &str,
) -> crate::resilience::policy::Policy {
    if policy.hedge.as_ref().is_some_and(|h| h.delay.is_none()) {
        check.error(
            name,
            format!("{prefix}.hedge.delay"),
            "hedging needs a delay, such as 50ms",
        );
    }
    let resolved = policy.resolve();
    super::check::policy_warnings(check, name, prefix, policy, &resolved, protocol, jsonrpc);
    resolved
}

/// Names and `hosts` are explicit claims on the shared port: two upstreams
/// may not claim one name, nor one server name.
fn check_claims(check: &mut Checker, raw: &RawConfig, pending: &[Pending]) {
    let mut sni: HashMap<&str, &str> = HashMap::new();
    for (i, p) in pending.iter().enumerate() {
        for (n, name) in p.sni.iter().enumerate() {
            if let Some(other) = sni.insert(name, &p.name.value)
                && other != p.name.value
            {
                check.error(
                    &raw.upstreams.0[i].1.sni[n],
                    format!("upstreams.{}.sni[{n}]", p.name.value),
                    format!("server name {name:?} is already routed to upstream {other:?}"),
                );
            }
        }
    }
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
