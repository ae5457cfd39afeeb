# Sourced by bench/instructions.sh and bench/ab.sh: writes the two policy
# files they compare, pass-through ("off": no retries, no breaker) and the
# built-in defaults ("on"), as "$1-off.yaml" and "$1-on.yaml".
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
}
