"""DAG Manager CPU per diff: `qmtl dagmanager` as users run it, load from this process.

    .venv/bin/python bench/bench_diff_cpu.py                    # SQLite (embedded) and PostgreSQL
    .venv/bin/python bench/bench_diff_cpu.py --engine sqlite --runs 300
    .venv/bin/python bench/bench_diff_cpu.py --profile /tmp/dm       # py-spy collapsed stacks of the server: /tmp/dm.<engine>.txt

Rows (issue 16), each the server's CPU (utime + stime of the ``qmtl dagmanager``
process from /proc/<pid>/stat) divided by the diffs it answered; the server runs on
core 0 and this driver on core 1 (taskset) when the machine has two cores:

* ``diff 10``      — POST /diff of a new strategy whose 10 nodes are all new
* ``batch 10``     — POST /diff/batch of 20 such diffs (as the Gateway's ingest worker sends them), per diff
* ``reuse 10``     — POST /diff of a new strategy whose 10 nodes are known
* ``diff 10k``     — POST /diff of a new 10,000-node DAG, per diff (and per node)

The Gateway + DAG Manager goal for a 10-node strategy from ack to completed is 1.5 ms CPU;
the DAG Manager's share is printed against it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_ops import LOAD_CORE, Server, cpu_seconds, free_port, wait_http  # noqa: E402
from qmtl.common.nodeid import compute_node_id  # noqa: E402

PG_URL = os.environ.get("QMTL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
STRATEGY_GOAL_US = 1500.0  # Gateway + DAG Manager, per 10-node strategy


def make_dag(n: int, salt: str) -> dict:
    nodes = []
    prev: list[str] = []
    for i in range(n):
        code = hashlib.sha256(f"{salt}{i}".encode()).hexdigest()
        cfg = hashlib.sha256(f"cfg{i % 7}".encode()).hexdigest()
        node_type = ("Price", "SMA", "EMA", "RSI", "Signal")[i % 5]
        nid = compute_node_id(node_type, code, cfg, "s1")
        nodes.append({"node_id": nid, "node_type": node_type, "code_hash": code, "config_hash": cfg, "schema_hash": "s1",
                      "interval": 60, "period": 20, "tags": ["bench", f"t{i % 10}"], "inputs": prev[-2:], "name": f"n{i}"})
        prev.append(nid)
    return {"nodes": nodes}


def measure(pid: int, bodies: list[bytes], client, path: str) -> float:
    """Server CPU seconds spent answering ``bodies`` (sent one after another)."""
    before = cpu_seconds(pid)
    for body in bodies:
        r = client.post(path, content=body, headers={"Content-Type": "application/json"})
        if r.status_code != 200:
            raise SystemExit(f"{path}: {r.status_code} {r.text[:300]}")
    return cpu_seconds(pid) - before


def run_engine(engine: str, args: argparse.Namespace) -> list[tuple[str, float, str]]:
    import httpx

    tmp = Path(tempfile.mkdtemp(prefix="bench-diff-cpu-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMTL")}
    env.update(QMTL__LOG_LEVEL="WARNING", QMTL__DAGMANAGER__GC_INTERVAL_SECONDS="0")
    schema = None
    if engine == "postgres":
        schema = f"bench_{uuid.uuid4().hex[:8]}"
        env.update(QMTL__DAGMANAGER__DATABASE_URL=PG_URL, QMTL__DAGMANAGER__DATABASE_SCHEMA=schema)
    qmtl = str(ROOT / ".venv" / "bin" / "qmtl")
    srv = Server([qmtl, "dagmanager", "--data-dir", str(tmp), "--port", str(port)], env, tmp / "server.log")
    spy = None
    rows: list[tuple[str, float, str]] = []
    try:
        wait_http(port)
        if args.profile:
            spy = subprocess.Popen([str(ROOT / ".venv" / "bin" / "py-spy"), "record", "-f", "raw", "-o", f"{args.profile}.{engine}.txt",
                                    "-p", str(srv.pid), "-r", "250"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            def bodies(n: int, size: int, tag: str) -> list[bytes]:
                return [json.dumps({"strategy_id": f"{tag}-{i}", "dag": make_dag(size, f"{tag}{i}")}).encode() for i in range(n)]

            measure(srv.pid, bodies(20, 10, "warm"), client, "/diff")
            n = args.runs
            cpu = measure(srv.pid, bodies(n, 10, "new"), client, "/diff")
            rows.append(("diff 10 (all new)", cpu / n * 1e6, "µs/diff"))
            batches = [json.dumps({"diffs": [{"strategy_id": f"b{b}-{i}", "dag": make_dag(10, f"b{b}x{i}")} for i in range(20)]}).encode()
                       for b in range(max(1, n // 20))]
            cpu = measure(srv.pid, batches, client, "/diff/batch")
            rows.append(("batch 10 (20 per batch)", cpu / (len(batches) * 20) * 1e6, "µs/diff"))
            shared = make_dag(10, "shared")
            measure(srv.pid, [json.dumps({"strategy_id": "seed", "dag": shared}).encode()], client, "/diff")
            cpu = measure(srv.pid, [json.dumps({"strategy_id": f"r{i}", "dag": shared}).encode() for i in range(n)], client, "/diff")
            rows.append(("reuse 10 (all known)", cpu / n * 1e6, "µs/diff"))
            if args.big:
                big = bodies(args.big, 10_000, "big")
                cpu = measure(srv.pid, big, client, "/diff")
                rows.append(("diff 10k (all new)", cpu / args.big * 1e6, "µs/diff"))
                rows.append(("diff 10k, per node", cpu / args.big / 10_000 * 1e6, "µs/node"))
    finally:
        if spy is not None:
            spy.send_signal(2)
            spy.wait(60)
        srv.stop()
        if schema is not None:
            import asyncio

            from qmtl.store.sql import drop_schema

            asyncio.run(drop_schema(PG_URL, schema))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=("sqlite", "postgres", "both"), default="both")
    ap.add_argument("--runs", type=int, default=200, help="10-node diffs per row (default 200)")
    ap.add_argument("--big", type=int, default=3, help="10,000-node diffs (default 3; 0: none)")
    ap.add_argument("--profile", help="py-spy collapsed-stack file prefix (the server, the whole run)")
    args = ap.parse_args()
    if (os.cpu_count() or 1) >= 2:  # the server is pinned to the other core by bench_ops.Server
        os.sched_setaffinity(0, {int(LOAD_CORE)})
    engines = ("sqlite", "postgres") if args.engine == "both" else (args.engine,)
    for engine in engines:
        for label, value, unit in run_engine(engine, args):
            extra = f"  ({value / STRATEGY_GOAL_US:.2f} of the 1.5 ms strategy goal)" if label.startswith(("diff 10 ", "batch")) else ""
            print(f"{engine:8s} {label:28s} {value:10.1f} {unit}{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
