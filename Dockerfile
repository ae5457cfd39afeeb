# The `breakwater` image: one static-enough binary (glibc only) on a
# distroless base, running as a non-root user. Every subcommand is in it:
# sidecar, control-plane, injector and the operator commands.
#
#   docker build -t breakwater:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin breakwater \
    && strip target/release/breakwater

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/breakwater /usr/local/bin/breakwater
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/breakwater"]
