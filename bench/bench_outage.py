"""Writes while the ControlBus is away (issue 15 item 4): a WorldService process on
PostgreSQL and librdkafka's mock Kafka cluster; W writers (one per world, each a
sequential chain of ``PUT /worlds/{id}/activation``) run with the broker up, then with
the broker down for ``--down`` seconds; then the broker returns.

Prints the write latency with the broker up and down (p50/p99 and the ratio), the
backlog /health reports at the end of the outage, how long the outbox took to publish
it, and whether every event arrived in per-world order (and how many were re-delivered).

    .venv/bin/python bench/bench_outage.py                # 60 s outage, 8 worlds
    .venv/bin/python bench/bench_outage.py --down 10 --worlds 4
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def run(args: argparse.Namespace) -> int:
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # the outage is on purpose
    from qmtl.bus.base import TOPIC_ACTIVATION
    from qmtl.store.sql import drop_schema
    from tests.helpers.replicas import Recorder, client, processes, service_env
    from tests.kafka_mock import MockKafkaCluster, schema_validator

    cluster = MockKafkaCluster().start()
    schema = "bench_" + uuid.uuid4().hex[:12]
    worlds = [f"bw{i}" for i in range(args.worlds)]
    seq = dict.fromkeys(worlds, 0)
    try:
        env = service_env("worldservice", (POSTGRES_URL, schema), cluster.bootstrap_servers)
        with tempfile.TemporaryDirectory() as tmp, processes(Path(tmp), "worldservice", 1, env) as [ws]:
            async with client(ws) as c, Recorder(cluster.bootstrap_servers, schema_validator(), [TOPIC_ACTIVATION]) as rec:
                for w in worlds:
                    r = await c.post("/worlds", json={"world_id": w, "name": w})
                    assert r.status_code == 201, r.text

                async def writers(seconds: float) -> list[float]:
                    lat: list[float] = []
                    deadline = time.monotonic() + seconds

                    async def one(w: str) -> None:
                        while time.monotonic() < deadline:
                            seq[w] += 1
                            body = {"strategy_id": "s", "side": "long", "active": True, "weight": seq[w] / 1e6}
                            t0 = time.perf_counter()
                            r = await c.put(f"/worlds/{w}/activation", json=body)
                            lat.append((time.perf_counter() - t0) * 1000)
                            assert r.status_code == 200, r.text

                    await asyncio.gather(*(one(w) for w in worlds))
                    return lat

                up = await writers(args.up)
                cluster.broker_down()
                down = await writers(args.down)
                health = (await c.get("/health")).json()
                cluster.broker_up()
                t0 = time.monotonic()
                while (await c.get("/health")).json()["outbox_pending"] > 0:
                    await asyncio.sleep(0.05)
                drained = time.monotonic() - t0
                total = sum(seq.values())
                while len({(m.key, m.value["weight"]) for m in rec.messages}) < total:
                    await asyncio.sleep(0.05)
                    if time.monotonic() - t0 > 300:
                        break
                ordered = True
                for w in worlds:
                    firsts = list(dict.fromkeys(m.value["weight"] for m in rec.of(TOPIC_ACTIVATION, w)))
                    ordered &= firsts == [i / 1e6 for i in range(1, seq[w] + 1)]
                dupes = len(rec.messages) - len({(m.key, m.value["weight"]) for m in rec.messages})

        print(f"worlds {args.worlds}, broker up {args.up:g} s then down {args.down:g} s")
        print(f"writes, broker up:   {len(up):6d}  p50 {statistics.median(up):7.2f} ms  p99 {pct(up, 0.99):7.2f} ms")
        print(f"writes, broker down: {len(down):6d}  p50 {statistics.median(down):7.2f} ms  p99 {pct(down, 0.99):7.2f} ms"
              f"  (ratio p50 {statistics.median(down) / statistics.median(up):.2f}, p99 {pct(down, 0.99) / pct(up, 0.99):.2f})")
        print(f"backlog at the end of the outage: {health['outbox_pending']} events, oldest {health['outbox_oldest_age_seconds']:.1f} s")
        print(f"published after the broker returned in {drained:.1f} s; all {total} events in per-world order: {ordered};"
              f" re-delivered duplicates: {dupes}")
        return 0 if ordered else 1
    finally:
        await drop_schema(POSTGRES_URL, schema)
        cluster.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--down", type=float, default=60.0, help="seconds the broker stays down")
    p.add_argument("--up", type=float, default=10.0, help="seconds of writes with the broker up first")
    p.add_argument("--worlds", type=int, default=8, help="concurrent writers (one world each)")
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
