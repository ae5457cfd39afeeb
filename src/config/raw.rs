//! The policy file as written: serde structs that mirror the YAML.
//!
//! Everything here is optional where the user may leave it out, keeps the
//! source position of values that later checks may complain about, and
//! rejects unknown fields. [`super::resolve`] turns it into the validated
//! [`super::Config`] the sidecar runs on.

use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_saphyr::Spanned;

use crate::resilience::fallback::Criticality;
use crate::resilience::faults::FaultSpec;
use crate::resilience::policy::{RawBreaker, RawHedge, RawPolicy, RawRetry};
use crate::values::{ByteSize, HumanDuration, Ratio};
use std::num::NonZeroU32;

/// The whole policy file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub admin: Option<RawAdmin>,
    pub proxy: Option<RawProxy>,
    pub control_plane: Option<Spanned<RawControlPlane>>,
    pub dead_letters: Option<RawDeadLetters>,
    pub intercept: Option<RawIntercept>,
    #[serde(default)]
    pub defaults: RawPolicy,
    #[serde(default)]
    pub upstreams: Entries<String, RawUpstream>,
    /// The position of each upstream's name, filled in after parsing.
    #[serde(skip)]
    pub upstream_names: Vec<Spanned<()>>,
}

/// Where each upstream's name sits in the file. Read in a second pass
/// because a position-carrying map key would hide the key from the field
/// path of deserialization errors.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawKeyPositions {
    #[serde(default)]
    pub upstreams: Entries<Spanned<String>, serde::de::IgnoredAny>,
}

/// `proxy`: the shared port, and the bounds on every proxy listener's
/// connections.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProxy {
    pub listen: Option<Spanned<String>>,
    pub header_read_timeout: Option<crate::values::HumanDuration>,
    pub max_connections: Option<NonZeroU32>,
    pub idle_timeout: Option<crate::values::HumanDuration>,
}

/// `intercept`: what the outbound port does with redirected connections.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIntercept {
    pub unmatched: Option<super::Unmatched>,
}

/// `admin`: the admin API's address, and the read-only one for probes
/// and scrapes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    pub listen: Option<Spanned<String>>,
    pub probes_listen: Option<Spanned<String>>,
}

/// An upstream's `protocol`: a transport, or a JSON-RPC protocol over
/// HTTP/1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawProtocol {
    Http1,
    Http2,
    Grpc,
    Mcp,
    A2a,
}

/// One upstream's block under `upstreams`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstream {
    pub address: Spanned<String>,
    pub protocol: Option<RawProtocol>,
    pub jsonrpc: Option<Spanned<bool>>,
    pub listen: Option<Spanned<String>>,
    #[serde(default)]
    pub hosts: Vec<Spanned<String>>,
    #[serde(default)]
    pub sni: Vec<Spanned<String>>,
    pub criticality: Option<Spanned<Criticality>>,
    pub fallback: Option<Spanned<RawFallback>>,
    pub faults: Option<Spanned<FaultSpec>>,
    pub dead_letter: Option<Spanned<RawDeadLetter>>,
    pub tls: Option<Spanned<RawTls>>,
    #[serde(default)]
    pub request_headers: Entries<String, Spanned<RawInjected>>,
    #[serde(default)]
    pub failover: Vec<Spanned<RawFailover>>,
    #[serde(default)]
    pub routes: Vec<Spanned<RawRoute>>,
    // The policy fields, as in `defaults` (see `policy()`). They are
    // listed here rather than flattened: serde's `flatten` loses source
    // positions and cannot deny unknown fields.
    pub timeout: Option<HumanDuration>,
    pub per_try_timeout: Option<HumanDuration>,
    pub stream_idle_timeout: Option<HumanDuration>,
    pub first_byte_timeout: Option<HumanDuration>,
    pub retry: Option<RawRetry>,
    pub hedge: Option<RawHedge>,
    pub circuit_breaker: Option<RawBreaker>,
    pub max_concurrent_requests: Option<NonZeroU32>,
    pub max_pending: Option<u32>,
    pub max_connection_share: Option<Ratio>,
}

/// One of an upstream's `routes`: what it matches, and the policy blocks
/// it sets over the upstream's.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub name: Spanned<String>,
    #[serde(rename = "match", default)]
    pub matches: Option<Spanned<RawMatch>>,
    pub idempotent: Option<bool>,
    pub criticality: Option<Spanned<Criticality>>,
    pub fallback: Option<Spanned<RawFallback>>,
    pub faults: Option<Spanned<FaultSpec>>,
    pub dead_letter: Option<Spanned<RawDeadLetter>>,
    pub timeout: Option<HumanDuration>,
    pub per_try_timeout: Option<HumanDuration>,
    pub stream_idle_timeout: Option<HumanDuration>,
    pub first_byte_timeout: Option<HumanDuration>,
    pub retry: Option<Spanned<RawRetry>>,
    pub hedge: Option<RawHedge>,
    pub circuit_breaker: Option<RawBreaker>,
}

/// A route's `match`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMatch {
    pub path: Option<Spanned<RawPath>>,
    pub method: Option<Spanned<String>>,
    #[serde(default)]
    pub headers: Entries<Spanned<String>, Spanned<String>>,
    pub grpc: Option<Spanned<RawGrpcMatch>>,
    pub jsonrpc: Option<Spanned<RawJsonRpcMatch>>,
}

/// A route's `match.jsonrpc`: a JSON-RPC method.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawJsonRpcMatch {
    pub method: String,
}

/// A route's `match.path`: one of the three.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPath {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

/// A route's `match.grpc`: a service, and one of its methods or all.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGrpcMatch {
    pub service: String,
    pub method: Option<String>,
}

/// A header the sidecar sets on every request to an upstream: a value, or
/// where to read it (a Secret's file, an environment variable).
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    deny_unknown_fields,
    expecting = "a header value, {from_file: path} or {from_env: NAME}"
)]
pub(crate) enum RawInjected {
    Value(String),
    FromFile { from_file: String },
    FromEnv { from_env: String },
}

/// An upstream's `tls` block.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    pub ca_file: Option<String>,
    pub server_name: Option<String>,
    pub client_cert_file: Option<String>,
    pub client_key_file: Option<String>,
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// `control_plane`: where sidecars send dead letters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawControlPlane {
    pub url: Spanned<String>,
    pub token_file: Option<String>,
    pub ca_file: Option<String>,
    pub letter_key_file: Option<String>,
}

/// `dead_letters`: the sidecar's local spool.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDeadLetters {
    pub spool_dir: Option<String>,
    pub max_spool_bytes: Option<ByteSize>,
    #[serde(default)]
    pub redact_headers: Vec<Spanned<String>>,
}

/// An upstream's `dead_letter`: `true`, or a block.
#[derive(Debug)]
pub(crate) struct RawDeadLetter {
    pub enabled: bool,
    pub max_body: Option<ByteSize>,
    pub durable: bool,
}

impl<'de> Deserialize<'de> for RawDeadLetter {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Block {
            #[serde(default = "yes")]
            enabled: bool,
            max_body: Option<ByteSize>,
            #[serde(default)]
            durable: bool,
        }
        fn yes() -> bool {
            true
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Flag(bool),
            Block(Block),
        }
        Ok(
            match Written::deserialize(deserializer).map_err(|_| {
                serde::de::Error::custom(
                    "expected true, false, or a block of enabled, max_body and durable, such as {max_body: 1MiB, durable: true}",
                )
            })? {
                Written::Flag(enabled) => Self {
                    enabled,
                    max_body: None,
                    durable: false,
                },
                Written::Block(b) => Self {
                    enabled: b.enabled,
                    max_body: b.max_body,
                    durable: b.durable,
                },
            },
        )
    }
}

/// One `failover` entry: an upstream's name, or
/// `{upstream: name, rewrite: {...}}`.
#[derive(Debug)]
pub(crate) struct RawFailover {
    pub upstream: String,
    pub rewrite: Option<RawRewrite>,
}

/// How a request is changed for a failover target.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRewrite {
    #[serde(default)]
    pub headers: Entries<Spanned<String>, Spanned<String>>,
    #[serde(default)]
    pub json_body: Entries<Spanned<String>, serde_json::Value>,
}

impl<'de> Deserialize<'de> for RawFailover {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Block {
            upstream: String,
            rewrite: Option<RawRewrite>,
        }
        struct FailoverVisitor;
        impl<'de> Visitor<'de> for FailoverVisitor {
            type Value = RawFailover;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an upstream's name, or {upstream: name, rewrite: {...}}")
            }

            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Self::Value, E> {
                Ok(RawFailover {
                    upstream: name.to_owned(),
                    rewrite: None,
                })
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                // Read in place (not buffered as `untagged` would), so an
                // error inside the block keeps its own position.
                let block = Block::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(RawFailover {
                    upstream: block.upstream,
                    rewrite: block.rewrite,
                })
            }
        }
        deserializer.deserialize_any(FailoverVisitor)
    }
}

/// An optional upstream's `fallback` block.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFallback {
    pub status: Option<Spanned<u16>>,
    #[serde(default)]
    pub headers: Entries<String, Spanned<String>>,
    pub body: Option<String>,
    pub body_file: Option<Spanned<String>>,
    pub message_base64: Option<Spanned<String>>,
}

impl RawRoute {
    /// This route's policy fields.
    pub fn policy(&self) -> RawPolicy {
        RawPolicy {
            timeout: self.timeout,
            per_try_timeout: self.per_try_timeout,
            stream_idle_timeout: self.stream_idle_timeout,
            first_byte_timeout: self.first_byte_timeout,
            retry: self.retry.as_ref().map(|r| r.value.clone()),
            hedge: self.hedge.clone(),
            circuit_breaker: self.circuit_breaker.clone(),
            ..RawPolicy::default()
        }
    }
}

impl RawUpstream {
    /// This upstream's policy fields.
    pub fn policy(&self) -> RawPolicy {
        RawPolicy {
            timeout: self.timeout,
            per_try_timeout: self.per_try_timeout,
            stream_idle_timeout: self.stream_idle_timeout,
            first_byte_timeout: self.first_byte_timeout,
            retry: self.retry.clone(),
            hedge: self.hedge.clone(),
            circuit_breaker: self.circuit_breaker.clone(),
            max_concurrent_requests: self.max_concurrent_requests,
            max_pending: self.max_pending,
            max_connection_share: self.max_connection_share,
        }
    }
}

/// A YAML mapping kept in file order, with keys that may carry their
/// position (a `BTreeMap` would need `Ord` keys and lose the order).
#[derive(Debug)]
pub(crate) struct Entries<K, V>(pub Vec<(K, V)>);

impl<K, V> Default for Entries<K, V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<'de, K: Deserialize<'de>, V: Deserialize<'de>> Deserialize<'de> for Entries<K, V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor<K, V>(PhantomData<(K, V)>);

        impl<'de, K: Deserialize<'de>, V: Deserialize<'de>> Visitor<'de> for EntriesVisitor<K, V> {
            type Value = Entries<K, V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }

        deserializer.deserialize_map(EntriesVisitor(PhantomData))
    }
}
