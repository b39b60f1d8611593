"""One caller's flood against everyone else (issue 15, item 5): does it open the breaker
for the others?

    .venv/bin/python bench/bench_flood.py                    # before and after, 3,000 requests
    .venv/bin/python bench/bench_flood.py --requests 1000 --modes after

What runs, for each mode, on a fresh stack of separate processes (tests/helpers/secstack.py:
``qmtl worldservice`` on ``rbac: enforce``, ``qmtl dagmanager``, ``qmtl gw`` in JWT mode with
an ES256 key, the shared service token and Redis; the Gateway's WorldService budget is the
SPEC's 300 ms, 2 retries):

* **flood**: one JWT with no roles sends ``--requests`` ``GET /worlds`` with ``--inflight``
  in flight;
* meanwhile a world **owner** (another JWT) does 12 writes (``PUT /worlds/{id}``) and 12
  decides (``GET /worlds/{id}/decide``), one of each every ``--owner-gap`` seconds, each on a
  world of its own created beforehand — so every decide is a cache miss that needs
  WorldService, and none is answered from the Gateway's cache.

Modes: ``before`` = no rate limit and one WorldService breaker (``gateway.rate_limit.mode:
disabled``, ``gateway.breaker.per_operation: false``: the Gateway as it was); ``after`` = the
defaults in JWT mode (per-subject token buckets, per-operation breakers).

Printed per mode: the flood's statuses, the owner's writes that succeeded and decides that
got WorldService's answer (not the safe default), the WorldService breaker states the
Gateway reports at the end. Exit status 1 when the owner lost any call in ``after``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers.secstack import SecureStack  # noqa: E402

MODES = {
    "before": {"QMTL__GATEWAY__RATE_LIMIT__MODE": "disabled", "QMTL__GATEWAY__BREAKER__PER_OPERATION": "false"},
    "after": {},
}
OWNER_CALLS = 12


async def flood(url: str, token: str, total: int, inflight: int) -> collections.Counter:
    statuses: collections.Counter = collections.Counter()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=inflight, max_keepalive_connections=inflight)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits, headers={"Authorization": f"Bearer {token}"}) as c:
        async def worker() -> None:
            while True:
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    statuses[(await c.get("/worlds")).status_code] += 1
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1

        await asyncio.gather(*(worker() for _ in range(inflight)))
    return statuses


async def owner(url: str, token: str, worlds: list[str], gap: float) -> dict:
    out = {"writes_ok": 0, "writes": collections.Counter(), "decides_real": 0, "decides": collections.Counter()}
    async with httpx.AsyncClient(base_url=url, timeout=30, headers={"Authorization": f"Bearer {token}"}) as c:
        for i, w in enumerate(worlds):
            r = await c.put(f"/worlds/{w}", json={"name": f"renamed {i}"})
            out["writes"][r.status_code] += 1
            out["writes_ok"] += r.status_code == 200
            r = await c.get(f"/worlds/{w}/decide")
            cache = r.headers.get("x-qmtl-cache", "-")
            out["decides"][f"{r.status_code}/{cache}"] += 1
            out["decides_real"] += r.status_code == 200 and cache != "safe-default"
            await asyncio.sleep(gap)
    return out


async def run_mode(mode: str, args: argparse.Namespace, base: Path) -> dict:
    stack = SecureStack(base / mode, extra={"gateway": {"QMTL__GATEWAY__WORLDSERVICE_BUDGET__TIMEOUT": "0.3", **MODES[mode]}})
    stack.start()
    try:
        url = stack.gateway.url
        owner_token = stack.token(f"owner-{uuid.uuid4().hex[:6]}", world_roles={"*": ["owner"]})
        flooder_token = stack.token(f"noroles-{uuid.uuid4().hex[:6]}", world_roles={})
        worlds = [f"flood-{uuid.uuid4().hex[:8]}" for _ in range(OWNER_CALLS)]
        async with httpx.AsyncClient(base_url=url, timeout=30, headers={"Authorization": f"Bearer {owner_token}"}) as c:
            for w in worlds:
                r = await c.post("/worlds", json={"world_id": w, "name": w})
                assert r.status_code == 201, r.text
        await asyncio.sleep(1.0)  # the setup's writes leave the owner's write bucket, which refills meanwhile
        started = time.monotonic()
        flood_task = asyncio.create_task(flood(url, flooder_token, args.requests, args.inflight))
        await asyncio.sleep(0.2)  # the flood is on
        owner_result = await owner(url, owner_token, worlds, args.owner_gap)
        statuses = await flood_task
        took = time.monotonic() - started
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            status = (await c.get("/status")).json()
        ws_breaker = status["breakers"]["worldservice"]
        return {"mode": mode, "flood": dict(statuses), "seconds": took, **owner_result,
                "breaker": ws_breaker["state"], "open_operations": ws_breaker.get("operations", {})}
    finally:
        stack.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--inflight", type=int, default=100)
    p.add_argument("--owner-gap", type=float, default=0.1, help="seconds between the owner's write+decide pairs")
    p.add_argument("--modes", default="before,after")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-flood-") as tmp:
        for mode in args.modes.split(","):
            results.append(asyncio.run(run_mode(mode, args, Path(tmp))))
    print(f"bench_flood: {args.requests} GET /worlds from one no-role JWT, {args.inflight} in flight; "
          f"the owner: {OWNER_CALLS} PUT /worlds/{{id}} + {OWNER_CALLS} decides meanwhile")
    print(f"{'mode':<8} {'flood statuses':<34} {'flood s':>7}  {'owner writes ok':>15}  {'decides real':>12}  breaker at the end")
    for r in results:
        flood_s = ", ".join(f"{k}: {v}" for k, v in sorted(r["flood"].items(), key=str))
        print(f"{r['mode']:<8} {flood_s:<34} {r['seconds']:>7.1f}  {r['writes_ok']:>12}/{OWNER_CALLS}  "
              f"{r['decides_real']:>9}/{OWNER_CALLS}  {r['breaker']} {r['open_operations'] or ''}")
        print(f"{'':<8} owner writes {dict(r['writes'])}, decides {dict(r['decides'])}")
    after = next((r for r in results if r["mode"] == "after"), None)
    if after is not None and (after["writes_ok"] < OWNER_CALLS or after["decides_real"] < OWNER_CALLS):
        print("FAILED: the owner lost calls to another caller's flood", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
