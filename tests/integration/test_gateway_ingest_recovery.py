"""No accepted submission is lost (SPEC §2): DAG Manager outages, a full fallback queue
(503 + Retry-After), Redis losing its data mid-flow, a worker dying mid-processing, a
Gateway dying with ids in its local fallback queue, Redis unreachable (MINIMAL)."""

from __future__ import annotations

import asyncio

import pytest

from qmtl.store import make_kv
from tests.helpers.ingest_stack import ingest_stack, node, wait_for
from tests.helpers.server import free_port

pytestmark = [pytest.mark.redis, pytest.mark.postgres]


async def test_dagmanager_outage_submissions_accepted_and_completed_after_it_returns(redis_kv, pg_schema):
    async with ingest_stack(redis_kv, pg_schema) as s:
        r = await s.submit([node("Compute", "before")])
        await s.wait_status(r.json()["strategy_id"])

        await s.stop_dagmanager()
        during = []
        for i in range(6):
            r = await s.submit([node("Compute", f"during{i}")])
            assert r.status_code == 202, r.text
            during.append(r.json()["strategy_id"])
            if i == 0:  # a worker's diff fails: from then on new ids go straight to the fallback queue
                await wait_for(lambda: not s.ingest.dagmanager_up and len(s.ingest.fallback) == 1, what="DAG Manager marked down")
        assert len(s.ingest.fallback) == 6
        for sid in during:
            assert (await s.status(sid))["status"] == "queued"
        status = (await s.client.get("/status")).json()
        assert status["fallback_queue"] == 6
        assert status["dependencies"]["dagmanager"]["healthy"] is False
        assert status["degradation"] == "PARTIAL"

        await s.start_dagmanager()
        sts = await s.wait_all(during, timeout=15)
        assert all(st["queue_map"] for st in sts.values())
        assert len(s.ingest.fallback) == 0
        text = (await s.client.get("/metrics")).text
        assert "gateway_ingest_fallback_queue_size 0.0" in text
        assert "lost_requests_total 0.0" in text
        # the mirror shows the wait: processing → queued (DAG Manager unavailable) → … → completed
        assert (await s.history(during[0]))[-1] == "completed"


async def test_full_fallback_queue_refuses_with_503_and_retry_after(redis_kv, pg_schema):
    async with ingest_stack(redis_kv, pg_schema, dagmanager=False, fallback_queue_size=2) as s:
        first = await s.submit([node("Compute", "f1")])
        assert first.status_code == 202
        # the worker's diff fails → the DAG Manager is marked down, the id parked
        await wait_for(lambda: len(s.ingest.fallback) == 1 and not s.ingest.dagmanager_up, what="first parked")
        second = await s.submit([node("Compute", "f2")])
        assert second.status_code == 202
        assert len(s.ingest.fallback) == 2

        refused = await s.submit([node("Compute", "f3")])
        assert refused.status_code == 503
        assert refused.headers["content-type"] == "application/problem+json"
        assert int(refused.headers["retry-after"]) >= 1
        assert "fallback queue is full" in refused.json()["detail"]
        # a duplicate is still recognised while refusing
        dup = await s.submit([node("Compute", "f1")])
        assert dup.status_code == 409 and dup.json()["strategy_id"] == first.json()["strategy_id"]
        assert await s.ingest.store.counts() == {"queued": 2}  # the refused one was not stored

        await s.start_dagmanager()
        await s.wait_all([first.json()["strategy_id"], second.json()["strategy_id"]], timeout=15)
        again = await s.submit([node("Compute", "f3")])
        assert again.status_code == 202
        await s.wait_status(again.json()["strategy_id"])


async def test_redis_flushed_mid_flow_fsm_rebuilt_nothing_lost(redis_kv, pg_schema):
    kv, prefix = redis_kv
    async with ingest_stack(redis_kv, pg_schema, workers=1) as s:
        done = await s.submit([node("Compute", "done-before")])
        done_sid = done.json()["strategy_id"]
        done_st = await s.wait_status(done_sid)

        s.tap.gate = asyncio.Event()  # hold the next diff: the worker is busy, the rest queue up
        s.tap.gate_timeout = 2.0
        first = await s.submit([node("Compute", "held")])
        await wait_for(lambda: s.tap.held == 1, what="the first diff to be held")
        rs = await asyncio.gather(*(s.submit([node("Compute", f"q{i}")]) for i in range(10)))
        sids = [first.json()["strategy_id"]] + [r.json()["strategy_id"] for r in rs]
        assert await kv.llen(prefix + "fifo") == 10

        keys = [k async for k in kv.scan_iter(match=prefix + "*")]
        await kv.delete(*keys)  # Redis lost everything: FIFO, FSM, locks, epoch
        assert await kv.llen(prefix + "fifo") == 0
        s.tap.gate.set()

        sts = await s.wait_all(sids, timeout=15)
        assert all(st["queue_map"] for st in sts.values())
        assert s.ingest.rebuilds >= 1
        for sid in sids:
            assert (await s.history(sid))[-1] == "completed"
        # a strategy finished before the loss: its state comes back from the mirror, queue map included
        assert await kv.exists(prefix + "fsm:" + done_sid) == 0
        st = await s.status(done_sid)
        assert st["status"] == "completed" and st["queue_map"] == done_st["queue_map"]
        assert await kv.exists(prefix + "fsm:" + done_sid) == 1  # re-cached
        assert "lost_requests_total 0.0" in (await s.client.get("/metrics")).text


async def test_orphan_on_processing_list_is_requeued_by_another_replica(redis_kv, pg_schema):
    kv, prefix = redis_kv
    async with ingest_stack(redis_kv, pg_schema, workers=0) as s:
        r = await s.submit([node("Compute", "orphan")])
        sid = r.json()["strategy_id"]
        # a worker popped it (reliable queue: fifo → processing) and died before finishing
        assert await kv.blmove(prefix + "fifo", prefix + "processing", 1, "RIGHT", "LEFT") == sid
        assert await kv.llen(prefix + "fifo") == 0

        replica = await s.start_gateway(workers=1)
        st = await s.wait_status(sid, timeout=10)
        assert st["status"] == "completed"
        assert await kv.llen(prefix + "processing") == 0
        # either replica's janitor may have moved it (both run one); exactly one did
        moved = [gw.app.service.registry.get_sample_value("gateway_ingest_recovered_total", {"reason": "janitor"}) or 0
                 for gw in (s.gateways[0], replica)]
        assert sum(moved) == 1, moved


async def test_gateway_dying_with_a_local_fallback_queue_loses_nothing(redis_kv, pg_schema):
    async with ingest_stack(redis_kv, pg_schema, dagmanager=False) as s:
        gw1 = s.gateways[0]
        first = await s.submit([node("Compute", "x0")])
        await wait_for(lambda: not gw1.ingest.dagmanager_up, what="DAG Manager marked down")
        rs = [await s.submit([node("Compute", f"x{i}")]) for i in range(1, 5)]
        sids = [first.json()["strategy_id"]] + [r.json()["strategy_id"] for r in rs]
        assert len(gw1.ingest.fallback) == 5  # only in this process's memory (and in the database)
        await s.stop_gateway(gw1)

        await s.start_dagmanager()
        await s.start_gateway(workers=2)  # a new Gateway process: its startup sweep finds them
        await s.wait_all(sids, timeout=15)


async def test_redis_unreachable_means_minimal_and_503(redis_kv, pg_schema):
    dead = make_kv(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2)
    async with ingest_stack(redis_kv, pg_schema, kv=dead) as s:
        status = (await s.client.get("/status")).json()
        assert status["degradation"] == "MINIMAL"
        assert status["dependencies"]["redis"]["healthy"] is False
        r = await s.submit([node("Compute", "m1")])
        assert r.status_code == 503
        assert int(r.headers["retry-after"]) >= 1
        assert "MINIMAL" in r.json()["detail"]
        assert await s.ingest.store.counts() == {}
