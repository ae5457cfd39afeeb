//! The policy file: parsing, validation and the resolved runtime model.
//!
//! Configuration lives in two types, as in every Breakwater policy:
//! [`raw::RawConfig`] mirrors the YAML (optional fields, source positions,
//! unknown fields rejected) and [`Config`] is what the sidecar runs on
//! (validated, defaults applied, no `Option`s left to interpret, cheap to
//! share). [`parse`] goes from text to `Config` and reports every problem as
//! `file:line:column: field: message`.

mod check;
mod error;
mod parse;
mod raw;
mod resolve;
mod routes;
mod upstream;

pub(crate) use raw::Entries;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http::uri::Authority;

use crate::resilience::fallback::{Criticality, Fallback};
use crate::resilience::faults::FaultSpec;
use crate::resilience::policy::Policy;
use serde::{Deserialize, Serialize, Serializer};

pub use error::{ConfigError, Diagnostic};

/// Default address of the admin endpoint (health, readiness, metrics, config).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:15000";
/// Default address of the shared proxy port, routed by `Host` / `:authority`.
pub const DEFAULT_PROXY_LISTEN: &str = "127.0.0.1:15001";

/// The wire protocol Breakwater speaks to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 over cleartext TCP, connections pooled with keep-alive.
    #[default]
    Http1,
    /// HTTP/2 over cleartext TCP with prior knowledge (h2c), multiplexed.
    Http2,
    /// gRPC: HTTP/2 with gRPC status mapping for synthetic answers.
    Grpc,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
        })
    }
}

impl Protocol {
    /// Whether requests to this upstream go out over HTTP/2.
    pub fn is_http2(self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc)
    }
}

/// A resolved, validated sidecar configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// The file this configuration came from (or `<embedded>`).
    pub source: String,
    /// Where the admin endpoint listens.
    pub admin: AdminConfig,
    /// Where the shared proxy port listens, and the bounds on every proxy
    /// listener's connections.
    pub proxy: ProxyConfig,
    /// Every upstream, sorted by name.
    pub upstreams: Vec<Arc<UpstreamConfig>>,
    /// Where dead letters go, if anywhere.
    pub control_plane: Option<ControlPlaneConfig>,
    /// The local spool of dead letters on their way.
    pub dead_letters: DeadLettersConfig,
    /// What the outbound port does with redirected connections.
    pub intercept: InterceptConfig,
    /// Settings that are valid but cannot take effect as written, in file
    /// order: `config check` prints them, the sidecar logs them at every
    /// load.
    #[serde(skip)]
    pub warnings: Vec<Diagnostic>,
}

/// `intercept`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct InterceptConfig {
    /// A redirected connection going to no upstream's address.
    pub unmatched: Unmatched,
}

/// What becomes of a redirected connection going to no upstream's
/// address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unmatched {
    /// Relayed, byte for byte, to where it was going.
    #[default]
    Passthrough,
    /// Closed, and counted.
    Deny,
}

/// `control_plane`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ControlPlaneConfig {
    /// Its gRPC URL.
    pub url: String,
    /// A file holding its bearer token.
    pub token_file: Option<PathBuf>,
    /// The CA to trust for an `https://` URL (default: Mozilla's roots).
    pub ca_file: Option<PathBuf>,
    /// The key dead letters are sealed with, shared with the control
    /// plane.
    pub letter_key_file: Option<PathBuf>,
}

/// `dead_letters`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLettersConfig {
    /// Where letters wait while the control plane is unreachable.
    pub spool_dir: PathBuf,
    /// The spool's bound; letters beyond it are dropped and counted.
    pub max_spool_bytes: u64,
    /// Headers left out of letters, besides `authorization`, `cookie` and
    /// `proxy-authorization` (lowercase).
    pub redact_headers: Vec<String>,
}

/// An upstream's `dead_letter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DeadLetterPolicy {
    /// Request body bytes kept in a letter; more are cut and the letter
    /// marked truncated.
    pub max_body: u64,
    /// The caller's answer waits until the letter is flushed to the spool.
    pub durable: bool,
}

/// Default bound of a dead letter's body.
pub const DEFAULT_DEAD_LETTER_MAX_BODY: u64 = 1 << 20;
/// Default bound of the spool.
pub const DEFAULT_MAX_SPOOL_BYTES: u64 = 64 << 20;

/// `proxy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ProxyConfig {
    /// The shared port's address; port 0 picks a free port.
    pub listen: SocketAddr,
    /// How long a caller may take from connecting (or from its last
    /// answer, on a kept-alive HTTP/1.1 connection) to a whole request head.
    #[serde(serialize_with = "crate::values::serialize_duration")]
    pub header_read_timeout: std::time::Duration,
    /// Caller connections open at once, over every proxy listener; more
    /// wait in the kernel's queue. Default: half the open-file limit.
    pub max_connections: Option<u32>,
    /// How long a caller connection may stay open with no call in flight
    /// (default 1 hour, as Envoy's); none: as long as it likes.
    #[serde(serialize_with = "crate::values::serialize_opt_duration")]
    pub idle_timeout: Option<std::time::Duration>,
}

/// Default of `proxy.header_read_timeout`.
pub const DEFAULT_HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// `admin`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AdminConfig {
    /// The admin API (status page, circuits, faults, and the read-only
    /// endpoints); port 0 picks a free port.
    pub listen: SocketAddr,
    /// A second port with only `/healthz`, `/readyz` and `/metrics`, for
    /// probes and scrapes from beyond the pod, while `listen` stays on
    /// loopback.
    pub probes_listen: Option<SocketAddr>,
}

/// One upstream and how callers reach it through the sidecar.
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamConfig {
    /// The upstream's name: a label in metrics, and a host routed to it.
    pub name: Arc<str>,
    /// Where the upstream listens (`host:port`).
    #[serde(serialize_with = "display")]
    pub address: Authority,
    /// The protocol spoken to the upstream.
    pub protocol: Protocol,
    /// The JSON-RPC protocol it speaks over HTTP, if any (`protocol: mcp`,
    /// `protocol: a2a`, `jsonrpc: true`): its answers are classified by
    /// their JSON-RPC errors, its calls retried by method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jsonrpc: Option<crate::jsonrpc::Dialect>,
    /// A dedicated local port for this upstream, if any.
    pub listen: Option<SocketAddr>,
    /// Names routed to this upstream on the shared port, lowercase. The
    /// upstream's name is always among them.
    pub hosts: Vec<String>,
    /// The host of its address when it is among `hosts` only implicitly:
    /// it routes an authority without a port, never `host:other-port`.
    pub address_host: Option<String>,
    /// Server names (SNI) of redirected TLS connections routed to it,
    /// lowercase: its connect policy applies to them.
    pub sni: Vec<String>,
    /// Its resilience policy, with `defaults` merged in.
    pub policy: Policy,
    /// Whether its failure may be replaced by a fallback.
    pub criticality: Criticality,
    /// The answer it degrades to: set exactly when it is optional.
    pub fallback: Option<Arc<Fallback>>,
    /// Faults injected at start (the admin API changes them at runtime).
    pub faults: Option<FaultSpec>,
    /// Requests that finally fail are dead-lettered, if set.
    pub dead_letter: Option<DeadLetterPolicy>,
    /// TLS to the upstream, if it speaks it.
    pub tls: Option<crate::transport::tls::UpstreamTls>,
    /// Headers set on every request to it (credentials), in order.
    pub request_headers: Vec<InjectedHeader>,
    /// The upstreams a call goes to, in order, when it finally fails here
    /// before any answer byte went to the caller.
    pub failover: Vec<FailoverTarget>,
    /// Its routes, in order: the first that matches a request gives it its
    /// policy; a request none matches gets the upstream's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Arc<RouteConfig>>,
}

/// One of an upstream's routes: what it matches, and its policy, merged
/// over the upstream's.
#[derive(Debug, Clone, Serialize)]
pub struct RouteConfig {
    /// Its name: the `route` label of its metrics.
    pub name: Arc<str>,
    /// What it matches.
    #[serde(rename = "match")]
    pub matches: crate::matching::RouteMatch,
    /// Its policy: its blocks over the upstream's (which are over
    /// `defaults`).
    pub policy: Policy,
    /// It has a circuit breaker of its own (it sets `circuit_breaker`);
    /// otherwise its attempts count on the upstream's.
    pub own_breaker: bool,
    /// Whether its failure may be replaced by a fallback.
    pub criticality: Criticality,
    /// The answer it degrades to: set exactly when it is optional.
    pub fallback: Option<Arc<Fallback>>,
    /// Faults injected at start.
    pub faults: Option<FaultSpec>,
    /// Its faults are its own (it sets `faults`); otherwise they are the
    /// upstream's, changed with them by the admin API.
    pub own_faults: bool,
    /// Requests that finally fail are dead-lettered, if set.
    pub dead_letter: Option<DeadLetterPolicy>,
}

impl RouteConfig {
    /// Whether a reload may keep this route's running state (breaker,
    /// budget) for `other`: the same name, match and policy.
    pub fn same_stack(&self, other: &RouteConfig) -> bool {
        self.name == other.name
            && self.matches == other.matches
            && self.policy == other.policy
            && self.own_breaker == other.own_breaker
            && self.own_faults == other.own_faults
            && (!self.own_faults || self.faults == other.faults)
    }
}

/// One upstream of a failover list, and how a request is changed for it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailoverTarget {
    /// The upstream's name.
    pub upstream: Arc<str>,
    /// What changes in the request sent to it, if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Arc<Rewrite>>,
}

/// How a request is changed for a failover target: enough to switch
/// models (another provider's version header, another model's name).
#[derive(Debug, PartialEq, Serialize)]
pub struct Rewrite {
    /// Headers set, replacing the caller's (shown by `/config` by name).
    #[serde(serialize_with = "header_names")]
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Top-level fields set on a JSON object request body, each value as
    /// JSON text.
    pub json_body: Vec<(String, String)>,
}

fn header_names<S: Serializer>(
    headers: &[(http::HeaderName, http::HeaderValue)],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(headers.iter().map(|(name, _)| name.as_str()))
}

/// A header the sidecar sets on every request to an upstream, read when
/// the policy loads. Shown by `/config` as where it comes from, never as
/// its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectedHeader {
    /// The header.
    pub name: http::HeaderName,
    /// Its value, marked sensitive (never indexed by HPACK).
    pub value: http::HeaderValue,
    /// Where it came from: `value`, `from_file: <path>` or `from_env: <name>`.
    pub source: String,
    /// The file it was read from, which the sidecar follows.
    pub file: Option<PathBuf>,
}

impl Serialize for InjectedHeader {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry("name", self.name.as_str())?;
        map.serialize_entry("source", &self.source)?;
        map.end()
    }
}

fn display<T: std::fmt::Display, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

impl Config {
    /// The files the policy names and the sidecar reads when it loads
    /// (upstreams' TLS certificates and keys, credentials from files): a
    /// change of any is a change of the policy.
    pub fn named_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for upstream in &self.upstreams {
            if let Some(tls) = &upstream.tls {
                let p = &tls.params;
                files.extend(
                    [&p.ca_file, &p.client_cert_file, &p.client_key_file]
                        .into_iter()
                        .flatten()
                        .cloned(),
                );
            }
            files.extend(
                upstream
                    .request_headers
                    .iter()
                    .filter_map(|h| h.file.clone()),
            );
        }
        files.sort();
        files.dedup();
        files
    }

    /// Each warning as `file:line:column: field: warning: message`.
    pub fn warning_lines(&self) -> impl Iterator<Item = String> + '_ {
        self.warnings
            .iter()
            .map(|d| error::located(&self.source, d, "warning: "))
    }

    /// Finds an upstream by name.
    pub fn upstream(&self, name: &str) -> Option<&Arc<UpstreamConfig>> {
        self.upstreams.iter().find(|u| &*u.name == name)
    }
}

/// Parses and validates a policy file's text. `file` names the source in
/// error messages.
pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
    parse::parse(file, text)
}

/// Reads, parses and validates a policy file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::single(
            &file,
            Diagnostic {
                line: 0,
                column: 0,
                field: String::new(),
                message: format!("cannot read the file: {e}"),
            },
        )
    })?;
    parse(&file, &text)
}

#[cfg(test)]
mod tests;
