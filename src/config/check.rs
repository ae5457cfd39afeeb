//! The checks of a policy file's values that serde cannot express: listen
//! addresses and their ports, upstream addresses, names and hosts, each
//! problem collected with its position.

use std::net::SocketAddr;
use std::path::Path;

use http::uri::Authority;
use serde_saphyr::Spanned;

use super::{Diagnostic, Protocol};
use crate::classify::Condition;
use crate::resilience::policy::{Policy, RawPolicy};

/// Collects diagnostics while resolving, so that one run reports them all.
#[derive(Default)]
pub(super) struct Checker {
    pub(super) diagnostics: Vec<Diagnostic>,
    /// What is valid but cannot do what the user meant.
    pub(super) warnings: Vec<Diagnostic>,
}

impl Checker {
    pub(super) fn error<T>(
        &mut self,
        at: &Spanned<T>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.diagnostics.push(diagnostic(at, field, message));
    }

    pub(super) fn warn<T>(
        &mut self,
        at: &Spanned<T>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.warnings.push(diagnostic(at, field, message));
    }

    pub(super) fn listen(
        &mut self,
        listen: Option<&Spanned<String>>,
        field: &str,
        default: &str,
    ) -> Option<(SocketAddr, Option<Spanned<()>>)> {
        match listen {
            None => Some((default.parse().expect("default listen address"), None)),
            Some(s) => self.socket_addr(s, field).map(|a| (a, Some(unit(s)))),
        }
    }

    pub(super) fn socket_addr(&mut self, s: &Spanned<String>, field: &str) -> Option<SocketAddr> {
        match s.value.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.error(
                    s,
                    field,
                    format!(
                        "invalid listen address {:?}: expected ip:port, such as 127.0.0.1:15001",
                        s.value
                    ),
                );
                None
            }
        }
    }
}

fn diagnostic<T>(
    at: &Spanned<T>,
    field: impl Into<String>,
    message: impl Into<String>,
) -> Diagnostic {
    Diagnostic {
        line: at.referenced.line(),
        column: at.referenced.column(),
        field: field.into(),
        message: message.into(),
    }
}

pub(super) fn unit<T>(s: &Spanned<T>) -> Spanned<()> {
    Spanned {
        value: (),
        referenced: s.referenced,
        defined: s.defined,
    }
}

/// Two listeners may not share a port (port 0 asks for any free port, so it
/// never conflicts).
pub(super) fn check_listens(
    check: &mut Checker,
    listens: &[(SocketAddr, String, Option<Spanned<()>>)],
) {
    for (i, (addr, field, at)) in listens.iter().enumerate() {
        if addr.port() == 0 {
            continue;
        }
        let clash = listens[..i].iter().find(|(other, ..)| {
            other.port() == addr.port()
                && (other.ip() == addr.ip()
                    || other.ip().is_unspecified()
                    || addr.ip().is_unspecified())
        });
        if let Some((_, other_field, _)) = clash {
            let message = format!("port {} is already used by {other_field}", addr.port());
            match at {
                Some(at) => check.error(at, field.clone(), message),
                None => check.diagnostics.push(Diagnostic {
                    line: 0,
                    column: 0,
                    field: field.clone(),
                    message,
                }),
            }
        }
    }
}

pub(super) fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
}

/// Parses an upstream address: `host:port`, nothing else.
pub(super) fn parse_address(text: &str) -> Result<Authority, String> {
    let hint = "expected host:port, such as ocr-agent:8080";
    if text.contains("://") {
        return Err(format!(
            "invalid address {text:?}: {hint}, without a scheme"
        ));
    }
    let authority: Authority = text
        .parse()
        .map_err(|_| format!("invalid address {text:?}: {hint}"))?;
    if text.contains('@') || authority.host().is_empty() {
        return Err(format!("invalid address {text:?}: {hint}"));
    }
    if authority.port_u16().is_none_or(|p| p == 0) {
        return Err(format!("address {text:?} has no port: {hint}"));
    }
    Ok(authority)
}

/// Parses a name routed on the shared port: a host, optionally with a port.
pub(super) fn parse_host(text: &str) -> Result<String, String> {
    let valid = !text.is_empty()
        && !text.contains('@')
        && !text.contains('/')
        && text.parse::<Authority>().is_ok();
    if valid {
        Ok(text.to_ascii_lowercase())
    } else {
        Err(format!(
            "invalid host {text:?}: expected a host name, optionally with a port"
        ))
    }
}

/// A path from the policy file, relative to the file's directory.
pub(super) fn relative_to(file: &str, path: &str) -> std::path::PathBuf {
    Path::new(file).parent().unwrap_or(Path::new("")).join(path)
}

/// Warns of policy settings that are valid but can never take effect:
/// retry and breaker conditions no answer of this upstream can match, a
/// per-try timeout the overall timeout always beats.
pub(super) fn policy_warnings<T>(
    check: &mut Checker,
    at: &Spanned<T>,
    prefix: &str,
    written: &RawPolicy,
    policy: &Policy,
    protocol: Protocol,
    jsonrpc: Option<crate::jsonrpc::Dialect>,
) {
    let per_try = policy
        .per_try_timeout
        .filter(|per_try| *per_try < policy.timeout);
    if let Some(per_try) = policy.per_try_timeout
        && per_try >= policy.timeout
    {
        check.warn(
            at,
            format!("{prefix}.per_try_timeout"),
            format!(
                "per_try_timeout ({}) is not shorter than timeout ({}): the overall timeout always ends the call first",
                humantime::format_duration(per_try),
                humantime::format_duration(policy.timeout),
            ),
        );
    }
    let retry_on = written.retry.as_ref().and_then(|r| r.on.as_ref());
    if retry_on.is_some_and(|on| !on.0.is_empty()) && policy.retry.max_attempts == 1 {
        check.warn(
            at,
            format!("{prefix}.retry.on"),
            "never applies: max_attempts is 1, so nothing is retried",
        );
    }
    let failure_on = written
        .circuit_breaker
        .as_ref()
        .and_then(|b| b.failure_on.as_ref());
    for (field, conditions) in [
        ("retry.on", retry_on),
        ("circuit_breaker.failure_on", failure_on),
    ] {
        for condition in conditions.map(|c| c.0.as_slice()).unwrap_or_default() {
            if let Some(why) = never_matches(*condition, protocol, jsonrpc, per_try.is_some()) {
                check.warn(
                    at,
                    format!("{prefix}.{field}"),
                    format!("{condition} never applies: {why}"),
                );
            }
        }
    }
}

/// Why no failure of an upstream speaking `protocol` can match
/// `condition`, if none can.
fn never_matches(
    condition: Condition,
    protocol: Protocol,
    jsonrpc: Option<crate::jsonrpc::Dialect>,
    per_try: bool,
) -> Option<String> {
    let client_error = "an answer below 500 other than 429 is not a failure (it is the caller's)";
    match condition {
        Condition::Status(code) if code < 500 && code != 429 => Some(client_error.into()),
        Condition::Class(4) => Some(format!(
            "only 429 of the 4xx answers is a failure; write 429 ({client_error})"
        )),
        Condition::Class(class) if class < 4 => Some(client_error.into()),
        Condition::Grpc(_) if protocol != Protocol::Grpc => Some(format!(
            "a gRPC code, and this upstream speaks {protocol}, whose answers carry none"
        )),
        Condition::JsonRpc if jsonrpc.is_none() => Some(
            "a JSON-RPC error, and this upstream does not speak JSON-RPC (protocol: mcp, protocol: a2a or jsonrpc: true)".into(),
        ),
        Condition::PerTryTimeout if !per_try => {
            Some("no per_try_timeout shorter than timeout is set".into())
        }
        _ => None,
    }
}
