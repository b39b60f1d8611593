"""Issue 15 item 8 at full size: N distinct sentinel ids (default 20,000) posted to
``POST /callbacks/dag-event`` with the service token, in-process (Gateway auth + events
components over ASGI) → how many ``gateway_sentinel_traffic_ratio`` series exist after
(before the fix: one per id). Also: the same body with a caller's token is refused.

    .venv/bin/python bench/bench_label_series.py [N]
"""

from __future__ import annotations

import asyncio
import re
import sys
import tempfile
import time

import httpx

from qmtl.bus.inproc import InProcessBus
from qmtl.common.config import load_config
from qmtl.contracts.events import event_validators
from qmtl.gateway.app import create_app


async def run(n: int) -> None:
    cfg = load_config(environ={}, overrides={"data_dir": tempfile.mkdtemp(), "gateway": {"service_token": "bench"}})
    bus = InProcessBus(validator=event_validators())
    app = create_app(cfg, bus=bus, parts=["auth", "events"])
    await bus.start()
    await app.service.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            started = time.perf_counter()
            for i in range(n):
                r = await c.post("/callbacks/dag-event", json={"event": "sentinel_weight", "data": {"sentinel_id": f"s-{i}", "weight": 0.5}},
                                 headers={"X-QMTL-Service-Token": "bench"})
                assert r.status_code == 202, r.text
            elapsed = time.perf_counter() - started
            text = (await c.get("/metrics")).text
            refused = await c.post("/callbacks/dag-event", json={"event": "sentinel_weight", "data": {"sentinel_id": "x", "weight": 0.5}},
                                   headers={"Authorization": "Bearer any-caller-token"})
    finally:
        await app.service.stop()
    series = len(re.findall(r"^gateway_sentinel_traffic_ratio\{", text, re.M))
    print(f"{n} distinct sentinel ids → {series} gateway_sentinel_traffic_ratio series "
          f"(gateway.metric_label_cap {cfg.gateway.metric_label_cap} + 'other'); {n / elapsed:.0f} callbacks/s in-process; "
          f"a caller's token → HTTP {refused.status_code}")


if __name__ == "__main__":
    asyncio.run(run(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000))
