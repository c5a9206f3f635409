# Starts bitbucket-auth-proxy for the rest of a CI job and points the job's tools at it.
# Source it (POSIX sh or bash), from the repository root:
#
#   export BB_PROXY_TOKEN=...                # the CI system's secret variable
#   . deploy/ci/start-proxy.sh
#   curl -fsS "$BITBUCKET_API_URL/2.0/repositories/acme?pagelen=1"
#   git clone https://bitbucket.org/acme/widgets.git      # goes through the proxy
#
# Needs `bitbucket-auth-proxy` on PATH (or BITBUCKET_AUTH_PROXY_BIN) and git 2.31 or later.
# Settings, all optional:
#   BITBUCKET_AUTH_PROXY_BIN     the binary            (default: bitbucket-auth-proxy)
#   BITBUCKET_AUTH_PROXY_CONFIG  the config file       (default: deploy/ci/config.toml)
#   BITBUCKET_AUTH_PROXY_URL     where it listens      (default: http://127.0.0.1:8080)
#
# After it: BITBUCKET_API_URL is the proxy's URL; for this job only, git rewrites the
# https://bitbucket.org/ URLs of the workspaces and repositories the config's git routes serve
# to the proxy (GIT_CONFIG_* variables built from the `git config` lines that
# `bitbucket-auth-proxy check --offline` prints, e.g. for deploy/ci/config.toml the same as
#   git config --global url."http://127.0.0.1:8080/git/acme/".insteadOf https://bitbucket.org/acme/
# without touching the runner's global config; other repositories stay direct);
# GIT_TERMINAL_PROMPT=0 makes git fail instead of waiting for a password; and the proxy is
# stopped (SIGTERM, in-flight requests drained) when the job's shell exits.

: "${BITBUCKET_AUTH_PROXY_BIN:=bitbucket-auth-proxy}"
: "${BITBUCKET_AUTH_PROXY_CONFIG:=deploy/ci/config.toml}"
: "${BITBUCKET_AUTH_PROXY_URL:=http://127.0.0.1:8080}"

# Logs go to a temporary file rather than the working tree, so they are printed only on failure.
BITBUCKET_AUTH_PROXY_LOG=$(mktemp "${TMPDIR:-/tmp}/bitbucket-auth-proxy-log.XXXXXX")
"$BITBUCKET_AUTH_PROXY_BIN" run --config "$BITBUCKET_AUTH_PROXY_CONFIG" --log-format json \
    2>"$BITBUCKET_AUTH_PROXY_LOG" &
BITBUCKET_AUTH_PROXY_PID=$!

bitbucket_auth_proxy_stop() {
    if kill -TERM "$BITBUCKET_AUTH_PROXY_PID" 2>/dev/null; then
        wait "$BITBUCKET_AUTH_PROXY_PID" 2>/dev/null || true
    fi
}
trap bitbucket_auth_proxy_stop EXIT

# Wait up to 10 s for /-/health. `health` exits 0 only on a 200 from the running proxy.
bitbucket_auth_proxy_tries=0
until "$BITBUCKET_AUTH_PROXY_BIN" health --url "$BITBUCKET_AUTH_PROXY_URL/-/health" >/dev/null 2>&1; do
    if ! kill -0 "$BITBUCKET_AUTH_PROXY_PID" 2>/dev/null; then
        echo "bitbucket-auth-proxy did not start:" >&2
        cat "$BITBUCKET_AUTH_PROXY_LOG" >&2
        return 1 2>/dev/null || exit 1
    fi
    bitbucket_auth_proxy_tries=$((bitbucket_auth_proxy_tries + 1))
    if [ "$bitbucket_auth_proxy_tries" -ge 50 ]; then
        echo "bitbucket-auth-proxy is not healthy after 10 s; its log:" >&2
        cat "$BITBUCKET_AUTH_PROXY_LOG" >&2
        return 1 2>/dev/null || exit 1
    fi
    sleep 0.2
done
echo "bitbucket-auth-proxy is serving on $BITBUCKET_AUTH_PROXY_URL (log: $BITBUCKET_AUTH_PROXY_LOG)"

export BITBUCKET_API_URL="$BITBUCKET_AUTH_PROXY_URL"
# One rewrite per git route, from the lines `check` prints:
#   git config --global url."PROXY_URL".insteadOf BITBUCKET_URL
bitbucket_auth_proxy_rewrites=$("$BITBUCKET_AUTH_PROXY_BIN" check --offline --config "$BITBUCKET_AUTH_PROXY_CONFIG" 2>/dev/null \
    | sed -n 's/^ *git config --global url\."\([^"]*\)"\.insteadOf \(.*\)$/\1 \2/p')
bitbucket_auth_proxy_n=${GIT_CONFIG_COUNT:-0}
while read -r bitbucket_auth_proxy_to bitbucket_auth_proxy_from; do
    [ -n "$bitbucket_auth_proxy_to" ] || continue
    export "GIT_CONFIG_KEY_$bitbucket_auth_proxy_n=url.$bitbucket_auth_proxy_to.insteadOf"
    export "GIT_CONFIG_VALUE_$bitbucket_auth_proxy_n=$bitbucket_auth_proxy_from"
    bitbucket_auth_proxy_n=$((bitbucket_auth_proxy_n + 1))
done <<EOF
$bitbucket_auth_proxy_rewrites
EOF
export GIT_CONFIG_COUNT=$bitbucket_auth_proxy_n
export GIT_TERMINAL_PROMPT=0
