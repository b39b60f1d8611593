"""A Gateway and a DAG Manager served over real sockets for the ingest tests, with real
Redis (the ``redis_kv`` fixture's client and prefix) and PostgreSQL (one schema each).

The DAG Manager app is wrapped in :class:`DagManagerTap`, which records every HTTP call and
can hold ``/diff`` calls at a gate, so tests can see (and stage) what reaches it. The
DAG Manager can be stopped and started again on the same port (an outage).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx

from qmtl.bus import InProcessBus
from qmtl.common.config import Config
from qmtl.common.crc import crc32_of_node_ids
from qmtl.common.nodeid import compute_node_id
from qmtl.contracts.events import event_validators
from qmtl.dagmanager.app import create_app as dagmanager_app
from qmtl.gateway.app import create_app as gateway_app
from qmtl.store import Database, drop_schema
from tests.helpers.server import free_port, serve

TERMINAL = ("completed", "failed")


def node(node_type: str = "Compute", code_hash: str = "c0de", config_hash: str = "cf", schema_hash: str = "5c",
         *, tags: Iterable[str] = ("btc",), interval: int = 60, inputs: Iterable[str] = (), **extra: Any) -> dict:
    n = {"node_type": node_type, "code_hash": code_hash, "config_hash": config_hash, "schema_hash": schema_hash,
         "interval": interval, "period": 1, "tags": list(tags), "inputs": list(inputs)}
    n["node_id"] = compute_node_id(node_type, code_hash, config_hash, schema_hash)
    n.update(extra)
    return n


def tag_query(code_hash: str, tags: Iterable[str], interval: int = 60, match_mode: str = "any") -> dict:
    return node("TagQueryNode", code_hash, tags=tags, interval=interval, match_mode=match_mode)


def submission(nodes: list[dict], *, raw: bool = False, run_type: str = "live", crc: int | None = None, **kw: Any) -> dict:
    dag = {"nodes": nodes}
    text = json.dumps(dag)
    body = {
        "dag_json": text if raw else base64.b64encode(text.encode()).decode(),
        "meta": {"name": "test"},
        "run_type": run_type,
        "node_ids_crc32": crc32_of_node_ids(n["node_id"] for n in nodes) if crc is None else crc,
    }
    body.update(kw)
    return body


class DagManagerTap:
    """ASGI wrapper: records (method, path) of every HTTP call; can hold ``/diff`` (and ``/diff/batch``) at a gate."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.calls: list[tuple[str, str]] = []
        self.gate: asyncio.Event | None = None
        self.gate_timeout = 0.4  # below the 500 ms budget: a held diff still succeeds
        self.held = 0
        self.delays: dict[str, float] = {}  # path -> seconds every call to it is delayed

    def count(self, path: str) -> int:
        return sum(1 for _m, p in self.calls if p == path)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.calls.append((scope["method"], scope["path"]))
            if scope["path"] in self.delays:
                await asyncio.sleep(self.delays[scope["path"]])
            if scope["path"] in ("/diff", "/diff/batch") and self.gate is not None and not self.gate.is_set():
                self.held += 1
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.gate_timeout):
                        await self.gate.wait()
        await self.app(scope, receive, send)


class RelayRecorder:
    """Wraps the ingest's relay (the events part, or none) to record relayed frames."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner
        self.frames: list[tuple[str, dict, str, Any]] = []

    def relay_local(self, type_: str, data: dict, *, key: str, world_id: Any = None) -> Any:
        self.frames.append((type_, json.loads(json.dumps(data)), key, world_id))
        if self.inner is not None:
            return self.inner.relay_local(type_, data, key=key, world_id=world_id)
        return None


def fast_timings(ingest: Any) -> None:
    t = ingest.tuning
    t.pop_timeout = 0.2
    t.reconcile_interval = 0.1
    t.janitor_interval = 0.2
    t.sweep_interval = 1.0
    t.probe_backoff = (0.05, 0.2)
    t.watch_poll_interval = 0.1


@dataclass
class Gateway:
    app: Any
    url: str
    client: httpx.AsyncClient
    relay: RelayRecorder | None
    stack: contextlib.AsyncExitStack

    @property
    def ingest(self) -> Any:
        return self.app.service.ingest


@dataclass
class Stack:
    kv: Any
    prefix: str
    pg_url: str
    cfg: Config
    bus: InProcessBus
    dm_port: int
    dm_schema: str
    gw_schema: str
    gateways: list[Gateway] = field(default_factory=list)
    tap: DagManagerTap | None = None
    _dm_cm: Any = None
    _dm_db: Any = None

    # the first Gateway, for tests that use one
    @property
    def gw(self) -> Any:
        return self.gateways[0].app

    @property
    def client(self) -> httpx.AsyncClient:
        return self.gateways[0].client

    @property
    def relay(self) -> RelayRecorder | None:
        return self.gateways[0].relay

    @property
    def ingest(self) -> Any:
        return self.gateways[0].ingest

    async def start_dagmanager(self) -> None:
        self._dm_db = Database(self.pg_url, schema=self.dm_schema)
        app = dagmanager_app(self.cfg, bus=self.bus, db=self._dm_db, gc_interval=0)
        calls = self.tap.calls if self.tap else []
        self.tap = DagManagerTap(app)
        self.tap.calls = calls
        self._dm_cm = serve(self.tap, port=self.dm_port)
        await self._dm_cm.__aenter__()

    async def stop_dagmanager(self) -> None:
        cm, self._dm_cm = self._dm_cm, None
        if cm is not None:
            await cm.__aexit__(None, None, None)
            await self._dm_db.close()

    async def start_gateway(self, *, workers: int | None = None, kv: Any = None, record_relay: bool = True,
                            tune: Any = None) -> Gateway:
        cfg = copy.deepcopy(self.cfg)
        if workers is not None:
            cfg.gateway.workers = workers
        app = gateway_app(cfg, bus=self.bus, kv=kv if kv is not None else self.kv, kv_prefix=self.prefix,
                          db=Database(self.pg_url, schema=self.gw_schema))
        ingest = app.service.ingest
        fast_timings(ingest)
        if tune is not None:
            tune(ingest)
        relay = None
        if record_relay:  # records what the ingest relays, and passes it on to the events part
            relay = ingest.fsm.relay = RelayRecorder(ingest.fsm.relay)
        stack = contextlib.AsyncExitStack()
        url = await stack.enter_async_context(serve(app))
        client = await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=10))
        gw = Gateway(app, url, client, relay, stack)
        self.gateways.append(gw)
        return gw

    async def stop_gateway(self, gw: Gateway) -> None:
        if gw in self.gateways:
            self.gateways.remove(gw)
            await gw.stack.aclose()

    async def submit(self, nodes: list[dict], *, client: httpx.AsyncClient | None = None, **kw: Any) -> httpx.Response:
        return await (client or self.client).post("/strategies", json=submission(nodes, **kw))

    async def status(self, sid: str) -> dict:
        r = await self.client.get(f"/strategies/{sid}/status")
        assert r.status_code == 200, r.text
        return r.json()

    async def wait_status(self, sid: str, want: str | tuple = TERMINAL, timeout: float = 10.0) -> dict:
        want = (want,) if isinstance(want, str) else want
        deadline = time.monotonic() + timeout
        while True:
            st = await self.status(sid)
            if st["status"] in want:
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"{sid} still {st['status']} after {timeout}s (wanted {want})")
            await asyncio.sleep(0.05)

    async def wait_all(self, sids: Iterable[str], want: str = "completed", timeout: float = 20.0) -> dict[str, dict]:
        out = {}
        deadline = time.monotonic() + timeout
        for sid in sids:
            out[sid] = await self.wait_status(sid, TERMINAL, timeout=max(0.1, deadline - time.monotonic()))
            assert out[sid]["status"] == want, out[sid]
        return out

    async def dm_get(self, path: str, **params: Any) -> httpx.Response:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.dm_port}") as c:
            return await c.get(path, params=params)

    async def history(self, sid: str) -> list[str]:
        return [status for status, _at, _d in await self.ingest.store.history(sid)]


async def wait_for(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while True:
        res = predicate()
        if asyncio.iscoroutine(res):
            res = await res
        if res:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def ingest_stack(redis_kv: tuple, pg: tuple, *, dagmanager: bool = True, workers: int = 2,
                       fallback_queue_size: int = 1000, insert_sentinel: bool = True, record_relay: bool = True,
                       kv: Any = None, tune: Any = None, gateway: bool = True):
    """A DAG Manager (unless ``dagmanager=False``: nothing listens on its port) and one Gateway."""
    kv_client, prefix = redis_kv
    pg_url, gw_schema = pg
    dm_schema = "t_" + uuid.uuid4().hex[:16]
    cfg = Config()
    dm_port = free_port()
    cfg.gateway.dagmanager_url = f"http://127.0.0.1:{dm_port}"
    cfg.gateway.worldservice_url = f"http://127.0.0.1:{free_port()}"
    cfg.gateway.workers = workers
    cfg.gateway.fallback_queue_size = fallback_queue_size
    cfg.gateway.insert_sentinel = insert_sentinel
    cfg.gateway.breaker.reset_timeout = 0.3
    cfg.gateway.status_cache_ttl = 0.2
    bus = InProcessBus(validator=event_validators())
    s = Stack(kv=kv_client, prefix=prefix, pg_url=pg_url, cfg=cfg, bus=bus, dm_port=dm_port, dm_schema=dm_schema, gw_schema=gw_schema)
    try:
        if dagmanager:
            await s.start_dagmanager()
        else:
            s.tap = DagManagerTap(None)
        if gateway:
            await s.start_gateway(kv=kv, record_relay=record_relay, tune=tune)
        yield s
    finally:
        for gw in list(s.gateways):
            await s.stop_gateway(gw)
        await s.stop_dagmanager()
        await drop_schema(pg_url, dm_schema)
