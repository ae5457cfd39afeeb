//! Sidecar injection: a Kubernetes mutating admission webhook that adds the
//! Breakwater sidecar to pods annotated `breakwater.io/inject: "true"`.
//!
//! [`review`] is the whole decision, a pure function from an
//! `AdmissionReview` to its answer (tested on real review documents);
//! [`server`] serves it over HTTPS, as the API server requires.
//!
//! The sidecar is added as a native sidecar (an init container with
//! `restartPolicy: Always`, Kubernetes 1.29 and later), first among the
//! init containers, so that it is running before any other container starts
//! and stops after them. With it come the policies volume (a ConfigMap in
//! the pod's namespace), the control plane's token (an optional Secret),
//! probes on its admin port, resources, a hardened
//! security context, and `BREAKWATER_PROXY` / `BREAKWATER_ADMIN` in every
//! app container's environment. Before it, unless the pod asks for the
//! `env` mode, goes the init container that redirects the pod's outbound
//! TCP to it ([`intercept`]).

pub mod intercept;
pub mod server;

use base64::Engine as _;
use serde_json::{Value, json};

/// The annotation that asks for the sidecar.
pub const INJECT: &str = "breakwater.io/inject";
/// Set on injected pods.
pub const STATUS: &str = "breakwater.io/status";
/// A pod's own policies ConfigMap (in its namespace).
pub const CONFIG: &str = "breakwater.io/config";
/// The injected container's name.
pub const CONTAINER: &str = "breakwater";
/// The policies volume's name.
pub const VOLUME: &str = "breakwater-policies";
/// A scratch volume for the dead-letter spool (the root filesystem is
/// read-only).
pub const TMP_VOLUME: &str = "breakwater-tmp";
/// The control plane's token (an optional Secret: a pod starts without
/// it, and its sidecar spools dead letters until it is there).
pub const TOKEN_VOLUME: &str = "breakwater-token";
const MOUNT: &str = "/etc/breakwater";
/// Where the token is mounted: the chart's policies name
/// `/var/run/breakwater/token`.
const TOKEN_MOUNT: &str = "/var/run/breakwater";
const RESOURCE_ANNOTATIONS: [(&str, &str, &str); 4] = [
    ("breakwater.io/cpu-request", "requests", "cpu"),
    ("breakwater.io/memory-request", "requests", "memory"),
    ("breakwater.io/cpu-limit", "limits", "cpu"),
    ("breakwater.io/memory-limit", "limits", "memory"),
];

/// What the injector adds.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The sidecar image.
    pub image: String,
    /// `Always`, `IfNotPresent` or `Never`.
    pub pull_policy: String,
    /// The policies ConfigMap, unless a pod names its own.
    pub config_map: String,
    /// The Secret holding the control plane's token (key `token`).
    pub token_secret: String,
    /// The sidecar's shared proxy port.
    pub proxy_port: u16,
    /// The sidecar's admin port (loopback).
    pub admin_port: u16,
    /// The sidecar's probes port: `/healthz`, `/readyz`, `/metrics`.
    pub probes_port: u16,
    /// Default resources: `(requests cpu, requests memory, limits cpu,
    /// limits memory)`; empty strings are left out.
    pub resources: [String; 4],
    /// Interception: the default mode, the init container's image, and
    /// what is never redirected.
    pub intercept: intercept::InterceptSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            image: format!("breakwater:{}", env!("CARGO_PKG_VERSION")),
            pull_policy: "IfNotPresent".into(),
            config_map: "breakwater-policies".into(),
            token_secret: "breakwater-token".into(),
            proxy_port: 15001,
            admin_port: 15000,
            probes_port: 15020,
            resources: ["50m".into(), "32Mi".into(), String::new(), "128Mi".into()],
            intercept: intercept::InterceptSettings::default(),
        }
    }
}

/// Why a review cannot be answered (HTTP 400 with the message).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct BadReview(pub String);

/// Answers an `AdmissionReview`: allowed, with the patch that adds the
/// sidecar when the pod asks for it and does not have it yet; refused
/// (with the reason) only when it asks in a way that cannot be honoured,
/// such as an invalid resource annotation. `Err` for a review that is not
/// one (answered HTTP 400).
pub fn review(body: &[u8], settings: &Settings) -> Result<Value, BadReview> {
    let review: Value = serde_json::from_slice(body)
        .map_err(|e| BadReview(format!("the body is not JSON: {e}")))?;
    if review["kind"] != "AdmissionReview" {
        return Err(BadReview("the body is not an AdmissionReview".into()));
    }
    let request = &review["request"];
    let uid = request["uid"]
        .as_str()
        .filter(|u| !u.is_empty())
        .ok_or_else(|| BadReview("request.uid is missing".into()))?;
    let api_version = review["apiVersion"]
        .as_str()
        .unwrap_or("admission.k8s.io/v1");
    let mut response = json!({"uid": uid, "allowed": true});
    let is_pod = request["kind"]["kind"] == "Pod" || request["object"]["kind"] == "Pod";
    if is_pod {
        match patch(&request["object"], settings) {
            Ok(None) => {}
            Ok(Some(patch)) => {
                let bytes = serde_json::to_vec(&patch).expect("patches serialize");
                response["patchType"] = json!("JSONPatch");
                response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
            }
            // A pod that asks for the sidecar in a way that cannot be
            // honoured is refused, with the reason: admitting it without
            // its sidecar would hide the mistake.
            Err(BadReview(message)) => {
                response["allowed"] = json!(false);
                response["status"] = json!({
                    "code": 400,
                    "reason": "BadRequest",
                    "message": format!("breakwater: {message}"),
                });
            }
        }
    }
    Ok(json!({
        "apiVersion": api_version,
        "kind": "AdmissionReview",
        "response": response,
    }))
}

pub(crate) fn annotation<'a>(pod: &'a Value, name: &str) -> Option<&'a str> {
    pod["metadata"]["annotations"][name].as_str()
}

/// A pod as the injector would leave it: `pod` (a Pod manifest, JSON or
/// YAML) with the patch applied; the pod unchanged when it does not ask
/// for the sidecar. For `breakwater inject-preview`.
pub fn preview(pod: &Value, settings: &Settings) -> Result<Value, BadReview> {
    let mut out = pod.clone();
    let Some(patch) = patch(pod, settings)? else {
        return Ok(out);
    };
    for op in patch.as_array().expect("patches are arrays") {
        let path = op["path"].as_str().expect("patch paths are strings");
        let mut parts: Vec<String> = path[1..]
            .split('/')
            .map(|p| p.replace("~1", "/").replace("~0", "~"))
            .collect();
        let last = parts.pop().expect("patch paths are not empty");
        let mut target = &mut out;
        for part in &parts {
            target = match target {
                Value::Array(items) => &mut items[part.parse::<usize>().expect("an index")],
                other => &mut other[part.as_str()],
            };
        }
        let value = op["value"].clone();
        match target {
            Value::Array(items) if last == "-" => items.push(value),
            Value::Array(items) => items.insert(last.parse().expect("an index"), value),
            other => other[last.as_str()] = value,
        }
    }
    Ok(out)
}

/// The JSON patch that injects the sidecar, or `None` when the pod does not
/// ask for it or has it already.
pub fn patch(pod: &Value, settings: &Settings) -> Result<Option<Value>, BadReview> {
    if !pod.is_object() {
        return Err(BadReview("request.object is not a pod".into()));
    }
    let wanted = annotation(pod, INJECT).is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let named = |list: &Value| {
        list.as_array()
            .is_some_and(|l| l.iter().any(|c| c["name"] == CONTAINER))
    };
    let present = annotation(pod, STATUS) == Some("injected")
        || named(&pod["spec"]["initContainers"])
        || named(&pod["spec"]["containers"]);
    if !wanted || present {
        return Ok(None);
    }
    let containers = pod["spec"]["containers"]
        .as_array()
        .ok_or_else(|| BadReview("the pod has no spec.containers".into()))?;
    let config_map = annotation(pod, CONFIG).unwrap_or(&settings.config_map);
    let mut ops = Vec::new();
    // The init container first: the sidecar, and every container after
    // it, start with the pod's traffic already redirected.
    let mut first = Vec::new();
    if intercept::mode(pod, settings)? == intercept::Intercept::Iptables {
        first.push(intercept::init_container(pod, settings)?);
    }
    first.push(sidecar(pod, settings)?);
    if pod["spec"]["initContainers"].is_array() {
        for (i, container) in first.into_iter().enumerate() {
            let path = format!("/spec/initContainers/{i}");
            ops.push(json!({"op": "add", "path": path, "value": container}));
        }
    } else {
        ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": first}));
    }
    let volumes = [
        json!({"name": VOLUME, "configMap": {"name": config_map}}),
        json!({"name": TMP_VOLUME, "emptyDir": {"sizeLimit": "256Mi"}}),
        json!({"name": TOKEN_VOLUME, "secret": {"secretName": settings.token_secret, "optional": true}}),
    ];
    if pod["spec"]["volumes"].is_array() {
        for volume in volumes {
            ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": volume}));
        }
    } else {
        ops.push(json!({"op": "add", "path": "/spec/volumes", "value": volumes}));
    }
    let env = [
        json!({"name": "BREAKWATER_PROXY", "value": format!("http://127.0.0.1:{}", settings.proxy_port)}),
        json!({"name": "BREAKWATER_ADMIN", "value": format!("http://127.0.0.1:{}", settings.admin_port)}),
    ];
    for (i, container) in containers.iter().enumerate() {
        if container["env"].is_array() {
            for var in &env {
                ops.push(json!({"op": "add", "path": format!("/spec/containers/{i}/env/-"), "value": var}));
            }
        } else {
            ops.push(
                json!({"op": "add", "path": format!("/spec/containers/{i}/env"), "value": env}),
            );
        }
    }
    if pod["metadata"]["annotations"].is_object() {
        ops.push(json!({"op": "add", "path": "/metadata/annotations/breakwater.io~1status", "value": "injected"}));
    } else {
        ops.push(
            json!({"op": "add", "path": "/metadata/annotations", "value": {STATUS: "injected"}}),
        );
    }
    Ok(Some(Value::Array(ops)))
}

/// The sidecar container, with the pod's resource annotations applied.
fn sidecar(pod: &Value, settings: &Settings) -> Result<Value, BadReview> {
    let mut resources = json!({});
    let defaults = RESOURCE_ANNOTATIONS.iter().zip(&settings.resources);
    for ((annotation_name, kind, resource), default) in defaults {
        let value = annotation(pod, annotation_name).unwrap_or(default);
        if value.is_empty() {
            continue;
        }
        if !quantity(value) {
            return Err(BadReview(format!(
                "annotation {annotation_name}: {value:?} is not a quantity such as 100m or 64Mi"
            )));
        }
        resources[*kind][*resource] = json!(value);
    }
    let probe = |path: &str| {
        json!({
            "httpGet": {"path": path, "port": "bw-probes"},
            "periodSeconds": 5,
            "failureThreshold": 3,
        })
    };
    Ok(json!({
        "name": CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.pull_policy,
        "restartPolicy": "Always",
        "args": ["sidecar", "--config", format!("{MOUNT}/policies.yaml"), "--log-format", "json"],
        "ports": [
            {"name": "bw-proxy", "containerPort": settings.proxy_port, "protocol": "TCP"},
            {"name": "bw-admin", "containerPort": settings.admin_port, "protocol": "TCP"},
            {"name": "bw-probes", "containerPort": settings.probes_port, "protocol": "TCP"},
        ],
        "startupProbe": {
            "httpGet": {"path": "/readyz", "port": "bw-probes"},
            "periodSeconds": 1,
            "failureThreshold": 30,
        },
        "readinessProbe": probe("/readyz"),
        "livenessProbe": probe("/healthz"),
        "resources": resources,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": intercept::SIDECAR_UID,
            "runAsGroup": intercept::SIDECAR_UID,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "env": [{"name": "TMPDIR", "value": "/tmp"}],
        "volumeMounts": [
            {"name": VOLUME, "mountPath": MOUNT, "readOnly": true},
            {"name": TMP_VOLUME, "mountPath": "/tmp"},
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_MOUNT, "readOnly": true},
        ],
    }))
}

/// Whether `text` reads as a Kubernetes quantity (`100m`, `0.5`, `64Mi`,
/// `1G`, `2e3`).
fn quantity(text: &str) -> bool {
    let digits_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(digits_end);
    let number_ok = !number.is_empty() && number != "." && number.matches('.').count() <= 1;
    let suffix_ok = matches!(
        suffix,
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
    ) || suffix
        .strip_prefix(['e', 'E'])
        .is_some_and(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_digit()));
    number_ok && suffix_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_are_recognised() {
        for ok in ["100m", "0.5", "64Mi", "1G", "2e3", "1"] {
            assert!(quantity(ok), "{ok}");
        }
        for bad in ["", "m", "64MB", "1..2", "-1", "lots"] {
            assert!(!quantity(bad), "{bad}");
        }
    }
}
