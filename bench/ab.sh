#!/usr/bin/env bash
# A/B of forwarders (issue 18): several binaries, or one binary under several environments, in
# interleaved rounds on the pinned set-up of `bench/run.sh --mode pinned`. Each target runs alone
# on CPU 1 with one worker thread (TOKIO_WORKER_THREADS=1); the upstream (nginx, TLS 1.3, h2,
# one worker) and wrk (-t2) share CPU 0. Per round, cell and target: a 1 s warm-up, then wrk for
# --dur seconds; CPU per request is the target's utime+stime over that run (all its threads, from
# /proc/PID/stat) divided by the requests wrk completed, and user CPU the same for utime alone.
#
# Made for the questions `bench/run.sh` cannot ask: what a change or a feature costs, measured
# against the same floor in the same rounds. Loopback only.
set -euo pipefail
usage() {
    cat <<'EOF'
usage: bench/ab.sh [--dur S] [--rounds N] [--conns LIST] [--keep] NAME=COMMAND...
  --dur S       seconds per wrk run (default 8)
  --rounds N    interleaved rounds (default 4)
  --conns LIST  wrk connection counts, comma-separated (default 16,64)
  --keep        keep the temporary directory
Each COMMAND runs through `bash -c` with these placeholders replaced:
  @PORT@  the port it must listen on (127.0.0.1)    @UP@  the upstream's origin (https)
  @CA@    the CA file the upstream's certificate chains to
  @CONF@  a proxy config for @PORT@ (one route, /2.0/repositories/acme, rewrite_links and
          coalesce off as in bench/run.sh's proxy target), in a directory of its own (the proxy
          watches its config's directory)
  @NGINX@ the options that run nginx as bench/run.sh's nginx target on @PORT@, one worker
          (`nginx=nginx @NGINX@`); a target's CPU includes its child processes
Example, this proxy against floor-hyper:
  bench/ab.sh proxy='target/release/bitbucket-auth-proxy run --config @CONF@' \
    floor-hyper='bench/floor/target/release/floor-hyper 127.0.0.1:@PORT@ @UP@ @CA@'
A feature's cost: one binary twice, `env SOME_SWITCH=1 …` in the second command.
Writes bench/results/issue18-ab-<stamp>.md (the command, per-round figures, means).
EOF
    exit "${1:-2}"
}
DUR=8 ROUNDS=4 CONNS=16,64 KEEP=0
while (($#)); do
    case $1 in
        --dur) DUR=${2:?}; shift ;;
        --rounds) ROUNDS=${2:?}; shift ;;
        --conns) CONNS=${2:?}; shift ;;
        --keep) KEEP=1 ;;
        -h | --help) usage 0 ;;
        -*) usage ;;
        *) break ;;
    esac
    shift
done
(($#)) || usage
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/pki.sh
source "$ROOT/bench/pki.sh"
# shellcheck source=bench/fixtures.sh
source "$ROOT/bench/fixtures.sh"
need_tools ab.sh nginx wrk openssl curl taskset python3
WORK=$(mktemp -d /tmp/bench-ab.XXXXXX)
PIDS=()
cleanup() {
    ((${#PIDS[@]})) && kill "${PIDS[@]}" 2>/dev/null
    wait 2>/dev/null
    ((KEEP)) || rm -rf "$WORK"
}
trap cleanup EXIT
log() { printf '[ab %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

TOKEN=bench-ab-$RANDOM$RANDOM
PORT_BASE=${BENCH_PORT_BASE:-29400}
P_UP=$PORT_BASE
PAGE=$BENCH_PAGE
UP=https://127.0.0.1:$P_UP
page_upstream_files "$WORK" "$P_UP" "$TOKEN"
proxy_conf() { # $1 dir $2 port
    page_proxy_conf "$1" "$2" "$UP" "$WORK/pki/ca.pem" "$TOKEN"
}

taskset -c 0 nginx -p "$WORK/up" -e "$WORK/up/error.log" -c "$WORK/up/nginx.conf" -g 'daemon off;' &
PIDS+=($!)
declare -A PID PORT
NAMES=()
port=$((PORT_BASE + 10))
for spec; do
    name=${spec%%=*} cmd=${spec#*=}
    [[ $name != "$spec" && -n $name ]] || usage
    proxy_conf "$WORK/conf-$port" "$port"
    if [[ $cmd == *@NGINX@* ]]; then
        dir=$WORK/nginx-$port
        mkdir -p "$dir"
        nginx_forwarder "$dir" 1 "$port" "$P_UP" "$TOKEN" "$WORK/pki/ca.pem" >"$dir/nginx.conf"
        cmd=${cmd//@NGINX@/-p $dir -e $dir/error.log -c $dir/nginx.conf -g \'daemon off;\'}
    fi
    cmd=${cmd//@PORT@/$port}
    cmd=${cmd//@UP@/$UP}
    cmd=${cmd//@CA@/$WORK/pki/ca.pem}
    cmd=${cmd//@CONF@/$WORK/conf-$port/proxy.toml}
    # Floors connect to the upstream at start: give nginx its moment first.
    FLOOR_TOKEN=$TOKEN TOKIO_WORKER_THREADS=1 RUST_LOG=warn \
        taskset -c 1 bash -c "sleep 0.5; exec $cmd" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    PID[$name]=$! PORT[$name]=$port
    NAMES+=("$name")
    port=$((port + 1))
done
for name in "${NAMES[@]}"; do
    for _ in $(seq 100); do
        curl -sf -o /dev/null "http://127.0.0.1:${PORT[$name]}$PAGE" && continue 2
        sleep 0.1
    done
    echo "ab.sh: $name does not answer 200 on $PAGE" >&2
    cat "$WORK/$name.log" >&2
    exit 1
done

ticks() { # cpu_ticks of $1 and its children (nginx's workers)
    # shellcheck disable=SC2046 # one pid per word
    cpu_ticks "$1" $(pgrep -P "$1" || true)
}
HZ=$(getconf CLK_TCK)
STAMP=$(date +%Y%m%d-%H%M%S)
ROWS=$WORK/rows.tsv
log "load average before: $(cut -d' ' -f1-3 /proc/loadavg); ${#NAMES[@]} targets, $ROUNDS rounds of ${DUR}s"
IFS=, read -r -a CELLS <<<"$CONNS"
for round in $(seq "$ROUNDS"); do
    for c in "${CELLS[@]}"; do
        for name in "${NAMES[@]}"; do
            url=http://127.0.0.1:${PORT[$name]}$PAGE
            taskset -c 0 wrk -t2 -c"$c" -d1s "$url" >/dev/null
            read -r t0 u0 < <(ticks "${PID[$name]}")
            out=$(taskset -c 0 wrk -t2 -c"$c" -d"${DUR}s" "$url")
            read -r t1 u1 < <(ticks "${PID[$name]}")
            requests=$(awk '/requests in/ {print $1}' <<<"$out")
            non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$c" "$name" "$requests" \
                "$((t1 - t0))" "$((u1 - u0))" "${non2xx:-0}" >>"$ROWS"
            log "round $round c$c $name: $(awk -v r="$requests" -v t=$((t1 - t0)) -v u=$((u1 - u0)) -v hz="$HZ" -v d="$DUR" \
                'BEGIN { printf "%.0f req/s, CPU %.2f µs/req, user %.2f", r / d, t * 1e6 / hz / r, u * 1e6 / hz / r }')"
        done
    done
done
log "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

REPORT=$ROOT/bench/results/issue18-ab-$STAMP.md
python3 - "$ROWS" "$HZ" "$DUR" "${NAMES[@]}" >"$REPORT" <<EOF
import statistics, sys
rows, hz, dur, names = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
cells = {}
for line in open(rows):
    rnd, c, name, req, total, user, non2xx = line.split("\t")
    req = int(req)
    cells.setdefault(int(c), {}).setdefault(name, []).append(
        (req / dur, int(total) * 1e6 / hz / req, int(user) * 1e6 / hz / req, int(non2xx)))
print("# A/B of forwarders, pinned ($(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown))")
print()
print("\`bench/ab.sh --dur $DUR --rounds $ROUNDS --conns $CONNS\` with these targets:")
print()
for spec in """$(printf '%s\n' "$@")""".splitlines():
    print(f"- \`{spec}\`")
print()
print("Each target alone on CPU 1, one worker; the upstream (nginx, TLS 1.3, h2) and wrk -t2 on")
print("CPU 0; 1.3 KiB page; interleaved rounds. CPU and user are µs per request.")
print()
first = names[0]
for c, by_name in sorted(cells.items()):
    print(f"## {c} connections")
    print()
    print(f"| target | req/s | CPU | user | CPU vs {first} | user vs {first} | per round (CPU / user) | non-2xx |")
    print("|---|--:|--:|--:|--:|--:|---|--:|")
    base = by_name[first]
    bcpu = statistics.mean(r[1] for r in base)
    buser = statistics.mean(r[2] for r in base)
    for name in names:
        rs = by_name[name]
        cpu = statistics.mean(r[1] for r in rs)
        user = statistics.mean(r[2] for r in rs)
        rate = statistics.mean(r[0] for r in rs)
        rounds = " ".join(f"{r[1]:.2f}/{r[2]:.2f}" for r in rs)
        print(f"| {name} | {rate:,.0f} | {cpu:.2f} | {user:.2f} | {cpu - bcpu:+.2f} ({cpu / bcpu - 1:+.1%}) "
              f"| {user - buser:+.2f} | {rounds} | {sum(r[3] for r in rs)} |")
    print()
EOF
cat "$REPORT"
log "wrote $REPORT"
