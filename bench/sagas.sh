#!/usr/bin/env bash
# Sagas: how many three-step sagas per second the control plane runs with
# durable transitions (every transition flushed before it acts), against a
# fast local upstream; and how long a restart takes to resume 10,000
# unfinished sagas.
#
# Throughput: `loadgen sagas` starts COUNT sagas from 64 clients, each of
# three HTTP POST steps with a DELETE compensation, and polls /metrics until
# all have completed: sagas per second from the first start to the last
# completion.
#
# Resume: sagas are started into a control plane that runs one at a time
# (--saga-workers 1), so nearly all are unfinished when it is killed with
# SIGKILL; a new control plane on the same data is timed from launch to
# "control plane ready" (every unfinished saga loaded, checked and
# scheduled; the log says how many), then to the last completion.
#
# Usage: bench/sagas.sh [count]   (default 20000)
# Results: bench/out/sagas.json, and a summary on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${1:-20000}
RESUME=10500
OUT=bench/out
mkdir -p "$OUT"

cargo build --release --locked -j2 --bin breakwater --example loadgen >&2
BIN=target/release/breakwater
LOADGEN=target/release/examples/loadgen

$LOADGEN upstream --http 127.0.0.1:18080 --grpc 127.0.0.1:18081 &
UPSTREAM=$!
CP=""
cleanup() { kill $UPSTREAM ${CP:-} 2>/dev/null || true; }
trap cleanup EXIT
cat >"$OUT/saga-policies.yaml" <<'YAML'
upstreams:
  fast: {address: 127.0.0.1:18080}
YAML

# Starts a control plane on $1 (data dir) with extra flags; sets CP.
start_cp() {
    local dir=$1
    shift
    : >"$OUT/saga-cp.log"
    $BIN --log-format json control-plane --data-dir "$dir" --listen 127.0.0.1:17080 \
        --admin-listen 127.0.0.1:17082 --config "$OUT/saga-policies.yaml" "$@" \
        2>"$OUT/saga-cp.log" &
    CP=$!
    for _ in $(seq 2000); do
        grep -q "control plane ready" "$OUT/saga-cp.log" && return 0
        sleep 0.005
    done
    echo "the control plane did not start" >&2
    exit 1
}

# ---------------------------------------------------------------- throughput
rm -rf "$OUT/saga-data"
start_cp "$OUT/saga-data"
echo "throughput: $COUNT three-step sagas" >&2
$LOADGEN sagas --target http://127.0.0.1:17080 --admin 127.0.0.1:17082 \
    --count "$COUNT" --steps 3 --concurrency 64 --prefix run >"$OUT/sagas-throughput.json"
kill $CP; wait $CP 2>/dev/null || true

# ---------------------------------------------------------------- resume
rm -rf "$OUT/saga-data"
start_cp "$OUT/saga-data" --saga-workers 1
echo "resume: $RESUME sagas started into one worker, then SIGKILL" >&2
$LOADGEN sagas --target http://127.0.0.1:17080 --admin 127.0.0.1:17082 \
    --count "$RESUME" --steps 3 --concurrency 64 --prefix resume --no-wait >/dev/null
kill -9 $CP; wait $CP 2>/dev/null || true
launched=$(date +%s.%N)
start_cp "$OUT/saga-data"
ready=$(date +%s.%N)
resumed=$(grep "control plane ready" "$OUT/saga-cp.log" | python3 -c \
    'import json,sys; print(json.loads(sys.stdin.readline())["resumed_sagas"])')
# Every resumed saga completes; those that had finished before the kill
# are counted from the store at start.
$LOADGEN sagas --target http://127.0.0.1:17080 --admin 127.0.0.1:17082 \
    --count "$RESUME" --wait-only >/dev/null
finished=$(date +%s.%N)
kill $CP; wait $CP 2>/dev/null || true

python3 - "$OUT" "$launched" "$ready" "$finished" "$resumed" <<'PY'
import json, sys
out, launched, ready, finished, resumed = sys.argv[1], *map(float, sys.argv[2:5]), int(sys.argv[5])
t = json.load(open(f"{out}/sagas-throughput.json"))
r = {"resumed": resumed, "launch_to_ready_s": round(ready - launched, 3),
     "launch_to_all_completed_s": round(finished - launched, 3)}
json.dump({"throughput": t, "resume": r}, open(f"{out}/sagas.json", "w"), indent=2)
print(f"throughput: {t['sagas']} three-step sagas in {t['seconds']:.2f} s: {t['sagas_per_s']} sagas/s "
      f"(start p50 {t['starts']['p50_us']/1000:.1f} ms, p99 {t['starts']['p99_us']/1000:.1f} ms)")
print(f"resume: {resumed} unfinished sagas; launch to ready {r['launch_to_ready_s']} s, "
      f"to all completed {r['launch_to_all_completed_s']} s")
PY
