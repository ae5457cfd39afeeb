#!/usr/bin/env bash
# Fuzzes the config parser, the saga template engine and the header
# parsers, each for a bounded time (default 60 s).
#
# cargo-fuzz needs a nightly compiler for its flags; on a stable toolchain
# RUSTC_BOOTSTRAP=1 lets stable rustc accept them, and `-s none` leaves the
# address sanitizer out (its runtime is nightly-only). With nightly, drop
# both for ASan.
#
# Usage: fuzz/run.sh [seconds per target] [target...]
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-60}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(config template headers)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1 CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2}
for target in "${TARGETS[@]}"; do
    echo "--- fuzz $target for ${SECONDS_EACH}s"
    cargo fuzz run -s none "$target" -- -max_total_time="$SECONDS_EACH" 2>&1 \
        | grep -E "^Done|crash-|panicked|SUMMARY" || true
    if ls fuzz/artifacts/"$target"/crash-* >/dev/null 2>&1; then
        echo "crashing inputs in fuzz/artifacts/$target/: reproduce with cargo fuzz run -s none $target <file>"
        exit 1
    fi
done
