#!/usr/bin/env python3
"""What the shared store ([store], docs/store.md) adds to a request's latency, on loopback.

Starts redis-server (no persistence, temporary directory), a plain-HTTP mock Bitbucket
answering 200 `{}`, and the proxy twice (without and with [store]), then sends the same
sequential keep-alive GETs through each and prints p50 / p90 / p99 / max. Three replicas are
also run against one Redis, clients spread over them, to show upstream requests per client
request under a shared `rate_limit`. Everything listens on 127.0.0.1 and is stopped on exit.

    bench/store_latency.py [--bin target/release/bitbucket-auth-proxy] [--requests 2000]
"""

import argparse
import http.client
import http.server
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, proc, what, within=20.0):
    deadline = time.monotonic() + within
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                sys.exit(f"{what} exited with {proc.returncode}")
            if time.monotonic() > deadline:
                sys.exit(f"{what} never listened on {port}")
            time.sleep(0.05)


class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without this, Nagle holds the body for the
    # proxy's delayed ACK (40 ms a request).
    disable_nagle_algorithm = True
    count = 0

    def do_GET(self):
        Upstream.count += 1
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def proxy_config(listen, upstream_port, store_url, rate_limit=""):
    store = f'\n[store]\nurl = "{store_url}"\ntimeout = "50ms"\n' if store_url else ""
    return f"""[server]
listen = ["127.0.0.1:{listen}"]

[upstream]
api_url = "http://127.0.0.1:{upstream_port}"
git_url = "http://127.0.0.1:{upstream_port}"
{store}
[credentials.ci]
kind = "workspace_access_token"
workspace = "acme"
token = {{ value = "bench-token-not-a-secret" }}
{rate_limit}

[[routes]]
prefix = "/2.0/repositories/acme"
credential = "ci"
"""


def start_proxy(binary, workdir, name, text, port, procs):
    path = os.path.join(workdir, f"{name}.toml")
    with open(path, "w") as f:
        f.write(text)
    proc = subprocess.Popen(
        [binary, "run", "--config", path],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "RUST_LOG": "error"},
    )
    procs.append(proc)
    wait_listening(port, proc, name)


def latencies(port, n):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    out = []
    for _ in range(n):
        started = time.perf_counter()
        conn.request("GET", "/2.0/repositories/acme/widgets")
        response = conn.getresponse()
        response.read()
        out.append(time.perf_counter() - started)
        if response.status != 200:
            sys.exit(f"unexpected {response.status}")
    conn.close()
    return sorted(out)


def pct(sorted_values, p):
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p))] * 1e6


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", default="target/release/bitbucket-auth-proxy")
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    procs = []
    workdir = tempfile.mkdtemp(prefix="bbap-store-bench-")
    try:
        redis_port = free_port()
        redis = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(redis_port),
             "--save", "", "--appendonly", "no", "--dir", workdir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        procs.append(redis)
        wait_listening(redis_port, redis, "redis-server")
        upstream_port = free_port()
        server = http.server.ThreadingHTTPServer(("127.0.0.1", upstream_port), Upstream)
        threading.Thread(target=server.serve_forever, daemon=True).start()

        rows = []
        for name, store in [("in-process", None), ("store", f"redis://127.0.0.1:{redis_port}/0")]:
            port = free_port()
            start_proxy(args.bin, workdir, name, proxy_config(port, upstream_port, store), port, procs)
            latencies(port, 200)  # warm-up: connections, script load
            values = latencies(port, args.requests)
            rows.append((name, values))
        print(f"{args.requests} sequential keep-alive GETs, proxy {args.bin}")
        print(f"{'budget':<12} {'p50 us':>8} {'p90 us':>8} {'p99 us':>8} {'max us':>8}")
        for name, values in rows:
            print(f"{name:<12} {pct(values, 0.5):8.0f} {pct(values, 0.9):8.0f} "
                  f"{pct(values, 0.99):8.0f} {values[-1] * 1e6:8.0f}")
        base, shared = rows[0][1], rows[1][1]
        print(f"store adds: p50 {pct(shared, 0.5) - pct(base, 0.5):+.0f} us, "
              f"p99 {pct(shared, 0.99) - pct(base, 0.99):+.0f} us")

        # Three replicas, per_hour = 100, 300 client requests spread over them.
        Upstream.count = 0
        ports = []
        for i in range(3):
            port = free_port()
            text = proxy_config(port, upstream_port, f"redis://127.0.0.1:{redis_port}/1",
                                "rate_limit = { per_hour = 100, burst = 100 }")
            start_proxy(args.bin, workdir, f"replica{i}", text, port, procs)
            ports.append(port)
        statuses = {}
        for i in range(300):
            conn = http.client.HTTPConnection("127.0.0.1", ports[i % 3], timeout=10)
            conn.request("GET", "/2.0/repositories/acme/widgets")
            response = conn.getresponse()
            response.read()
            conn.close()
            statuses[response.status] = statuses.get(response.status, 0) + 1
        print(f"3 replicas, rate_limit per_hour = 100, 300 client requests: "
              f"{Upstream.count} upstream ({Upstream.count / 300:.2f} per client request), "
              f"statuses {dict(sorted(statuses.items()))}")
        server.shutdown()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
