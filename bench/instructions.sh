#!/usr/bin/env bash
# Instructions per call, counted by callgrind: a repeatable measure of the
# sidecar's CPU cost, unaffected by a noisy machine.
#
#   bench/instructions.sh
#
# For HTTP/1.1 and gRPC unary, with retries and the breaker off
# (pass-through), with the default policy (resilience on) and with the
# default policy under routes (each call tried against every route before
# the last, which takes it), the sidecar
# runs under `valgrind --tool=callgrind` while the load generator sends
# exactly RATE × SECONDS calls at a fixed rate; the sidecar's total
# instruction count, divided by the calls, is printed. Startup is included
# and amounts to a few hundred instructions per call.
#
#   BW=/path/to/breakwater bench/instructions.sh   # another build (A/B)
#   LOADGEN=/path/to/loadgen ...                   # and no build at all
#   RUNS=3 bench/instructions.sh                   # each cell three times
set -euo pipefail
cd "$(dirname "$0")/.."

RATE=${RATE:-1000}
SECONDS_=${SECONDS_:-8}
OUT=bench/out
mkdir -p "$OUT"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v valgrind >/dev/null; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind
fi
RUNS=${RUNS:-1}
if [ -z "${BW:-}" ]; then
    cargo build --release --locked -j2 --bin breakwater --example loadgen
    BW=target/release/breakwater
elif [ -z "${LOADGEN:-}" ]; then
    cargo build --release --locked -j2 --example loadgen
fi
LOADGEN=${LOADGEN:-target/release/examples/loadgen}

. bench/policies.sh
write_policies "$OUT/instructions"

wait_port() { for _ in $(seq 200); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; exit 1; }

"$LOADGEN" upstream --http 127.0.0.1:18080 --grpc 127.0.0.1:18081 &
UPSTREAM=$!
trap 'kill $UPSTREAM 2>/dev/null || true' EXIT
wait_port 18080

printf '| protocol | policy | calls | instructions per call |\n|---|---|---:|---:|\n'
for protocol in http1 grpc; do
    port=18100; [ "$protocol" = grpc ] && port=18101
    for policy in off on routed; do
      for run in $(seq "$RUNS"); do
        RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" \
            "$BW" sidecar --threads 1 --config "$OUT/instructions-$policy.yaml" 2>/dev/null &
        SIDECAR=$!
        wait_port "$port"
        result=$("$LOADGEN" run --target "127.0.0.1:$port" --protocol "$protocol" --mode rate \
                 --rate "$RATE" --concurrency 16 --h2-connections 2 --duration "${SECONDS_}s" --warmup 0s)
        kill -INT "$SIDECAR"; wait "$SIDECAR" || true
        calls=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["ok"])' "$result")
        total=$(awk '/^(summary|totals):/ {print $2; exit}' "$OUT/callgrind.out")
        printf '| %s | %s | %s | %s |\n' "$protocol" "$policy" "$calls" "$((total / calls))"
        # Kept for callgrind_annotate: which functions the calls cost.
        cp "$OUT/callgrind.out" "$OUT/callgrind.$protocol-$policy-$run.out"
      done
    done
done
