#!/usr/bin/env bash
# Idle keep-alive clients (issue 18): N connections to a target, each after one request, then
# held idle; the target's RSS growth per connection. Peers: this proxy and nginx doing the same
# job (header injected, TLS to a local nginx upstream with a pooled keep-alive connection).
#
# Each client connection sends one GET of a 1.2 KiB page, reads the whole response and stays
# open. RSS is VmRSS summed over the target's processes, read before the first connection (after
# one warm-up request on a connection that is closed again) and once all N are open and idle
# (after a 2 s settle); growth ÷ N is the cost of one idle connection. Errors are connections
# or requests that failed. The open-file limit is raised to N + 1024 for everything started here.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bench/idle.sh [--conns LIST] [--targets LIST] [--no-build | --bin PATH] [--keep]
  --conns LIST    connection counts, comma-separated (default 1000,5000,10000)
  --targets LIST  proxy,nginx (default both)
  --no-build      use the existing target/release binary
  --bin PATH      measure this proxy binary
  --keep          keep the temporary directory
Environment: BENCH_PORT_BASE (default 28700; uses 4 ports from there); IDLE_BATCH=B and
IDLE_PAUSE=S pause S seconds after every B connections (the proxy parks idle connections after
1 s: paced, the figure is the parked state's cost without the unparked ones' high-water mark);
IDLE_PROXY_ENV="NAME=value ..." adds to the proxy's environment (an allocator experiment:
LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2, MALLOC_ARENA_MAX=1, GLIBC_TUNABLES=...).
EOF
    exit "${1:-2}"
}

CONNS=1000,5000,10000 TARGETS=proxy,nginx BUILD=1 BIN_SRC="" KEEP=0
while (($#)); do
    case $1 in
        --conns) CONNS=${2:?}; shift ;;
        --targets) TARGETS=${2:?}; shift ;;
        --no-build) BUILD=0 ;;
        --bin) BUILD=0 BIN_SRC=$(realpath "${2:?}"); shift ;;
        --keep) KEEP=1 ;;
        -h | --help) usage 0 ;;
        *) usage ;;
    esac
    shift
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/pki.sh
source "$ROOT/bench/pki.sh"
export PATH=$PATH:/usr/sbin:/sbin
log() { printf '[idle %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

declare -A PKG=([nginx]=nginx [curl]=curl [openssl]=openssl [python3]=python3 [ss]=iproute2)
missing=()
for cmd in "${!PKG[@]}"; do command -v "$cmd" >/dev/null || missing+=("${PKG[$cmd]}"); done
if ((${#missing[@]})); then
    ((EUID == 0)) || die "missing ${missing[*]}; run as root to install them"
    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi
IFS=, read -r -a CONN_LIST <<<"$CONNS"
MAX_CONNS=0
for n in "${CONN_LIST[@]}"; do ((n > MAX_CONNS)) && MAX_CONNS=$n; done
ulimit -n $((MAX_CONNS + 1024)) || die "cannot raise the open-file limit to $((MAX_CONNS + 1024))"

[[ -n $BIN_SRC ]] || BIN_SRC=${CARGO_TARGET_DIR:-$ROOT/target}/release/bitbucket-auth-proxy
((BUILD)) && (cd "$ROOT" && cargo build --release)
[[ -x $BIN_SRC ]] || die "$BIN_SRC not found (build it, or drop --no-build)"

WORK=$(mktemp -d /tmp/bbap-idle.XXXXXX)
PIDS=()
stop() {
    local pid all=()
    for pid; do all+=("$pid" $(pgrep -P "$pid" 2>/dev/null || true)); done
    ((${#all[@]})) || return 0
    kill -TERM "${all[@]}" 2>/dev/null || true
    for pid in "${all[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}
forget() {
    local i
    for i in "${!PIDS[@]}"; do [[ ${PIDS[$i]} == "$1" ]] && unset 'PIDS[i]'; done
    PIDS=("${PIDS[@]}")
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    ((${#PIDS[@]})) && stop "${PIDS[@]}"
    if ((KEEP)); then log "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

BIN=$WORK/bitbucket-auth-proxy
cp "$BIN_SRC" "$BIN"
BASE=${BENCH_PORT_BASE:-28700}
P_UP=$BASE P_PROXY=$((BASE + 1)) P_NGINX=$((BASE + 2))
for p in $P_UP $P_PROXY $P_NGINX; do
    [[ -z $(ss -Hltn "sport = :$p") ]] || die "port $p is in use (set BENCH_PORT_BASE)"
done
declare -A PORT=([proxy]=$P_PROXY [nginx]=$P_NGINX)
TOKEN="bench-$(openssl rand -hex 16)"
PAGE_PATH=/2.0/repositories/acme/widgets

mkdir -p "$WORK/pki" "$WORK/www" "$WORK/upstream" "$WORK/nginx" "$WORK/proxy" "$WORK/logs"
throwaway_pki "$WORK/pki" 2>"$WORK/pki.log" || { cat "$WORK/pki.log" >&2; die "openssl failed"; }
CA=$WORK/pki/ca.pem
python3 -c 'import json,sys; print(json.dumps({"type": "repository", "full_name": "acme/widgets", "description": "x" * 1100}))' \
    >"$WORK/www/page.json"

NGINX_USER=""
((EUID == 0)) && NGINX_USER="user root;"
temp_paths() { for t in client_body proxy fastcgi uwsgi scgi; do echo "  ${t}_temp_path $1/tmp_$t;"; done; }
cat >"$WORK/upstream/nginx.conf" <<EOF
$NGINX_USER
worker_processes 1;
worker_rlimit_nofile $((MAX_CONNS + 1024));
pid $WORK/upstream/nginx.pid;
error_log $WORK/upstream/error.log warn;
events { worker_connections 1024; }
http {
$(temp_paths "$WORK/upstream")
  access_log off;
  keepalive_timeout 300s;
  keepalive_requests 1000000000;
  server {
    listen 127.0.0.1:$P_UP ssl http2;
    ssl_certificate $WORK/pki/leaf.pem;
    ssl_certificate_key $WORK/pki/leaf.key;
    location = $PAGE_PATH {
      if (\$http_authorization != "Bearer $TOKEN") { return 401; }
      types { } default_type application/json;
      alias $WORK/www/page.json;
    }
  }
}
EOF
# The peer: one worker, like the proxy's one runtime; its memory per connection is nginx's
# connection structure, its 1 KiB header buffer, and the pooled upstream connection's share.
cat >"$WORK/nginx/nginx.conf" <<EOF
$NGINX_USER
worker_processes 1;
worker_rlimit_nofile $((MAX_CONNS + 1024));
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections $((MAX_CONNS + 512)); }
http {
$(temp_paths "$WORK/nginx")
  access_log off;
  keepalive_timeout 300s;
  keepalive_requests 1000000000;
  upstream bitbucket { server 127.0.0.1:$P_UP; keepalive 64; }
  server {
    listen 127.0.0.1:$P_NGINX backlog=4096;
    location / {
      proxy_pass https://bitbucket;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer $TOKEN";
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate $CA;
      proxy_ssl_name 127.0.0.1;
      proxy_ssl_session_reuse on;
    }
  }
}
EOF
write_proxy_conf() { # $1 max_connections
    cat >"$WORK/proxy/proxy.toml" <<EOF
[server]
listen = ["127.0.0.1:$P_PROXY"]
max_connections = $1
# Idle connections are what is measured: they must not be closed while counted.
header_read_timeout = "300s"

[upstream]
api_url = "https://127.0.0.1:$P_UP"
ca_file = "$CA"

[credentials.acme]
kind = "workspace_access_token"
workspace = "acme"
token = { value = "$TOKEN" }

[[routes]]
prefix = "/2.0/repositories/acme"
credential = "acme"
# The same job as nginx's (and a content-length response for the client script).
rewrite_links = false
EOF
}

cat >"$WORK/clients.py" <<'EOF'
# Opens N connections, one GET each, response read in full, then holds them all; prints
# "OPEN <ok> <errors>" and waits for a line on stdin before closing them.
import os, socket, sys, time
port, n, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
# IDLE_BATCH=B IDLE_PAUSE=S: a pause of S seconds after every B connections (default: none).
batch, pause = int(os.environ.get("IDLE_BATCH", "0")), float(os.environ.get("IDLE_PAUSE", "0"))
request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
held, errors = [], 0
for i in range(n):
    if batch and i and i % batch == 0:
        time.sleep(pause)
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("closed before the head")
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        status = head.split(b" ", 2)[1]
        length = next(int(l.split(b":", 1)[1]) for l in head.split(b"\r\n")[1:]
                      if l.lower().startswith(b"content-length:"))
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("closed mid-body")
            body += chunk
        if status != b"200":
            raise ConnectionError(f"status {status!r}")
        held.append(s)
    except Exception as e:
        errors += 1
        if errors <= 3:
            print(f"error: {e}", file=sys.stderr)
print(f"OPEN {len(held)} {errors}", flush=True)
sys.stdin.readline()
# Every held connection must still be open: a byte of a second request gets an answer.
alive = 0
for s in held:
    try:
        s.sendall(request)
        if s.recv(1):
            alive += 1
    except Exception:
        pass
print(f"ALIVE {alive}", flush=True)
EOF

rss_kib() {
    local pid key value _ total=0
    for pid in "$@"; do
        while read -r key value _; do
            [[ $key == VmRSS: ]] && { total=$((total + value)); break; }
        done <"/proc/$pid/status"
    done
    echo "$total"
}
wait_ok() { # $1 url
    local deadline=$((SECONDS + 10))
    until [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1") == 200 ]]; do
        ((SECONDS < deadline)) || die "$1 did not answer 200"
        sleep 0.05
    done
}

nginx -c "$WORK/upstream/nginx.conf" -g 'daemon off;' >"$WORK/logs/upstream.log" 2>&1 &
PIDS+=($!)
sleep 0.5

ROWS=$WORK/rows.txt
: >"$ROWS"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
IFS=, read -r -a TARGET_LIST <<<"$TARGETS"
for n in "${CONN_LIST[@]}"; do
    for target in "${TARGET_LIST[@]}"; do
        port=${PORT[$target]}
        if [[ $target == proxy ]]; then
            write_proxy_conf $((MAX_CONNS + 100))
            env RUST_LOG=warn ${IDLE_PROXY_ENV:-} "$BIN" run --config "$WORK/proxy/proxy.toml" >"$WORK/logs/proxy.log" 2>&1 &
        else
            nginx -c "$WORK/nginx/nginx.conf" -g 'daemon off;' >"$WORK/logs/nginx.log" 2>&1 &
        fi
        master=$!
        PIDS+=("$master")
        wait_ok "http://127.0.0.1:$port$PAGE_PATH"
        sleep 0.5
        pids=("$master" $(pgrep -P "$master" || true))
        before=$(rss_kib "${pids[@]}")
        coproc CLIENTS { python3 "$WORK/clients.py" "$port" "$n" "$PAGE_PATH" 2>>"$WORK/logs/clients.log"; }
        read -r word ok errors <&"${CLIENTS[0]}"
        [[ $word == OPEN ]] || die "clients: $word"
        sleep 2
        after=$(rss_kib "${pids[@]}")
        echo >&"${CLIENTS[1]}"
        read -r _ alive <&"${CLIENTS[0]}"
        wait "$CLIENTS_PID" 2>/dev/null || true
        per=$(awk -v a="$after" -v b="$before" -v n="$ok" 'BEGIN { printf "%.2f", n ? (a - b) / n : 0 }')
        log "$target n=$n: RSS $before -> $after KiB, $per KiB/conn, $ok open, $errors errors, $alive still alive"
        echo "$n $target $before $after $per $ok $errors $alive" >>"$ROWS"
        stop "$master"
        forget "$master"
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

STAMP=$(date -u +%Y%m%d-%H%M%S)
OUT=$ROOT/bench/results/issue18-idle-$STAMP.md
{
    echo "# Idle keep-alive connections, issue 18 ($(date -u +%FT%TZ), commit $(git -C "$ROOT" rev-parse --short HEAD), binary $BIN_SRC)"
    echo
    echo "\`${IDLE_PROXY_ENV:+IDLE_PROXY_ENV=\"$IDLE_PROXY_ENV\" }bench/idle.sh --conns $CONNS --targets $TARGETS\`. Load average before $LOAD_BEFORE, after $LOAD_AFTER."
    echo "Each connection: one GET of a 1.2 KiB page through the target, response read, then idle."
    echo "nginx with one worker; the proxy with its default runtime (one worker thread per CPU)."
    echo
    echo "| connections | target | RSS before KiB | RSS idle KiB | KiB per connection | open | errors | alive after |"
    echo "|---|---|---|---|---|---|---|---|"
    while read -r n target before after per ok errors alive; do
        echo "| $n | $target | $before | $after | $per | $ok | $errors | $alive |"
    done <"$ROWS"
} >"$OUT"
cat "$OUT"
log "wrote $OUT"
