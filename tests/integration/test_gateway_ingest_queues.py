"""GET /queues/by_tag and the legacy GET /queues/watch, answered from the DAG Manager on
its budget (SPEC §3), plus the ingest frames on the legacy WebSocket stream."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from websockets.asyncio.client import connect

from tests.helpers.ingest_stack import ingest_stack, node

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

LINK = '</events/subscribe>; rel="successor-version"'


async def _strategy(s, code, tags):
    r = await s.submit([node("Compute", code, tags=tags)])
    assert r.status_code == 202, r.text
    st = await s.wait_status(r.json()["strategy_id"])
    return st["queue_map"][node("Compute", code, tags=tags)["node_id"]]


async def test_by_tag_any_all_alias_and_precedence(redis_kv, pg_schema):
    async with ingest_stack(redis_kv, pg_schema) as s:
        t_btc = await _strategy(s, "a1", ["btc", "price"])
        t_eth = await _strategy(s, "b2", ["eth", "price"])

        async def q(**params):
            r = await s.client.get("/queues/by_tag", params={"interval": 60, **params})
            assert r.status_code == 200, r.text
            return sorted(r.json()["queues"])

        assert await q(tags="btc,eth") == sorted([t_btc, t_eth])  # default any
        assert await q(tags="btc,price", match_mode="all") == [t_btc]
        assert await q(tags="btc,eth", match_mode="all") == []
        assert await q(tags="btc,price", match="all") == [t_btc]  # deprecated alias
        assert await q(tags="btc,eth", match="all", match_mode="any") == sorted([t_btc, t_eth])  # match_mode wins
        assert await q(tags="btc", interval=300) == []
        # at least one DAG Manager call per valid lookup (more when a slow one was retried under load)
        reached = s.tap.count("/queues/by_tag")
        assert reached >= 6
        r = await s.client.get("/queues/by_tag", params={"tags": "btc", "interval": 0})
        assert r.status_code == 400
        r = await s.client.get("/queues/by_tag", params={"tags": "btc", "interval": 60, "match_mode": "some"})
        assert r.status_code == 400
        assert s.tap.count("/queues/by_tag") == reached  # the invalid ones never reached the DAG Manager


async def test_by_tag_on_the_dagmanager_budget(redis_kv, pg_schema):
    async with ingest_stack(redis_kv, pg_schema) as s:
        s.tap.delays["/queues/by_tag"] = 0.7  # slower than the 500 ms budget
        before = s.tap.count("/queues/by_tag")
        started = time.monotonic()
        r = await s.client.get("/queues/by_tag", params={"tags": "btc", "interval": 60})
        took = time.monotonic() - started
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert s.tap.count("/queues/by_tag") - before == 2  # one attempt + one retry
        # The stand-in answers after 700 ms, so the 503 shows each attempt was cut short; both
        # attempts waited their budget out (no upper bound: timings are not asserted).
        assert took > 0.9, took


async def test_queue_routes_answer_503_when_the_dagmanager_is_down(redis_kv, pg_schema):
    async with ingest_stack(redis_kv, pg_schema, dagmanager=False) as s:
        r = await s.client.get("/queues/by_tag", params={"tags": "btc", "interval": 60})
        assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json"
        assert int(r.headers["retry-after"]) >= 1
        r = await s.client.get("/queues/watch", params={"tags": "btc", "interval": 60})
        assert r.status_code == 503
        assert r.headers["deprecation"] == "@1795651200" and r.headers["link"] == LINK
        # Refused by parameter validation before the handler runs: still marked deprecated.
        for params in ({"tags": "btc"}, {"tags": "btc", "interval": "soon"}, {"tags": "btc", "interval": 60, "match_mode": "x"}):
            r = await s.client.get("/queues/watch", params=params)
            assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json", (params, r.text)
            assert r.headers["deprecation"] == "@1795651200" and r.headers["link"] == LINK, params
        # A route that is not deprecated carries neither.
        r = await s.client.get("/queues/by_tag", params={"tags": "btc"})
        assert r.status_code == 400 and "deprecation" not in r.headers and "link" not in r.headers


async def test_watch_streams_the_current_list_then_each_change(redis_kv, pg_schema):
    async with ingest_stack(redis_kv, pg_schema) as s:
        t1 = await _strategy(s, "c1", ["sol"])
        async with s.client.stream("GET", "/queues/watch", params={"tags": "sol", "interval": 60}) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("application/x-ndjson")
            assert resp.headers["deprecation"].startswith("@")
            assert resp.headers["link"] == LINK
            lines = resp.aiter_lines()
            first = json.loads(await asyncio.wait_for(lines.__anext__(), 5))
            assert first["queues"] == [t1]
            t2 = await _strategy(s, "d2", ["sol", "vol"])
            second = json.loads(await asyncio.wait_for(lines.__anext__(), 5))
            assert sorted(second["queues"]) == sorted([t1, t2])
            # an unrelated queue does not produce a line
            await _strategy(s, "e3", ["doge"])
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(lines.__anext__(), 0.5)


async def test_progress_and_queue_map_frames_reach_websocket_clients(redis_kv, pg_schema):
    async with ingest_stack(redis_kv, pg_schema, record_relay=False) as s:
        ws_url = s.gateways[0].url.replace("http://", "ws://") + "/ws"
        async with connect(ws_url) as ws:
            await asyncio.sleep(0.1)
            r = await s.submit([node("Compute", "f5", tags=["ada"])])
            sid = r.json()["strategy_id"]
            progress, queue_map = [], None
            async with asyncio.timeout(10):
                while queue_map is None or progress[-1:] != ["completed"]:
                    frame = json.loads(await ws.recv())
                    if frame["type"] == "progress" and frame["data"]["strategy_id"] == sid:
                        progress.append(frame["data"]["status"])
                    elif frame["type"] == "queue_map" and frame["data"]["strategy_id"] == sid:
                        queue_map = frame["data"]
            assert progress == ["queued", "processing", "diffed", "completed"]
            st = await s.status(sid)
            assert queue_map["queue_map"] == st["queue_map"]
            assert queue_map["sentinel_id"] == f"{sid}-sentinel"
