#!/usr/bin/env bash
# Per-call latency for clients that keep no connection (issue 18): a fresh `curl` process per
# request and `git ls-remote`, at a distance, direct against through the proxy.
#
# The upstream is nginx (TLS 1.3 only, h2 and http/1.1 by ALPN) closing idle connections after
# 2 s, behind bench/relay, which delays every byte by RTT/2 each way. "direct" is the client
# through the relay to the upstream; "proxy" is the client to the proxy on loopback, the proxy
# through the relay to the upstream. Per RTT:
#   - steady: --calls back-to-back calls each way (curl, then git);
#   - first:  the first call after start-up, --starts fresh proxies (readiness waited for);
#   - spaced: --spaced calls 3 s apart (past the upstream's 2 s idle close);
#   first and spaced also with `keep_warm = false` ("proxy-cold"), the behaviour before it.
# --costs measures instead where a call's time goes (bench/results/issue18-gitcosts-*.md): git's
# own start-up, each way at 0 ms added delay and at each RTT, and one request on a connection
# already open (direct, and through the proxy's warm one), so what the proxy adds is separated
# from what the tools cost.
# curl figures are curl's own time_total (process start excluded); git's are the wall time of
# the whole `git ls-remote` process. Loopback only; everything started here is stopped on exit.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bench/latency.sh [--rtt LIST] [--calls N] [--starts N] [--spaced N] [--costs]
                        [--no-build | --bin PATH] [--keep]
  --rtt LIST   round-trip times in ms, comma-separated (default 20,80)
  --calls N    steady-state calls per tool and way (default 50)
  --starts N   proxy start-ups for the first-call figure (default 5)
  --spaced N   calls 3 s apart per tool (default 10)
  --costs      where the time goes instead: tool start-up, 0 ms and each RTT, reused connections
  --no-build   use the existing target/release binary
  --bin PATH   measure this proxy binary
  --keep       keep the temporary directory
Environment: BENCH_PORT_BASE (default 28600; uses 4 ports from there).
EOF
    exit "${1:-2}"
}

RTTS=20,80 CALLS=50 STARTS=5 SPACED=10 COSTS=0 BUILD=1 BIN_SRC="" KEEP=0
while (($#)); do
    case $1 in
        --rtt) RTTS=${2:?}; shift ;;
        --calls) CALLS=${2:?}; shift ;;
        --starts) STARTS=${2:?}; shift ;;
        --spaced) SPACED=${2:?}; shift ;;
        --costs) COSTS=1 ;;
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
log() { printf '[latency %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

declare -A PKG=([nginx]=nginx [curl]=curl [git]=git [openssl]=openssl [python3]=python3 [ss]=iproute2)
missing=()
for cmd in "${!PKG[@]}"; do command -v "$cmd" >/dev/null || missing+=("${PKG[$cmd]}"); done
if ((${#missing[@]})); then
    ((EUID == 0)) || die "missing ${missing[*]}; run as root to install them"
    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi

[[ -n $BIN_SRC ]] || BIN_SRC=${CARGO_TARGET_DIR:-$ROOT/target}/release/bitbucket-auth-proxy
((BUILD)) && (cd "$ROOT" && cargo build --release)
[[ -x $BIN_SRC ]] || die "$BIN_SRC not found (build it, or drop --no-build)"
RELAY_SRC=$ROOT/bench/relay/target/release/relay
cargo build --release --manifest-path "$ROOT/bench/relay/Cargo.toml" \
    --target-dir "$ROOT/bench/relay/target" || die "cannot build bench/relay"

WORK=$(mktemp -d /tmp/bbap-latency.XXXXXX)
PIDS=()
stop() { # pids and their children, by pid
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
forget() { # drop a stopped pid from PIDS
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

BIN=$WORK/bitbucket-auth-proxy RELAY=$WORK/relay
cp "$BIN_SRC" "$BIN"
cp "$RELAY_SRC" "$RELAY"

BASE=${BENCH_PORT_BASE:-28600}
P_UP=$BASE P_STATUS=$((BASE + 1)) P_RELAY=$((BASE + 2)) P_PROXY=$((BASE + 3))
for p in $P_UP $P_STATUS $P_RELAY $P_PROXY; do
    [[ -z $(ss -Hltn "sport = :$p") ]] || die "port $p is in use (set BENCH_PORT_BASE)"
done
TOKEN="bench-$(openssl rand -hex 16)"
GIT_AUTH="Basic $(printf 'x-token-auth:%s' "$TOKEN" | base64 -w0)"
PAGE_PATH=/2.0/repositories/acme/widgets

# --- Throwaway CA and an ECDSA P-256 leaf for 127.0.0.1; content --------------------------------
mkdir -p "$WORK/pki" "$WORK/www" "$WORK/proxy" "$WORK/logs"
throwaway_pki "$WORK/pki" 2>"$WORK/pki.log" || { cat "$WORK/pki.log" >&2; die "openssl failed"; }
CA=$WORK/pki/ca.pem
printf '{"type":"repository","full_name":"acme/widgets","slug":"widgets","scm":"git"}' \
    >"$WORK/www/page.json"
# The smart-HTTP ref advertisement of a small repository, as Bitbucket serves info/refs.
(
    git init -q -b main "$WORK/repo"
    cd "$WORK/repo"
    git -c user.name=bench -c user.email=bench@example.invalid commit -q --allow-empty -m one
    git tag v1
    printf '001e# service=git-upload-pack\n0000'
    git upload-pack --stateless-rpc --advertise-refs .
) >"$WORK/www/info-refs"
EXPECTED_REFS=$(git ls-remote "$WORK/repo" | wc -l)

NGINX_USER=""
((EUID == 0)) && NGINX_USER="user root;"
mkdir -p "$WORK/upstream"
cat >"$WORK/upstream/nginx.conf" <<EOF
$NGINX_USER
worker_processes 1;
pid $WORK/upstream/nginx.pid;
error_log $WORK/upstream/error.log warn;
events { worker_connections 1024; }
http {
$(for t in client_body proxy fastcgi uwsgi scgi; do echo "  ${t}_temp_path $WORK/upstream/tmp_$t;"; done)
  access_log off;
  tcp_nodelay on;
  # Idle connections, fresh or used, are closed after 2 s.
  keepalive_timeout 2s;
  client_header_timeout 2s;
  map_hash_bucket_size 128;
  map \$http_authorization \$authorized {
    "Bearer $TOKEN" 1;
    "$GIT_AUTH" 1;
    default 0;
  }
  server {
    listen 127.0.0.1:$P_UP ssl http2;
    ssl_certificate $WORK/pki/leaf.pem;
    ssl_certificate_key $WORK/pki/leaf.key;
    ssl_protocols TLSv1.3;
    location = $PAGE_PATH {
      if (\$authorized = 0) { return 401; }
      types { } default_type application/json;
      alias $WORK/www/page.json;
    }
    location = /acme/widgets.git/info/refs {
      if (\$authorized = 0) { return 401; }
      types { } default_type application/x-git-upload-pack-advertisement;
      alias $WORK/www/info-refs;
    }
    location / { return 404; }
  }
  server {
    listen 127.0.0.1:$P_STATUS;
    location = /status { stub_status; }
  }
}
EOF

write_proxy_conf() { # $1 keep_warm
    cat >"$WORK/proxy/proxy.toml" <<EOF
[server]
listen = ["127.0.0.1:$P_PROXY"]

[upstream]
api_url = "https://127.0.0.1:$P_RELAY"
git_url = "https://127.0.0.1:$P_RELAY"
ca_file = "$CA"
keep_warm = $1

[credentials.acme]
kind = "workspace_access_token"
workspace = "acme"
token = { value = "$TOKEN" }

[[routes]]
prefix = "/2.0/repositories/acme"
credential = "acme"
rewrite_links = false

[[routes]]
prefix = "/git/acme/widgets.git"
upstream = "git"
upstream_prefix = "/acme/widgets.git"
credential = "acme"
EOF
}

# --- Helpers ----------------------------------------------------------------------------------
wait_until() { # $1 what, rest: command; 10 s bound
    local what=$1 deadline=$((SECONDS + 10))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "$what did not become ready"
        sleep 0.02
    done
}
http_ok() { [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$1") == 200 ]]; }
upstream_accepts() { curl -s --max-time 5 "http://127.0.0.1:$P_STATUS/status" | awk 'NR == 3 { print $1 }'; }

CSV=$WORK/calls.csv
echo "rtt,way,case,tool,ms,ok" >"$CSV"
record() { echo "$RTT,$1,$2,$3,$4,$5" >>"$CSV"; }

call_curl() { # $1 way $2 case
    local url out ok=1
    if [[ $1 == direct ]]; then
        out=$(curl -sS -o /dev/null --max-time 10 -w '%{http_code} %{time_total}' --cacert "$CA" \
            -H "Authorization: Bearer $TOKEN" "https://127.0.0.1:$P_RELAY$PAGE_PATH" 2>&1) || ok=0
    else
        out=$(curl -sS -o /dev/null --max-time 10 -w '%{http_code} %{time_total}' \
            "http://127.0.0.1:$P_PROXY$PAGE_PATH" 2>&1) || ok=0
    fi
    [[ ${out%% *} == 200 ]] || ok=0
    record "$1" "$2" curl "$(awk '{ printf "%.3f", $2 * 1000 }' <<<"$out")" "$ok"
}
call_git() { # $1 way $2 case
    local start end refs ok=1
    start=$EPOCHREALTIME
    if [[ $1 == direct ]]; then
        refs=$(GIT_SSL_CAINFO=$CA git -c http.extraHeader="Authorization: $GIT_AUTH" \
            ls-remote "https://127.0.0.1:$P_RELAY/acme/widgets.git" 2>>"$WORK/logs/git.log") || ok=0
    else
        refs=$(git ls-remote "http://127.0.0.1:$P_PROXY/git/acme/widgets.git" \
            2>>"$WORK/logs/git.log") || ok=0
    fi
    end=$EPOCHREALTIME
    [[ $(wc -l <<<"$refs") -eq $EXPECTED_REFS ]] || ok=0
    record "$1" "$2" git "$(awk -v s="$start" -v e="$end" 'BEGIN { printf "%.3f", (e - s) * 1000 }')" "$ok"
}

PROXY_PID=""
start_proxy() { # $1 keep_warm
    write_proxy_conf "$1"
    "$BIN" run --config "$WORK/proxy/proxy.toml" >>"$WORK/logs/proxy.log" 2>&1 &
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
    wait_until "the proxy" http_ok "http://127.0.0.1:$P_PROXY/-/ready"
}
stop_proxy() {
    stop "$PROXY_PID"
    forget "$PROXY_PID"
    PROXY_PID=""
}

nginx -c "$WORK/upstream/nginx.conf" -g 'daemon off;' >"$WORK/logs/upstream.log" 2>&1 &
PIDS+=($!)
wait_until "the upstream" http_ok "http://127.0.0.1:$P_STATUS/status"

# --- --costs: where a call's time goes --------------------------------------------------------
ms_since() { awk -v s="$1" -v e="$EPOCHREALTIME" 'BEGIN { printf "%.2f", (e - s) * 1000 }'; }
costs_row() { # $1 label, rest: command; $CALLS runs, wall time of each
    local label=$1 start
    shift
    local -a xs=()
    for _ in $(seq "$CALLS"); do
        start=$EPOCHREALTIME
        "$@" >/dev/null 2>>"$WORK/logs/costs.log" || die "$label failed"
        xs+=("$(ms_since "$start")")
    done
    printf '%s\n' "${xs[@]}" | sort -n | awk -v l="$label" -v r="$CRTT" \
        '{ a[NR] = $1 } END { printf "| %s | %s | %.1f | %.1f | %.1f |\n", r, l, a[int((NR + 1) / 2)], a[1], a[int(NR * 0.9)] }'
}
git_direct() { GIT_SSL_CAINFO=$CA git -c http.extraHeader="Authorization: $GIT_AUTH" ls-remote "https://127.0.0.1:$P_RELAY/acme/widgets.git"; }
git_proxy() { git ls-remote "http://127.0.0.1:$P_PROXY/git/acme/widgets.git"; }
curl_direct() { curl -sS -o /dev/null --cacert "$CA" -H "Authorization: Bearer $TOKEN" "https://127.0.0.1:$P_RELAY$PAGE_PATH"; }
curl_proxy() { curl -sS -o /dev/null "http://127.0.0.1:$P_PROXY$PAGE_PATH"; }
# The second of two requests on one curl connection: the request alone, handshakes done.
reused_direct() {
    curl -sS -o /dev/null -o /dev/null --cacert "$CA" -H "Authorization: Bearer $TOKEN" \
        -w '%{time_total}\n' "https://127.0.0.1:$P_RELAY$PAGE_PATH" "https://127.0.0.1:$P_RELAY$PAGE_PATH" |
        tail -1 | awk '{ printf "%.2f\n", $1 * 1000 }'
}
reused_proxy() { curl -sS -o /dev/null -w '%{time_total}\n' "http://127.0.0.1:$P_PROXY$PAGE_PATH" | awk '{ printf "%.2f\n", $1 * 1000 }'; }
curl_time_row() { # $1 label $2 function printing ms
    local -a xs=()
    for _ in $(seq "$CALLS"); do xs+=("$("$2")"); done
    printf '%s\n' "${xs[@]}" | sort -n | awk -v l="$1" -v r="$CRTT" \
        '{ a[NR] = $1 } END { printf "| %s | %s | %.1f | %.1f | %.1f |\n", r, l, a[int((NR + 1) / 2)], a[1], a[int(NR * 0.9)] }'
}
if ((COSTS)); then
    STAMP=$(date -u +%Y%m%d-%H%M%S)
    OUT=$ROOT/bench/results/issue18-gitcosts-$STAMP.md
    COSTS_LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
    ROWS=$WORK/costs.md
    start_proxy true
    CRTT=-
    log "costs: tool start-up"
    costs_row "git --version (process start)" git --version >>"$ROWS"
    costs_row "git ls-remote of a local repository" git ls-remote "$WORK/repo" >>"$ROWS"
    for CRTT in 0 ${RTTS//,/ }; do
        log "costs: RTT $CRTT ms"
        "$RELAY" "127.0.0.1:$P_RELAY" "127.0.0.1:$P_UP" $((CRTT / 2)) >"$WORK/logs/relay-costs-$CRTT.log" 2>&1 &
        RELAY_PID=$!
        PIDS+=("$RELAY_PID")
        sleep 0.3
        curl_proxy && git_proxy >/dev/null # the proxy's pool, and git's page cache
        {
            curl_time_row "one request on an open connection, direct (curl time_total)" reused_direct
            curl_time_row "one request on an open connection, through the proxy (curl time_total)" reused_proxy
            costs_row "curl, direct (process wall time)" curl_direct
            costs_row "curl, through the proxy (process wall time)" curl_proxy
            costs_row "git ls-remote, direct" git_direct
            costs_row "git ls-remote, through the proxy" git_proxy
        } >>"$ROWS"
        GIT_TRACE_CURL=1 GIT_TRACE_CURL_NO_DATA=1 git_direct >/dev/null 2>"$WORK/trace-direct-$CRTT.txt"
        GIT_TRACE_CURL=1 GIT_TRACE_CURL_NO_DATA=1 git_proxy >/dev/null 2>"$WORK/trace-proxy-$CRTT.txt"
        stop "$RELAY_PID"
        forget "$RELAY_PID"
    done
    {
        echo "# Where a call's time goes, issue 18 ($(date -u +%FT%TZ), commit $(git -C "$ROOT" rev-parse --short HEAD))"
        echo
        echo "\`bench/latency.sh --costs --rtt $RTTS --calls $CALLS\`. Load average before $COSTS_LOAD_BEFORE, after $(cut -d' ' -f1-3 /proc/loadavg)."
        echo "Wall time of each process unless noted; RTT 0 is the relay with no added delay (the relay"
        echo "itself costs about 1 ms each way: tokio's timer rounds each delay up to the next millisecond)."
        echo
        echo "| RTT ms | what | p50 ms | min ms | p90 ms |"
        echo "|---|---|---|---|---|"
        cat "$ROWS"
        for CRTT in ${RTTS//,/ }; do
            echo
            echo "HTTP requests per \`git ls-remote\` at RTT $CRTT (GIT_TRACE_CURL): direct" \
                "$(grep -c '=> Send header: GET\|=> Send header: POST' "$WORK/trace-direct-$CRTT.txt")," \
                "through the proxy $(grep -c '=> Send header: GET\|=> Send header: POST' "$WORK/trace-proxy-$CRTT.txt")."
            echo "Direct, from git's trace (ms after its first HTTP line, which follows its process start-up): $(awk '
                { split($1, t, ":"); s = t[1] * 3600 + t[2] * 60 + t[3]; if (!t0) t0 = s }
                /Trying/ && !a { a = 1; printf "connect %.1f; ", (s - t0) * 1000 }
                /ALPN: offers/ && !b { b = 1; printf "CA certificates loaded %.1f; ", (s - t0) * 1000 }
                /SSL connection using/ && !c { c = 1; printf "TLS done %.1f; ", (s - t0) * 1000 }
                /Recv header: HTTP/ && !d { d = 1; printf "response %.1f; ", (s - t0) * 1000 }
                END { printf "exit %.1f.", (s - t0) * 1000 }' "$WORK/trace-direct-$CRTT.txt")"
            echo "Through the proxy: $(awk '
                { split($1, t, ":"); s = t[1] * 3600 + t[2] * 60 + t[3]; if (!t0) t0 = s }
                /Trying/ && !a { a = 1; printf "connect %.1f; ", (s - t0) * 1000 }
                /Recv header: HTTP/ && !d { d = 1; printf "response %.1f; ", (s - t0) * 1000 }
                END { printf "exit %.1f.", (s - t0) * 1000 }' "$WORK/trace-proxy-$CRTT.txt")"
        done
    } >"$OUT"
    cat "$OUT"
    log "wrote $OUT"
    exit 0
fi

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
STARTED=$(date -u +%FT%TZ)
declare -A SPACED_ACCEPTS=()
IFS=, read -r -a RTT_LIST <<<"$RTTS"
for RTT in "${RTT_LIST[@]}"; do
    log "RTT $RTT ms (load $(cut -d' ' -f1-3 /proc/loadavg))"
    "$RELAY" "127.0.0.1:$P_RELAY" "127.0.0.1:$P_UP" $((RTT / 2)) >"$WORK/logs/relay-$RTT.log" 2>&1 &
    RELAY_PID=$!
    PIDS+=("$RELAY_PID")
    sleep 0.2

    log "  direct: $CALLS curl, $CALLS git ls-remote"
    for _ in $(seq "$CALLS"); do call_curl direct steady; done
    for _ in $(seq "$CALLS"); do call_git direct steady; done

    for warm in true false; do
        way=proxy
        [[ $warm == true ]] || way=proxy-cold
        log "  $way: first call after start-up, $STARTS start-ups per tool"
        for tool in curl git; do
            for _ in $(seq "$STARTS"); do
                start_proxy "$warm"
                "call_$tool" "$way" first
                stop_proxy
            done
        done
        start_proxy "$warm"
        if [[ $warm == true ]]; then
            log "  $way: $CALLS curl, $CALLS git ls-remote back to back"
            call_curl "$way" warmup
            for _ in $(seq "$CALLS"); do call_curl "$way" steady; done
            for _ in $(seq "$CALLS"); do call_git "$way" steady; done
        fi
        log "  $way: $SPACED calls per tool, 3 s apart"
        before=$(upstream_accepts)
        for tool in curl git; do
            for _ in $(seq "$SPACED"); do
                sleep 3
                "call_$tool" "$way" spaced
            done
        done
        SPACED_ACCEPTS[$RTT-$way]="$(($(upstream_accepts) - before))"
        stop_proxy
    done
    stop "$RELAY_PID"
    forget "$RELAY_PID"
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

STAMP=$(date -u +%Y%m%d-%H%M%S)
OUT=$ROOT/bench/results/issue18-latency-$STAMP.md
cp "$CSV" "$ROOT/bench/results/latency-$STAMP.csv"
accepts=""
for key in "${!SPACED_ACCEPTS[@]}"; do accepts+="$key=${SPACED_ACCEPTS[$key]} "; done
python3 - "$CSV" "$OUT" "$STARTED" "$LOAD_BEFORE" "$LOAD_AFTER" "$(git -C "$ROOT" rev-parse --short HEAD)" \
    "$CALLS" "$STARTS" "$SPACED" "$accepts" <<'EOF'
import csv, statistics, sys
path, out, started, load_before, load_after, commit, calls, starts, spaced, accepts = sys.argv[1:]
rows = list(csv.DictReader(open(path)))
def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]
cells = {}
errors = {}
for r in rows:
    if r["case"] == "warmup":
        continue
    key = (int(r["rtt"]), r["tool"], r["way"], r["case"])
    if r["ok"] == "1":
        cells.setdefault(key, []).append(float(r["ms"]))
    else:
        errors[key] = errors.get(key, 0) + 1
lines = [
    f"# Per-call latency, issue 18 ({started}, commit {commit})", "",
    f"`bench/latency.sh --calls {calls} --starts {starts} --spaced {spaced}`. Load average "
    f"before {load_before}, after {load_after} (2 CPUs, shared with other builds).", "",
    "curl: curl's time_total, a new process and connection per call. git: wall time of "
    "`git ls-remote`. Upstream nginx, TLS 1.3, closing idle connections after 2 s, behind "
    "bench/relay. ×direct: the p50 over direct's steady p50 (every direct call pays the full "
    "handshakes, so direct has no first or spaced case).", "",
    "| RTT | tool | way | case | n | p50 ms | p99 ms | ×direct (p50) | errors |",
    "|---|---|---|---|---|---|---|---|---|",
]
for key in sorted(cells, key=lambda k: (k[0], k[1], k[2] != "direct", k[2], ["steady", "first", "spaced"].index(k[3]))):
    rtt, tool, way, case = key
    v = cells[key]
    direct = cells.get((rtt, tool, "direct", "steady"))
    ratio = f"{statistics.median(v) / statistics.median(direct):.2f}" if direct else ""
    lines.append(f"| {rtt} | {tool} | {way} | {case} | {len(v)} | {statistics.median(v):.1f} | "
                 f"{pct(v, 99):.1f} | {ratio} | {errors.get(key, 0)} |")
lines += ["", f"Upstream connections accepted during the spaced calls: {accepts.strip()}", ""]
open(out, "w").write("\n".join(lines))
print("\n".join(lines))
EOF
log "wrote $OUT"
