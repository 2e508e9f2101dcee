# syntax=docker/dockerfile:1
#
# worker-host and the sample handlers, built in one stage and shipped in a slim runtime image.
#
#   docker build -t worker-host .
#   docker run --rm worker-host --test_input '{"input": {"hello": "world"}}'
#   docker run --rm -p 8000:8000 worker-host --rp_serve_api --rp_api_host 0.0.0.0
#
# On RunPod the platform sets RUNPOD_* in the environment and the image runs as a queue worker
# with no arguments. Your own handler goes in a layer of its own (see the README, "Deploying"):
# a new handler version is a new .so, never a new host build.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
# The target directory and the registry live in build caches, so the artefacts are copied out
# to /out in the same step. --locked: the image is built from exactly the committed Cargo.lock.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        -p worker-host -p echo-handler -p stream-handler -p c-echo-handler \
 && mkdir -p /out/handlers \
 && cp target/release/worker-host /out/ \
 && cp target/release/libecho_handler.so \
       target/release/libstream_handler.so \
       target/release/libc_echo_handler.so /out/handlers/

# The same Debian release as the build, so the glibc the binary was linked against is there
# (worker-host needs glibc 2.34 or later: Debian 12, Ubuntu 22.04, RHEL 9 and the CUDA images
# built on them).
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# worker-host itself carries its TLS roots; ca-certificates is for handlers that fetch models.
# It is left unpinned on purpose: certificate updates should reach every rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/worker-host /usr/local/bin/worker-host
COPY --from=build /out/handlers/ /opt/worker-host/handlers/
ENV WORKER_HOST_HANDLER=/opt/worker-host/handlers/libecho_handler.so
# worker-host runs as PID 1: it installs its own SIGTERM and SIGINT handlers (RunPod stops a
# worker with SIGTERM, then drains it for --shutdown-grace-secs), and it does an init's other
# job too: it reaps every child it inherits (the handler runs in a runner process of the host's,
# and processes a handler starts are left to PID 1 when their parent dies), so no init shim is
# needed. It runs as root, as RunPod's own base images do, so that handlers can write to the
# network volume mounted at /runpod-volume.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/worker-host"]
