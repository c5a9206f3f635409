#!/usr/bin/env python3
"""Soak test: the release binary under a bounded mixed load with injected faults, on loopback.

Starts a fault-injecting mock upstream (plain HTTP/1.1, a separate process), the proxy binary
pointed at it, and a load driver whose workers pick, request by request, an ordinary request
(small GET, paginated JSON through the link rewriter, upload with Content-Length or chunked), an
upstream fault (reset before the head, body cut mid-way, stalled body, slow head, 500, 429) or a
hostile client (garbage, CL+TE, bad chunk, an upload abandoned mid-body, a client that never
reads, a slowloris, h2 garbage, a disconnect mid-response, a dot-segment path, no route).

Every 5 s it records the proxy's RSS and open file descriptors (/proc/PID/status, /proc/PID/fd)
into a CSV; at the end it prints requests served, faults injected, outcomes by kind, and RSS and
FD at start, after warm-up and at the end (after the load stopped and idle connections timed out).

Standard library only. See bench/soak.sh.
"""

import argparse
import asyncio
import collections
import csv
import multiprocessing
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

PREFIX = "/2.0/repositories/acme/soak"
BIG = 4 * 1024 * 1024

# ---------------------------------------------------------------------------------------------
# Mock upstream
# ---------------------------------------------------------------------------------------------


async def read_head(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return method, target, headers


async def read_body(reader, headers):
    if headers.get("transfer-encoding", "").lower().endswith("chunked"):
        total = 0
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return total
            await reader.readexactly(size + 2)
            total += size
    length = int(headers.get("content-length", "0"))
    if length:
        await reader.readexactly(length)
    return length


def reset(writer):
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def respond(writer, status, body=b"", content_type="application/octet-stream", extra=""):
    reason = {200: "OK", 429: "Too Many Requests", 500: "Internal Server Error"}[status]
    writer.write(
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\n{extra}\r\n".encode()
        + body
    )


async def mock_connection(reader, writer, origin, chunk):
    try:
        while True:
            method, target, headers = await read_head(reader)
            received = await read_body(reader, headers)
            path = target.split("?")[0]
            kind = path[len(PREFIX) + 1 :] if path.startswith(PREFIX + "/") else ""
            if kind == "fault/reset":
                reset(writer)
                return
            if kind in ("fault/cut", "fault/stall"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 200000\r\n\r\n" + chunk[:20000])
                await writer.drain()
                if kind == "fault/stall":
                    await asyncio.sleep(3)
                writer.transport.abort()
                return
            if kind == "fault/slowhead":
                await asyncio.sleep(3)
                writer.transport.abort()
                return
            if kind == "fault/500":
                respond(writer, 500, b'{"type":"error","error":{"message":"boom"}}', "application/json")
            elif kind == "fault/429":
                respond(writer, 429, b'{"type":"error"}', "application/json", "retry-after: 30\r\n")
            elif kind == "json":
                page = '{"values":[%s],"next":"%s%s/json?page=2"}' % (
                    ",".join('{"links":{"self":{"href":"%s%s/item/%d"}}}' % (origin, PREFIX, i) for i in range(20)),
                    origin,
                    PREFIX,
                )
                respond(writer, 200, page.encode(), "application/json")
            elif kind == "big":
                respond(writer, 200, chunk * (BIG // len(chunk)))
            elif kind == "upload":
                respond(writer, 200, str(received).encode(), "text/plain")
            else:
                respond(writer, 200, chunk[:2048])
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.transport.abort()


def run_mock(port_out):
    async def main():
        chunk = os.urandom(64 * 1024)
        server = await asyncio.start_server(lambda r, w: mock_connection(r, w, origin[0], chunk), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        origin = [f"http://127.0.0.1:{port}"]
        port_out.put(port)
        await server.serve_forever()

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# Load driver
# ---------------------------------------------------------------------------------------------


class Response:
    def __init__(self, status, headers, body_len, complete):
        self.status, self.headers, self.body_len, self.complete = status, headers, body_len, complete


async def read_response(reader, read_body=True):
    """Reads one response; a transfer that ends short of its framing is `complete=False`."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    if not read_body:
        return Response(status, headers, 0, False)
    total = 0
    try:
        if headers.get("transfer-encoding") == "chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                await reader.readexactly(size + 2)
                total += size
        elif "content-length" in headers:
            length = int(headers["content-length"])
            while total < length:
                data = await reader.read(min(65536, length - total))
                if not data:
                    return Response(status, headers, total, False)
                total += len(data)
        return Response(status, headers, total, True)
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        return Response(status, headers, total, False)


def outcome(response):
    if response is None:
        return "closed without a response"
    reason = response.headers.get("x-bitbucket-auth-proxy")
    label = f"{response.status}" + (f" {reason}" if reason else "")
    return label if response.complete else f"{label}, body aborted"


class Driver:
    def __init__(self, proxy_port):
        self.port = proxy_port
        self.host = f"127.0.0.1:{proxy_port}"
        self.outcomes = collections.Counter()  # (scenario, outcome) -> count
        self.served = 0
        self.faults = collections.Counter()  # "upstream"/"client" -> count

    async def connect(self):
        return await asyncio.open_connection("127.0.0.1", self.port)

    def req(self, method, path, extra="", close=True):
        connection = "Connection: close\r\n" if close else ""
        return f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n{extra}{connection}\r\n".encode()

    async def exchange(self, data, read_body=True, after=None):
        reader, writer = await self.connect()
        try:
            writer.write(data)
            if after:
                await after(writer)
            await writer.drain()
            try:
                return await read_response(reader, read_body)
            except (asyncio.IncompleteReadError, ConnectionError, ValueError):
                return None
        finally:
            writer.transport.abort()

    # Ordinary requests ------------------------------------------------------------------------

    async def get_keepalive(self):
        reader, writer = await self.connect()
        results = []
        try:
            n = random.randint(1, 4)
            for i in range(n):
                writer.write(self.req("GET", f"{PREFIX}/ok?i={i}", close=i == n - 1))
                await writer.drain()
                results.append(await read_response(reader))
        finally:
            writer.transport.abort()
        return results

    async def get_json(self):
        return await self.exchange(self.req("GET", f"{PREFIX}/json"))

    async def upload(self):
        body = os.urandom(64 * 1024)
        return await self.exchange(self.req("PUT", f"{PREFIX}/upload", f"Content-Length: {len(body)}\r\n") + body)

    async def upload_chunked(self):
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in [os.urandom(8192)] * 8) + b"0\r\n\r\n"
        return await self.exchange(self.req("POST", f"{PREFIX}/upload", "Transfer-Encoding: chunked\r\n") + chunks)

    # Upstream faults --------------------------------------------------------------------------

    async def upstream_fault(self, kind):
        return await self.exchange(self.req("GET", f"{PREFIX}/fault/{kind}"))

    # Hostile clients --------------------------------------------------------------------------

    async def garbage(self):
        return await self.exchange(os.urandom(random.randint(1, 4096)) + b"\r\n\r\n")

    async def cl_te(self):
        body = b"3\r\nabc\r\n0\r\n\r\n" + self.req("GET", f"{PREFIX}/smuggled", close=False)
        return await self.exchange(
            self.req("POST", f"{PREFIX}/upload", "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", close=False)
            + body
        )

    async def bad_chunk(self):
        return await self.exchange(
            self.req("POST", f"{PREFIX}/upload", "Transfer-Encoding: chunked\r\n") + b"zz\r\nabc\r\n0\r\n\r\n"
        )

    async def abandoned_upload(self):
        reader, writer = await self.connect()
        writer.write(self.req("PUT", f"{PREFIX}/upload", "Content-Length: 1000000\r\n") + os.urandom(10000))
        await writer.drain()
        await asyncio.sleep(random.random() * 0.5)
        writer.transport.abort()
        return None

    async def never_reads(self):
        reader, writer = await self.connect()
        writer.write(self.req("GET", f"{PREFIX}/big"))
        await writer.drain()
        await asyncio.sleep(3)  # longer than send_timeout
        writer.transport.abort()
        return None

    async def slowloris(self):
        reader, writer = await self.connect()
        try:
            writer.write(f"GET {PREFIX}/ok HTTP/1.1\r\nHost: {self.host}\r\n".encode())
            for _ in range(30):  # 3 s, longer than header_read_timeout
                writer.write(b"X")
                await writer.drain()
                await asyncio.sleep(0.1)
        except ConnectionError:
            pass
        finally:
            writer.transport.abort()
        return None

    async def h2_garbage(self):
        return await self.exchange(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(64), read_body=False)

    async def disconnect_mid_response(self):
        reader, writer = await self.connect()
        writer.write(self.req("GET", f"{PREFIX}/big"))
        await writer.drain()
        await reader.read(10000)
        writer.transport.abort()
        return None

    async def bad_path(self):
        return await self.exchange(self.req("GET", f"{PREFIX}/../../../user"))

    async def no_route(self):
        return await self.exchange(self.req("GET", "/2.0/user"))


SCENARIOS = [
    # (name, weight, fault class or None, coroutine factory)
    ("get", 30, None, lambda d: d.get_keepalive()),
    ("json", 10, None, lambda d: d.get_json()),
    ("upload", 6, None, lambda d: d.upload()),
    ("upload-chunked", 4, None, lambda d: d.upload_chunked()),
    ("upstream-reset", 3, "upstream", lambda d: d.upstream_fault("reset")),
    ("upstream-cut-mid-body", 3, "upstream", lambda d: d.upstream_fault("cut")),
    ("upstream-stalled-body", 2, "upstream", lambda d: d.upstream_fault("stall")),
    ("upstream-slow-head", 2, "upstream", lambda d: d.upstream_fault("slowhead")),
    ("upstream-500", 3, "upstream", lambda d: d.upstream_fault("500")),
    ("upstream-429", 3, "upstream", lambda d: d.upstream_fault("429")),
    ("client-garbage", 3, "client", lambda d: d.garbage()),
    ("client-cl-te", 2, "client", lambda d: d.cl_te()),
    ("client-bad-chunk", 2, "client", lambda d: d.bad_chunk()),
    ("client-abandoned-upload", 2, "client", lambda d: d.abandoned_upload()),
    ("client-never-reads", 1, "client", lambda d: d.never_reads()),
    ("client-slowloris", 1, "client", lambda d: d.slowloris()),
    ("client-h2-garbage", 2, "client", lambda d: d.h2_garbage()),
    ("client-disconnect-mid-response", 2, "client", lambda d: d.disconnect_mid_response()),
    ("client-bad-path", 2, "client", lambda d: d.bad_path()),
    ("client-no-route", 2, "client", lambda d: d.no_route()),
]


async def worker(driver, deadline):
    names = [s[0] for s in SCENARIOS]
    weights = [s[1] for s in SCENARIOS]
    table = {s[0]: s for s in SCENARIOS}
    while time.monotonic() < deadline:
        name = random.choices(names, weights)[0]
        _, _, fault, run = table[name]
        if fault:
            driver.faults[fault] += 1
        try:
            result = await asyncio.wait_for(run(driver), timeout=15)
        except asyncio.TimeoutError:
            driver.outcomes[(name, "DRIVER TIMEOUT (a hang)")] += 1
            continue
        except OSError as error:
            driver.outcomes[(name, f"connect error: {error.strerror or error}")] += 1
            continue
        results = result if isinstance(result, list) else [result]
        for response in results:
            if response is not None and response.complete and 200 <= response.status < 300:
                driver.served += 1
            if name in ("client-abandoned-upload", "client-never-reads", "client-slowloris",
                        "client-disconnect-mid-response"):
                driver.outcomes[(name, "client gave up")] += 1
            else:
                driver.outcomes[(name, outcome(response))] += 1


def sample(pid):
    rss = None
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss, fds


async def sampler(pid, driver, rows, started, stop):
    while not stop.is_set():
        rss, fds = sample(pid)
        rows.append((round(time.monotonic() - started, 1), rss, fds, driver.served))
        try:
            await asyncio.wait_for(stop.wait(), timeout=5)
        except asyncio.TimeoutError:
            pass


async def drive(args, pid, proxy_port):
    driver = Driver(proxy_port)
    rows = []
    started = time.monotonic()
    stop = asyncio.Event()
    sampling = asyncio.create_task(sampler(pid, driver, rows, started, stop))
    deadline = started + args.duration
    await asyncio.gather(*(worker(driver, deadline) for _ in range(args.workers)))
    load_ended = time.monotonic() - started
    # Idle connections are closed after header_read_timeout (2 s); give them that and more.
    await asyncio.sleep(args.settle)
    stop.set()
    await sampling
    rss, fds = sample(pid)
    rows.append((round(time.monotonic() - started, 1), rss, fds, driver.served))
    return driver, rows, load_ended


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------

CONFIG = """
[server]
listen = ["127.0.0.1:{proxy_port}"]
max_connections = 512
max_in_flight = 256
header_read_timeout = "2s"
send_timeout = "2s"

[upstream]
api_url = "http://127.0.0.1:{mock_port}"
git_url = "http://127.0.0.1:{mock_port}"
connect_timeout = "1s"
timeout = "2s"
idle_timeout = "1s"

[credentials.soak]
kind = "workspace_access_token"
workspace = "acme"
token = {{ value = "soak-token" }}

[[routes]]
prefix = "/2.0/repositories/acme"
credential = "soak"
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, proxy, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proxy.poll() is not None:
            sys.exit(f"the proxy exited with {proxy.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /-/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit("the proxy never became healthy")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", default="target/release/bitbucket-auth-proxy")
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    parser.add_argument("--workers", type=int, default=24, help="concurrent client loops")
    parser.add_argument("--settle", type=float, default=6, help="seconds after the load before the last sample")
    parser.add_argument("--csv", default="target/soak/soak.csv")
    parser.add_argument("--log", default="target/soak/proxy.log")
    args = parser.parse_args()

    os.makedirs(os.path.dirname(args.csv) or ".", exist_ok=True)
    os.makedirs(os.path.dirname(args.log) or ".", exist_ok=True)
    ports = multiprocessing.Queue()
    mock = multiprocessing.Process(target=run_mock, args=(ports,), daemon=True)
    mock.start()
    mock_port = ports.get(timeout=10)
    proxy_port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = os.path.join(tmp, "soak.toml")
        with open(config, "w") as f:
            f.write(CONFIG.format(proxy_port=proxy_port, mock_port=mock_port))
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        with open(args.log, "w") as log:
            proxy = subprocess.Popen(
                [args.binary, "--config", config, "--log-format", "json", "run"],
                stdout=log, stderr=log, env=env,
            )
        try:
            wait_listening(proxy_port, proxy)
            print(f"proxy pid {proxy.pid} on 127.0.0.1:{proxy_port}, mock upstream on 127.0.0.1:{mock_port}; "
                  f"{args.duration:.0f} s of load with {args.workers} workers", flush=True)
            driver, rows, load_ended = asyncio.run(drive(args, proxy.pid, proxy_port))
            alive = proxy.poll() is None
        finally:
            proxy.send_signal(signal.SIGTERM)
            try:
                proxy.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proxy.kill()
            mock.terminate()

    with open(args.csv, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["seconds", "rss_kib", "open_fds", "requests_served"])
        out.writerows(rows)

    total = sum(driver.outcomes.values())
    warm = next((r for r in rows if r[0] >= min(60, args.duration / 5)), rows[0])
    during = [r for r in rows if r[0] <= load_ended]
    print(f"\nrequests made: {total}; requests served (2xx, complete): {driver.served}")
    print(f"faults injected: {driver.faults['upstream']} upstream, {driver.faults['client']} hostile clients")
    print("outcomes by scenario:")
    for (name, what), count in sorted(driver.outcomes.items()):
        print(f"  {name:32} {what:40} {count}")
    hangs = sum(c for (_, what), c in driver.outcomes.items() if "TIMEOUT" in what)
    print(f"hangs (no answer and no close within 15 s): {hangs}")
    print(f"proxy alive at the end: {alive}; exit status after SIGTERM: {proxy.returncode}")
    print(f"RSS KiB: start {rows[0][1]}, after warm-up ({warm[0]:.0f} s) {warm[1]}, "
          f"max under load {max(r[1] for r in during)}, end {rows[-1][1]}")
    print(f"open FDs: start {rows[0][2]}, max under load {max(r[2] for r in during)}, end {rows[-1][2]}")
    print(f"samples: {args.csv}")
    if hangs or not alive or rows[-1][2] > rows[0][2] + 2:
        sys.exit(1)


if __name__ == "__main__":
    main()
