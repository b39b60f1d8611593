"""WorldService / DAG Manager replicas as separate OS processes on one PostgreSQL schema
and librdkafka's mock Kafka cluster, and a Kafka consumer that records what they publish."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import pytest

from qmtl.bus.base import BusMessage
from qmtl.bus.kafka import KafkaBus
from qmtl.common.nodeid import compute_node_id
from qmtl.worldservice.rbac import encode_claims
from tests.helpers.wsproc import SERVICE_TOKEN, WorldServiceProcess, metric

# The service token and a forwarded identity with every role (as the Gateway sends them).
HEADERS = {
    "X-QMTL-Service-Token": SERVICE_TOKEN,
    "X-QMTL-Subject": "ops",
    "X-QMTL-Claims": encode_claims({"sub": "ops", "world_roles": {"*": ["owner", "operator", "reader"]}}),
}


def service_env(service: str, pg: tuple[str, str], bootstrap: str, **settings: object) -> dict[str, str]:
    """Environment for ``qmtl <service>`` on the PostgreSQL schema ``pg`` and the Kafka bus."""
    url, schema = pg
    section = service.upper()
    env = {
        "QMTL__CONTROLBUS__KIND": "kafka",
        "QMTL__CONTROLBUS__BOOTSTRAP_SERVERS": bootstrap,
        "QMTL__CONTROLBUS__FETCH_MAX_WAIT_MS": "10",
        f"QMTL__{section}__DATABASE_URL": url,
        f"QMTL__{section}__DATABASE_SCHEMA": schema,
    }
    env.update({f"QMTL__{section}__{k.upper()}": str(v) for k, v in settings.items()})
    return env


@contextlib.contextmanager
def processes(tmp_path: Path, service: str, n: int, env: Mapping[str, str], *,
              hooked: Mapping[int, Mapping[str, str]] | None = None) -> Iterator[list[WorldServiceProcess]]:
    """``n`` processes of ``service`` (each its own data dir and free port), started one
    after the other, killed (SIGKILL) at the end. ``hooked[i]``: process i runs the CLI
    through tests/helpers/ws_hooked.py with that extra environment."""
    procs = []
    try:
        for i in range(n):
            extra = dict(env)
            argv = None
            if hooked and i in hooked:
                extra.update(hooked[i])
                argv = [sys.executable, "-m", "tests.helpers.ws_hooked"]
            p = WorldServiceProcess(tmp_path / f"{service}-{i}", service_token=SERVICE_TOKEN, env=extra, service=service, argv=argv)
            procs.append(p)
            p.start(timeout=40)
        yield procs
    finally:
        for p in procs:
            p.stop()


def client(p: WorldServiceProcess, timeout: float = 60.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=p.url, headers=HEADERS, timeout=timeout)


async def poll(check, timeout: float = 60.0, what: str = "condition") -> None:
    """Await ``check()`` (async) until it is true; fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def metric_sum(procs: list[WorldServiceProcess], name: str, **labels: str) -> float:
    total = 0.0
    for p in procs:
        if p.running:
            async with client(p) as c:
                total += metric((await c.get("/metrics")).text, name, **labels)
    return total


class Recorder:
    """Every event on ``topics`` from the beginning, in arrival order (its own consumer)."""

    def __init__(self, bootstrap: str, validator, topics: list[str]) -> None:
        self.bus = KafkaBus(bootstrap, validator=validator, request_timeout_ms=1000, reconnect_backoff=(0.05, 0.3),
                            fetch_max_wait_ms=10)
        self.topics = topics
        self.messages: list[BusMessage] = []
        self._task: asyncio.Task | None = None
        self._sub = None

    async def __aenter__(self) -> Recorder:
        await self.bus.start()
        self._sub = await self.bus.subscribe(self.topics, consumer_id=f"rec-{uuid.uuid4().hex[:8]}", from_beginning=True)

        async def run() -> None:
            async for msg in self._sub:
                self.messages.append(msg)

        self._task = asyncio.create_task(run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sub is not None:
            await self._sub.close()
        await self.bus.close()

    def of(self, topic: str, key: str | None = None) -> list[BusMessage]:
        return [m for m in self.messages if m.topic == topic and (key is None or m.key == key)]


def dag_node(key: str, *, tags: tuple[str, ...] = ("price",), interval: int = 60) -> dict:
    """A compute node of the DAG schema with a valid node_id, distinct per ``key``."""
    code_hash = hashlib.sha256(f"code:{key}".encode()).hexdigest()
    config_hash = hashlib.sha256(f"cfg:{key}".encode()).hexdigest()
    return {
        "node_id": compute_node_id("Compute", code_hash, config_hash, "s1"),
        "node_type": "Compute", "code_hash": code_hash, "config_hash": config_hash, "schema_hash": "s1",
        "interval": interval, "period": 10, "tags": list(tags), "inputs": [],
    }
