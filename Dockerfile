# syntax=docker/dockerfile:1
#
# Multi-stage build: a release binary built on Debian bookworm, run on distroless (glibc, no
# shell) as the unprivileged `nonroot` user.
#
#   docker build -t bitbucket-auth-proxy .
#   docker run --rm -e BITBUCKET_TOKEN -p 127.0.0.1:8080:8080 bitbucket-auth-proxy

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
# build: touch them so cargo rebuilds the crate.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked \
 && cp target/release/bitbucket-auth-proxy /usr/local/bin/bitbucket-auth-proxy

# ---- run -----------------------------------------------------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot

COPY --from=builder /usr/local/bin/bitbucket-auth-proxy /usr/local/bin/bitbucket-auth-proxy
# The default config listens on 0.0.0.0:8080 for clients on private (bridge/pod) networks and
# reads the token from BITBUCKET_TOKEN. Mount your own over it:
#   -v "$PWD/proxy.toml:/etc/bitbucket-auth-proxy/config.toml:ro"
COPY config/container.toml /etc/bitbucket-auth-proxy/config.toml

USER nonroot

# The proxy listens on 0.0.0.0:8080 only because the mounted config says
# `listen = ["0.0.0.0:8080"]`; its built-in default is 127.0.0.1:8080, unreachable from outside
# the container. It also serves only peers in `allowed_clients` (default: loopback), so that list
# must cover the pod/bridge network the clients come from, as config/container.toml does.
EXPOSE 8080

ENTRYPOINT ["/usr/local/bin/bitbucket-auth-proxy"]
CMD ["run", "--config", "/etc/bitbucket-auth-proxy/config.toml"]
