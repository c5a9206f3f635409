# syntax=docker/dockerfile:1
#
# Multi-stage build: a release binary built on Debian bookworm, run on distroless (glibc, no
# shell) as the unprivileged `nonroot` user.
#
#   docker build -t bitbucket-auth-proxy .
#   docker run --rm -e BITBUCKET_TOKEN -p 127.0.0.1:8080:8080 bitbucket-auth-proxy
#
# The OCI labels' revision and creation time come from build arguments (.git is not in the build
# context), e.g.
#   docker build -t bitbucket-auth-proxy \
#     --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" .
#
# Deployment examples (docker compose, Kubernetes, systemd, CI) are in deploy/.

# ---- build ---------------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /build

# Dependencies first: this layer is rebuilt only when Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src

# Then the real source. COPY keeps the files' own timestamps, which may be older than the dummy
# build: touch them so cargo rebuilds the crate. build.rs stamps `--version` and the build_info
# metric with the commit; .git is not in the context, so the REVISION build argument names it.
ARG REVISION=unknown
COPY build.rs ./
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && if [ "$REVISION" != unknown ]; then export BITBUCKET_AUTH_PROXY_COMMIT="$(printf %.7s "$REVISION")"; fi \
 && cargo build --release --locked \
 && cp target/release/bitbucket-auth-proxy /usr/local/bin/bitbucket-auth-proxy

# ---- run -----------------------------------------------------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot

# Keep VERSION in step with Cargo.toml's `version`.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="bitbucket-auth-proxy" \
      org.opencontainers.image.description="Keeps Bitbucket Cloud credentials in one process: local clients call it without secrets, it injects the right token per path and forwards over TLS" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"

COPY --from=builder /usr/local/bin/bitbucket-auth-proxy /usr/local/bin/bitbucket-auth-proxy
COPY LICENSE-MIT LICENSE-APACHE /usr/share/doc/bitbucket-auth-proxy/
# The default config listens on 0.0.0.0:8080 for clients on private (bridge/pod) networks and
# reads the token from BITBUCKET_TOKEN. Mount your own over it:
#   -v "$PWD/proxy.toml:/etc/bitbucket-auth-proxy/config.toml:ro"
COPY config/container.toml /etc/bitbucket-auth-proxy/config.toml

# Non-root (uid/gid 65532 in distroless): the proxy needs no privilege. It binds an unprivileged
# port and only reads its config and secrets, so a compromise of the process gets no root in the
# container. Mounted secret files must be readable by uid 65532.
USER nonroot

# The proxy listens on 0.0.0.0:8080 only because the mounted config says
# `listen = ["0.0.0.0:8080"]`; its built-in default is 127.0.0.1:8080, unreachable from outside
# the container. It also serves only peers in `allowed_clients` (default: loopback), so that list
# must cover the pod/bridge network the clients come from, as config/container.toml does.
EXPOSE 8080

# distroless has no shell and no curl, so the check is the binary's own `health` subcommand,
# in exec form: it reads the config, probes `/-/health` on its first `listen` address (0.0.0.0
# is probed on 127.0.0.1, so `allowed_clients` must keep loopback), waits at most 3 s and exits
# 0 only on a 200 (--timeout leaves room above that 3 s). Because it loads the config, the
# config's secrets must be readable by the check too, and a config edited into an invalid state
# shows as unhealthy (the error is in `docker inspect`) while the running proxy keeps serving
# the last valid one. If you mount the config elsewhere, change the path here and in CMD.
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/bitbucket-auth-proxy", "health", "--config", "/etc/bitbucket-auth-proxy/config.toml"]

ENTRYPOINT ["/usr/local/bin/bitbucket-auth-proxy"]
CMD ["run", "--config", "/etc/bitbucket-auth-proxy/config.toml"]
