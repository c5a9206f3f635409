#!/usr/bin/env bash
# Instructions per request (issue 18): each forwarder runs under valgrind's callgrind behind the
# ab.sh set-up (the same upstream nginx, page, route and proxy config) while wrk loads it; the
# counters are zeroed after a warm-up and dumped after a fixed run, so the figure is user-space
# instructions per completed request. Unlike CPU time on a shared machine it hardly moves
# between runs (0.1 % here), which makes it the measure for changes worth a few tenths of a
# microsecond; the profile it leaves says which functions the instructions went to.
#
# What it does not see: the kernel (syscalls, the network stack), and the cost of a memory copy
# or a cache miss beyond its instruction count. Under callgrind a target runs some 50x slower, so
# its batching (requests per read, frames per write) is not the one of a real run; compare
# targets with each other, and confirm a gain in time with bench/ab.sh. Loopback only.
set -euo pipefail
usage() {
    cat <<'EOF'
usage: bench/instructions.sh [--dur S] [--conns N] [--keep] NAME=COMMAND...
  --dur S     seconds of measured load per target (default 6)
  --conns N   wrk connections (default 16)
  --keep      keep the callgrind profiles (bench/results/callgrind-<stamp>/NAME.out)
NAME=COMMAND and its placeholders (@PORT@ @UP@ @CA@ @CONF@) are bench/ab.sh's.
Writes bench/results/issue18-instructions-<stamp>.md.
EOF
    exit "${1:-2}"
}
DUR=6 CONNS=16 KEEP=0
while (($#)); do
    case $1 in
        --dur) DUR=${2:?}; shift ;;
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
need_tools instructions.sh nginx wrk openssl curl taskset valgrind callgrind_control python3
WORK=$(mktemp -d /tmp/bench-instructions.XXXXXX)
PIDS=()
cleanup() {
    ((${#PIDS[@]})) && kill "${PIDS[@]}" 2>/dev/null
    wait 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
log() { printf '[instructions %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

STAMP=$(date +%Y%m%d-%H%M%S)
PROFILES=$ROOT/bench/results/callgrind-$STAMP
((KEEP)) && mkdir -p "$PROFILES"
TOKEN=bench-instructions-$RANDOM$RANDOM
PORT_BASE=${BENCH_PORT_BASE:-29600}
P_UP=$PORT_BASE
PAGE=$BENCH_PAGE
UP=https://127.0.0.1:$P_UP
page_upstream_files "$WORK" "$P_UP" "$TOKEN"
taskset -c 0 nginx -p "$WORK/up" -e "$WORK/up/error.log" -c "$WORK/up/nginx.conf" -g 'daemon off;' &
PIDS+=($!)

ROWS=$WORK/rows.tsv
port=$((PORT_BASE + 10))
for spec; do
    name=${spec%%=*} cmd=${spec#*=}
    [[ $name != "$spec" && -n $name ]] || usage
    conf=$WORK/conf-$port
    page_proxy_conf "$conf" "$port" "$UP" "$WORK/pki/ca.pem" "$TOKEN"
    # `env NAME=VALUE… COMMAND`: the variables go to valgrind, which passes them on, so the
    # profile is COMMAND's and not env's.
    vars=()
    if [[ $cmd =~ ^env[[:space:]] ]]; then
        read -r -a words <<<"$cmd"
        i=1
        while [[ ${words[i]:-} == *=* ]]; do
            vars+=("${words[i]}")
            i=$((i + 1))
        done
        cmd=${words[*]:i}
    fi
    cmd=${cmd//@PORT@/$port}
    cmd=${cmd//@UP@/$UP}
    cmd=${cmd//@CA@/$WORK/pki/ca.pem}
    cmd=${cmd//@CONF@/$conf/proxy.toml}
    out=$WORK/$name.out
    FLOOR_TOKEN=$TOKEN TOKIO_WORKER_THREADS=1 RUST_LOG=warn taskset -c 1 bash -c \
        "sleep 0.5; exec env ${vars[*]} valgrind --tool=callgrind --callgrind-out-file=$out $cmd" \
        >"$WORK/$name.log" 2>&1 &
    vpid=$!
    PIDS+=("$vpid")
    url=http://127.0.0.1:$port$PAGE
    for _ in $(seq 300); do
        curl -sf -o /dev/null "$url" && break
        sleep 0.2
    done
    curl -sf -o /dev/null "$url" || { cat "$WORK/$name.log" >&2; echo "instructions.sh: $name does not answer" >&2; exit 1; }
    taskset -c 0 wrk -t2 -c"$CONNS" -d2s "$url" >/dev/null
    callgrind_control -z "$vpid" >/dev/null 2>&1
    result=$(taskset -c 0 wrk -t2 -c"$CONNS" -d"${DUR}s" "$url")
    callgrind_control -d "$vpid" >/dev/null 2>&1
    sleep 1
    requests=$(awk '/requests in/ {print $1}' <<<"$result")
    non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$result")
    profile=$(ls -t "$out".* | head -1)
    total=$(awk '/^(summary|totals):/ {print $2; exit}' "$profile")
    printf '%s\t%s\t%s\t%s\n' "$name" "$requests" "$total" "${non2xx:-0}" >>"$ROWS"
    log "$name: $requests requests, $((total / requests)) instructions per request"
    ((KEEP)) && cp "$profile" "$PROFILES/$name.out"
    kill "$vpid" 2>/dev/null || true
    port=$((port + 1))
done

REPORT=$ROOT/bench/results/issue18-instructions-$STAMP.md
python3 - "$ROWS" "$@" >"$REPORT" <<EOF
import sys
rows, specs = sys.argv[1], sys.argv[2:]
print("# Instructions per request ($(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown))")
print()
print("\`bench/instructions.sh --dur $DUR --conns $CONNS\` with these targets:")
print()
for spec in specs:
    print(f"- \`{spec}\`")
print()
print("User-space instructions (callgrind) per completed request, after a 2 s warm-up, one worker,")
print("the ab.sh upstream and page. Not time: see the script's header for what it leaves out.")
print()
print("| target | requests | instructions per request | vs first | non-2xx |")
print("|---|--:|--:|--:|--:|")
first = None
for line in open(rows):
    name, requests, total, non2xx = line.rstrip("\n").split("\t")
    per = int(total) / int(requests)
    first = first or per
    print(f"| {name} | {int(requests):,} | {per:,.0f} | {per / first - 1:+.1%} | {non2xx} |")
EOF
log "wrote $REPORT"
