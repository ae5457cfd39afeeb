# The `breakwater` image: one static-enough binary (glibc only) on a
# distroless base, running as a non-root user. Every subcommand is in it:
# sidecar, control-plane, injector and the operator commands.
#
#   docker build -t breakwater:0.1.0 .
#
# The `breakwater-init` image (target `init`) is the same binary beside
# Debian's iptables (nft mode), for the init container that redirects an
# injected pod's outbound TCP to its sidecar (docs/interception.md):
#
#   docker build --target init -t breakwater-init:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin breakwater \
    && strip target/release/breakwater

FROM debian:bookworm-slim AS init
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/breakwater /usr/local/bin/breakwater
ENTRYPOINT ["/usr/local/bin/breakwater"]

# The default target, last: the sidecar, control plane and injector image.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/breakwater /usr/local/bin/breakwater
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/breakwater"]
