"""POST /diff/batch (DAG Manager) and the Gateway's ingest workers using it: strategies taken
from the queue together are diffed in one request, each answered on its own; a diff's budget
grows with its size."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from qmtl.bus.inproc import InProcessBus
from qmtl.common.config import Config
from qmtl.contracts.events import event_validators
from qmtl.dagmanager.app import create_app
from qmtl.dagmanager.topics import EmbeddedTopicAdmin
from qmtl.gateway.backends import Backend, BackendUnavailable
from qmtl.store.sql import Database, sqlite_url
from tests.helpers.ingest_stack import ingest_stack, node
from tests.helpers.server import serve


@pytest.fixture
async def dm(tmp_path):
    bus = InProcessBus(validator=event_validators())
    await bus.start()
    app = create_app(Config(), bus=bus, db=Database(sqlite_url(tmp_path / "dm.db")), topic_admin=EmbeddedTopicAdmin(), gc_interval=0)
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        yield client
    await bus.close()


def sentinel(sid: str, inputs: list[str], version: str = "v2") -> dict:
    return {"node_id": f"{sid}-sentinel-{version}", "node_type": "VersionSentinel", "version": version, "inputs": inputs}


async def test_each_diff_of_a_batch_is_answered_on_its_own_in_order(dm):
    a, b, c = node("Compute", "ba1", tags=["btc"]), node("Compute", "ba2", tags=["eth"]), node("Compute", "ba3")
    taken = sentinel("s-owner", [a["node_id"]])
    r = await dm.post("/diff", json={"strategy_id": "s-owner", "dag": {"nodes": [a, taken]}})
    assert r.status_code == 200, r.text
    owner_queue = r.json()["queue_map"][a["node_id"]]

    r = await dm.post("/diff/batch", json={"diffs": [
        {"strategy_id": "s-1", "run_type": "live", "dag": {"nodes": [a, b]}},
        {"strategy_id": "s-2", "dag": {"nodes": [c, dict(taken, inputs=[c["node_id"]])]}},  # another strategy's sentinel
        {"strategy_id": "s-3", "run_type": "dry-run", "dag": {"nodes": [b]}},
    ]})
    assert r.status_code == 200, r.text
    first, second, third = r.json()["results"]
    assert first["status"] == 200 and first["body"]["strategy_id"] == "s-1"
    assert set(first["body"]["queue_map"]) == {a["node_id"], b["node_id"]}
    assert first["body"]["reused_queues"] == [owner_queue]
    assert first["body"]["new_queues"] == [first["body"]["queue_map"][b["node_id"]]]
    assert second["status"] == 409 and second["problem"]["status"] == 409
    assert "s-owner" in second["problem"]["detail"] and second["problem"]["title"] == "Conflict"
    assert third["status"] == 200 and third["body"]["sim"] is True  # the failure before it stopped nothing

    # the batch's diffs are the same as POST /diff's: diffing s-1 again reuses what it created
    again = await dm.post("/diff", json={"strategy_id": "s-1", "run_type": "live", "dag": {"nodes": [a, b]}})
    assert again.json()["new_queues"] == [] and again.json()["queue_map"] == first["body"]["queue_map"]


async def test_a_batch_that_breaks_the_schema_is_one_422_with_pointers(dm):
    r = await dm.post("/diff/batch", json={"diffs": [{"strategy_id": "ok", "dag": {"nodes": [node("Compute", "x")]}},
                                                     {"strategy_id": "bad", "dag": {"nodes": []}}]})
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["errors"][0]["pointer"] == "/diffs/1/dag/nodes"
    r = await dm.post("/diff/batch", json={"diffs": []})
    assert r.status_code == 422 and r.json()["errors"][0]["pointer"] == "/diffs"


async def test_queued_strategies_are_diffed_together_and_each_completes(redis_kv, pg_schema):
    async with ingest_stack(redis_kv, pg_schema, workers=1) as s:
        s.tap.gate = asyncio.Event()  # the first diff waits at the DAG Manager while more arrive
        shared = node("Compute", "bshared", tags=["btc"])
        first = await s.submit([shared, node("Compute", "bfirst", inputs=[shared["node_id"]])])
        await asyncio.sleep(0)
        rest = await asyncio.gather(*(s.submit([shared, node("Compute", f"bown{i}", inputs=[shared["node_id"]])]) for i in range(11)))
        s.tap.gate.set()
        sids = [first.json()["strategy_id"], *(r.json()["strategy_id"] for r in rest)]
        sts = await s.wait_all(sids)
        assert len({st["queue_map"][shared["node_id"]] for st in sts.values()}) == 1
        assert s.tap.count("/diff/batch") >= 1
        assert s.tap.count("/diff") + s.tap.count("/diff/batch") < len(sids)  # fewer requests than strategies
        for sid in sids:
            assert await s.history(sid) == ["queued", "processing", "diffed", "completed"]


async def test_a_batch_refused_as_a_whole_is_diffed_one_by_one(redis_kv, pg_schema):
    async with ingest_stack(redis_kv, pg_schema, workers=1) as s:
        inner = s.tap.app

        async def no_batch(scope, receive, send):  # a DAG Manager without POST /diff/batch
            if scope["type"] == "http" and scope["path"] == "/diff/batch":
                await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"application/problem+json")]})
                await send({"type": "http.response.body", "body": b'{"title":"Not Found","status":404}'})
                return
            await inner(scope, receive, send)

        s.tap.app = no_batch
        s.tap.gate = asyncio.Event()
        try:
            subs = await asyncio.gather(*(s.submit([node("Compute", f"nb{i}")]) for i in range(6)))
            s.tap.gate.set()
            await s.wait_all([r.json()["strategy_id"] for r in subs])
        finally:
            s.tap.app = inner
        assert s.tap.count("/diff/batch") >= 1 and s.tap.count("/diff") == 6


async def test_a_diff_budget_grows_with_the_call():
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.3)
        return httpx.Response(200, json={})

    backend = Backend("dagmanager", "http://dm", timeout=0.05, retries=0,
                      client=httpx.AsyncClient(base_url="http://dm", transport=httpx.MockTransport(slow)))
    try:
        with pytest.raises(BackendUnavailable, match="within 50 ms"):
            await backend.request("POST", "/diff", content=b"{}")
        assert (await backend.request("POST", "/diff", content=b"{}", timeout=5.0)).status_code == 200
    finally:
        await backend.close()


async def test_a_batch_is_a_write_and_needs_the_service_token(tmp_path):
    cfg = Config()
    cfg.dagmanager.service_token = "dm-s3cret"
    bus = InProcessBus(validator=event_validators())
    await bus.start()
    app = create_app(cfg, bus=bus, db=Database(sqlite_url(tmp_path / "dm.db")), topic_admin=EmbeddedTopicAdmin(), gc_interval=0)
    body = {"diffs": [{"strategy_id": "s-auth", "dag": {"nodes": [node("Compute", "auth1")]}}]}
    try:
        async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
            r = await client.post("/diff/batch", json=body)
            assert r.status_code == 401 and r.headers["content-type"].startswith("application/problem+json")
            r = await client.post("/diff/batch", json=body, headers={"X-QMTL-Service-Token": "dm-s3cret"})
            assert r.status_code == 200 and r.json()["results"][0]["status"] == 200
    finally:
        await bus.close()
