"""What tracing costs: off (the default), on but sampling nothing, and on exporting every span.

Each mode runs WorldService (`qmtl worldservice`) as its own server process; this process
loads it with keep-alive requests (GET /health and GET /worlds/{id}) and reads the server's
CPU time (utime+stime from /proc/<pid>/stat) over a fixed count of requests — CPU per request
holds up on a noisy machine where req/s does not. With tracing on, spans go over OTLP/HTTP to
a sink in this process that accepts and discards them. The per-event hooks the relay runs
whether tracing is on or not (continue the event's context, copy its traceparent to the
frame) are timed in-process for an event without trace context (the "off" case).

    .venv/bin/python bench/bench_tracing.py [--requests 3000]

Prints CPU µs per request per mode, each as a ratio to "off" measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
QMTL = str(Path(sys.executable).with_name("qmtl"))
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class _Sink(BaseHTTPRequestHandler):
    spans_posts = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        type(self).spans_posts += 1
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


async def load(url: str, paths: list[str], n: int, concurrency: int = 8) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=httpx.Limits(max_connections=concurrency)) as c:
        counter = iter(range(n))

        async def worker() -> None:
            for i in counter:
                r = await c.get(paths[i % len(paths)])
                assert r.status_code == 200, r.text

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def run_mode(name: str, env_extra: dict[str, str], n: int) -> float:
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QMTL")}
        env.update(env_extra)
        env["QMTL__ACCESS_LOG"] = "false"  # the same in every mode; logs are not what is measured
        proc = subprocess.Popen([QMTL, "worldservice", "--port", str(port), "--data-dir", data, "--log-level", "WARNING"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(300):
                try:
                    if httpx.get(url + "/health", timeout=0.5).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            httpx.post(url + "/worlds", json={"world_id": "bench", "name": "bench"}, timeout=5)
            paths = ["/health", "/worlds/bench"]
            asyncio.run(load(url, paths, 500))  # warm-up
            before = cpu_seconds(proc.pid)
            asyncio.run(load(url, paths, n))
            used = cpu_seconds(proc.pid) - before
        finally:
            proc.terminate()
            proc.wait(10)
    return used / n * 1e6


def hooks_off_us(n: int = 200_000) -> float:
    """The relay's per-event tracing work for an event that carries no trace context."""
    from qmtl.common import tracing

    headers = {"correlation_id": "c1"}
    t0 = time.perf_counter()
    for _ in range(n):  # what ControlBusConsumer._handle and EventsComponent.apply_event do per event
        if headers and tracing.TRACEPARENT in headers:
            raise AssertionError("an event without trace context")
        tracing.frame_extensions()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    args = ap.parse_args()
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{sink.server_address[1]}/v1/traces"
    modes = [
        ("off (default)", {}),
        ("on, sampling 0", {"QMTL__TRACING__ENABLED": "true", "QMTL__TRACING__SAMPLE_RATIO": "0", "QMTL__TRACING__OTLP_ENDPOINT": endpoint}),
        ("on, every span exported", {"QMTL__TRACING__ENABLED": "true", "QMTL__TRACING__OTLP_ENDPOINT": endpoint}),
    ]
    results = [(name, run_mode(name, env, args.requests)) for name, env in modes]
    base = results[0][1]
    print(f"bench_tracing: WorldService, {args.requests} requests per mode (GET /health, GET /worlds/{{id}}), load "
          f"{os.getloadavg()[0]:.2f}")
    for name, us in results:
        print(f"  {name:<26} {us:8.1f} µs CPU/request   ratio {us / base:5.2f}")
    print(f"  spans batches received by the sink: {_Sink.spans_posts}")
    print(f"  relay hooks per event, tracing off: {hooks_off_us():.2f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
