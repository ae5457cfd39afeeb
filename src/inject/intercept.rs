//! Transparent interception in an injected pod: an init container that
//! runs `breakwater init` before any other container, so that the agent's
//! outbound TCP reaches the sidecar with no change to the agent.
//!
//! The mode is the injector's default (`--intercept`), or the pod's
//! `breakwater.io/intercept` annotation:
//!
//! - `iptables`: the init container `breakwater-init` programs the pod's
//!   network namespace (capabilities `NET_ADMIN` and `NET_RAW` only, not
//!   privileged; it runs as root because `iptables` needs it, and exits).
//!   The sidecar's own traffic is left alone by its UID, 65532, the one its
//!   container runs as. `breakwater.io/exclude-outbound-ports` and
//!   `breakwater.io/exclude-outbound-cidrs` (comma-separated) replace the
//!   injector's defaults for what is never redirected, such as a database.
//! - `env`: no init container; the agent reaches the sidecar through
//!   `BREAKWATER_PROXY` (set in both modes), for clusters whose policies
//!   forbid `NET_ADMIN`.

use serde_json::{Value, json};

use super::{BadReview, Settings, TMP_VOLUME, annotation};
use crate::intercept::rules::Cidr;

/// The annotation that chooses the mode.
pub const INTERCEPT: &str = "breakwater.io/intercept";
/// Destination ports never redirected (comma-separated).
pub const EXCLUDE_PORTS: &str = "breakwater.io/exclude-outbound-ports";
/// Destination networks never redirected (comma-separated CIDRs).
pub const EXCLUDE_CIDRS: &str = "breakwater.io/exclude-outbound-cidrs";
/// The init container's name.
pub const INIT_CONTAINER: &str = "breakwater-init";
/// The UID the sidecar runs as, whose connections are not redirected.
pub const SIDECAR_UID: u32 = 65532;

/// How an injected pod's agent reaches its sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Intercept {
    /// Its outbound TCP is redirected (an init container).
    #[default]
    Iptables,
    /// It is pointed at the sidecar by `BREAKWATER_PROXY`.
    Env,
}

impl std::str::FromStr for Intercept {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "iptables" => Ok(Self::Iptables),
            "env" => Ok(Self::Env),
            _ => Err(format!("{text:?} is not a mode: iptables or env")),
        }
    }
}

/// What the injector adds for interception, beyond the sidecar.
#[derive(Debug, Clone)]
pub struct InterceptSettings {
    /// The mode of pods without the annotation.
    pub mode: Intercept,
    /// The init container's image (it needs the `iptables` binary, which
    /// the sidecar's distroless image does not have).
    pub image: String,
    /// Ports never redirected, unless a pod names its own.
    pub exclude_ports: Vec<u16>,
    /// Networks never redirected, unless a pod names its own.
    pub exclude_cidrs: Vec<Cidr>,
}

impl Default for InterceptSettings {
    fn default() -> Self {
        Self {
            mode: Intercept::default(),
            image: format!("breakwater-init:{}", env!("CARGO_PKG_VERSION")),
            exclude_ports: Vec::new(),
            exclude_cidrs: Vec::new(),
        }
    }
}

/// The pod's mode: its annotation, else the injector's default.
pub(super) fn mode(pod: &Value, settings: &Settings) -> Result<Intercept, BadReview> {
    match annotation(pod, INTERCEPT) {
        None => Ok(settings.intercept.mode),
        Some(text) => text
            .parse()
            .map_err(|why| BadReview(format!("annotation {INTERCEPT}: {why}"))),
    }
}

/// The init container that redirects the pod's outbound TCP to the
/// sidecar's shared port.
pub(super) fn init_container(pod: &Value, settings: &Settings) -> Result<Value, BadReview> {
    let ports = match annotation(pod, EXCLUDE_PORTS) {
        None => settings.intercept.exclude_ports.clone(),
        Some(text) => list(text, EXCLUDE_PORTS, |p| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{p:?} is not a port"))
        })?,
    };
    let cidrs = match annotation(pod, EXCLUDE_CIDRS) {
        None => settings.intercept.exclude_cidrs.clone(),
        Some(text) => list(text, EXCLUDE_CIDRS, str::parse::<Cidr>)?,
    };
    let mut args = vec![
        "init".to_owned(),
        "--redirect-port".to_owned(),
        settings.proxy_port.to_string(),
        "--exclude-uid".to_owned(),
        SIDECAR_UID.to_string(),
    ];
    if !ports.is_empty() {
        args.push("--exclude-ports".to_owned());
        args.push(joined(&ports));
    }
    if !cidrs.is_empty() {
        args.push("--exclude-cidrs".to_owned());
        args.push(joined(&cidrs));
    }
    Ok(json!({
        "name": INIT_CONTAINER,
        "image": settings.intercept.image,
        "imagePullPolicy": settings.pull_policy,
        "args": args,
        "resources": {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"memory": "64Mi"},
        },
        "securityContext": {
            "runAsNonRoot": false,
            "runAsUser": 0,
            "runAsGroup": 0,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        // iptables takes its lock under /run.
        "volumeMounts": [{"name": TMP_VOLUME, "mountPath": "/run"}],
    }))
}

/// A comma-separated annotation, each item read by `parse`.
fn list<T>(
    text: &str,
    name: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, BadReview> {
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| parse(item).map_err(|why| BadReview(format!("annotation {name}: {why}"))))
        .collect()
}

fn joined<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
