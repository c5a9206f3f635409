#!/usr/bin/env bash
# End-to-end benchmark: this proxy against nginx and HAProxy doing the same job (plain HTTP in,
# `Authorization` injected, TLS out with the upstream certificate verified, pooled keep-alive
# upstream connections), and against "direct" (wrk speaking TLS to the upstream itself: the
# ceiling). Loopback only; every run is bounded by wrk's -d; everything started here is stopped
# on exit. See bench/README.md for what is measured and how to read the table.
#
#   bench/run.sh            full matrix: 10 s cells, 2 interleaved rounds, unpinned and pinned
#   bench/run.sh --quick    smoke test: 3 s cells, 1 round
#
# Needs root only to install missing Debian packages (nginx haproxy wrk openssl curl python3).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bench/run.sh [--quick] [--rounds N] [--duration S] [--mode unpinned|pinned|both]
                    [--targets LIST] [--floors] [--perf] [--no-build | --bin PATH] [--keep]
  --quick       3 s cells, 1 round, 1 s warm-up (smoke test)
  --rounds N    interleaved rounds per mode (default 2)
  --duration S  seconds per measured cell (default 10)
  --mode M      unpinned, pinned or both (default both)
  --targets L   comma-separated subset of direct,nginx,haproxy,proxy,proxy-rw,proxy-h1,
                floor-hyper,floor-h2,floor-conn (default all but the floors; nginx is always
                run, ratios are to it)
  --floors      add floor-hyper, floor-h2 and floor-conn (bench/floor): the least this proxy's stack costs
                per request, with nothing of the proxy around it
  --perf        after the matrix, `perf record -e cpu-clock` the proxy under pinned 1 KiB c64
                (bench/results/perf-proxy-c64.{data,txt}); perf's sampling is not in the table
  --no-build    use the existing target/release binary
  --bin PATH    benchmark this proxy binary instead of building (an A/B of a change, a
                profiling build)
  --keep        keep the temporary directory (configs, logs) for inspection
Environment: BENCH_PORT_BASE (default 28400; uses 10 ports from there).
EOF
    exit "${1:-2}"
}

TARGET_LIST=direct,nginx,haproxy,proxy,proxy-rw,proxy-h1 BIN_SRC="" QUICK=0 ROUNDS=2 DUR=10 WARMUP=2 PERF=0 BUILD=1 KEEP=0
MODES=(unpinned pinned)
ARGS="$*"
while (($#)); do
    case $1 in
        --quick) QUICK=1 ROUNDS=1 DUR=3 WARMUP=1 ;;
        --rounds) ROUNDS=${2:?}; shift ;;
        --duration) DUR=${2:?}; shift ;;
        --mode)
            case ${2:-} in
                both) MODES=(unpinned pinned) ;;
                unpinned | pinned) MODES=("$2") ;;
                *) usage ;;
            esac
            shift
            ;;
        --targets) TARGET_LIST=${2:?}; shift ;;
        --floors) TARGET_LIST=$TARGET_LIST,floor-hyper,floor-h2,floor-conn ;;
        --perf) PERF=1 ;;
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
# shellcheck source=bench/fixtures.sh
source "$ROOT/bench/fixtures.sh"
RESULTS=$ROOT/bench/results
export PATH=$PATH:/usr/sbin:/sbin
log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- Dependencies ----------------------------------------------------------------------------
declare -A PKG=([nginx]=nginx [haproxy]=haproxy [wrk]=wrk [openssl]=openssl [curl]=curl
    [python3]=python3 [taskset]=util-linux [ss]=iproute2)
((PERF)) && PKG[perf]=linux-perf
missing=()
for cmd in "${!PKG[@]}"; do
    command -v "$cmd" >/dev/null || missing+=("${PKG[$cmd]}")
done
if ((${#missing[@]})); then
    ((EUID == 0)) || die "missing ${missing[*]}; run as root to install them, or install them first"
    log "installing ${missing[*]}"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi
NCPU=$(nproc)
if ((NCPU < 2)); then
    log "only $NCPU CPU: pinned mode needs 2, running unpinned only"
    MODES=(unpinned)
fi

# --- Build -----------------------------------------------------------------------------------
[[ -n $BIN_SRC ]] || BIN_SRC=${CARGO_TARGET_DIR:-$ROOT/target}/release/bitbucket-auth-proxy
if ((BUILD)); then
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release)
fi
[[ -x $BIN_SRC ]] || die "$BIN_SRC not found (build it, or drop --no-build)"
FLOORS=0
[[ ,$TARGET_LIST, == *,floor-* ]] && FLOORS=1
FLOOR_DIR=$ROOT/bench/floor/target/release
if ((FLOORS && BUILD)); then
    log "cargo build --release (bench/floor)"
    cargo build --release --manifest-path "$ROOT/bench/floor/Cargo.toml" \
        --target-dir "$ROOT/bench/floor/target"
fi
if ((FLOORS)); then
    for f in floor-hyper floor-h2 floor-conn; do
        [[ -x $FLOOR_DIR/$f ]] || die "$FLOOR_DIR/$f not found (build bench/floor, or drop --no-build)"
    done
fi

# --- Everything started here is stopped on exit -----------------------------------------------
WORK=$(mktemp -d /tmp/bbap-bench.XXXXXX)
PIDS=()
stop_pids() {
    local pid all=()
    for pid; do
        # nginx masters' workers and anything a wrapper left behind: by parent pid, never by name.
        all+=("$pid" $(pgrep -P "$pid" 2>/dev/null || true))
    done
    ((${#all[@]})) || return 0
    kill -TERM "${all[@]}" 2>/dev/null || true
    local alive tries=50
    while ((tries--)); do
        alive=0
        for pid in "${all[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    kill -KILL "${all[@]}" 2>/dev/null || true
    for pid in "${all[@]}"; do wait "$pid" 2>/dev/null || true; done
}
forget_pid() { # drop pids that were stopped already from PIDS
    local pid i
    for pid; do
        for i in "${!PIDS[@]}"; do [[ ${PIDS[$i]} == "$pid" ]] && unset 'PIDS[i]'; done
    done
    PIDS=("${PIDS[@]}")
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    ((${#PIDS[@]})) && stop_pids "${PIDS[@]}"
    if ((KEEP)); then log "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

BIN=$WORK/bitbucket-auth-proxy
cp "$BIN_SRC" "$BIN" # others may rebuild target/ while this runs
if ((FLOORS)); then cp "$FLOOR_DIR/floor-hyper" "$FLOOR_DIR/floor-h2" "$FLOOR_DIR/floor-conn" "$WORK/"; fi

# --- Ports -----------------------------------------------------------------------------------
BASE=${BENCH_PORT_BASE:-28400}
P_UP=$BASE P_STATUS=$((BASE + 1)) P_NGINX=$((BASE + 2)) P_HAPROXY=$((BASE + 3))
P_PROXY=$((BASE + 4)) P_PROXYRW=$((BASE + 5)) P_START=$((BASE + 6)) P_PROXYH1=$((BASE + 7))
P_FLOOR=$((BASE + 8)) P_FLOORH2=$((BASE + 9)) P_FLOORCONN=$((BASE + 10))
for p in $P_UP $P_STATUS $P_NGINX $P_HAPROXY $P_PROXY $P_PROXYRW $P_START $P_PROXYH1 $P_FLOOR \
    $P_FLOORH2 $P_FLOORCONN; do
    [[ -z $(ss -Hltn "sport = :$p") ]] || die "port $p is in use (set BENCH_PORT_BASE)"
done

TOKEN="bench-$(openssl rand -hex 16)"
UP_ORIGIN="https://127.0.0.1:$P_UP"
PAGE_PATH=/2.0/repositories/acme/widgets
BIG_PATH=/2.0/repositories/acme/widgets/src/main/big.bin
BIG_BYTES=$((64 << 20))

# --- Throwaway CA and an ECDSA P-256 leaf for 127.0.0.1 ----------------------------------------
log "certificates, upstream content"
mkdir -p "$WORK/pki" "$WORK/www"
throwaway_pki "$WORK/pki" 2>"$WORK/pki.log" || { cat "$WORK/pki.log" >&2; die "openssl failed"; }
CA=$WORK/pki/ca.pem

# --- Upstream content: a Bitbucket-style repository object (~1.2 KiB) and 64 MiB --------------
U="$UP_ORIGIN$PAGE_PATH"
bench_page "$U" >"$WORK/www/page.json"
PAGE_BYTES=$(stat -c %s "$WORK/www/page.json")
head -c "$BIG_BYTES" /dev/urandom >"$WORK/www/big.bin"

cat >"$WORK/report.lua" <<'EOF'
-- One machine-readable line after wrk's own report.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK requests=%d bytes=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d p50_us=%.0f p99_us=%.0f\n",
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99)))
end
EOF

# Peak VmRSS (KiB, summed over the given pids) every 0.2 s, written to $1 until killed.
cat >"$WORK/rss.sh" <<'EOF'
out=$1; shift; peak=0
while :; do
  total=0
  for pid in "$@"; do
    while read -r key value _; do
      if [[ $key == VmRSS: ]]; then total=$((total + value)); break; fi
    done <"/proc/$pid/status" || true
  done 2>/dev/null
  if ((total > peak)); then peak=$total; echo "$peak" >"$out"; fi
  sleep 0.2
done
EOF

# --- Configs ---------------------------------------------------------------------------------
write_upstream_conf() { # $1 workers
    local d=$WORK/upstream
    mkdir -p "$d"
    nginx_upstream "$d" "$1" "$P_UP" "$WORK/pki" \
        "$(bearer_location "$PAGE_PATH" "$WORK/www/page.json" application/json "$TOKEN")
$(bearer_location "$BIG_PATH" "$WORK/www/big.bin" application/octet-stream "$TOKEN")" \
        "  server {
    listen 127.0.0.1:$P_STATUS;
    location = /status { stub_status; }
  }" >"$d/nginx.conf"
}

write_nginx_target_conf() { # $1 workers
    mkdir -p "$WORK/nginx"
    nginx_forwarder "$WORK/nginx" "$1" "$P_NGINX" "$P_UP" "$TOKEN" "$CA" >"$WORK/nginx/nginx.conf"
}

write_haproxy_conf() { # $1 threads
    mkdir -p "$WORK/haproxy"
    cat >"$WORK/haproxy/haproxy.cfg" <<EOF
global
  nbthread $1
  maxconn 8192
defaults
  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  timeout http-keep-alive 300s
frontend fe
  bind 127.0.0.1:$P_HAPROXY
  http-request set-header Authorization "Bearer $TOKEN"
  default_backend be
backend be
  http-reuse always
  server s1 127.0.0.1:$P_UP ssl verify required ca-file $CA sni str(127.0.0.1)
EOF
}

write_proxy_conf() { # $1 file $2 port $3 rewrite_links [$4 upstream.http2]
    cat >"$1" <<EOF
[server]
listen = ["127.0.0.1:$2"]

[upstream]
api_url = "$UP_ORIGIN"
ca_file = "$CA"
http2 = ${4:-true}

$(acme_route "$TOKEN")
rewrite_links = $3
# Like for like: nginx, HAProxy and the floors forward every request. Coalescing (on by default)
# would answer wrk's identical concurrent GETs with one upstream request between them.
coalesce = false
EOF
}
# The proxy watches its config's directory and reloads on any change there: its logs go elsewhere.
mkdir -p "$WORK/proxy" "$WORK/logs"
write_proxy_conf "$WORK/proxy/plain.toml" "$P_PROXY" false
write_proxy_conf "$WORK/proxy/rewrite.toml" "$P_PROXYRW" true
write_proxy_conf "$WORK/proxy/startup.toml" "$P_START" false
write_proxy_conf "$WORK/proxy/http1.toml" "$P_PROXYH1" false false
"$BIN" check --config "$WORK/proxy/plain.toml" >/dev/null 2>"$WORK/logs/check.log" ||
    { cat "$WORK/logs/check.log" >&2; die "the proxy refused the bench config"; }

# --- Helpers ---------------------------------------------------------------------------------
http_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$@" || true; }

wait_until() { # $1 description, rest: command that succeeds when ready; 10 s bound
    local what=$1 deadline=$((SECONDS + 10))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "$what did not become ready"
        sleep 0.05
    done
}
listening() { [[ -n $(ss -Hltn "sport = :$1") ]]; }
health_ok() { [[ $(http_code "http://127.0.0.1:$1/-/health") == 200 ]]; }

rss_kib() {
    local pid key value _ total=0
    for pid; do
        while read -r key value _; do
            [[ $key == VmRSS: ]] && { total=$((total + value)); break; }
        done <"/proc/$pid/status"
    done
    echo "$total"
}
upstream_accepts() { curl -s --max-time 5 "http://127.0.0.1:$P_STATUS/status" | awk 'NR == 3 { print $1 }'; }
CLK_TCK=$(getconf CLK_TCK)

# Target name -> port / master pid (set by start_stack).
declare -A PORT=([nginx]=$P_NGINX [haproxy]=$P_HAPROXY [proxy]=$P_PROXY [proxy-rw]=$P_PROXYRW
    [proxy-h1]=$P_PROXYH1)
((FLOORS)) && PORT+=([floor-hyper]=$P_FLOOR [floor-h2]=$P_FLOORH2 [floor-conn]=$P_FLOORCONN)
# This proxy's targets -> their config in $WORK/proxy.
declare -A PROXY_CONF=([proxy]=plain [proxy-rw]=rewrite [proxy-h1]=http1)
declare -A MASTER=()
STACK=()

target_pids() { # the master and its children (nginx workers)
    local m=${MASTER[$1]}
    echo "$m" $(pgrep -P "$m" 2>/dev/null || true)
}

start_bg() { # $1 log file, rest: command; records the pid in STACK and PIDS
    local out=$1
    shift
    "$@" >"$out" 2>&1 &
    STACK+=($!)
    PIDS+=($!)
    LAST_PID=$!
}

start_stack() { # $1 mode
    local mode=$1 workers pin_up=() pin_target=()
    if [[ $mode == pinned ]]; then
        workers=1 pin_up=(taskset -c 0) pin_target=(taskset -c 1)
    else
        workers=$NCPU
    fi
    log "[$mode] starting upstream and targets, $workers worker(s) each"
    write_upstream_conf "$workers"
    write_nginx_target_conf "$workers"
    write_haproxy_conf "$workers"
    start_bg "$WORK/upstream/stdout.log" "${pin_up[@]}" nginx -p "$WORK/upstream" \
        -e "$WORK/upstream/error.log" -c "$WORK/upstream/nginx.conf" -g 'daemon off;'
    UPSTREAM_PID=$LAST_PID
    wait_until "upstream nginx" listening "$P_UP"
    start_bg "$WORK/nginx/stdout.log" "${pin_target[@]}" nginx -p "$WORK/nginx" \
        -e "$WORK/nginx/error.log" -c "$WORK/nginx/nginx.conf" -g 'daemon off;'
    MASTER[nginx]=$LAST_PID
    start_bg "$WORK/haproxy/stdout.log" "${pin_target[@]}" haproxy -db -f "$WORK/haproxy/haproxy.cfg"
    MASTER[haproxy]=$LAST_PID
    # tokio's Builder::new_multi_thread() reads TOKIO_WORKER_THREADS when worker_threads() is not
    # called (src/cli.rs does not call it); without it, one worker per CPU in the affinity mask.
    local target config
    for target in proxy proxy-rw proxy-h1; do
        config=${PROXY_CONF[$target]}
        TOKIO_WORKER_THREADS=$workers RUST_LOG=warn start_bg "$WORK/logs/$target-$mode.log" \
            "${pin_target[@]}" "$BIN" run --config "$WORK/proxy/$config.toml" --log-format json
        MASTER[$target]=$LAST_PID
    done
    wait_until "nginx target" listening "$P_NGINX"
    wait_until "haproxy" listening "$P_HAPROXY"
    if ((FLOORS)); then
        for target in floor-hyper floor-h2 floor-conn; do
            FLOOR_TOKEN=$TOKEN TOKIO_WORKER_THREADS=$workers start_bg \
                "$WORK/logs/$target-$mode.log" "${pin_target[@]}" "$WORK/$target" \
                "127.0.0.1:${PORT[$target]}" "$UP_ORIGIN" "$CA"
            MASTER[$target]=$LAST_PID
        done
    fi
    for target in proxy proxy-rw proxy-h1; do
        wait_until "$target (${PROXY_CONF[$target]}.toml)" health_ok "${PORT[$target]}"
    done
    if ((FLOORS)); then
        wait_until "floor-hyper" listening "$P_FLOOR"
        wait_until "floor-h2" listening "$P_FLOORH2"
        wait_until "floor-conn" listening "$P_FLOORCONN"
    fi
    sleep 0.5
    declare -gA IDLE_RSS=()
    for target in "${!PORT[@]}"; do IDLE_RSS[$target]=$(rss_kib $(target_pids "$target")); done
}

preflight() { # the upstream refuses a wrong header; every target gets 200 and the right bytes
    local t url body
    [[ $(http_code "$UP_ORIGIN$PAGE_PATH" --cacert "$CA") == 401 ]] ||
        die "upstream does not refuse a request without Authorization"
    [[ $(http_code "$UP_ORIGIN$PAGE_PATH" --cacert "$CA" -H "Authorization: Bearer x$TOKEN") == 401 ]] ||
        die "upstream does not refuse a wrong Authorization"
    [[ $(http_code "$UP_ORIGIN$PAGE_PATH" --cacert "$CA" -H "Authorization: Bearer $TOKEN") == 200 ]] ||
        die "upstream does not serve the page with the right Authorization"
    for t in "${!PORT[@]}"; do
        url=http://127.0.0.1:${PORT[$t]}
        body=$(curl -sf --max-time 10 "$url$PAGE_PATH") || die "$t: GET $PAGE_PATH failed ($(http_code "$url$PAGE_PATH"))"
        if [[ $t == proxy-rw ]]; then
            [[ $body == *"\"http://127.0.0.1:${PORT[$t]}$PAGE_PATH/pullrequests\""* ]] ||
                die "$t: links were not rewritten"
        else
            cmp -s <(printf '%s\n' "$body") "$WORK/www/page.json" || die "$t: page differs from the upstream's"
        fi
        [[ $(curl -sf --max-time 30 -o /dev/null -w '%{size_download}' "$url$BIG_PATH") == "$BIG_BYTES" ]] ||
            die "$t: GET $BIG_PATH did not return $BIG_BYTES bytes"
    done
}

CSV_HEADER=mode,round,cell,target,connections,requests,bytes,duration_s,req_per_s,mib_per_s,p50_us,p99_us,cpu_s,cpu_us_per_req,upstream_cpu_us_per_req,new_upstream_conns,errors,idle_rss_kib,peak_rss_kib,user_us_per_req
STAMP=$(date +%Y%m%d-%H%M%S)
mkdir -p "$RESULTS"
CSV=$RESULTS/runs-$STAMP.csv
echo "$CSV_HEADER" >"$CSV"

run_cell() { # $1 mode $2 round $3 cell $4 target
    local mode=$1 round=$2 cell=$3 target=$4
    local path conns threads url pin_load=() hdr=() pids=() sampler out
    case $cell in
        page-c1) path=$PAGE_PATH conns=1 threads=1 ;;
        page-c16) path=$PAGE_PATH conns=16 threads=2 ;;
        page-c64) path=$PAGE_PATH conns=64 threads=2 ;;
        big-c4) path=$BIG_PATH conns=4 threads=2 ;;
    esac
    [[ $mode == pinned ]] && pin_load=(taskset -c 0)
    if [[ $target == direct ]]; then
        url=$UP_ORIGIN$path
        hdr=(-H "Authorization: Bearer $TOKEN")
    else
        url=http://127.0.0.1:${PORT[$target]}$path
        read -r -a pids <<<"$(target_pids "$target")"
    fi
    local wrk=(wrk -t"$threads" -c"$conns" --timeout 30s "${hdr[@]}")
    "${pin_load[@]}" "${wrk[@]}" -d"${WARMUP}s" "$url" >/dev/null 2>&1 || true
    local acc0 acc1 cpu0=0 cpu1=0 user0=0 user1=0 peak="" up0 up1 up_pids
    read -r -a up_pids <<<"$(echo "$UPSTREAM_PID" $(pgrep -P "$UPSTREAM_PID"))"
    acc0=$(upstream_accepts)
    read -r up0 _ < <(cpu_ticks "${up_pids[@]}")
    if ((${#pids[@]})); then
        read -r cpu0 user0 < <(cpu_ticks "${pids[@]}")
        : >"$WORK/peak"
        "${pin_load[@]}" bash "$WORK/rss.sh" "$WORK/peak" "${pids[@]}" &
        sampler=$!
        PIDS+=("$sampler")
    fi
    out=$("${pin_load[@]}" "${wrk[@]}" -d"${DUR}s" --latency -s "$WORK/report.lua" "$url" 2>&1) ||
        die "wrk failed on $target $cell: $out"
    if ((${#pids[@]})); then
        read -r cpu1 user1 < <(cpu_ticks "${pids[@]}")
        kill "$sampler" 2>/dev/null || true
        wait "$sampler" 2>/dev/null || true
        forget_pid "$sampler"
        peak=$(<"$WORK/peak")
    fi
    read -r up1 _ < <(cpu_ticks "${up_pids[@]}")
    acc1=$(upstream_accepts)
    echo "$out" >>"$WORK/wrk.log"
    local line
    line=$(grep '^WRK ' <<<"$out") || die "no summary from wrk: $out"
    local -A w=()
    local kv
    for kv in ${line#WRK }; do w[${kv%%=*}]=${kv#*=}; done
    local errors=$((w[connect] + w[read] + w[write] + w[status] + w[timeout]))
    local idle=""
    [[ $target != direct ]] && idle=${IDLE_RSS[$target]}
    python3 - "$mode" "$round" "$cell" "$target" "$conns" "${w[requests]}" "${w[bytes]}" \
        "${w[duration_us]}" "${w[p50_us]}" "${w[p99_us]}" "$cpu0" "$cpu1" "$CLK_TCK" \
        "$acc0" "$acc1" "$errors" "$idle" "$peak" "${#pids[@]}" "$up0" "$up1" "$user0" "$user1" \
        >>"$CSV" <<'EOF'
import sys
(mode, rnd, cell, target, conns, req, nbytes, dur_us, p50, p99, c0, c1, tck, a0, a1, errors,
 idle, peak, npids, u0, u1, t0, t1) = sys.argv[1:]
up_cpu = (int(u1) - int(u0)) / int(tck)
req, nbytes, dur = int(req), int(nbytes), int(dur_us) / 1e6
cpu = (int(c1) - int(c0)) / int(tck)
has_cpu = int(npids) > 0
# The "after" read of stub_status is itself one accepted connection.
new_conns = int(a1) - int(a0) - 1
row = [mode, rnd, cell, target, conns, req, nbytes, f"{dur:.3f}", f"{req / dur:.1f}",
       f"{nbytes / dur / 2**20:.1f}", p50, p99, f"{cpu:.2f}" if has_cpu else "",
       f"{cpu * 1e6 / req:.2f}" if has_cpu and req else "",
       f"{up_cpu * 1e6 / req:.2f}" if req else "", new_conns, errors, idle, peak,
       f"{(int(t1) - int(t0)) / int(tck) * 1e6 / req:.2f}" if has_cpu and req else ""]
print(",".join(map(str, row)))
EOF
    log "[$mode r$round] $cell $target: $(tail -n1 "$CSV" | cut -d, -f9-)"
}

measure_startup() { # exec to the first 200 on /-/health, 7 times; median in ms
    TOKIO_WORKER_THREADS=$NCPU RUST_LOG=warn python3 - "$BIN" "$WORK/proxy/startup.toml" "$P_START" <<'EOF'
import socket, statistics, subprocess, sys, time
binary, config, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
times = []
for _ in range(7):
    t0 = time.perf_counter()
    p = subprocess.Popen([binary, "run", "--config", config, "--log-format", "json"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if time.perf_counter() - t0 > 10:
                sys.exit("proxy not ready within 10 s")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"GET /-/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                    if s.recv(64).startswith(b"HTTP/1.1 200"):
                        break
            except OSError:
                pass
            time.sleep(0.0005)
        times.append((time.perf_counter() - t0) * 1000)
    finally:
        # The proxy answers /-/health a moment before its SIGTERM handler is in place; a
        # SIGTERM in that window can be lost (seen once): give it time, then insist.
        time.sleep(0.1)
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            print("warning: the proxy ignored SIGTERM; killed", file=sys.stderr)
            p.kill()
            p.wait()
print(f"{statistics.median(times):.1f} {min(times):.1f} {max(times):.1f}")
EOF
}

# --- Run -------------------------------------------------------------------------------------
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "load average before: $LOAD_BEFORE; page ${PAGE_BYTES} B; $NCPU CPUs"
log "start-up to ready"
STARTUP=$(measure_startup)
log "proxy start-up to first 200 on /-/health (median min max, ms): $STARTUP"

CELLS=(page-c1 page-c16 page-c64 big-c4)
TARGETS=()
for t in direct nginx haproxy proxy proxy-rw proxy-h1 floor-hyper floor-h2 floor-conn; do
    [[ $t == nginx || ,$TARGET_LIST, == *,$t,* ]] && TARGETS+=("$t")
done
for mode in "${MODES[@]}"; do
    start_stack "$mode"
    preflight
    for ((round = 1; round <= ROUNDS; round++)); do
        for cell in "${CELLS[@]}"; do
            # A B C D, rotated each round so no target always runs first.
            n=${#TARGETS[@]}
            for ((i = 0; i < n; i++)); do
                target=${TARGETS[$(((i + round - 1) % n))]}
                # Link rewriting only touches JSON: the 64 MiB file would measure `proxy` again.
                [[ $cell == big-c4 && $target == proxy-rw ]] && continue
                run_cell "$mode" "$round" "$cell" "$target"
            done
        done
    done
    if [[ $mode == pinned ]] && ((PERF)); then
        log "[pinned] perf record of the proxy under page-c64 (not in the table)"
        # -g: frame-pointer call graphs, useful with a --bin built with force-frame-pointers.
        taskset -c 0 perf record -q -g -e cpu-clock -F 1999 -p "${MASTER[proxy]}" \
            -o "$RESULTS/perf-proxy-c64.data" -- sleep "$DUR" 2>/dev/null &
        perf_pid=$!
        PIDS+=("$perf_pid")
        sleep 0.2
        taskset -c 0 wrk -t2 -c64 -d"${DUR}s" "http://127.0.0.1:$P_PROXY$PAGE_PATH" >/dev/null
        wait "$perf_pid" || true
        forget_pid "$perf_pid"
        {
            echo "## self time, by symbol"
            perf report -i "$RESULTS/perf-proxy-c64.data" --stdio --no-children -g none \
                --sort dso,symbol --percent-limit 0.3 2>/dev/null | grep -v '^#' | grep -v '^$'
            echo "## including callees, by symbol"
            perf report -i "$RESULTS/perf-proxy-c64.data" --stdio --children -g none \
                --sort symbol --percent-limit 2 2>/dev/null | grep -v '^#' | grep -v '^$'
        } >"$RESULTS/perf-proxy-c64.txt" || true
        log "[pinned] profile: $RESULTS/perf-proxy-c64.txt"
    fi
    stop_pids "${STACK[@]}"
    forget_pid "${STACK[@]}"
    STACK=()
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
log "load average after: $LOAD_AFTER"

# --- Report ----------------------------------------------------------------------------------
cp "$CSV" "$RESULTS/latest.csv"
MD=$RESULTS/results-$STAMP.md
QUICK_NOTE=""
((QUICK)) && QUICK_NOTE="QUICK MODE (smoke test, not a measurement) — "
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -n $(git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]] && COMMIT="$COMMIT (+ uncommitted changes)"
CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
python3 - "$CSV" "$STARTUP" >"$MD" <<EOF
import csv, statistics, sys
from collections import defaultdict

rows = list(csv.DictReader(open(sys.argv[1])))
startup = [float(x) for x in sys.argv[2].split()]
print("# bitbucket-auth-proxy benchmark")
print()
print("Command: \`bench/run.sh $ARGS\` — $QUICK_NOTE"
      "$ROUNDS interleaved round(s), ${DUR} s cells after a ${WARMUP} s warm-up.  ")
print("Machine: $NCPU × $CPU_MODEL, $(uname -r); load average $LOAD_BEFORE before, $LOAD_AFTER after.  ")
print("Proxy commit $COMMIT; nginx $(nginx -v 2>&1 | sed 's/.*nginx\///'), HAProxy $(haproxy -v | awk 'NR==1 {print $3}'), wrk $(wrk -v 2>&1 | awk 'NR==1 {print $2}'). $STAMP.  ")
print("Page: ${PAGE_BYTES} B JSON; big: 64 MiB. Upstream: nginx, TLS 1.3 ECDSA P-256, h2 and http/1.1 offered.")
print()
print("Each figure is the median over rounds; ×nginx is the median over rounds of the ratio to nginx in "
      "the same round (×direct likewise). CPU is the target's utime+stime (all its processes) per "
      "request; new up conns is the upstream's accepted connections during the measured run "
      "(after the warm-up), 0 when pooling works. proxy-rw is this proxy with rewrite_links on "
      "(the others do not rewrite); proxy-h1 is this proxy with upstream.http2 = false (HTTP/1.1 "
      "to the upstream, as nginx and HAProxy use; proxy and proxy-rw use h2).")
if any(r["target"].startswith("floor-") for r in rows):
    print()
    print("floor-hyper, floor-h2 and floor-conn (bench/floor, with --floors) are not proxies: a hyper "
          "HTTP/1.1 server that drops Host, sets Authorization and forwards, through hyper-util's "
          "pooled client (floor-hyper), one h2 connection driven by the h2 crate, as the proxy's h2 "
          "lanes (floor-h2), or one through hyper's connection API (floor-conn), with no routes, "
          "limits, timeouts, metrics or logs. They show what this stack costs at the least.")
print()
print(f"Proxy start-up, exec to first 200 on /-/health: median {startup[0]:.1f} ms "
      f"(min {startup[1]:.1f}, max {startup[2]:.1f}; 7 starts).")

by = defaultdict(list)   # (mode, cell, target) -> rows
for r in rows:
    by[(r["mode"], r["cell"], r["target"])].append(r)

def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None

def num(r, k):
    # .get: reports rendered again from older CSVs, written before a column was added.
    return float(r[k]) if r.get(k) not in ("", None) else None

def metric(mode, cell, target, k):
    return med([num(r, k) for r in by.get((mode, cell, target), [])])

def ratio(mode, cell, target, k, ref):
    ours = {r["round"]: num(r, k) for r in by.get((mode, cell, target), [])}
    base = {r["round"]: num(r, k) for r in by.get((mode, cell, ref), [])}
    return med([ours[x] / base[x] for x in ours if x in base and ours[x] is not None
                and base[x] not in (None, 0.0)])

def fmt(v, p=0):
    return "—" if v is None else f"{v:,.{p}f}"

def fx(v):
    return "" if v is None else f" ({v:.2f}×)"

def cpu_fmt(v, big):
    # A 64 MiB response: CPU per MiB reads better than per request.
    return "—" if v is None else (f"{v / 64:,.0f} /MiB" if big else f"{v:,.1f}")

cells = ["page-c1", "page-c16", "page-c64", "big-c4"]
targets = ["direct", "nginx", "haproxy", "proxy", "proxy-rw", "proxy-h1", "floor-hyper", "floor-h2",
           "floor-conn"]
modes = [m for m in ("unpinned", "pinned") if any(k[0] == m for k in by)]
for mode in modes:
    print()
    print(f"## {mode}" + (" — upstream + wrk on CPU 0, target alone on CPU 1, 1 worker each"
                          if mode == "pinned" else " — $NCPU workers each, nothing pinned"))
    print()
    print("| cell | target | rate (×nginx) | ×direct | p50 ms | p99 ms (×nginx) | CPU µs/req (×nginx) "
          "| upstream CPU µs/req | new up conns | errors | idle RSS MiB | peak RSS MiB |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for cell in cells:
        big = cell.startswith("big")
        rate_key = "mib_per_s" if big else "req_per_s"
        unit = "MiB/s" if big else "req/s"
        for t in targets:
            if (mode, cell, t) not in by:
                continue
            rs = by[(mode, cell, t)]
            rate = metric(mode, cell, t, rate_key)
            p50, p99 = metric(mode, cell, t, "p50_us"), metric(mode, cell, t, "p99_us")
            cpu = metric(mode, cell, t, "cpu_us_per_req")
            up_cpu = metric(mode, cell, t, "upstream_cpu_us_per_req")
            idle, peak = metric(mode, cell, t, "idle_rss_kib"), metric(mode, cell, t, "peak_rss_kib")
            new = max(int(r["new_upstream_conns"]) for r in rs)
            errs = sum(int(r["errors"]) for r in rs)
            vs = (lambda k: None) if t == "nginx" else (lambda k: ratio(mode, cell, t, k, "nginx"))
            print(f"| {cell} | {t} | {fmt(rate, 1 if big else 0)} {unit}{fx(vs(rate_key))} "
                  f"| {fmt(ratio(mode, cell, t, rate_key, 'direct'), 2) if t != 'direct' else ''} "
                  f"| {fmt(p50 / 1000 if p50 else None, 2)} "
                  f"| {fmt(p99 / 1000 if p99 else None, 2)}{fx(vs('p99_us'))} "
                  f"| {cpu_fmt(cpu, big)}{fx(vs('cpu_us_per_req'))} | {cpu_fmt(up_cpu, big)} | {new} | {errs} "
                  f"| {fmt(idle / 1024 if idle else None, 1)} | {fmt(peak / 1024 if peak else None, 1)} |")

# The targets of issues 6 and 18, for this proxy (rewrite off unless said), pinned mode when
# measured. Issue 18 replaced issue 6's CPU goal (0.70× nginx) with ≤ nginx, and added the
# proxy's own cost over floor-hyper.
print()
print("## Against the targets of issues 6 and 18")
print()
m = "pinned" if "pinned" in modes else (modes[0] if modes else None)
def check(name, value, goal, ok):
    state = "—" if value is None else ("**met**" if ok(value) else "**missed**")
    print(f"| {name} | {value if isinstance(value, str) else fmt(value, 2)} | {goal} | {state} |")
if m:
    print(f"Mode: {m}.")
    print()
    print("| target | measured | goal | |")
    print("|---|--:|---|---|")
    for c in ("page-c16", "page-c64"):
        check(f"CPU/request vs nginx, {c}", ratio(m, c, "proxy", "cpu_us_per_req", "nginx"), "≤ 1.00×",
              lambda v: v <= 1.0)
    for c in ("page-c16", "page-c64"):
        over = ratio(m, c, "proxy", "cpu_us_per_req", "floor-hyper")
        check(f"CPU/request over floor-hyper, {c}", None if over is None else f"{(over - 1) * 100:+.0f} %",
              "≤ +10 %", lambda v: over <= 1.10)
    check("req/s vs nginx, page-c64", ratio(m, "page-c64", "proxy", "req_per_s", "nginx"), "≥ 1.30×",
          lambda v: v >= 1.3)
    for c in ("page-c16", "page-c64"):
        check(f"p99 vs nginx, {c}", ratio(m, c, "proxy", "p99_us", "nginx"), "≤ 1.00×", lambda v: v <= 1.0)
    check("64 MiB MiB/s vs direct", ratio(m, "big-c4", "proxy", "mib_per_s", "direct"), "≥ 0.90×",
          lambda v: v >= 0.9)
    check("64 MiB MiB/s vs direct, upstream.http2 = false",
          ratio(m, "big-c4", "proxy-h1", "mib_per_s", "direct"), "≥ 0.90×", lambda v: v >= 0.9)
    peak = metric(m, "page-c64", "proxy", "peak_rss_kib")
    check("peak RSS, page-c64 (MiB)", peak / 1024 if peak else None, "≤ 15", lambda v: v <= 15)
    idle = metric(m, "page-c64", "proxy", "idle_rss_kib")
    check("idle RSS (MiB)", idle / 1024 if idle else None, "≤ 8", lambda v: v <= 8)
    check("start-up to ready (ms)", startup[0], "≤ 50", lambda v: v <= 50)
    for c in ("page-c16", "page-c64"):
        check(f"req/s rewrite on vs off, {c}", ratio(m, c, "proxy-rw", "req_per_s", "proxy"), "≥ 0.90×",
              lambda v: v >= 0.9)

floors = [t for t in ("floor-hyper", "floor-h2", "floor-conn") if any(k[2] == t for k in by)]
if m and floors:
    # How far the proxy is from the least its stack can cost, and that least against nginx.
    print()
    print("## The stack's floor")
    print()
    print(f"Mode: {m}. Ratios to nginx in the same round, for this proxy and the floors.")
    print()
    shown = ["proxy"] + floors
    print("| cell | figure | " + " | ".join(shown) + " |")
    print("|---|---|" + "--:|" * len(shown))
    for c in ("page-c16", "page-c64"):
        for label, k in (("CPU µs/req ×nginx", "cpu_us_per_req"), ("req/s ×nginx", "req_per_s")):
            print(f"| {c} | {label} | " + " | ".join(fmt(ratio(m, c, t, k, "nginx"), 2) for t in shown) + " |")
    print(f"| big-c4 | MiB/s ×direct | "
          + " | ".join(fmt(ratio(m, "big-c4", t, "mib_per_s", "direct"), 2) for t in shown) + " |")
    # User time alone: the target's own work, without the kernel's share (loopback delivery,
    # and the sleeping and waking that grow as a target gets faster and idles more often).
    if any(metric(m, c, t, "user_us_per_req") is not None for c in ("page-c16", "page-c64")
           for t in shown):
        print()
        print("User CPU alone (utime, µs per request; nginx for reference): "
              + "; ".join(f"{c} " + ", ".join(f"{t} {fmt(metric(m, c, t, 'user_us_per_req'), 2)}"
                                               for t in ["nginx"] + shown)
                          for c in ("page-c16", "page-c64")) + ".")
EOF
cp "$MD" "$RESULTS/latest.md"
cat "$MD"
log "results: $MD (also latest.md), raw: $CSV (also latest.csv)"
