# Sourced by bench/instructions.sh and bench/ab.sh: writes the policy
# files they compare, pass-through ("off": no retries, no breaker) and the
# built-in defaults ("on"), as "$1-off.yaml" and "$1-on.yaml"; and
# "$1-routed.yaml", the defaults with routes, every call matching the
# last of them after trying the others (exact, prefix with a method, a
# header, a regular expression).
write_policies() { # path-prefix
    local defaults
    for policy in off on; do
        defaults=""
        [ "$policy" = off ] && defaults="retry: {max_attempts: 1}, circuit_breaker: {enabled: false}"
        cat > "$1-$policy.yaml" <<YAML
admin: {listen: 127.0.0.1:18190}
proxy: {listen: 127.0.0.1:18191}
defaults: {$defaults}
upstreams:
  upstream: {address: 127.0.0.1:18080, protocol: http1, listen: 127.0.0.1:18100}
  grpc-upstream: {address: 127.0.0.1:18081, protocol: grpc, listen: 127.0.0.1:18101}
YAML
    done
    cat > "$1-routed.yaml" <<'YAML'
admin: {listen: 127.0.0.1:18190}
proxy: {listen: 127.0.0.1:18191}
upstreams:
  upstream:
    address: 127.0.0.1:18080
    protocol: http1
    listen: 127.0.0.1:18100
    routes:
      - {name: models, match: {path: {exact: /v1/models}}, timeout: 5s}
      - {name: chat, match: {path: {prefix: /v1/chat}, method: POST}, timeout: 120s}
      - {name: tier, match: {headers: {x-tier: gold}}, retry: {max_attempts: 5}}
      - {name: rest, match: {path: {prefix: /}}, timeout: 20s}
  grpc-upstream:
    address: 127.0.0.1:18081
    protocol: grpc
    listen: 127.0.0.1:18101
    routes:
      - {name: create, match: {grpc: {service: breakwater.echo.v1.Echo, method: Create}}, idempotent: false}
      - {name: other, match: {path: {regex: '/other\..*'}}}
      - {name: echo, match: {grpc: {service: breakwater.echo.v1.Echo}}, timeout: 20s}
YAML
}
