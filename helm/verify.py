"""Checks the Helm chart with real tools and no cluster (run by verify.sh).

For each value set: `helm lint --strict`, `helm template`, every manifest
through `kubernetes-validate --strict` (built-in kinds), and the checks an
API server or a running cluster would make that schemas do not: names,
label and port-name syntax, selectors that match their pods, named ports
and volumes that exist, references between objects, the webhook's service,
runbook links, the policy file (`breakwater config check`). Then: wrong
values are refused by values.schema.json, the example chart that includes
the sidecar by hand renders the same sidecar the injector adds, and an
injected pod passes the Pod schema.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHART = os.path.join(ROOT, "helm", "breakwater")
EXAMPLE = os.path.join(ROOT, "helm", "examples", "agent-without-webhook")
BREAKWATER = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "debug", "breakwater")
NAMESPACE = "breakwater"

def chart_version():
    with open(os.path.join(CHART, "Chart.yaml")) as f:
        return yaml.safe_load(f)["appVersion"]


VALUE_SETS = {
    "defaults": [],
    "webhook off": ["--set", "injector.enabled=false"],
    "monitoring on": [
        "--set", "monitoring.serviceMonitor.enabled=true",
        "--set", "monitoring.prometheusRule.enabled=true",
    ],
    "existing secret": ["--set", "controlPlane.auth.existingSecret=my-token"],
    "auth off": ["--set", "controlPlane.auth.enabled=false"],
    "cert-manager": ["--set", "injector.certManager.enabled=true"],
    "intercept env, exclusions": ["--set", "intercept.mode=env",
                                  "--set", "intercept.excludeOutboundPorts={5432,6379}",
                                  "--set", "intercept.excludeOutboundCIDRs={10.0.0.0/8}"],
    "agent namespaces and upstreams": ["--values", "AGENTS"],
}
AGENTS_VALUES = {
    "policies": {
        "namespaces": ["agents", "billing"],
        "file": {"upstreams": {
            "ocr": {"address": "ocr.agents.svc:8080", "protocol": "grpc", "per_try_timeout": "5s",
                    "retry": {"on": ["unavailable"]}},
            "matching": {"address": "matching.agents.svc:80", "criticality": "optional",
                         "fallback": {"status": 200, "body": "{\"matches\": []}"}},
        }},
    },
    "controlPlane": {"persistence": {"storageClassName": "fast-ssd", "size": "10Gi"}},
}
EXPECTED_ALERTS = {
    "BreakwaterUpstreamErrorRate", "BreakwaterUpstreamLatencyHigh", "BreakwaterCircuitsOpen",
    "BreakwaterDeadLettersPiling", "BreakwaterDeadLettersDropped", "BreakwaterRetriesHigh",
    "BreakwaterSagaFailed",
}
# Kinds the bundled schemas do not know (CRDs): checked here instead.
CUSTOM_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "Certificate", "Issuer"}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
SERVICE_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]*[a-z0-9])?$")

problems = []


def problem(where, message):
    problems.append(f"{where}: {message}")


def run(args, **kwargs):
    return subprocess.run(args, capture_output=True, text=True, **kwargs)


def helm(*args):
    return run(["helm", *args])


def anchors(markdown_path):
    """GitHub's heading anchors of a Markdown file."""
    found = set()
    with open(markdown_path) as f:
        for line in f:
            if line.startswith("#"):
                text = line.lstrip("#").strip().lower()
                text = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
                found.add(text)
    return found


def pod_spec(doc):
    kind = doc["kind"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return doc["spec"]["template"]["spec"], doc["spec"]["template"]["metadata"].get("labels", {})
    if kind == "Pod":
        return doc["spec"], doc["metadata"].get("labels", {})
    return None, None


def named_ports(spec):
    return {p.get("name"): p for c in spec.get("containers", []) + spec.get("initContainers", [])
            for p in c.get("ports", [])}


def rendered(docs, kind, name):
    """Whether `docs` hold (or, for Secrets, a Certificate makes) `kind/name`."""
    return any(d["kind"] == kind and d["metadata"]["name"] == name for d in docs) or (
        kind == "Secret" and any(d["kind"] == "Certificate" and d["spec"].get("secretName") == name
                                 for d in docs))


def check_pod(where, spec, docs, external, claims=()):
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    volumes.update({name: {} for name in claims})
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        cwhere = f"{where} container {c['name']}"
        ports = {}
        for p in c.get("ports", []):
            name = p.get("name")
            if name is not None:
                if len(name) > 15 or not PORT_NAME.match(name):
                    problem(cwhere, f"port name {name!r} is not an IANA service name of at most 15 characters")
                ports[name] = p["containerPort"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            port = c.get(probe, {}).get("httpGet", {}).get("port")
            if isinstance(port, str) and port not in ports:
                problem(cwhere, f"{probe} uses port {port!r}, which the container does not name")
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                problem(cwhere, f"mounts volume {m['name']!r}, which the pod does not have")
        if c.get("restartPolicy") not in (None, "Always"):
            problem(cwhere, "restartPolicy may only be Always")
    for name, v in volumes.items():
        for kind, key in (("ConfigMap", "configMap"), ("Secret", "secret")):
            # An optional volume may name what another chart makes.
            if key in v and not v[key].get("optional"):
                ref = v[key].get("name") or v[key].get("secretName")
                if ref not in external and not rendered(docs, kind, ref):
                    problem(where, f"volume {name!r} refers to {kind} {ref!r}, which is not rendered")


def check_render(label, docs, external):
    names = set()
    for doc in docs:
        kind, meta = doc["kind"], doc["metadata"]
        name, ns = meta["name"], meta.get("namespace", NAMESPACE)
        where = f"[{label}] {kind}/{name}"
        if (kind, ns, name) in names:
            problem(where, "rendered twice")
        names.add((kind, ns, name))
        pattern = SERVICE_NAME if kind == "Service" else DNS_SUBDOMAIN
        limit = 63 if kind in ("Service", "StatefulSet") else 253
        if len(name) > limit or not pattern.match(name):
            problem(where, f"name {name!r} is not a valid {kind} name (at most {limit})")
        for key, value in meta.get("labels", {}).items():
            if len(str(value)) > 63 or not LABEL_VALUE.match(str(value)):
                problem(where, f"label {key}={value!r} is not a valid label value")
        spec, labels = pod_spec(doc)
        if spec is not None and kind != "Pod":
            selector = doc["spec"].get("selector", {}).get("matchLabels", {})
            if not selector or any(labels.get(k) != v for k, v in selector.items()):
                problem(where, f"selector {selector} does not match the pod labels {labels}")
        if spec is not None:
            claims = [c["metadata"]["name"] for c in doc["spec"].get("volumeClaimTemplates", [])]
            check_pod(where, spec, docs, external, claims)
        if kind == "Service":
            selector = doc["spec"].get("selector")
            if selector:
                pods = [pod_spec(d) for d in docs if pod_spec(d)[0] is not None]
                matched = [s for s, l in pods if all(l.get(k) == v for k, v in selector.items())]
                if not matched:
                    problem(where, f"selector {selector} matches no pod in the chart")
                for port in doc["spec"]["ports"]:
                    pname = port.get("name", "")
                    if len(pname) > 15 or not PORT_NAME.match(pname):
                        problem(where, f"port name {pname!r} is not valid")
                    target = port.get("targetPort")
                    if isinstance(target, str) and matched and not all(
                            target in named_ports(s) for s in matched):
                        problem(where, f"targetPort {target!r} is not a port its pods name")
        if kind == "MutatingWebhookConfiguration":
            for hook in doc["webhooks"]:
                svc = hook["clientConfig"]["service"]
                if not any(d["kind"] == "Service" and d["metadata"]["name"] == svc["name"]
                           and any(p["port"] == svc.get("port", 443) for p in d["spec"]["ports"])
                           for d in docs):
                    problem(where, f"calls service {svc['name']}:{svc.get('port')}, which is not rendered")
                if svc.get("path") != "/mutate":
                    problem(where, "the injector serves /mutate")
                cert_manager = "cert-manager.io/inject-ca-from" in meta.get("annotations", {})
                if not cert_manager and not hook["clientConfig"].get("caBundle"):
                    problem(where, "no caBundle and no cert-manager CA injection")
                if "namespaceSelector" not in hook:
                    problem(where, "no namespaceSelector: it would see every namespace")
        if kind == "PrometheusRule":
            rules = [r for g in doc["spec"]["groups"] for r in g["rules"]]
            alerts = {r["alert"] for r in rules}
            if alerts != EXPECTED_ALERTS:
                problem(where, f"alerts {sorted(alerts)} are not the expected {sorted(EXPECTED_ALERTS)}")
            sections = anchors(os.path.join(ROOT, "docs", "runbook.md"))
            for r in rules:
                anchor = r["annotations"]["runbook_url"].rsplit("#", 1)[-1]
                if anchor not in sections:
                    problem(where, f"{r['alert']}: runbook_url #{anchor} is not a section of docs/runbook.md")
                if not r["expr"].strip():
                    problem(where, f"{r['alert']}: empty expression")
        if kind == "ConfigMap" and "breakwater.json" in doc.get("data", {}):
            dashboard = json.loads(doc["data"]["breakwater.json"])
            exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
            for metric in ("breakwater_requests_total", "breakwater_request_duration_seconds_bucket",
                           "breakwater_circuit_state", "breakwater_retries_total",
                           "breakwater_dead_letters", "breakwater_sagas"):
                if metric not in exprs:
                    problem(where, f"the dashboard does not show {metric}")
        if kind == "ConfigMap" and "policies.yaml" in doc.get("data", {}):
            with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
                f.write(doc["data"]["policies.yaml"])
            checked = run([BREAKWATER, "config", "check", f.name])
            os.unlink(f.name)
            if checked.returncode != 0:
                problem(where, f"the policy file does not pass `breakwater config check`:\n{checked.stderr}")


def validate(label, docs):
    builtin = [d for d in docs if d["kind"] not in CUSTOM_KINDS]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump_all(builtin, f)
    out = run(["kubernetes-validate", "--strict", "--quiet", f.name])
    os.unlink(f.name)
    if out.returncode != 0:
        problem(f"[{label}]", f"kubernetes-validate --strict:\n{out.stdout}{out.stderr}")
    for d in docs:
        if d["kind"] in CUSTOM_KINDS and not d.get("spec"):
            problem(f"[{label}] {d['kind']}/{d['metadata']['name']}", "no spec")


def render(label, args, chart=CHART, lint=True):
    if lint:
        linted = helm("lint", "--strict", chart, *args)
        if linted.returncode != 0:
            problem(f"[{label}]", f"helm lint --strict:\n{linted.stdout}{linted.stderr}")
    rendered = helm("template", "bw", chart, "--namespace", NAMESPACE, *args)
    if rendered.returncode != 0:
        problem(f"[{label}]", f"helm template:\n{rendered.stderr}")
        return []
    return [d for d in yaml.safe_load_all(rendered.stdout) if d]


def main():
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(AGENTS_VALUES, f)
        agents_file = f.name
    for label, args in VALUE_SETS.items():
        args = [agents_file if a == "AGENTS" else a for a in args]
        docs = render(label, args)
        external = {"my-token"} if label == "existing secret" else set()
        kinds = sorted({d["kind"] for d in docs})
        print(f"{label}: {len(docs)} manifests ({', '.join(kinds)})")
        validate(label, docs)
        check_render(label, docs, external)
        if label == "webhook off" and any(d["kind"] == "MutatingWebhookConfiguration" for d in docs):
            problem(f"[{label}]", "the webhook is rendered")
        if label == "monitoring on" and not {"ServiceMonitor", "PrometheusRule"} <= set(kinds):
            problem(f"[{label}]", "ServiceMonitor or PrometheusRule missing")
        if label == "defaults" and {"ServiceMonitor", "PrometheusRule"} & set(kinds):
            problem(f"[{label}]", "Prometheus Operator objects without their CRDs")
        # Without a token the control plane (listening on 0.0.0.0) starts
        # only when told to serve open; with one it must not be told so.
        cp_args = [a for d in docs if d["kind"] == "StatefulSet"
                   for c in d["spec"]["template"]["spec"]["containers"] for a in c.get("args", [])]
        if ("--insecure-no-auth" in cp_args) != (label == "auth off"):
            problem(f"[{label}]", f"--insecure-no-auth with auth {'off' if label == 'auth off' else 'on'}: {cp_args}")
        if ("--token-file" in cp_args) == (label == "auth off"):
            problem(f"[{label}]", f"--token-file with auth {'off' if label == 'auth off' else 'on'}")
        # Sidecars are pointed at the control plane, with the token the
        # injector mounts (named by the Secret the chart uses).
        service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-control-plane"))
        grpc = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
        want = {"url": f"http://{service['metadata']['name']}.{NAMESPACE}.svc:{grpc}"}
        if label != "auth off":
            want["token_file"] = "/var/run/breakwater/token"
        for d in docs:
            if d["kind"] == "ConfigMap" and "policies.yaml" in d.get("data", {}):
                policies = yaml.safe_load(d["data"]["policies.yaml"])
                got = policies.get("control_plane")
                if got != want:
                    problem(f"[{label}] ConfigMap/{d['metadata']['name']}", f"control_plane is {got}, not {want}")
                # The API that changes circuits and faults stays on loopback;
                # only probes and metrics face the pod network.
                if policies["admin"] != {"listen": "127.0.0.1:15000", "probes_listen": "0.0.0.0:15020"}:
                    problem(f"[{label}] ConfigMap/{d['metadata']['name']}", f"admin is {policies['admin']}")
        injector_args = [a for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-injector")
                         for c in d["spec"]["template"]["spec"]["containers"] for a in c.get("args", [])]
        secret = "my-token" if label == "existing secret" else "breakwater-token"
        if injector_args and injector_args[injector_args.index("--token-secret") + 1] != secret:
            problem(f"[{label}]", f"the injector does not mount the token Secret {secret}: {injector_args}")
        # The injector is told the mode, the init image and the exclusions.
        want = ["--intercept=iptables"]
        if label == "intercept env, exclusions":
            want = ["--intercept=env", "--exclude-outbound-ports=5432,6379", "--exclude-outbound-cidrs=10.0.0.0/8"]
        want.append("--init-image=breakwater-init:" + chart_version())
        if injector_args and not set(want) <= set(injector_args):
            problem(f"[{label}]", f"the injector is not given {want}: {injector_args}")
        if label == "agent namespaces and upstreams":
            for ns in ("agents", "billing"):
                for kind in ("ConfigMap", "Secret"):
                    if not any(d["kind"] == kind and d["metadata"].get("namespace") == ns for d in docs):
                        problem(f"[{label}]", f"no {kind} in namespace {ns}")
    os.unlink(agents_file)

    # The CRDs' presence alone turns the Prometheus Operator objects on.
    docs = render("monitoring CRDs present", ["--api-versions", "monitoring.coreos.com/v1/ServiceMonitor",
                                              "--api-versions", "monitoring.coreos.com/v1/PrometheusRule"],
                  lint=False)
    if not {"ServiceMonitor", "PrometheusRule"} <= {d["kind"] for d in docs}:
        problem("[monitoring CRDs present]", "ServiceMonitor or PrometheusRule missing")

    # Wrong values fail at install time, naming the value.
    for setting, field in (("injector.failurePolicy=Maybe", "failurePolicy"),
                           ("controlPlane.grpcPort=0", "grpcPort"),
                           ("monitoring.prometheusRule.thresholds.errorRate=2", "errorRate"),
                           ("sidecar.resources.limits.memory=lots", "memory"),
                           ("intercept.mode=ebpf", "mode"),
                           ("intercept.excludeOutboundPorts={0}", "excludeOutboundPorts"),
                           ("controlPlane.sagaWorkrs=3", "sagaWorkrs")):
        out = helm("template", "bw", CHART, "--set", setting)
        if out.returncode == 0 or field not in out.stderr:
            problem("[schema]", f"--set {setting} was not refused with a message naming {field}:\n{out.stderr}")
    print("wrong values: refused")

    # The sidecar a chart adds by hand is the one the injector adds.
    dep = helm("dependency", "update", EXAMPLE)
    if dep.returncode != 0:
        problem("[example]", dep.stderr)
    docs = render("example without webhook", [], chart=EXAMPLE)
    validate("example without webhook", docs)
    check_render("example without webhook", docs, set())
    added = {c["name"]: c for d in docs if d["kind"] == "Deployment"
             for c in d["spec"]["template"]["spec"]["initContainers"]}
    manual, manual_init = added["breakwater"], added["breakwater-init"]
    with open(os.path.join(ROOT, "tests", "data", "admission", "annotated-pod.json")) as f:
        pod = json.load(f)["request"]["object"]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(pod, f)
    preview = run([BREAKWATER, "inject-preview", f.name, "--image", manual["image"],
                   "--init-image", manual_init["image"]])
    os.unlink(f.name)
    if preview.returncode != 0:
        problem("[injected pod]", preview.stderr)
    else:
        injected = json.loads(preview.stdout)
        injected["metadata"]["name"] = "ocr-agent-1"
        validate("injected pod", [injected])
        check_render("injected pod", [injected], {"breakwater-policies", "breakwater-token"})
        token = next((v for v in injected["spec"]["volumes"] if v["name"] == "breakwater-token"), None)
        if token != {"name": "breakwater-token", "secret": {"secretName": "breakwater-token", "optional": True}}:
            problem("[injected pod]", f"no optional volume of the token Secret: {token}")
        init = {c["name"]: c for c in injected["spec"]["initContainers"]}
        if [c["name"] for c in injected["spec"]["initContainers"]] != ["breakwater-init", "breakwater"]:
            problem("[injected pod]", "the init container does not come first, then the sidecar")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if init["breakwater"][probe]["httpGet"]["port"] != "bw-probes":
                problem("[injected pod]", f"{probe} is not on the probes port")
        mounts = {m["mountPath"]: m["name"] for m in init["breakwater"]["volumeMounts"]}
        if mounts.get("/var/run/breakwater") != "breakwater-token":
            problem("[injected pod]", f"the sidecar does not mount the token where the policies name it: {mounts}")
        sidecar = init["breakwater"]
        # The pod's annotation raised the memory limit; otherwise the same.
        sidecar["resources"]["limits"]["memory"] = manual["resources"]["limits"]["memory"]
        if sidecar != manual:
            problem("[injected pod]", "the injector's sidecar differs from the chart's breakwater.sidecar:\n"
                    f"injector: {json.dumps(sidecar, sort_keys=True)}\nchart:    {json.dumps(manual, sort_keys=True)}")
        if init["breakwater-init"] != manual_init:
            problem("[injected pod]", "the injector's init container differs from the chart's breakwater.init:\n"
                    f"injector: {json.dumps(init['breakwater-init'], sort_keys=True)}\n"
                    f"chart:    {json.dumps(manual_init, sort_keys=True)}")
        # The init container leaves the sidecar's own traffic alone.
        uid = str(sidecar["securityContext"]["runAsUser"])
        args = manual_init["args"]
        if args[args.index("--exclude-uid") + 1] != uid or args[args.index("--redirect-port") + 1] != str(
                manual["ports"][0]["containerPort"]):
            problem("[injected pod]", f"the init container's {args} do not match the sidecar's UID {uid} and port")
        print("injected pod: valid, and the same init container and sidecar as breakwater.init and breakwater.sidecar")

    if problems:
        print(f"\n{len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"- {p}", file=sys.stderr)
        sys.exit(1)
    print("the chart is valid")


if __name__ == "__main__":
    main()
