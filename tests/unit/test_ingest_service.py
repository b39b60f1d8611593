"""IngestService paths the HTTP tests cannot stage easily: the DAG Manager refusing or
garbling a diff, a queued id without a record, a lock held elsewhere, a failing relay,
queue lookups failing at acceptance. In-memory Redis substitute, SQLite, and a DAG Manager
played by an httpx MockTransport behind the real Backend (budget and breaker)."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry

from qmtl.common.config import Config
from qmtl.common.crc import crc32_of_node_ids
from qmtl.common.nodeid import compute_node_id
from qmtl.gateway.backends import Backend
from qmtl.gateway.ingest import FallbackQueue, IngestMetrics, IngestService, QueueLookup
from qmtl.store import Database, make_kv, sqlite_url


def node(code, node_type="Compute", **extra):
    n = {"node_type": node_type, "code_hash": code, "config_hash": "c", "schema_hash": "s", "interval": 60,
         "period": 1, "tags": ["btc"], "inputs": []}
    n["node_id"] = compute_node_id(node_type, code, "c", "s")
    n.update(extra)
    return n


def body(nodes):
    return {"dag_json": base64.b64encode(json.dumps({"nodes": nodes}).encode()).decode(), "meta": None,
            "run_type": "dry-run", "node_ids_crc32": crc32_of_node_ids(n["node_id"] for n in nodes)}


class FakeDagManager:
    def __init__(self):
        self.diff_status = 200
        self.diff_body = None
        self.by_tag_status = 200
        self.calls = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request.url.path)
        if request.url.path == "/diff":
            payload = json.loads(request.content)
            if self.diff_body is not None:
                return httpx.Response(self.diff_status, json=self.diff_body)
            nodes = [n for n in payload["dag"]["nodes"] if n["node_type"] == "Compute"]
            return httpx.Response(self.diff_status, json={
                "strategy_id": payload["strategy_id"], "sentinel_id": payload["strategy_id"] + "-sentinel",
                "queue_map": {n["node_id"]: f"t_{n['code_hash']}_sim" for n in nodes},
                "new_queues": [], "reused_queues": [], "tag_queries": {}} if self.diff_status < 400 else
                {"title": "Unprocessable Content", "status": 422, "detail": "node x is bad"})
        if request.url.path == "/queues/by_tag":
            return httpx.Response(self.by_tag_status, json={"queues": ["t_a"]} if self.by_tag_status < 400 else {"title": "x"})
        return httpx.Response(200, json={"status": "ok"})


class Recorder:
    def __init__(self, fail=False):
        self.frames = []
        self.fail = fail

    async def relay_local(self, type_, data, *, key, world_id=None):
        self.frames.append((type_, data))
        if self.fail:
            raise ValueError("frame rejected")
        return 1


@pytest.fixture
async def svc(tmp_path):
    fake = FakeDagManager()
    cfg = Config()
    cfg.gateway.workers = 1
    backend = Backend("dagmanager", "http://dm", timeout=0.5, retries=1,
                      client=httpx.AsyncClient(base_url="http://dm", transport=httpx.MockTransport(fake)))
    registry, db, kv = CollectorRegistry(), Database(sqlite_url(tmp_path / "gw.db")), make_kv("memory://")
    metrics = IngestMetrics.create(registry)
    service = IngestService(cfg.gateway, db=db, kv=kv, kv_prefix="u:", dagmanager=backend, metrics=metrics,
                            fallback=FallbackQueue(cfg.gateway.fallback_queue_size, on_change=metrics.fallback_size.set),
                            queues=QueueLookup(backend))
    service.registry = registry  # read by sample() below
    service.tuning.pop_timeout = 0.05
    service.tuning.reconcile_interval = 0.05
    service.fake = fake
    yield service
    await service.stop()
    await backend.close()
    await db.close()
    await kv.aclose()


async def wait_terminal(svc, sid, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        st = await svc.status(sid)
        if st["status"] in ("completed", "failed"):
            return st
        assert time.monotonic() < deadline, st
        await asyncio.sleep(0.02)


def sample(svc, name, labels=None):
    return svc.registry.get_sample_value(name, labels or {}) or 0


async def test_refused_diff_fails_the_strategy_with_the_reason(svc):
    svc.fake.diff_status = 422
    await svc.start()
    ack, _ = await svc.submit(body([node("a")]))
    st = await wait_terminal(svc, ack["strategy_id"])
    assert st["status"] == "failed" and "HTTP 422" in st["error"] and "node x is bad" in st["error"]
    assert [s for s, _a, _d in await svc.store.history(ack["strategy_id"])] == ["queued", "processing", "failed"]
    assert sample(svc, "gateway_ingest_fsm_total", {"state": "failed"}) == 1


async def test_malformed_diff_answer_fails_the_strategy(svc):
    svc.fake.diff_body = {"queue_map": "not a map"}
    await svc.start()
    ack, _ = await svc.submit(body([node("b")]))
    st = await wait_terminal(svc, ack["strategy_id"])
    assert st["status"] == "failed" and "malformed" in st["error"]


async def test_a_queued_id_without_a_record_is_counted_as_lost(svc):
    await svc.start()
    await svc.redis.push("s-ghost")
    deadline = time.monotonic() + 5
    while sample(svc, "lost_requests_total") < 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert await svc.redis.queued_ids() == set()


async def test_a_lock_held_elsewhere_means_this_copy_is_dropped(svc):
    await svc.start()
    svc.link.up.clear()  # keep the workers idle while staging
    ack, _ = await svc.submit(body([node("c")]))
    sid = ack["strategy_id"]
    svc.fallback.remove([sid])
    await svc.redis.push(sid)
    token = await svc.redis.lock(sid)  # another replica holds it
    svc.link.up.set()
    deadline = time.monotonic() + 5
    while await svc.redis.queued_ids():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert (await svc.status(sid))["status"] == "queued"  # untouched by this worker
    assert "/diff" not in svc.fake.calls
    await svc.redis.unlock(sid, token)


async def test_a_failing_relay_does_not_stop_the_fsm(svc):
    rec = Recorder(fail=True)
    svc.fsm.relay = rec
    await svc.start()
    ack, _ = await svc.submit(body([node("d")]))
    st = await wait_terminal(svc, ack["strategy_id"])
    assert st["status"] == "completed"
    assert [t for t, _d in rec.frames] == ["progress", "progress", "progress", "queue_map", "progress"]
    assert sample(svc, "gateway_ingest_relay_errors_total") == 5


async def test_tag_query_lookup_failure_still_acks_with_empty_lists(svc):
    svc.fake.by_tag_status = 503
    await svc.start()
    q = node("q", node_type="TagQueryNode", match_mode="any")
    ack, headers = await svc.submit(body([q]))
    assert ack["queue_map"] == {q["node_id"]: []}
    assert headers == {"Location": f"/strategies/{ack['strategy_id']}/status"}
    svc.fake.by_tag_status = 200
    ack2, _ = await svc.submit(body([node("q2", node_type="TagQueryNode", match_mode="all")]))
    assert list(ack2["queue_map"].values()) == [["t_a"]]


async def test_identical_concurrent_lookups_share_one_call(svc):
    await svc.start()
    before = svc.queues.calls
    res = await asyncio.gather(*(svc.queues.by_tag(["b", "a"], 60, "any") for _ in range(10)), svc.queues.by_tag(["a", "b"], 60, "any"))
    assert all(r == {"queues": ["t_a"]} for r in res)
    assert svc.queues.calls - before == 1


async def test_dry_run_and_meta_reach_the_diff(svc):
    seen = {}
    original = svc.fake.__call__

    def spy(request):
        if request.url.path == "/diff":
            seen.update(json.loads(request.content))
        return original(request)

    svc.dagmanager.client = httpx.AsyncClient(base_url="http://dm", transport=httpx.MockTransport(spy))
    await svc.start()
    b = body([node("e")])
    b["meta"] = {"asset": "btc", "version": "v3"}
    ack, _ = await svc.submit(b)
    await wait_terminal(svc, ack["strategy_id"])
    assert seen["run_type"] == "dry-run" and seen["asset"] == "btc"
    assert seen["dag"]["nodes"][-1] == {"node_id": ack["sentinel_id"], "node_type": "VersionSentinel", "version": "v3",
                                        "inputs": [node("e")["node_id"]]}


async def test_an_unexpected_error_fails_the_strategy_and_keeps_the_worker(svc, monkeypatch):
    await svc.start()
    original = svc.workers._run_batch
    calls = {"n": 0}

    async def buggy(todo):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("boom")
        return await original(todo)

    monkeypatch.setattr(svc.workers, "_run_batch", buggy)
    first, _ = await svc.submit(body([node("x1")]))
    st = await wait_terminal(svc, first["strategy_id"])
    assert st["status"] == "failed" and "KeyError" in st["error"]
    second, _ = await svc.submit(body([node("x2")]))  # the worker is still alive
    assert (await wait_terminal(svc, second["strategy_id"]))["status"] == "completed"
    assert await svc.redis.processing_ids() == []


def test_rate_meter_counts_the_last_second():
    from qmtl.gateway.ingest.state import RateMeter

    now = [100.0]
    meter = RateMeter(monotonic=lambda: now[0])
    for _ in range(50):
        meter.tick()
    now[0] += 0.5
    for _ in range(30):
        meter.tick()
    assert meter.per_second() == 80
    now[0] += 0.6  # the first 50 are more than a second old
    assert meter.per_second() == 30
    now[0] += 5
    assert meter.per_second() == 0
