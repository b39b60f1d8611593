"""Gateway replicas: cached decide with 2 Gateway processes vs 1, and the cross-replica
staleness window (event produced → every replica answers the new policy version).

    .venv/bin/python bench/bench_replicas.py                  # defaults: 64 connections, 3 s per target, 40 changes
    .venv/bin/python bench/bench_replicas.py --changes 100 --duration 6

What runs (loopback only, about 40 s):

* librdkafka's mock Kafka cluster (in this process; consumers fetch with a 5 ms wait — the
  mock holds a fetch for the whole wait where a real broker answers as data arrives);
* ``qmtl worldservice`` and two ``qmtl gw`` processes on it (each Gateway its own consumer
  identity, caches and in-memory kv), the Gateways proxying worlds to WorldService;
* this process: the load generator of ``bench_decide.py`` (asyncio protocols, one request in
  flight per connection) and a ControlBus subscriber that reads each PolicyUpdated's
  producer timestamp.

1. **Cached decide, 2 processes vs 1.** The same total connections on one Gateway, then
   split over both, in interleaved rounds; every answer must be a cache hit
   (``X-QMTL-Cache: hit``). Prints req/s of each, the ratio, and the server CPU per request
   (utime+stime of the Gateway processes from /proc): on a machine whose cores the load
   generator shares, CPU per request says more than req/s.
2. **Staleness window.** ``--changes`` times: a new default policy through one Gateway
   (alternating), then both Gateways' decide polled every ``--poll-ms`` until each answers the
   new ``policy_version``. The window of a change = the last Gateway's first new answer − the
   PolicyUpdated's producer timestamp on the bus. Prints p50/p99/max over the changes (and per
   Gateway). A Gateway that has consumed the event never answers the old version (the
   topology test asserts that); the window is the bus latency plus one upstream read.

Exit status 1 when an answer was not a 200 (or, in part 1, not a cache hit) or a change was
never seen.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_decide import combine, drive  # noqa: E402 - the same load generator as bench_decide.py

QMTL = str(Path(sys.executable).with_name("qmtl"))
WORLD = "bench-replicas"
PATH = f"/worlds/{WORLD}/decide"
POLICY = "hysteresis: {promote_after: 1, max_mode: dryrun}\n"
TOKEN = "bench-replicas-token"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, kind: str, data_dir: Path, env: dict[str, str]) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log = data_dir / "log"
        full = {**{k: v for k, v in os.environ.items() if not k.startswith("QMTL")}, "PYTHONUNBUFFERED": "1",
                "QMTL__LOG_LEVEL": "WARNING", **env}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([QMTL, kind, "--port", str(self.port), "--data-dir", str(data_dir)], env=full, cwd=ROOT,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.url} exited:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise SystemExit(f"{self.url} did not start:\n{self.log.read_text()[-3000:]}")

    def cpu_seconds(self) -> float:
        """utime + stime of the process (the server's whole CPU time so far)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(p * len(v)))] if v else float("nan")


async def decide_throughput(gws: list[Proc], args: argparse.Namespace) -> dict:
    parts: dict[str, list[dict]] = {"one": [], "two": []}
    cpu = {"one": [0.0, 0], "two": [0.0, 0]}
    share = args.duration / args.rounds
    for _ in range(args.rounds):
        before = gws[0].cpu_seconds()
        r = await drive(gws[0].port, connections=args.connections, warmup=args.warmup, duration=share, headers={},
                        expect_header=b"x-qmtl-cache: hit", path=PATH)
        parts["one"].append(r)
        cpu["one"][0] += gws[0].cpu_seconds() - before
        cpu["one"][1] += r["requests"]
        before2 = [g.cpu_seconds() for g in gws]
        half = args.connections // 2
        both = await asyncio.gather(*(drive(g.port, connections=half, warmup=args.warmup, duration=share, headers={},
                                            expect_header=b"x-qmtl-cache: hit", path=PATH) for g in gws))
        total = {"rps": sum(b["rps"] for b in both), "requests": sum(b["requests"] for b in both), "seconds": share,
                 "non_200": sum(b["non_200"] for b in both), "unexpected": sum(b["unexpected"] for b in both),
                 "latencies": sorted(x for b in both for x in b["latencies"])}
        parts["two"].append(total)
        cpu["two"][0] += sum(g.cpu_seconds() - b for g, b in zip(gws, before2))
        cpu["two"][1] += total["requests"]
    one, two = combine(parts["one"]), combine(parts["two"])
    for name, r in (("one", one), ("two", two)):
        r["cpu_us_per_request"] = cpu[name][0] / cpu[name][1] * 1e6 if cpu[name][1] else float("nan")
    return {"one": one, "two": two, "ratio": two["rps"] / one["rps"] if one["rps"] else float("nan")}


async def staleness(gws: list[Proc], bootstrap: str, args: argparse.Namespace) -> dict:
    import httpx

    from qmtl.bus import make_bus
    from qmtl.bus.base import TOPIC_POLICY
    from qmtl.contracts.events import event_validators

    bus = make_bus({"kind": "kafka", "bootstrap_servers": bootstrap, "fetch_max_wait_ms": 5}, validator=event_validators())
    await bus.start()
    produced: dict[int, float] = {}  # policy_version -> producer timestamp (s)
    sub = await bus.subscribe([TOPIC_POLICY], consumer_id=f"bench-{uuid.uuid4().hex[:8]}", from_beginning=True)

    async def watch() -> None:
        async for msg in sub:
            if msg.value.get("world_id") == WORLD and msg.value.get("status") == "ACTIVE":
                produced.setdefault(int(msg.value["policy_version"]), msg.timestamp_ms / 1000)

    watcher = asyncio.create_task(watch())
    clients = [httpx.AsyncClient(base_url=g.url, timeout=5) for g in gws]
    windows: list[float] = []
    per_gw: list[list[float]] = [[] for _ in gws]
    bus_ms: list[float] = []  # producer → applied by the slower Gateway (its controlbus_lag_ms{control.policy})
    bad = 0
    try:
        version = (await clients[0].get(PATH)).json()["policy_version"]
        for n in range(args.changes):
            writer = clients[n % len(clients)]
            version += 1  # the only writer: each change is the next version
            # Poll from the moment the write is sent (not when it is answered): the window is
            # bus and cache behaviour, not the writer's round trip.
            post = asyncio.create_task(writer.post(f"/worlds/{WORLD}/policies", json={"yaml": POLICY + f"# change {n}\n", "set_default": True}))
            seen: list[float | None] = [None] * len(clients)
            deadline = time.monotonic() + 30
            while None in seen and time.monotonic() < deadline:
                for i, c in enumerate(clients):
                    if seen[i] is None:
                        d = await c.get(PATH)
                        if d.status_code != 200:
                            bad += 1
                        elif d.json()["policy_version"] == version:
                            seen[i] = time.time()
                await asyncio.sleep(args.poll_ms / 1000)
            r = await post
            if r.status_code != 201 or r.json()["version"] != version:
                raise SystemExit(f"policy change {n}: {r.status_code} {r.text} (expected version {version})")
            while version not in produced and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            if None in seen or version not in produced:
                bad += 1
                continue
            t0 = produced[version]
            windows.append((max(seen) - t0) * 1000)  # type: ignore[type-var]
            lags = [_metric((await c.get("/metrics")).text, 'controlbus_lag_ms{topic="control.policy"}') for c in clients]
            bus_ms.append(max(lags))
            for i, t in enumerate(seen):
                per_gw[i].append((t - t0) * 1000)  # type: ignore[operator]
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher
        await sub.close()
        await bus.close()
        for c in clients:
            await c.aclose()
    return {"changes": len(windows), "failed": bad, "p50_ms": pct(windows, 0.5), "p99_ms": pct(windows, 0.99),
            "max_ms": max(windows) if windows else float("nan"), "mean_ms": statistics.fmean(windows) if windows else float("nan"),
            "per_gateway_p50_ms": [pct(v, 0.5) for v in per_gw], "per_gateway_p99_ms": [pct(v, 0.99) for v in per_gw],
            "bus_p50_ms": pct(bus_ms, 0.5), "bus_p99_ms": pct(bus_ms, 0.99)}


def _metric(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds per target, over all rounds (default 3)")
    p.add_argument("--warmup", type=float, default=0.3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--changes", type=int, default=40, help="policy changes for the staleness window (default 40)")
    p.add_argument("--poll-ms", type=float, default=2.0, help="decide polling interval while waiting for a change (default 2)")
    args = p.parse_args(argv)

    from tests.kafka_mock import MockKafkaCluster

    tmp = Path(tempfile.mkdtemp(prefix="qmtl-bench-replicas-"))
    cluster = MockKafkaCluster().start()
    bus_env = {"QMTL__CONTROLBUS__KIND": "kafka", "QMTL__CONTROLBUS__BOOTSTRAP_SERVERS": cluster.bootstrap_servers,
               "QMTL__CONTROLBUS__FETCH_MAX_WAIT_MS": "5"}
    procs: list[Proc] = []
    try:
        ws = Proc("worldservice", tmp / "ws", {**bus_env, "QMTL__WORLDSERVICE__SERVICE_TOKEN": TOKEN})
        procs.append(ws)
        ws.wait()
        gws = [Proc("gw", tmp / f"g{i}", {**bus_env, "QMTL__GATEWAY__WORLDSERVICE_URL": ws.url, "QMTL__GATEWAY__SERVICE_TOKEN": TOKEN,
                                          "QMTL__GATEWAY__DAGMANAGER_URL": "http://127.0.0.1:9",
                                          # a shared, loaded machine: more room than the SPEC's 300 ms for writes
                                          "QMTL__GATEWAY__WORLDSERVICE_BUDGET__TIMEOUT": "2.0"}) for i in (1, 2)]
        procs += gws
        for g in gws:
            g.wait()
        import httpx

        with httpx.Client(base_url=gws[0].url, timeout=10) as c:
            r = c.post("/worlds", json={"world_id": WORLD, "name": "bench replicas"})
            assert r.status_code in (201, 409), r.text
            r = c.post(f"/worlds/{WORLD}/policies", json={"yaml": POLICY, "set_default": True})
            assert r.status_code == 201, r.text
        for g in gws:  # both caches warm and answering hits
            deadline = time.monotonic() + 20
            while httpx.get(g.url + PATH, timeout=5).headers.get("x-qmtl-cache") != "hit":
                if time.monotonic() > deadline:
                    raise SystemExit(f"{g.url} does not cache decide")
                time.sleep(0.05)

        async def run() -> tuple[dict, dict]:
            return await decide_throughput(gws, args), await staleness(gws, cluster.bootstrap_servers, args)

        try:
            import uvloop

            thr, stale = uvloop.run(run())
        except ImportError:  # pragma: no cover
            thr, stale = asyncio.run(run())
    finally:
        for proc in reversed(procs):
            proc.stop()
        cluster.stop()

    one, two = thr["one"], thr["two"]
    print(f"cached GET {PATH}: {args.connections} keep-alive connections in total, {args.rounds} interleaved rounds, "
          f"load generator in this process ({os.cpu_count()} cores on the machine, load average {os.getloadavg()[0]:.1f} at the end)")
    print(f"  {'target':<34}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU µs/req':>12}{'non-200':>9}")
    for name, r in (("1 Gateway process", one), ("2 Gateway processes", two)):
        print(f"  {name:<34}{r['rps']:>10.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['cpu_us_per_request']:>12.1f}{r['non_200']:>9}")
    print(f"ratio 2 processes / 1: {thr['ratio']:.2f}")
    print(f"staleness window (PolicyUpdated produced → both Gateways answer the new version), {stale['changes']} changes, "
          f"polled every {args.poll_ms:g} ms: p50 {stale['p50_ms']:.1f} ms, p99 {stale['p99_ms']:.1f} ms, max {stale['max_ms']:.1f} ms; "
          f"per Gateway p50 {', '.join(f'{v:.1f}' for v in stale['per_gateway_p50_ms'])} ms; of which the bus (produced → "
          f"applied by the slower Gateway) p50 {stale['bus_p50_ms']:.1f} ms, p99 {stale['bus_p99_ms']:.1f} ms")
    print(json.dumps({"decide": {k: {kk: vv for kk, vv in v.items() if kk != "latencies"} if isinstance(v, dict) else v
                                 for k, v in thr.items()}, "staleness": stale}))
    bad = one["non_200"] + two["non_200"] + one["unexpected"] + two["unexpected"] + stale["failed"]
    if one["unexpected"] + two["unexpected"]:
        print(f"WARNING: {one['unexpected'] + two['unexpected']} answers were not cache hits")
    return 0 if bad == 0 and stale["changes"] == args.changes else 1


if __name__ == "__main__":
    sys.exit(main())
