//! An upstream's `routes`: each one's match, checked and compiled, and its
//! policy blocks merged over the upstream's; a route that an earlier one
//! always takes first is an error.

use std::sync::Arc;

use http::{HeaderName, HeaderValue, Method};
use serde_saphyr::Spanned;

use super::check::{Checker, policy_warnings, valid_name};
use super::raw::{RawConfig, RawMatch, RawRoute, RawUpstream};
use super::upstream::{resolve_dead_letter, resolve_degradation};
use super::{DeadLetterPolicy, Protocol, RouteConfig};
use crate::matching::{PathMatch, RouteMatch};
use crate::resilience::fallback::{Criticality, Fallback};
use crate::resilience::faults::FaultSpec;
use crate::resilience::policy::RawPolicy;
use crate::values::Merge;

/// What a route inherits from its upstream when it does not say.
pub(super) struct Inherited<'a> {
    /// The upstream's policy fields, merged over `defaults`.
    pub policy: &'a RawPolicy,
    pub protocol: Protocol,
    pub jsonrpc: Option<crate::jsonrpc::Dialect>,
    pub criticality: Criticality,
    pub fallback: &'a Option<Arc<Fallback>>,
    pub faults: &'a Option<FaultSpec>,
    pub dead_letter: Option<DeadLetterPolicy>,
}

/// Every route of an upstream, in order.
pub(super) fn resolve_routes(
    check: &mut Checker,
    file: &str,
    raw: &RawConfig,
    up: &RawUpstream,
    inherited: &Inherited<'_>,
    prefix: &str,
) -> Vec<Arc<RouteConfig>> {
    let mut routes: Vec<Arc<RouteConfig>> = Vec::new();
    let mut names: Vec<&str> = Vec::new();
    for (i, route) in up.routes.iter().enumerate() {
        let field = format!("{prefix}.routes[{i}]");
        let before = check.diagnostics.len();
        let name = &route.value.name;
        if !valid_name(&name.value) {
            check.error(
                name,
                format!("{field}.name"),
                "a route name must be 1-63 characters of a-z, 0-9, '-', '_' or '.'",
            );
        } else if names.contains(&name.value.as_str()) {
            check.error(
                name,
                format!("{field}.name"),
                format!("another route of this upstream is named {:?}", name.value),
            );
        }
        names.push(&name.value);
        let matches = match &route.value.matches {
            Some(m) => resolve_match(check, m, inherited, &field),
            None => RouteMatch::default(),
        };
        if let Some(earlier) = routes.iter().find(|r| r.matches.covers(&matches)) {
            check.error(
                name,
                format!("{field}.match"),
                format!(
                    "route {:?} is never reached: route {:?} before it takes every request it matches; put the narrower route first",
                    name.value, earlier.name
                ),
            );
        }
        let resolved = resolve_route(check, file, raw, &route.value, inherited, &field);
        if check.diagnostics.len() == before {
            routes.push(Arc::new(RouteConfig {
                name: name.value.as_str().into(),
                matches,
                ..resolved
            }));
        }
    }
    routes
}

/// A route's policy blocks over its upstream's.
fn resolve_route(
    check: &mut Checker,
    file: &str,
    raw: &RawConfig,
    route: &RawRoute,
    inherited: &Inherited<'_>,
    field: &str,
) -> RouteConfig {
    if let Some(retry) = &route.retry
        && retry.value.hold_on_pushback.is_some()
    {
        check.error(
            retry,
            format!("{field}.retry.hold_on_pushback"),
            "an upstream's pushback holds all its calls: set hold_on_pushback on the upstream",
        );
    }
    let written = route.policy();
    let merged = written.clone().merge(inherited.policy);
    if merged.hedge.as_ref().is_some_and(|h| h.delay.is_none()) {
        check.error(
            &route.name,
            format!("{field}.hedge.delay"),
            "hedging needs a delay, such as 50ms",
        );
    }
    let mut policy = merged.resolve();
    policy.retry.idempotent = route.idempotent;
    policy_warnings(
        check,
        &route.name,
        field,
        &written,
        &policy,
        inherited.protocol,
        inherited.jsonrpc,
    );
    let criticality = route
        .criticality
        .as_ref()
        .map_or(inherited.criticality, |c| c.value);
    let fallback = match (&route.fallback, &route.criticality) {
        (None, None) => inherited.fallback.clone(),
        (None, Some(_)) if criticality == inherited.criticality => inherited.fallback.clone(),
        (fallback, _) => {
            resolve_degradation(check, file, fallback.as_ref(), criticality, field).map(Arc::new)
        }
    };
    if let Some(faults) = &route.faults
        && let Err(errors) = faults.value.resolve()
    {
        for (name, message) in errors {
            check.error(faults, format!("{field}.faults.{name}"), message);
        }
    }
    RouteConfig {
        name: Arc::from(""),
        matches: RouteMatch::default(),
        own_breaker: route.circuit_breaker.is_some(),
        policy,
        criticality,
        fallback,
        own_faults: route.faults.is_some(),
        faults: match &route.faults {
            Some(f) => Some(f.value.clone()),
            None => inherited.faults.clone(),
        },
        dead_letter: match &route.dead_letter {
            Some(d) => resolve_dead_letter(check, raw, Some(d), field),
            None => inherited.dead_letter,
        },
    }
}

/// A route's `match`, compiled.
fn resolve_match(
    check: &mut Checker,
    at: &Spanned<RawMatch>,
    inherited: &Inherited<'_>,
    field: &str,
) -> RouteMatch {
    let protocol = inherited.protocol;
    let raw = &at.value;
    let mut matches = RouteMatch::default();
    if let Some(path) = &raw.path {
        let p = &path.value;
        let at = format!("{field}.match.path");
        matches.path = match (&p.exact, &p.prefix, &p.regex) {
            (Some(exact), None, None) => {
                check_path(check, path, &at, exact).then(|| PathMatch::Exact(exact.clone()))
            }
            (None, Some(prefix), None) => {
                check_path(check, path, &at, prefix).then(|| PathMatch::prefix(prefix))
            }
            (None, None, Some(regex)) => PathMatch::regex(regex)
                .map_err(|why| check.error(path, format!("{at}.regex"), why))
                .ok(),
            _ => {
                check.error(
                    path,
                    at,
                    "give one of exact, prefix or regex, such as {prefix: /v1/}",
                );
                None
            }
        };
    }
    if let Some(grpc) = &raw.grpc {
        matches.path = resolve_grpc(check, grpc, raw.path.is_some(), protocol, field);
    }
    if let Some(jsonrpc) = &raw.jsonrpc {
        let method = &jsonrpc.value.method;
        if inherited.jsonrpc.is_none() {
            check.error(
                jsonrpc,
                format!("{field}.match.jsonrpc"),
                "a JSON-RPC match needs an upstream that speaks it: protocol: mcp, protocol: a2a or jsonrpc: true",
            );
        } else if method.is_empty() {
            check.error(
                jsonrpc,
                format!("{field}.match.jsonrpc.method"),
                "expected a method such as tools/call",
            );
        } else {
            matches.jsonrpc_method = Some(method.as_str().into());
        }
    }
    if let Some(method) = &raw.method {
        match Method::from_bytes(method.value.to_ascii_uppercase().as_bytes()) {
            Ok(m) => matches.method = Some(m),
            Err(_) => check.error(
                method,
                format!("{field}.match.method"),
                format!("{:?} is not an HTTP method", method.value),
            ),
        }
    }
    for (name, value) in &raw.headers.0 {
        let at = format!("{field}.match.headers.{}", name.value);
        match (
            HeaderName::from_bytes(name.value.as_bytes()),
            HeaderValue::from_str(&value.value),
        ) {
            (Ok(n), Ok(v)) => matches.headers.push((n, v)),
            (Err(_), _) => check.error(
                name,
                at,
                format!("{:?} is not a valid header name", name.value),
            ),
            (_, Err(_)) => check.error(value, at, "not a valid header value"),
        }
    }
    matches
}

/// A path as a route matches it: starting with `/`.
fn check_path<T>(check: &mut Checker, at: &Spanned<T>, field: &str, path: &str) -> bool {
    let ok = path.starts_with('/');
    if !ok {
        check.error(
            at,
            field,
            format!("{path:?} is not a path: a path starts with /"),
        );
    }
    ok
}

/// `match.grpc`: the path of a service's methods, or of one of them.
fn resolve_grpc(
    check: &mut Checker,
    grpc: &Spanned<super::raw::RawGrpcMatch>,
    has_path: bool,
    protocol: Protocol,
    field: &str,
) -> Option<PathMatch> {
    let at = format!("{field}.match.grpc");
    if protocol != Protocol::Grpc {
        check.error(
            grpc,
            at,
            "a gRPC match needs an upstream with protocol: grpc",
        );
        return None;
    }
    if has_path {
        check.error(
            grpc,
            at,
            "a gRPC service and method are a path: give grpc or path, not both",
        );
        return None;
    }
    let g = &grpc.value;
    let name = |s: &str| !s.is_empty() && !s.contains('/');
    if !name(&g.service) || g.method.as_deref().is_some_and(|m| !name(m)) {
        check.error(
            grpc,
            at,
            "expected a service such as pkg.v1.Invoices and a method such as Create, without slashes",
        );
        return None;
    }
    Some(match &g.method {
        Some(method) => PathMatch::Exact(format!("/{}/{method}", g.service)),
        None => PathMatch::prefix(&format!("/{}", g.service)),
    })
}
