"""Slowloris at full size against the production-configured Gateway (issue 15, item 3).

    .venv/bin/python bench/bench_slowloris.py                  # 15,000 slow connections
    .venv/bin/python bench/bench_slowloris.py --connections 5000 --hold 20

The attack as the issue describes it: unauthenticated connections that send complete headers
announcing ``Content-Length: 1000000`` and one byte of body, then stall — plus (``--mix``) as
many that stall in the middle of their headers. The stack is separate processes with the
default limits (tests/helpers/secstack.py: ``qmtl gw`` in JWT mode with Redis, WorldService on
``rbac: enforce``). Opened as fast as this process can, then held for ``--hold`` seconds.

Printed: connections opened / refused at connect; ``GET /health`` during the attack (count,
failures, p50, max); the Gateway's file descriptors and RSS at the start, peak and end; how
many slow connections the Gateway cut (by the end of the hold) and its
``gateway_http_connections_refused_total`` by reason; the lines its log grew by (access lines —
one per request that reached the app — counted apart).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers.secstack import SecureStack  # noqa: E402
from tests.helpers.wsproc import metric  # noqa: E402

BODY_STALL = b"POST /worlds HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{"
HEADER_STALL = b"POST /worlds HTTP/1.1\r\nHost: gw\r\nX-Slow: 1\r\n"


async def attacker(port: int, i: int, mix: bool, cut: list[int], refused: list[int], held: list) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        refused[0] += 1
        return
    held.append(writer)
    try:
        writer.write(HEADER_STALL if mix and i % 2 else BODY_STALL)
        await writer.drain()
        while await reader.read(65536):
            pass
        cut[0] += 1  # the server closed it
    except OSError:
        cut[0] += 1


async def run(args: argparse.Namespace, base: Path) -> None:
    stack = SecureStack(base)
    stack.start()
    gw = stack.gateway
    port = int(gw.url.rsplit(":", 1)[1])
    try:
        fds0, rss0 = gw.fd_count(), gw.rss_kb()
        log0 = len(gw.log_text().splitlines())
        cut, refused, held = [0], [0], []
        tasks = []
        started = time.monotonic()
        for i in range(args.connections):
            tasks.append(asyncio.create_task(attacker(port, i, args.mix, cut, refused, held)))
            if i % 200 == 199:
                await asyncio.sleep(0)  # let the connects go out
        opened_in = time.monotonic() - started
        health: list[float] = []
        failures = 0
        fd_peak, rss_peak = fds0, rss0
        async with httpx.AsyncClient(timeout=5) as c:
            deadline = time.monotonic() + args.hold
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                try:
                    r = await c.get(gw.url + "/health", headers={"Connection": "close"})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    health.append((time.perf_counter() - t0) * 1000)
                else:
                    failures += 1
                fd_peak, rss_peak = max(fd_peak, gw.fd_count()), max(rss_peak, gw.rss_kb())
                await asyncio.sleep(0.2)
            metrics = (await c.get(gw.url + "/metrics")).text
        cut_by_then = cut[0]
        for w in held:
            w.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(1)
        reasons = {r: int(metric(metrics, "gateway_http_connections_refused_total", reason=r))
                   for r in ("over_cap", "evicted", "header_timeout", "health_only", "header_too_large", "invalid_request")}
        added = gw.log_text().splitlines()[log0:]
        access = sum(" qmtl.access " in line for line in added)  # one per request that reached the app, by design
        print(f"bench_slowloris: {args.connections} slow connections ({'half mid-headers, half ' if args.mix else ''}"
              f"headers + 1 of 1,000,000 body bytes) opened in {opened_in:.1f} s, held {args.hold:.0f} s; Gateway limits: defaults")
        print(f"  refused at connect: {refused[0]}; cut by the Gateway within the hold: {cut_by_then}")
        if health:
            print(f"  GET /health during the attack: {len(health)} ok, {failures} failed; p50 {statistics.median(health):.1f} ms, max {max(health):.1f} ms")
        else:
            print(f"  GET /health during the attack: 0 ok, {failures} failed")
        print(f"  Gateway fds: {fds0} at start, peak {fd_peak}, {gw.fd_count()} after; RSS {rss0 // 1024} MB, peak {rss_peak // 1024} MB")
        print(f"  gateway_http_connections_refused_total: {reasons}")
        print(f"  log lines added: {len(added) - access} (+ {access} access lines: one per request that reached the app)")
    finally:
        stack.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--connections", type=int, default=15000)
    p.add_argument("--hold", type=float, default=40.0, help="seconds to keep attacking while probing /health")
    p.add_argument("--mix", action="store_true", help="half of the connections stall mid-headers instead")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-slowloris-") as tmp:
        asyncio.run(run(args, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
