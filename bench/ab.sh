#!/usr/bin/env bash
# Interleaved A/B: pass-through ("off") against the default policy ("on"),
# alternating, each run a fresh sidecar pinned to core 0 with the load
# generator and upstream on core 1, so that the machine's drift falls on
# both sides alike. Prints requests per CPU-second of the sidecar.
#
#   bench/ab.sh [grpc|http1] [pairs]      (defaults: grpc, 5)
set -euo pipefail
cd "$(dirname "$0")/.."
PROTOCOL=${1:-grpc}
PAIRS=${2:-5}
OUT=bench/out
mkdir -p "$OUT"
cargo build --release --locked -j2 --bin breakwater --example loadgen >&2
BW=target/release/breakwater
LOADGEN=target/release/examples/loadgen

. bench/policies.sh
write_policies "$OUT/ab"
port=18100; [ "$PROTOCOL" = grpc ] && port=18101

taskset -c 1 "$LOADGEN" upstream --http 127.0.0.1:18080 --grpc 127.0.0.1:18081 &
UPSTREAM=$!
trap 'kill $UPSTREAM 2>/dev/null || true' EXIT
sleep 0.5

printf '| pair | policy | requests | sidecar CPU s | req per CPU-s |\n|---:|---|---:|---:|---:|\n'
for pair in $(seq "$PAIRS"); do
    for policy in off on; do
        RUST_LOG=warn taskset -c 0 "$BW" sidecar --threads 1 --reload-interval 0 \
            --config "$OUT/ab-$policy.yaml" 2>/dev/null &
        SIDECAR=$!
        for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done
        t0=$(awk '{print $14 + $15}' /proc/$SIDECAR/stat)
        result=$(taskset -c 1 "$LOADGEN" run --target "127.0.0.1:$port" --protocol "$PROTOCOL" \
            --mode closed --concurrency 64 --h2-connections 4 --duration 8s --warmup 0s)
        t1=$(awk '{print $14 + $15}' /proc/$SIDECAR/stat)
        kill -INT $SIDECAR; wait $SIDECAR 2>/dev/null || true
        ok=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["ok"])' "$result")
        ticks=$((t1 - t0))
        hz=$(getconf CLK_TCK)
        printf '| %s | %s | %s | %s | %s |\n' "$pair" "$policy" "$ok" \
            "$(python3 -c "print(f'{$ticks/$hz:.2f}')")" "$((ok * hz / ticks))"
    done
done
