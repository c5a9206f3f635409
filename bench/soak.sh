#!/usr/bin/env bash
# Soak: the release binary under 10 minutes (by default) of mixed load with injected faults, on
# loopback only, recording the proxy's RSS and open file descriptors every 5 s.
#
#   bench/soak.sh                 # 600 s
#   bench/soak.sh 120             # a shorter run
#   WORKERS=48 bench/soak.sh      # more concurrent client loops (default 24)
#
# Needs python3 (standard library only). Writes target/soak/soak.csv (seconds, rss_kib,
# open_fds, requests_served) and target/soak/proxy.log; prints requests served, faults injected,
# outcomes by kind, and RSS and FD start/end. Exits non-zero if a request hung, the proxy died,
# or it ended with more open FDs than it started with. Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${1:-600}"
cargo build --release --locked --bin bitbucket-auth-proxy
exec python3 bench/soak.py --binary target/release/bitbucket-auth-proxy \
    --duration "$duration" --workers "${WORKERS:-24}" --csv target/soak/soak.csv --log target/soak/proxy.log
