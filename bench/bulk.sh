#!/usr/bin/env bash
# Bulk transfer through a git route with default settings (issue 18): a 256 MiB pack fetched
# with curl, direct from a local TLS nginx upstream against through the proxy, the proxy once
# with its defaults (git to a git origin of its own over HTTP/1.1: `upstream.git_http2 = false`)
# and once with `upstream.git_http2 = true` (h2, as nginx offers it).
# Rounds are interleaved; the table gives the median MiB/s and the ratio to direct in the same
# round. CPU-bound on loopback: on a shared machine, read it with the load average beside it.
# With --rtt, the upstream is behind bench/relay (RTT/2 added each way, as in bench/latency.sh),
# for the direct client and the proxies alike: flow-control windows then bound a transfer.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bench/bulk.sh [--rounds N] [--mib N] [--rtt MS] [--no-build | --bin PATH]
  --rounds N   interleaved rounds (default 5)
  --mib N      pack size in MiB (default 256)
  --rtt MS     put the upstream behind bench/relay with this round-trip time (default 0: none)
Environment: BENCH_PORT_BASE (default 28800; uses 4 ports from there).
EOF
    exit "${1:-2}"
}
ROUNDS=5 MIB=256 RTT=0 BUILD=1 BIN_SRC="" ARGS="$*"
while (($#)); do
    case $1 in
        --rounds) ROUNDS=${2:?}; shift ;;
        --mib) MIB=${2:?}; shift ;;
        --rtt) RTT=${2:?}; shift ;;
        --no-build) BUILD=0 ;;
        --bin) BUILD=0 BIN_SRC=$(realpath "${2:?}"); shift ;;
        -h | --help) usage 0 ;;
        *) usage ;;
    esac
    shift
done
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/pki.sh
source "$ROOT/bench/pki.sh"
export PATH=$PATH:/usr/sbin:/sbin
log() { printf '[bulk %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
for cmd in nginx curl openssl python3; do command -v "$cmd" >/dev/null || die "$cmd is missing"; done
[[ -n $BIN_SRC ]] || BIN_SRC=${CARGO_TARGET_DIR:-$ROOT/target}/release/bitbucket-auth-proxy
((BUILD)) && (cd "$ROOT" && cargo build --release)
[[ -x $BIN_SRC ]] || die "$BIN_SRC not found"
if ((RTT > 0)); then
    cargo build --release --manifest-path "$ROOT/bench/relay/Cargo.toml" \
        --target-dir "$ROOT/bench/relay/target" || die "cannot build bench/relay"
fi

WORK=$(mktemp -d /tmp/bbap-bulk.XXXXXX)
PIDS=()
cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" $(pgrep -P "$pid" 2>/dev/null || true) 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

BASE=${BENCH_PORT_BASE:-28800}
P_UP=$BASE P_PROXY=$((BASE + 1)) P_PROXYH2=$((BASE + 2)) P_RELAY=$((BASE + 3))
# Where clients and proxies reach the upstream: nginx itself, or the relay in front of it.
P_REACH=$P_UP
((RTT > 0)) && P_REACH=$P_RELAY
TOKEN="bench-$(openssl rand -hex 16)"
GIT_AUTH="Basic $(printf 'x-token-auth:%s' "$TOKEN" | base64 -w0)"
PACK_PATH=/acme/widgets.git/objects/pack/pack-bench.pack
mkdir -p "$WORK/pki" "$WORK/www" "$WORK/upstream"
throwaway_pki "$WORK/pki" 2>"$WORK/pki.log" || die "openssl failed"
CA=$WORK/pki/ca.pem
head -c $((MIB << 20)) /dev/urandom >"$WORK/www/pack"
NGINX_USER=""
((EUID == 0)) && NGINX_USER="user root;"
cat >"$WORK/upstream/nginx.conf" <<EOF
$NGINX_USER
worker_processes 1;
pid $WORK/upstream/nginx.pid;
error_log $WORK/upstream/error.log warn;
events { worker_connections 1024; }
http {
$(for t in client_body proxy fastcgi uwsgi scgi; do echo "  ${t}_temp_path $WORK/upstream/tmp_$t;"; done)
  access_log off;
  sendfile on;
  keepalive_timeout 300s;
  server {
    listen 127.0.0.1:$P_UP ssl http2;
    ssl_certificate $WORK/pki/leaf.pem;
    ssl_certificate_key $WORK/pki/leaf.key;
    location = $PACK_PATH {
      if (\$http_authorization != "$GIT_AUTH") { return 401; }
      types { } default_type application/x-git-packed-objects;
      alias $WORK/www/pack;
    }
  }
}
EOF
proxy_conf() { # $1 port, [$2 extra upstream line]
    cat <<EOF
[server]
listen = ["127.0.0.1:$1"]
[upstream]
git_url = "https://127.0.0.1:$P_REACH"
ca_file = "$CA"
${2:-}
[credentials.acme]
kind = "workspace_access_token"
workspace = "acme"
token = { value = "$TOKEN" }
[[routes]]
prefix = "/git/acme/widgets.git"
upstream = "git"
upstream_prefix = "/acme/widgets.git"
credential = "acme"
EOF
}
mkdir -p "$WORK/p1" "$WORK/p2"
proxy_conf "$P_PROXY" >"$WORK/p1/proxy.toml"
proxy_conf "$P_PROXYH2" "git_http2 = true" >"$WORK/p2/proxy.toml"
nginx -c "$WORK/upstream/nginx.conf" -g 'daemon off;' >"$WORK/upstream.log" 2>&1 &
PIDS+=($!)
if ((RTT > 0)); then
    "$ROOT/bench/relay/target/release/relay" "127.0.0.1:$P_RELAY" "127.0.0.1:$P_UP" $((RTT / 2)) \
        >"$WORK/relay.log" 2>&1 &
    PIDS+=($!)
fi
RUST_LOG=warn "$BIN_SRC" run --config "$WORK/p1/proxy.toml" >"$WORK/p1.log" 2>&1 &
PIDS+=($!)
RUST_LOG=warn "$BIN_SRC" run --config "$WORK/p2/proxy.toml" >"$WORK/p2.log" 2>&1 &
PIDS+=($!)
sleep 1

fetch() { # $1 target: prints MiB/s
    local out
    case $1 in
        direct) out=$(curl -sS -o /dev/null --cacert "$CA" -H "Authorization: $GIT_AUTH" \
            -w '%{http_code} %{size_download} %{speed_download}' "https://127.0.0.1:$P_REACH$PACK_PATH") ;;
        proxy) out=$(curl -sS -o /dev/null -w '%{http_code} %{size_download} %{speed_download}' \
            "http://127.0.0.1:$P_PROXY/git$PACK_PATH") ;;
        proxy-h2) out=$(curl -sS -o /dev/null -w '%{http_code} %{size_download} %{speed_download}' \
            "http://127.0.0.1:$P_PROXYH2/git$PACK_PATH") ;;
    esac
    read -r code size speed <<<"$out"
    [[ $code == 200 && $size == $((MIB << 20)) ]] || die "$1: status $code, $size bytes"
    awk -v s="$speed" 'BEGIN { printf "%.1f", s / 1048576 }'
}
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
for t in direct proxy proxy-h2; do fetch "$t" >/dev/null; done # warm-up: pools, page cache
ROWS=$WORK/rows
for round in $(seq "$ROUNDS"); do
    line="$round"
    for t in direct proxy proxy-h2; do line+=" $(fetch "$t")"; done
    log "round $round: direct proxy proxy-h2 MiB/s: ${line#* }"
    echo "$line" >>"$ROWS"
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
OUT=$ROOT/bench/results/issue18-bulk-$(date -u +%Y%m%d-%H%M%S).md
{
    echo "# Bulk transfer through a git route, issue 18 ($(date -u +%FT%TZ), commit $(git -C "$ROOT" rev-parse --short HEAD))"
    echo
    echo "\`bench/bulk.sh $ARGS\`; MiB/s per round (direct, proxy, proxy-h2):"
    while read -r round speeds; do echo "round $round: $speeds  "; done <"$ROWS"
    echo
} >"$OUT"
python3 - "$ROWS" "$MIB" "$ROUNDS" "$LOAD_BEFORE" "$LOAD_AFTER" "$RTT" <<'EOF' | tee -a "$OUT"
import statistics, sys
rows = [list(map(float, l.split()[1:])) for l in open(sys.argv[1])]
mib, rounds, before, after, rtt = sys.argv[2:]
where = f", upstream behind a {rtt} ms RTT relay" if rtt != "0" else ""
print(f"{mib} MiB through a git route{where}, {rounds} interleaved rounds; load average before {before}, after {after}")
print("| target | median MiB/s | median ×direct (same round) | min–max ×direct |")
print("|---|---|---|---|")
for i, name in enumerate(["direct", "proxy (defaults: git over HTTP/1.1)", "proxy, git_http2 = true (h2)"]):
    ratios = [r[i] / r[0] for r in rows]
    print(f"| {name} | {statistics.median(r[i] for r in rows):.0f} | {statistics.median(ratios):.2f} | {min(ratios):.2f}–{max(ratios):.2f} |")
EOF
