#!/usr/bin/env bash
# Checkpoint puts: Breakwater's control plane against PostgreSQL, at equal
# durability (an acknowledged write is on disk: fsync on, and
# synchronous_commit = on for PostgreSQL).
#
# Each write stores a 1 KiB state as a new version of one of 10,000
# workflows and moves the workflow's latest version, in one transaction,
# from 64 concurrent clients. Breakwater is driven by `loadgen
# checkpoints` (gRPC); PostgreSQL by `pgbench` with the same rows.
#
# Usage: bench/control.sh [seconds]   (default 20)
# Results: bench/out/control.json, and a table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RUN=${1:-20}
CLIENTS=64
WORKFLOWS=10000
OUT=bench/out
mkdir -p "$OUT"

if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    echo "installing PostgreSQL (Debian's package)" >&2
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q postgresql >/dev/null
fi
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)

cargo build --release --locked -j2 --bin breakwater --example loadgen >&2
BIN=target/release/breakwater
LOADGEN=target/release/examples/loadgen

# ---------------------------------------------------------------- Breakwater
rm -rf "$OUT/cp-data"
$BIN --log-format json control-plane --data-dir "$OUT/cp-data" --listen 127.0.0.1:17070 \
    2>"$OUT/cp.log" &
CP=$!
trap 'kill $CP 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "control plane ready" "$OUT/cp.log" && break; sleep 0.1; done
echo "breakwater: ${SECONDS_TO_RUN}s, $CLIENTS clients" >&2
$LOADGEN checkpoints --target http://127.0.0.1:17070 --concurrency $CLIENTS \
    --workflows $WORKFLOWS --state-bytes 1024 --duration "${SECONDS_TO_RUN}s" --warmup 3s \
    >"$OUT/control-breakwater.json"
kill $CP; wait $CP 2>/dev/null || true
trap - EXIT

# ---------------------------------------------------------------- PostgreSQL
PGDATA="$OUT/pg-data"
PGSOCK=$(mktemp -d)
rm -rf "$PGDATA"
mkdir -p "$PGDATA"
RUN=()
if [ "$(id -u)" -eq 0 ]; then
    # PostgreSQL refuses to run as root.
    chown postgres "$PGDATA" "$PGSOCK" "$OUT"
    RUN=(runuser -u postgres --)
fi
"${RUN[@]}" "$PGBIN/initdb" -D "$PGDATA" -A trust -U postgres >/dev/null
"${RUN[@]}" "$PGBIN/pg_ctl" -D "$PGDATA" -l "$OUT/pg.log" -w start -o \
    "-p 55432 -k $PGSOCK -c listen_addresses='' -c fsync=on -c synchronous_commit=on \
     -c full_page_writes=on -c max_connections=200 -c shared_buffers=256MB" >/dev/null
trap '"${RUN[@]}" "$PGBIN/pg_ctl" -D "$PGDATA" -m fast stop >/dev/null 2>&1 || true' EXIT
PSQL=(psql -h "$PGSOCK" -p 55432 -U postgres -q -v ON_ERROR_STOP=1)
"${PSQL[@]}" <<'SQL'
CREATE TABLE workflows (id text PRIMARY KEY, latest bigint NOT NULL);
CREATE TABLE checkpoints (
    workflow_id text NOT NULL,
    version bigint NOT NULL,
    step text NOT NULL,
    state bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow_id, version)
);
SQL
cat >"$OUT/put.sql" <<SQL
\set w random(1, $WORKFLOWS)
BEGIN;
INSERT INTO workflows (id, latest) VALUES ('wf-' || :w, 1)
    ON CONFLICT (id) DO UPDATE SET latest = workflows.latest + 1
    RETURNING latest \gset
INSERT INTO checkpoints (workflow_id, version, step, state)
    VALUES ('wf-' || :w, :latest, 'step', convert_to(repeat('x', 1024), 'UTF8'));
COMMIT;
SQL
echo "postgresql: ${SECONDS_TO_RUN}s, $CLIENTS clients" >&2
rm -f "$OUT"/pgbench_log.*
# Warm-up, then the measured run with a per-transaction latency log.
"${RUN[@]}" pgbench -h "$PGSOCK" -p 55432 -U postgres -n -c $CLIENTS -j 2 -T 3 \
    -f "$OUT/put.sql" postgres >/dev/null
(cd "$OUT" && "${RUN[@]}" pgbench -h "$PGSOCK" -p 55432 -U postgres -n -c $CLIENTS -j 2 \
    -T "$SECONDS_TO_RUN" -l --log-prefix=pgbench_log -f put.sql postgres >pgbench.txt)

python3 - "$OUT" "$SECONDS_TO_RUN" <<'PY'
import glob, json, sys
out, seconds = sys.argv[1], float(sys.argv[2])
lat = []
for path in glob.glob(f"{out}/pgbench_log.*"):
    with open(path) as f:
        for line in f:
            fields = line.split()
            lat.append(int(fields[2]))
lat.sort()
pct = lambda p: lat[min(len(lat) - 1, int(len(lat) * p / 100))] if lat else 0
pg = {"ok": len(lat), "rps": round(len(lat) / seconds), "p50_us": pct(50), "p99_us": pct(99), "p999_us": pct(99.9)}
bw = json.load(open(f"{out}/control-breakwater.json"))
json.dump({"breakwater": bw, "postgresql": pg}, open(f"{out}/control.json", "w"), indent=2)
print(f"{'':12} {'puts/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9}")
for name, r in [("breakwater", bw), ("postgresql", pg)]:
    print(f"{name:12} {r['rps']:>8} {r['p50_us']/1000:>8.2f} {r['p99_us']/1000:>8.2f} {r['p999_us']/1000:>9.2f}")
PY
