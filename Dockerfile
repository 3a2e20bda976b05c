# syntax=docker/dockerfile:1.7
#
# natsbridge image: one static-ish binary on distroless. Build it with
#   docker build -t natsbridge:dev .
#   (or: podman build / buildah bud / kaniko, with BuildKit-style cache mounts ignored if unsupported)
# The same image serves every role: `run` (the injected sidecar), `inject` (the webhook) and
# `provision` (the Helm hook Job).

# The builder's Rust must be >= the crate's rust-version; pin it so rebuilds are reproducible.
ARG RUST_VERSION=1.95.0

FROM rust:${RUST_VERSION}-slim-bookworm AS builder
WORKDIR /src
# The whole (dockerignored) tree, not just src/: Cargo refuses a manifest whose declared bench or
# test targets are missing.
COPY . .
# --locked: an image must build exactly the dependency set CI tested.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin natsbridge \
    && install -D -m 0755 target/release/natsbridge /out/natsbridge

# cc, not static: ring links against glibc; distroless/cc carries glibc + libgcc and nothing else
# (no shell, no package manager).
FROM gcr.io/distroless/cc-debian12:nonroot

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="natsbridge" \
      org.opencontainers.image.description="A sidecar that moves HTTP services onto NATS and JetStream one route at a time" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"

COPY --from=builder /out/natsbridge /usr/local/bin/natsbridge

# Numeric, so Kubernetes' runAsNonRoot can verify it without resolving a user name.
USER 65532:65532

# 4280: egress (bound on loopback inside the pod), 9464: admin (/healthz, /readyz, /metrics),
# 8443: the injector webhook (only in `inject` mode).
EXPOSE 4280 9464 8443

# mimalloc (the binary's allocator) keeps transparent huge pages off for the process: on a
# node with THP "always", 2 MB pages would add several MB of RSS to every sidecar (the
# build already skips mimalloc's own huge-page advice, `no_thp`; BENCHMARKS.md).
ENV MIMALLOC_ALLOW_THP=0

ENTRYPOINT ["/usr/local/bin/natsbridge"]
CMD ["run", "--config", "/etc/natsbridge/routes.toml"]
