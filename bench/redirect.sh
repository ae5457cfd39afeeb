#!/usr/bin/env bash
# The cost of interception: an agent calling its upstream's own address
# through `breakwater init`'s redirection, against the same calls on the
# upstream's dedicated port; and the TCP relay (a connection going to no
# upstream) against a direct connection.
#
#   bench/redirect.sh                     # about 3 minutes
#   DURATION=5s REPEAT=1 bench/redirect.sh
#
# Needs root, ip, iptables and setpriv (as tests/intercept.rs does). Two
# network namespaces of its own joined by a veth pair: the agent's
# (10.99.0.1, the sidecar and the load generator) and the upstream's
# (10.99.0.2, the load generator's upstream). Nothing leaves them. The
# sidecar runs as UID 1337, one worker thread, pinned to core 0; the load
# generator and the upstream to core 1. Closed loop, 64 in flight.
# Results: bench/out/redirect.jsonl and a Markdown table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
REPEAT=${REPEAT:-2}
CONCURRENCY=${CONCURRENCY:-64}
OUT=bench/out
AGENT=bwbench-agent
UP=bwbench-up
mkdir -p "$OUT"

cargo build --release --locked -j2 --bin breakwater --example loadgen
BW=$PWD/target/release/breakwater
LOADGEN=$PWD/target/release/examples/loadgen

PIDS=()
cleanup() {
    for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip netns del "$AGENT" 2>/dev/null || true
    ip netns del "$UP" 2>/dev/null || true
}
trap cleanup EXIT
cleanup

ip netns add "$AGENT"
ip netns add "$UP"
ip link add bwbench-a type veth peer name bwbench-u
ip link set bwbench-a netns "$AGENT"
ip link set bwbench-u netns "$UP"
ip -n "$AGENT" addr add 10.99.0.1/24 dev bwbench-a
ip -n "$UP" addr add 10.99.0.2/24 dev bwbench-u
ip -n "$AGENT" link set lo up
ip -n "$UP" link set lo up
ip -n "$AGENT" link set bwbench-a up
ip -n "$UP" link set bwbench-u up

in_agent() { ip netns exec "$AGENT" "$@"; }
wait_for() { # ns host port
    for _ in $(seq 100); do
        ip netns exec "$1" bash -c "echo >/dev/tcp/$2/$3" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "$2:$3 never opened" >&2
    exit 1
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
sys_ticks() { awk '{print $15}' "/proc/$1/stat"; }

# Two upstreams: one the sidecar knows (18080, 18081), one it does not
# (18082, 18083: relayed).
# (Started with `ip netns exec` itself, not a shell function: `$!` is then
# the server's own pid, which `exec` keeps.)
ip netns exec "$UP" taskset -c 1 "$LOADGEN" upstream --http 10.99.0.2:18080 --grpc 10.99.0.2:18081 &
PIDS+=($!)
ip netns exec "$UP" taskset -c 1 "$LOADGEN" upstream --http 10.99.0.2:18082 --grpc 10.99.0.2:18083 &
PIDS+=($!)
for p in 18080 18081 18082 18083; do wait_for "$AGENT" 10.99.0.2 "$p"; done

# Pass-through policy, as bench/run.sh's breakwater-off.
CONFIG=$(mktemp -d)/redirect.yaml
cat > "$CONFIG" <<'YAML'
admin: {listen: 127.0.0.1:18190}
proxy: {listen: 127.0.0.1:18191}
defaults:
  retry: {max_attempts: 1}
  circuit_breaker: {enabled: false}
upstreams:
  upstream: {address: 10.99.0.2:18080, protocol: http1, listen: 127.0.0.1:18100}
  grpc-upstream: {address: 10.99.0.2:18081, protocol: grpc, listen: 127.0.0.1:18101}
YAML
chmod 755 "$(dirname "$CONFIG")"
chmod 644 "$CONFIG"
RUST_LOG=warn ip netns exec "$AGENT" setpriv --reuid 1337 --regid 1337 --clear-groups \
    taskset -c 0 "$BW" sidecar --threads 1 --config "$CONFIG" >"$OUT/redirect-sidecar.log" 2>&1 &
SIDECAR=$!
PIDS+=("$SIDECAR")
wait_for "$AGENT" 127.0.0.1 18191

: > "$OUT/redirect.jsonl"
measure() { # cell protocol target host
    local args=(run --target "$3" --host "$4" --protocol "$2" --mode closed --concurrency "$CONCURRENCY")
    in_agent taskset -c 1 "$LOADGEN" "${args[@]}" --duration "$WARMUP" --warmup 0s >/dev/null
    for run in $(seq "$REPEAT"); do
        local before after sys_before sys_after result
        before=$(cpu_ticks "$SIDECAR")
        sys_before=$(sys_ticks "$SIDECAR")
        result=$(in_agent taskset -c 1 "$LOADGEN" "${args[@]}" --duration "$DURATION" --warmup 0s)
        after=$(cpu_ticks "$SIDECAR")
        sys_after=$(sys_ticks "$SIDECAR")
        echo "{\"cell\":\"$1\",\"protocol\":\"$2\",\"run\":$run,\"cpu_ticks\":$((after - before)),\"sys_ticks\":$((sys_after - sys_before)),\"result\":$result}" |
            tee -a "$OUT/redirect.jsonl"
    done
}

# Without redirection: the dedicated ports, and the unknown upstream direct.
measure dedicated-port http1 127.0.0.1:18100 upstream
measure dedicated-port grpc 127.0.0.1:18101 grpc-upstream
measure direct http1 10.99.0.2:18082 10.99.0.2:18082
measure direct grpc 10.99.0.2:18083 10.99.0.2:18083

in_agent "$BW" init --redirect-port 18191 --exclude-uid 1337 --ipv6 off >/dev/null
# The upstream's own address, as an unmodified agent calls it.
measure redirected http1 10.99.0.2:18080 10.99.0.2:18080
measure redirected grpc 10.99.0.2:18081 10.99.0.2:18081
# An address no upstream has: relayed byte for byte.
measure relayed http1 10.99.0.2:18082 10.99.0.2:18082
measure relayed grpc 10.99.0.2:18083 10.99.0.2:18083
in_agent "$BW" init --cleanup >/dev/null
# How the redirected connections were counted: one per connection, not
# per request (the load generator keeps its connections).
in_agent curl -s http://127.0.0.1:18190/metrics | grep '^breakwater_intercepted_connections_total' |
    tee "$OUT/redirect-connections.txt"

python3 - "$OUT/redirect.jsonl" <<'PY'
import json, os, sys
hz = os.sysconf("SC_CLK_TCK")
print("| cell | protocol | run | req/s | p50 µs | p99 µs | sidecar CPU s (kernel) | req per sidecar CPU-s | errors |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|")
for line in open(sys.argv[1]):
    r = json.loads(line)
    res, cpu = r["result"], r["cpu_ticks"] / hz
    # Direct runs bypass the sidecar: its CPU time there is idle noise.
    eff = f"{res['ok'] / cpu:,.0f}" if cpu > 0 and r["cell"] != "direct" else "-"
    kernel = r["sys_ticks"] / hz
    print(f"| {r['cell']} | {r['protocol']} | {r['run']} | {res['rps']:,} | {res['p50_us']} | {res['p99_us']} | {cpu:.2f} ({kernel:.2f}) | {eff} | {res['errors']} |")
PY
