"""Cached ``GET /worlds/{id}/decide`` through the Gateway vs a bare Starlette route, same run.

    .venv/bin/python bench/bench_decide.py                 # defaults: 64 connections, 4 s per target
    .venv/bin/python bench/bench_decide.py --duration 3 --connections 32
    .venv/bin/python bench/bench_decide.py --jwt          # callers present an ES256 bearer JWT

What runs (loopback only, bounded to about 20 s):

* **server process 1** — the embedded deployment minus the DAG Manager: WorldService and
  the Gateway (auth, worlds proxy, status) in one process, each on its own uvicorn server
  (uvloop, httptools), the Gateway proxying worlds to WorldService over HTTP. The world
  ``bench`` is created and the decision cached (WorldService's ``ttl`` is 300 s) before
  measuring; every measured request is a Gateway cache hit — which the run checks by the
  ``X-QMTL-Cache`` header of every answer.
* **server process 2** — a bare Starlette app serving the very same JSON bytes on the same
  path (the in-run baseline).
* **this process** — a small HTTP/1.1 keep-alive load generator written on asyncio
  protocols (one request in flight per connection, no parsing beyond status line and
  ``Content-Length``), so the client costs little and shares no loop with the servers.

Targets are measured in interleaved rounds (Gateway, bare, Gateway again with an ignored
``?via=stack`` query that makes the cache-hit fast path decline, so the same hit goes
through the whole contract stack), each after a short warm-up, so a noisy neighbour slows
all alike. The run prints req/s, p50/p99 latency and non-200 counts per target and the
ratio Gateway / bare Starlette; it exits 1 if any answer was not a 200 (or, for the
Gateway, not a cache hit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORLD = "bench"
PATH = f"/worlds/{WORLD}/decide"


# --------------------------------------------------------------------------- servers


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _serve_forever(apps: list[tuple[object, int]]) -> None:
    import uvicorn

    servers = []
    for app, port in apps:
        cfg = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on",
                             loop="uvloop", http="httptools")
        server = uvicorn.Server(cfg)
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        servers.append(server)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(s.serve()) for s in servers]
    while not all(s.started for s in servers):
        if any(t.done() for t in tasks):
            for t in tasks:
                if t.done():
                    t.result()
            raise SystemExit("a server exited during startup")
        await asyncio.sleep(0.01)
    print("READY", flush=True)
    await stop.wait()
    for s in servers:
        s.should_exit = True
    await asyncio.gather(*tasks, return_exceptions=True)


def role_gateway(args: argparse.Namespace) -> None:
    import logging

    import uvloop

    from qmtl.bus.inproc import InProcessBus
    from qmtl.common.config import load_config
    from qmtl.contracts.events import event_validators
    from qmtl.gateway.app import create_app as gateway_app
    from qmtl.worldservice.app import create_app as ws_app

    logging.basicConfig(level=logging.WARNING)
    data = Path(args.data_dir)
    gw_port, ws_port = args.port, args.ws_port
    overrides = {
        "data_dir": str(data),
        "log_level": "WARNING",
        "gateway": {"port": gw_port, "worldservice_url": f"http://127.0.0.1:{ws_port}", "dagmanager_url": "http://127.0.0.1:9",
                    "service_token": "bench-token"},
        "worldservice": {"port": ws_port, "service_token": "bench-token", "rbac": "enforce", "decision_ttl": "300s"},
    }
    if args.jwks_pem:
        overrides["gateway"]["auth"] = {"mode": "jwt", "public_keys": [args.jwks_pem], "issuer": "bench", "audience": "qmtl"}
    cfg = load_config(environ={}, overrides=overrides)
    bus = InProcessBus(validator=event_validators())
    apps = [
        (ws_app(cfg, bus=bus), ws_port),
        (gateway_app(cfg, bus=bus, parts=("auth", "worlds", "status")), gw_port),
    ]
    uvloop.run(_serve_forever(apps))


def role_bare(args: argparse.Namespace) -> None:
    import logging

    import uvloop
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    logging.basicConfig(level=logging.WARNING)
    body = Path(args.body_file).read_bytes()

    async def decide(_request):
        return Response(body, media_type="application/json")

    app = Starlette(routes=[Route(PATH, decide)])
    uvloop.run(_serve_forever([(app, args.port)]))


class ServerProcess:
    def __init__(self, argv: list[str], name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen([sys.executable, __file__, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**{k: v for k, v in os.environ.items() if not k.startswith("QMTL")}, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        lines = []
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        buf = b""
        while time.monotonic() < deadline:
            chunk = self.proc.stdout.read() or b""
            buf += chunk
            if b"READY" in buf:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        lines = buf.decode(errors="replace")
        self.stop()
        raise SystemExit(f"{self.name} did not start:\n{lines[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# --------------------------------------------------------------------------- load generator


class _Conn(asyncio.Protocol):
    """One keep-alive connection: send a request, read the whole response, send the next."""

    def __init__(self, request: bytes, stats: _Stats, expect_header: bytes | None) -> None:
        self.request = request
        self.stats = stats
        self.expect = expect_header
        self.buf = bytearray()
        self.need: int | None = None
        self.status = 0
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        self._send()

    def _send(self) -> None:
        if self.stats.stopped:
            self.transport.close()  # type: ignore[union-attr]
            return
        self.sent_at = time.perf_counter()
        self.transport.write(self.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.need is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buf[:end]).lower()
                self.status = int(head[9:12])
                i = head.find(b"content-length:")
                length = int(head[i + 15:head.index(b"\r\n", i) if b"\r\n" in head[i:] else len(head)]) if i >= 0 else 0
                if self.expect is not None and self.expect not in head:
                    self.stats.unexpected += 1
                del self.buf[:end + 4]
                self.need = length
            if len(self.buf) < self.need:
                return
            del self.buf[:self.need]
            self.need = None
            self.stats.record(self.status, time.perf_counter() - self.sent_at)
            self._send()

    def connection_lost(self, exc) -> None:  # type: ignore[override]
        if not self.done.done():
            self.done.set_result(None)


class _Stats:
    def __init__(self) -> None:
        self.stopped = False
        self.recording = False
        self.count = 0
        self.non_200 = 0
        self.unexpected = 0
        self.latencies: list[float] = []

    def record(self, status: int, latency: float) -> None:
        if not self.recording:
            return
        self.count += 1
        if status != 200:
            self.non_200 += 1
        if len(self.latencies) < 200_000:
            self.latencies.append(latency)


async def drive(port: int, *, connections: int, warmup: float, duration: float, headers: dict[str, str],
                expect_header: bytes | None, path: str = PATH) -> dict:
    loop = asyncio.get_running_loop()
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}\r\n".encode()
    stats = _Stats()
    protos = []
    for _ in range(connections):
        _t, proto = await loop.create_connection(lambda: _Conn(request, stats, expect_header), "127.0.0.1", port)
        protos.append(proto)
    await asyncio.sleep(warmup)
    stats.recording = True
    started = time.perf_counter()
    await asyncio.sleep(duration)
    stats.recording = False
    elapsed = time.perf_counter() - started
    stats.stopped = True
    await asyncio.wait([p.done for p in protos], timeout=5)
    lat = sorted(stats.latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    return {"rps": stats.count / elapsed, "requests": stats.count, "seconds": elapsed, "non_200": stats.non_200,
            "unexpected": stats.unexpected, "latencies": lat}


def combine(parts: list[dict]) -> dict:
    """Rounds of one target → one figure (requests over seconds, percentiles over all samples)."""
    lat = sorted(x for p in parts for x in p["latencies"])

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    requests = sum(p["requests"] for p in parts)
    seconds = sum(p["seconds"] for p in parts)
    return {"rps": requests / seconds if seconds else 0.0, "requests": requests, "non_200": sum(p["non_200"] for p in parts),
            "unexpected": sum(p["unexpected"] for p in parts), "p50_ms": pct(0.50), "p99_ms": pct(0.99)}


# --------------------------------------------------------------------------- main


def _make_jwt(tmp: Path) -> tuple[str, str]:
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pem = tmp / "bench-pub.pem"
    pem.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    now = int(time.time())
    token = jwt.encode({"sub": "bench-user", "iss": "bench", "aud": "qmtl", "iat": now, "exp": now + 3600,
                        "world_roles": {"*": ["owner", "operator", "reader"]}}, key, algorithm="ES256")
    return str(pem), token


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=["gateway", "bare"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ws-port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    p.add_argument("--body-file", help=argparse.SUPPRESS)
    p.add_argument("--jwks-pem", help=argparse.SUPPRESS)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds per target, over all rounds (default 3)")
    p.add_argument("--warmup", type=float, default=0.3, help="seconds of unmeasured load before each measurement")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (Gateway, bare, Gateway via the full stack)")
    p.add_argument("--jwt", action="store_true", help="the Gateway verifies an ES256 bearer JWT on every request")
    args = p.parse_args(argv)
    if args.role == "gateway":
        role_gateway(args)
        return 0
    if args.role == "bare":
        role_bare(args)
        return 0
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        uvloop = None

    import httpx

    tmp = Path(tempfile.mkdtemp(prefix="qmtl-bench-decide-"))
    headers: dict[str, str] = {}
    extra: list[str] = []
    if args.jwt:
        pem, token = _make_jwt(tmp)
        headers["Authorization"] = f"Bearer {token}"
        extra = ["--jwks-pem", pem]
    gw_port, ws_port, bare_port = _free_port(), _free_port(), _free_port()
    gw = ServerProcess(["--role", "gateway", "--port", str(gw_port), "--ws-port", str(ws_port), "--data-dir", str(tmp), *extra], "Gateway+WorldService")
    bare = None
    try:
        gw.wait_ready()
        base = f"http://127.0.0.1:{gw_port}"
        with httpx.Client(base_url=base, headers=headers, timeout=10) as c:
            r = c.post("/worlds", json={"world_id": WORLD, "name": "Bench world"})
            if r.status_code not in (201, 409):
                raise SystemExit(f"creating the world failed: {r.status_code} {r.text}")
            first = c.get(PATH)
            second = c.get(PATH)
            if first.status_code != 200 or second.headers.get("x-qmtl-cache") != "hit":
                raise SystemExit(f"decide is not cached: {first.status_code} {second.headers}")
            body = second.content
        body_file = tmp / "decide.json"
        body_file.write_bytes(body)
        bare = ServerProcess(["--role", "bare", "--port", str(bare_port), "--body-file", str(body_file)], "bare Starlette")
        bare.wait_ready()

        async def run() -> tuple[dict, dict, dict]:
            # Interleaved rounds, so that a noisy neighbour slows every target alike.
            parts: dict[str, list[dict]] = {"gw": [], "bare": [], "full": []}
            share = args.duration / args.rounds
            for _ in range(args.rounds):
                parts["gw"].append(await drive(gw_port, connections=args.connections, warmup=args.warmup, duration=share,
                                               headers=headers, expect_header=b"x-qmtl-cache: hit"))
                parts["bare"].append(await drive(bare_port, connections=args.connections, warmup=args.warmup, duration=share,
                                                 headers=headers, expect_header=None))
                # the same cache hit through the whole contract stack: an extra (ignored) query
                # parameter makes the fast path decline
                parts["full"].append(await drive(gw_port, connections=args.connections, warmup=args.warmup, duration=share / 2,
                                                 headers=headers, expect_header=b"x-qmtl-cache: hit", path=PATH + "?via=stack"))
            return combine(parts["gw"]), combine(parts["bare"]), combine(parts["full"])

        g, b, full = uvloop.run(run()) if uvloop else asyncio.run(run())
    finally:
        gw.stop()
        if bare is not None:
            bare.stop()

    print(f"cached GET {PATH} ({len(body)} bytes JSON), {args.connections} keep-alive connections, {args.rounds} interleaved rounds, "
          f"auth: {'ES256 JWT' if args.jwt else 'development (anonymous)'}")
    print(f"  {'target':<46}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'non-200':>9}")
    rows = (("Gateway, cache hit (fast path)", g), ("bare Starlette, same JSON (baseline)", b),
            ("Gateway, cache hit through the contract stack", full))
    for name, r in rows:
        print(f"  {name:<46}{r['rps']:>10.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['non_200']:>9}")
    if g["unexpected"] or full["unexpected"]:
        print(f"  WARNING: {g['unexpected'] + full['unexpected']} Gateway answers were not cache hits")
    ratio = g["rps"] / b["rps"] if b["rps"] else float("nan")
    print(f"ratio Gateway / bare Starlette: {ratio:.3f}   (through the contract stack: {full['rps'] / b['rps']:.3f})")
    print(json.dumps({"gateway": g, "bare": b, "gateway_full_stack": full, "ratio": ratio}))
    bad = g["non_200"] + b["non_200"] + full["non_200"] + g["unexpected"] + full["unexpected"]
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
