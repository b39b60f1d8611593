"""A production topology on this machine, as separate OS processes: N Gateways, N
WorldServices and N DAG Managers (``qmtl gw|worldservice|dagmanager`` subprocesses on free
ports) on the machine's Redis (a key prefix of their own), one fresh PostgreSQL database and
a Kafka (mock) cluster; WorldService and the DAG Manager each behind a TCP load balancer
that skips a replica refusing connections, as they would be in production.

``kill(name)`` is ``kill -9``; ``start(name)`` restarts a replica on its port and data
directory (a Gateway keeps its ``instance_id``, so it resumes from its committed offsets).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from tests.helpers.server import free_port
from tests.sdk.live import QMTL, ROOT, TcpProxy

COMMAND = {"gateway": "gw", "worldservice": "worldservice", "dagmanager": "dagmanager"}


class QmtlProcess:
    """One ``qmtl <service>`` process."""

    def __init__(self, name: str, kind: str, data_dir: Path, env: Mapping[str, str]) -> None:
        self.name, self.kind = name, kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = Path(data_dir)
        self.env = dict(env)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir.parent / f"{name}.log"
        self.starts = 0

    def spawn(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("QMTL")}
        env.update({"PYTHONUNBUFFERED": "1", **self.env})
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([QMTL, COMMAND[self.kind], "--port", str(self.port), "--data-dir", str(self.data_dir)],
                                         cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.starts += 1

    def ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.proc and self.proc.returncode}):\n{self.log_tail()}")
        try:
            return httpx.get(self.url + "/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """``kill -9``: nothing flushed, nothing closed."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class Topology:
    def __init__(self, root: Path, *, replicas: int, bootstrap: str, database_url: str, redis_url: str, kv_prefix: str,
                 service_token: str = "topology-service-token", extra: Mapping[str, Mapping[str, str]] | None = None) -> None:
        common = {
            "QMTL__CONTROLBUS__KIND": "kafka", "QMTL__CONTROLBUS__BOOTSTRAP_SERVERS": bootstrap,
            "QMTL__CONTROLBUS__FETCH_MAX_WAIT_MS": "5",  # the mock cluster holds a fetch for the whole wait
            "QMTL__GATEWAY__SERVICE_TOKEN": service_token, "QMTL__WORLDSERVICE__SERVICE_TOKEN": service_token,
            "QMTL__DAGMANAGER__SERVICE_TOKEN": service_token, "QMTL__LOG_LEVEL": "INFO",
        }
        extra = extra or {}
        self.procs: dict[str, QmtlProcess] = {}
        for i in range(1, replicas + 1):
            self.procs[f"ws{i}"] = QmtlProcess(f"ws{i}", "worldservice", root / f"ws{i}", {
                **common, "QMTL__WORLDSERVICE__DATABASE_URL": database_url, **extra.get("worldservice", {})})
            self.procs[f"dm{i}"] = QmtlProcess(f"dm{i}", "dagmanager", root / f"dm{i}", {
                **common, "QMTL__DAGMANAGER__DATABASE_URL": database_url, **extra.get("dagmanager", {})})
        self.ws_lb = TcpProxy([p.port for n, p in self.procs.items() if n.startswith("ws")])
        self.dm_lb = TcpProxy([p.port for n, p in self.procs.items() if n.startswith("dm")])
        gateways = [QmtlProcess(f"g{i}", "gateway", root / f"g{i}", {}) for i in range(1, replicas + 1)]
        for i, g in enumerate(gateways):
            sibling = gateways[(i + 1) % len(gateways)]
            g.env = {
                **common, "QMTL__GATEWAY__WORLDSERVICE_URL": self.ws_lb.url, "QMTL__GATEWAY__DAGMANAGER_URL": self.dm_lb.url,
                "QMTL__GATEWAY__KV_URL": redis_url, "QMTL__GATEWAY__KV_PREFIX": f"\"{kv_prefix}\"",  # YAML: quoted
                "QMTL__GATEWAY__DATABASE_URL": database_url, "QMTL__GATEWAY__PUBLIC_URL": g.url,
                "QMTL__GATEWAY__EVENTS__INSTANCE_ID": f"topology-{g.name}-{kv_prefix.strip(':')}",
                # a client of this replica reconnects to the other one when this one is gone
                "QMTL__GATEWAY__EVENTS__FALLBACK_URL": sibling.url.replace("http://", "ws://") + "/ws/evt",
                # the machine is shared: give WorldService's commits more room than the SPEC's 300 ms
                "QMTL__GATEWAY__WORLDSERVICE_BUDGET__TIMEOUT": "2.0",
                **extra.get("gateway", {}),
            }
            self.procs[g.name] = g

    def gateways(self) -> list[QmtlProcess]:
        return [p for p in self.procs.values() if p.kind == "gateway"]

    def start(self, *names: str, timeout: float = 60.0) -> None:
        """Start ``names`` (default: all; the backends first) and wait until each is ready."""
        order = names or tuple(sorted(self.procs, key=lambda n: n.startswith("g")))
        for name in order:
            self.procs[name].spawn()
        deadline = time.monotonic() + timeout
        pending = list(order)
        while pending:
            pending = [n for n in pending if not self.procs[n].ready()]
            if pending and time.monotonic() > deadline:
                tails = "\n".join(f"--- {n}\n{self.procs[n].log_tail()}" for n in pending)
                raise AssertionError(f"not ready within {timeout}s: {pending}\n{tails}")
            if pending:
                time.sleep(0.1)

    def kill(self, name: str) -> None:
        self.procs[name].kill()

    def stop(self) -> None:
        for p in self.procs.values():
            p.kill()
        self.ws_lb.shutdown()
        self.dm_lb.shutdown()
