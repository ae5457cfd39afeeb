//! Sidecar injection on real `AdmissionReview` documents
//! (`tests/data/admission/`): an annotated pod gains exactly the sidecar,
//! other pods and objects are left alone, malformed reviews get a clean
//! error; and the HTTPS server answers them.

mod support;

use std::sync::Arc;

use base64::Engine as _;
use breakwater::inject::{self, Settings};
use serde_json::{Value, json};

fn document(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/data/admission/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn settings() -> Settings {
    Settings {
        image: "registry.example/breakwater:0.1.0".into(),
        ..Settings::default()
    }
}

/// Applies a JSON patch made of `add` operations, as the API server would
/// (strictly: adding a field that exists is an error).
fn apply(mut doc: Value, patch: &Value) -> Value {
    for op in patch.as_array().unwrap() {
        assert_eq!(op["op"], "add", "{op}");
        let path = op["path"].as_str().unwrap();
        let mut parts: Vec<String> = path[1..]
            .split('/')
            .map(|p| p.replace("~1", "/").replace("~0", "~"))
            .collect();
        let last = parts.pop().unwrap();
        let mut target = &mut doc;
        for part in &parts {
            target = match target {
                Value::Array(items) => &mut items[part.parse::<usize>().unwrap()],
                other => other
                    .get_mut(part.as_str())
                    .unwrap_or_else(|| panic!("no {part} in {path}")),
            };
        }
        let value = op["value"].clone();
        match target {
            Value::Array(items) if last == "-" => items.push(value),
            Value::Array(items) => items.insert(last.parse().unwrap(), value),
            Value::Object(fields) => {
                assert!(!fields.contains_key(&last), "{path} exists already");
                fields.insert(last, value);
            }
            other => panic!("cannot add {path} to {other}"),
        }
    }
    doc
}

/// Answers a review, and the pod as the patch leaves it.
fn mutate(name: &str) -> (Value, Value, Value) {
    let body = document(name);
    let review: Value = serde_json::from_slice(&body).unwrap();
    let answer = inject::review(&body, &settings()).unwrap();
    let pod = review["request"]["object"].clone();
    let patched = match answer["response"]["patch"].as_str() {
        Some(patch) => {
            assert_eq!(answer["response"]["patchType"], "JSONPatch");
            let patch: Value = serde_json::from_slice(
                &base64::engine::general_purpose::STANDARD
                    .decode(patch)
                    .unwrap(),
            )
            .unwrap();
            let patched = apply(pod.clone(), &patch);
            // The preview applies the same patch.
            assert_eq!(inject::preview(&pod, &settings()).unwrap(), patched);
            patched
        }
        None => pod.clone(),
    };
    (answer, pod, patched)
}

#[test]
fn an_annotated_pod_gains_exactly_the_sidecar() {
    let (answer, pod, patched) = mutate("annotated-pod.json");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(
        answer["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    assert_eq!(answer["response"]["allowed"], true);

    // First the init container that redirects the pod's outbound TCP to
    // the sidecar's port, leaving the sidecar's own UID alone: with
    // NET_ADMIN and NET_RAW only, not privileged.
    let init = &patched["spec"]["initContainers"][0];
    assert_eq!(init["name"], "breakwater-init");
    assert_eq!(
        init["image"],
        format!("breakwater-init:{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(
        init["args"],
        json!(["init", "--redirect-port", "15001", "--exclude-uid", "65532"])
    );
    assert!(init.get("restartPolicy").is_none(), "it runs once: {init}");
    let context = &init["securityContext"];
    assert_eq!(
        context["capabilities"]["add"],
        json!(["NET_ADMIN", "NET_RAW"])
    );
    assert_eq!(context["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(context["privileged"], false);
    assert_eq!(context["allowPrivilegeEscalation"], false);
    assert_eq!(context["runAsUser"], 0);
    let sidecar = &patched["spec"]["initContainers"][1];
    assert_eq!(sidecar["name"], "breakwater");
    assert_eq!(sidecar["securityContext"]["runAsUser"], 65532);
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(sidecar["image"], "registry.example/breakwater:0.1.0");
    assert_eq!(
        sidecar["args"],
        json!([
            "sidecar",
            "--config",
            "/etc/breakwater/policies.yaml",
            "--log-format",
            "json"
        ])
    );
    assert_eq!(sidecar["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(sidecar["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(sidecar["securityContext"]["runAsNonRoot"], true);
    assert_eq!(sidecar["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        sidecar["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    // The pod's annotation overrides the default memory limit.
    assert_eq!(sidecar["resources"]["limits"]["memory"], "256Mi");
    assert_eq!(sidecar["resources"]["requests"]["cpu"], "50m");
    let volumes = patched["spec"]["volumes"].as_array().unwrap();
    assert_eq!(
        volumes[1],
        json!({"name": "breakwater-policies", "configMap": {"name": "breakwater-policies"}})
    );
    // The control plane's token, optional: the pod starts without it.
    assert_eq!(
        volumes[3],
        json!({"name": "breakwater-token", "secret": {"secretName": "breakwater-token", "optional": true}})
    );
    assert!(
        sidecar["volumeMounts"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "breakwater-token", "mountPath": "/var/run/breakwater", "readOnly": true})),
        "{sidecar}"
    );
    for container in patched["spec"]["containers"].as_array().unwrap() {
        let env = container["env"].as_array().unwrap();
        assert!(
            env.contains(&json!({"name": "BREAKWATER_PROXY", "value": "http://127.0.0.1:15001"}))
        );
        assert!(
            env.contains(&json!({"name": "BREAKWATER_ADMIN", "value": "http://127.0.0.1:15000"}))
        );
    }
    assert_eq!(
        patched["metadata"]["annotations"]["breakwater.io/status"],
        "injected"
    );

    // Take the additions back out: what is left is the pod as it was.
    let mut undone = patched.clone();
    let spec = undone["spec"].as_object_mut().unwrap();
    spec.remove("initContainers");
    spec["volumes"].as_array_mut().unwrap().truncate(1);
    let containers = spec["containers"].as_array_mut().unwrap();
    containers[0]["env"].as_array_mut().unwrap().truncate(1);
    containers[1].as_object_mut().unwrap().remove("env");
    undone["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove("breakwater.io/status");
    assert_eq!(undone, pod);
}

#[test]
fn the_sidecar_goes_first_among_init_containers_with_the_pods_own_config() {
    let (_, pod, patched) = mutate("pod-with-init-containers.json");
    let init = patched["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(init.len(), 3);
    assert_eq!(init[0]["name"], "breakwater-init");
    assert_eq!(init[1]["name"], "breakwater");
    assert_eq!(init[2], pod["spec"]["initContainers"][0]);
    assert_eq!(
        patched["spec"]["volumes"][0]["configMap"]["name"],
        "ocr-policies"
    );
    assert_eq!(
        patched["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn pods_without_the_annotation_injected_ones_and_other_objects_are_left_alone() {
    for name in ["plain-pod.json", "injected-pod.json", "service.json"] {
        let (answer, pod, patched) = mutate(name);
        assert_eq!(answer["response"]["allowed"], true, "{name}");
        assert!(
            answer["response"].get("patch").is_none(),
            "{name}: {answer}"
        );
        assert_eq!(patched, pod);
    }
}

/// The annotated pod with `annotations` added, as the injector leaves it
/// under `settings`.
fn injected_with(annotations: Value, settings: &Settings) -> Result<Value, inject::BadReview> {
    let review: Value = serde_json::from_slice(&document("annotated-pod.json")).unwrap();
    let mut pod = review["request"]["object"].clone();
    for (name, value) in annotations.as_object().unwrap() {
        pod["metadata"]["annotations"][name] = value.clone();
    }
    inject::preview(&pod, settings)
}

fn init_names(pod: &Value) -> Vec<&str> {
    pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

#[test]
fn interception_follows_the_pods_annotations_over_the_injectors_default() {
    let s = settings();
    // The env mode: no init container, the sidecar alone.
    let pod = injected_with(json!({"breakwater.io/intercept": "env"}), &s).unwrap();
    assert_eq!(init_names(&pod), ["breakwater"]);
    // An injector whose default is env, and a pod that asks for iptables.
    let mut env_default = settings();
    env_default.intercept.mode = inject::intercept::Intercept::Env;
    env_default.intercept.exclude_ports = vec![5432];
    let pod = injected_with(json!({}), &env_default).unwrap();
    assert_eq!(init_names(&pod), ["breakwater"]);
    let pod = injected_with(json!({"breakwater.io/intercept": "iptables"}), &env_default).unwrap();
    assert_eq!(init_names(&pod), ["breakwater-init", "breakwater"]);
    // The injector's exclusions, unless the pod names its own.
    assert_eq!(
        pod["spec"]["initContainers"][0]["args"],
        json!([
            "init",
            "--redirect-port",
            "15001",
            "--exclude-uid",
            "65532",
            "--exclude-ports",
            "5432"
        ])
    );
    let pod = injected_with(
        json!({
            "breakwater.io/exclude-outbound-ports": "5432, 6379",
            "breakwater.io/exclude-outbound-cidrs": "10.0.0.0/8,fd00::/8",
        }),
        &s,
    )
    .unwrap();
    assert_eq!(
        pod["spec"]["initContainers"][0]["args"],
        json!([
            "init",
            "--redirect-port",
            "15001",
            "--exclude-uid",
            "65532",
            "--exclude-ports",
            "5432,6379",
            "--exclude-cidrs",
            "10.0.0.0/8,fd00::/8"
        ])
    );
    // What cannot be honoured refuses the pod, with the reason.
    for (annotations, message) in [
        (
            json!({"breakwater.io/intercept": "ebpf"}),
            "annotation breakwater.io/intercept: \"ebpf\" is not a mode: iptables or env",
        ),
        (
            json!({"breakwater.io/exclude-outbound-ports": "5432,http"}),
            "annotation breakwater.io/exclude-outbound-ports: \"http\" is not a port",
        ),
        (
            json!({"breakwater.io/exclude-outbound-ports": "0"}),
            "annotation breakwater.io/exclude-outbound-ports: \"0\" is not a port",
        ),
    ] {
        assert_eq!(injected_with(annotations, &s).unwrap_err().0, message);
    }
    let bad_cidr = injected_with(
        json!({"breakwater.io/exclude-outbound-cidrs": "10.0.0.0/33"}),
        &s,
    );
    assert!(
        bad_cidr
            .unwrap_err()
            .0
            .starts_with("annotation breakwater.io/exclude-outbound-cidrs: "),
    );
}

#[test]
fn malformed_reviews_get_a_clean_error_and_bad_annotations_refuse_the_pod() {
    let s = settings();
    let error = |body: &[u8]| inject::review(body, &s).unwrap_err().0;
    assert!(error(b"{not json").starts_with("the body is not JSON"));
    assert_eq!(
        error(br#"{"kind": "Pod"}"#),
        "the body is not an AdmissionReview"
    );
    assert_eq!(
        error(br#"{"kind": "AdmissionReview", "request": {}}"#),
        "request.uid is missing"
    );
    let mut review: Value = serde_json::from_slice(&document("annotated-pod.json")).unwrap();
    review["request"]["object"]["metadata"]["annotations"]["breakwater.io/cpu-limit"] =
        json!("lots");
    // A pod asking for the sidecar with an invalid annotation is refused,
    // with the reason, rather than admitted without its sidecar.
    let answer = inject::review(&serde_json::to_vec(&review).unwrap(), &s).unwrap();
    assert_eq!(answer["response"]["allowed"], false);
    assert_eq!(answer["response"]["status"]["code"], 400);
    assert_eq!(
        answer["response"]["status"]["message"],
        "breakwater: annotation breakwater.io/cpu-limit: \"lots\" is not a quantity such as 100m or 64Mi"
    );
    assert!(answer["response"].get("patch").is_none());
    review["request"]["object"]["spec"] = json!({});
    review["request"]["object"]["metadata"]["annotations"] =
        json!({"breakwater.io/inject": "true"});
    let answer = inject::review(&serde_json::to_vec(&review).unwrap(), &s).unwrap();
    assert_eq!(
        answer["response"]["status"]["message"],
        "breakwater: the pod has no spec.containers"
    );
}

#[tokio::test]
async fn the_injector_answers_reviews_over_https() {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let files = inject::server::TlsFiles {
        cert: dir.path().join("tls.crt"),
        key: dir.path().join("tls.key"),
    };
    std::fs::write(&files.cert, leaf.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(inject::server::serve(
        listener,
        files,
        Arc::new(settings()),
        stopped,
    ));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let post = |path: &'static str, body: Vec<u8>| {
        let connector = connector.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            let tls = connector.connect(name, tcp).await.unwrap();
            let (mut send, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .unwrap();
            tokio::spawn(connection);
            let request = http::Request::post(path)
                .header("host", "localhost")
                .header("content-type", "application/json")
                .body(breakwater::body::full(body))
                .unwrap();
            let response = send.send_request(request).await.unwrap();
            let (parts, body) = support::read_body(response).await;
            (
                parts.status,
                serde_json::from_slice::<Value>(&body).unwrap(),
            )
        }
    };
    let (status, answer) = post("/mutate", document("annotated-pod.json")).await;
    assert_eq!(status, 200);
    assert!(answer["response"]["patch"].is_string(), "{answer}");
    let (status, answer) = post("/mutate", b"{\"kind\": 3}".to_vec()).await;
    assert_eq!(status, 400);
    assert_eq!(
        answer["error"]["message"],
        "the body is not an AdmissionReview"
    );
    let (status, _) = post("/elsewhere", Vec::new()).await;
    assert_eq!(status, 404);
    stop.send(true).unwrap();
    server.await.unwrap().unwrap();
}
