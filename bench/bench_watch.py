"""Do `/ws` and the legacy `GET /queues/watch` agree, and how far apart? (issue 12, item 5)

Starts `qmtl up` as its own process, opens a `/ws` client and a `/queues/watch` stream on one
(tags, interval), then sends N `queue_update` callbacks (the DAG Manager's legacy form, with the
service credential), each with a new queue set, and records for every event when each stream
showed it. Prints |watch − ws| p50/p95/max in ms against the goal (both within 100 ms of each
other) and how many events either stream missed (the goal is none).

    .venv/bin/python bench/bench_watch.py [--events 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import websockets

ROOT = Path(__file__).resolve().parents[1]
QMTL = str(Path(sys.executable).with_name("qmtl"))
TOKEN = "bench-watch-service-token"
GOAL_MS = 100.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def measure(url: str, events: int) -> tuple[list[float], int]:
    lags: list[float] = []
    missed = 0
    async with httpx.AsyncClient(base_url=url, timeout=30) as c, \
            websockets.connect(url.replace("http://", "ws://") + "/ws") as ws, \
            c.stream("GET", "/queues/watch", params={"tags": "benchwatch", "interval": 60}) as watch:
        lines = watch.aiter_lines()
        await lines.__anext__()  # the current set
        for i in range(events):
            queues = [f"bench-watch-{i}"]
            body = {"event": "queue_update", "data": {"tags": ["benchwatch"], "interval": 60, "queues": queues, "match_mode": "any"}}
            r = await c.post("/callbacks/dag-event", json=body, headers={"X-QMTL-Service-Token": TOKEN})
            if r.status_code != 202:
                raise SystemExit(f"callback refused: {r.status_code} {r.text}")

            async def on_ws(queues: list[str] = queues) -> float:
                while True:
                    frame = json.loads(await ws.recv())
                    if frame["type"] == "queue_update" and frame["data"]["queues"] == queues:
                        return time.perf_counter()

            async def on_watch(queues: list[str] = queues) -> float:
                while True:
                    if json.loads(await lines.__anext__())["queues"] == queues:
                        return time.perf_counter()

            try:
                t_ws, t_watch = await asyncio.wait_for(asyncio.gather(on_ws(), on_watch()), 10)
            except TimeoutError:
                missed += 1
                continue
            lags.append(abs(t_watch - t_ws) * 1000)
    return lags, missed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=300)
    args = ap.parse_args()
    ports = [free_port(), free_port(), free_port()]
    url = f"http://127.0.0.1:{ports[0]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMTL")}
    env["QMTL__GATEWAY__SERVICE_TOKEN"] = TOKEN
    env["QMTL__ACCESS_LOG"] = "false"
    with tempfile.TemporaryDirectory() as data:
        proc = subprocess.Popen([QMTL, "up", "--data-dir", data, "--gateway-port", str(ports[0]), "--worldservice-port",
                                 str(ports[1]), "--dagmanager-port", str(ports[2]), "--log-level", "WARNING"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(600):
                try:
                    if httpx.get(url + "/health", timeout=0.5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            lags, missed = asyncio.run(measure(url, args.events))
        finally:
            proc.terminate()
            proc.wait(15)
    lags.sort()
    p95 = lags[max(0, int(len(lags) * 0.95) - 1)] if lags else float("nan")
    worst = lags[-1] if lags else float("nan")
    ok = missed == 0 and bool(lags) and worst <= GOAL_MS
    print(f"bench_watch: {args.events} callback events, load {os.getloadavg()[0]:.2f}")
    print(f"  |/queues/watch - /ws| ms: p50 {statistics.median(lags):.2f}  p95 {p95:.2f}  max {worst:.2f}   missed {missed}")
    print(f"  [{'ok' if ok else 'MISSED'}] both streams show every event, within {GOAL_MS:.0f} ms of each other")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
