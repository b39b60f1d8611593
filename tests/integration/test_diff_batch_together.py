"""POST /diff/batch applied set-based in one transaction: every answer is the one the diff
gets applied alone after the ones before it (POST /diff one by one on a twin database),
on SQLite and PostgreSQL; what that path does not cover goes one by one; two DAG
Managers batching the same DAGs at once on one PostgreSQL database converge."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from qmtl.bus.inproc import InProcessBus
from qmtl.common.config import Config
from qmtl.contracts.events import event_validators
from qmtl.dagmanager.app import create_app
from qmtl.dagmanager.diff import Differ
from qmtl.dagmanager.topics import EmbeddedTopicAdmin
from qmtl.store import drop_schema
from qmtl.store.sql import Database, sqlite_url
from tests.helpers.ingest_stack import node, tag_query
from tests.helpers.server import serve


@contextlib.asynccontextmanager
async def dag_manager(db: Database) -> AsyncIterator[httpx.AsyncClient]:
    bus = InProcessBus(validator=event_validators())
    await bus.start()
    app = create_app(Config(), bus=bus, db=db, topic_admin=EmbeddedTopicAdmin(), gc_interval=0)
    try:
        async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:
            yield client
    finally:
        await bus.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def twins(request, tmp_path, pg_schema):
    """Two DAG Managers on two empty databases of one engine: (batched, one by one)."""
    if request.param == "sqlite":
        dbs = [Database(sqlite_url(tmp_path / "a.db")), Database(sqlite_url(tmp_path / "b.db"))]
        extra: list[str] = []
    else:
        url, schema = pg_schema
        extra = [schema + "_b"]
        dbs = [Database(url, schema=schema), Database(url, schema=extra[0])]
    try:
        async with dag_manager(dbs[0]) as batched, dag_manager(dbs[1]) as single:
            yield batched, single
    finally:
        for schema in extra:
            await drop_schema(pg_schema[0], schema)


@pytest.fixture
def together(monkeypatch) -> list[bool]:
    """Whether each POST /diff/batch since was applied in one transaction (True) or one by one."""
    seen: list[bool] = []
    original = Differ._diff_together

    async def spy(self: Differ, plans: Any) -> Any:
        results = await original(self, plans)
        seen.append(results is not None)
        return results

    monkeypatch.setattr(Differ, "_diff_together", spy)
    return seen


def sentinel(sid: str, inputs: list[str]) -> dict:
    return {"node_id": f"{sid}-sentinel-v2", "node_type": "VersionSentinel", "version": "v2", "inputs": inputs}


JSON = {"Content-Type": "application/json"}


def as_json(body: Any) -> bytes:
    return json.dumps(body).encode()  # ASCII, escapes included (a lone surrogate too)


async def both(twins: Any, diffs: list[dict]) -> tuple[list[dict], list[dict]]:
    """The batch's results from the first DAG Manager, and POST /diff's answers to the same
    diffs one by one from the second, in the batch's result shape."""
    batched, single = twins
    r = await batched.post("/diff/batch", content=as_json({"diffs": diffs}), headers=JSON)
    assert r.status_code == 200, r.text
    expected = []
    for d in diffs:
        one = await single.post("/diff", content=as_json(d), headers=JSON)
        if one.status_code == 200:
            expected.append({"status": 200, "body": one.json()})
        else:
            problem = one.json()
            expected.append({"status": one.status_code, "problem": {k: problem[k] for k in ("status", "title", "detail")}})
    got = []
    for item in r.json()["results"]:
        if item["status"] == 200:
            got.append(item)
        else:
            got.append({"status": item["status"], "problem": {k: item["problem"][k] for k in ("status", "title", "detail")}})
    return got, expected


async def setup_both(twins: Any, diffs: list[dict]) -> None:
    for client in twins:
        for d in diffs:
            assert (await client.post("/diff", json=d)).status_code == 200


async def test_each_answer_is_the_one_by_one_answer(twins, together):
    owned = node("Compute", "eq01", tags=["btc"])
    await setup_both(twins, [{"strategy_id": "s-owner", "dag": {"nodes": [owned]}}])
    b, c, d = node("Compute", "eq02", tags=["btc"]), node("Compute", "eq03", tags=["btc", "eth"]), node("Compute", "eq04", tags=["eth"])
    tq_btc, tq_eth = tag_query("eqq1", ["btc"]), tag_query("eqq2", ["eth", "btc"], match_mode="all")
    got, expected = await both(twins, [
        {"strategy_id": "s-1", "run_type": "live", "dag": {"nodes": [owned, b, tq_btc]}},  # b new here
        {"strategy_id": "s-2", "dag": {"nodes": [b, c, tq_eth]}},  # b reused (s-1's), c new
        {"strategy_id": "s-3", "asset": "eth", "dag": {"nodes": [c, d, tq_btc, sentinel("s-3", [c["node_id"]])]}},
        {"strategy_id": "s-4", "dag": {"nodes": [owned, tq_btc]}},  # known nodes only
    ])
    assert together == [True]  # one transaction for the batch
    assert got == expected
    first, second, third, fourth = (x["body"] for x in got)
    assert first["new_queues"] == [first["queue_map"][b["node_id"]]]
    assert second["reused_queues"] == [first["queue_map"][b["node_id"]]]
    assert second["queue_map"][c["node_id"]] not in first["tag_queries"][tq_btc["node_id"]]  # c came later
    assert second["queue_map"][c["node_id"]] in fourth["tag_queries"][tq_btc["node_id"]]
    assert third["new_queues"] == [third["queue_map"][d["node_id"]]]
    assert fourth["new_queues"] == []


async def test_queue_names_that_clash_are_the_one_by_one_names(twins, together):
    held = node("Compute", "abc123ff", config_hash="held")
    await setup_both(twins, [{"strategy_id": "s-owner", "dag": {"nodes": [held]}}])
    together.clear()
    same = [node("Compute", "abc123ff", config_hash=f"k{i}") for i in range(4)]  # one short name, the owner's
    other = [node("Compute", "abc124ee", config_hash=f"k{i}") for i in range(3)]  # another one, free
    got, expected = await both(twins, [
        {"strategy_id": "s-1", "dag": {"nodes": [same[0], same[1]]}},  # both renamed (the name is taken)
        {"strategy_id": "s-2", "dag": {"nodes": [other[0], other[1], same[2]]}},  # one gets the free name
        {"strategy_id": "s-3", "dag": {"nodes": [other[2], same[3], same[0]]}},
    ])
    assert together == [True]
    assert got == expected
    topics = [t for x in got for t in x["body"]["new_queues"]]
    assert len(topics) == len(set(topics)) == 7


async def test_a_failing_diff_fails_alone_and_the_others_answer_as_one_by_one(twins, together):
    a = node("Compute", "fa01", tags=["btc"])
    taken = sentinel("s-owner", [a["node_id"]])
    await setup_both(twins, [{"strategy_id": "s-owner", "dag": {"nodes": [a, taken]}},
                             {"strategy_id": "s-again", "dag": {"nodes": [a]}}])
    b, c = node("Compute", "fa02", tags=["eth"]), node("Compute", "fa03")
    clash = [node("Compute", "fa04ab", config_hash="x1"), node("Compute", "fa04ab", config_hash="x2")]  # one short name
    two_sentinels = [sentinel("s-10", []), dict(sentinel("s-10", []), node_id="s-10-other")]
    batches = [
        [{"strategy_id": "s-1", "dag": {"nodes": [a, b]}},
         {"strategy_id": "s-2", "dag": {"nodes": [c, dict(taken, inputs=[c["node_id"]])]}},  # another strategy's sentinel: 409
         {"strategy_id": "s-3", "dag": {"nodes": [b, c]}}],
        [{"strategy_id": "s-4", "dag": {"nodes": [b]}},
         {"strategy_id": "s-again", "dag": {"nodes": [a, b, c]}}],  # a strategy diffed again
        [{"strategy_id": "s-5", "dag": {"nodes": [clash[0]]}},
         {"strategy_id": "s-6", "dag": {"nodes": [clash[1], b]}}],  # renamed: the second of one short name
        [{"strategy_id": "s-7", "dag": {"nodes": [node("Compute", "fa05")]}},
         {"strategy_id": "s-8", "run_type": "dry-run", "dag": {"nodes": [b, node("Compute", "fa06")]}}],  # two namespaces
        [{"strategy_id": "s-9", "dag": {"nodes": [node("Compute", "fa07", tags=["btc"])]}},
         {"strategy_id": "s-10", "dag": {"nodes": [node("Compute", "fa08"), *two_sentinels]}},  # 422, before any SQL
         {"strategy_id": "s-11", "dag": {"nodes": [node("Compute", "fa09", tags=["btc"]), tag_query("faq2", ["btc"])]}}],
        [{"strategy_id": "s-12", "dag": {"nodes": [b]}},
         {"strategy_id": "s-12", "dag": {"nodes": [b, c]}}],  # one strategy twice in a batch
        [{"strategy_id": "s-13", "dag": {"nodes": [node("Compute", "fa10")]}},
         {"strategy_id": "s-14", "dag": {"nodes": [dict(node("Compute", "fa11"), code_hash="fa11\udc00")]}},  # refused: 422
         {"strategy_id": "s-15", "dag": {"nodes": [node("Compute", "fa12"), b]}}],
    ]
    statuses = []
    for diffs in batches:
        got, expected = await both(twins, diffs)
        assert got == expected, diffs
        statuses.append([x["status"] for x in got])
    assert statuses == [[200, 409, 200], [200, 200], [200, 200], [200, 200], [200, 422, 200], [200, 200], [200, 422, 200]]
    # one transaction where it applies: not with the 409, the re-diff, two namespaces, one strategy twice,
    # a string the database refuses
    assert together == [False, False, True, False, True, False, False]


async def test_two_dag_managers_batching_the_same_dags_converge(pg_schema):
    url, schema = pg_schema
    async with dag_manager(Database(url, schema=schema)) as one, dag_manager(Database(url, schema=schema)) as two:
        shared = [node("Compute", f"cv{i:02d}", tags=[f"t{i % 3}"]) for i in range(6)]
        for round_ in range(4):
            dags = [[*shared[i % 3:i % 3 + 3], node("Compute", f"cv{round_}{i}u")] for i in range(6)]
            run = uuid.uuid4().hex[:6]
            batch_a = [{"strategy_id": f"a-{run}-{i}", "dag": {"nodes": dag}} for i, dag in enumerate(dags)]
            batch_b = [{"strategy_id": f"b-{run}-{i}", "dag": {"nodes": dag}} for i, dag in enumerate(reversed(dags))]
            both_same = [{"strategy_id": f"s-{run}-{i}", "dag": {"nodes": dag}} for i, dag in enumerate(dags)]  # same ids too
            ra, rb, rc, rd = await asyncio.gather(
                one.post("/diff/batch", json={"diffs": batch_a}), two.post("/diff/batch", json={"diffs": batch_b}),
                one.post("/diff/batch", json={"diffs": both_same}), two.post("/diff/batch", json={"diffs": both_same}))
            answers = [x for r in (ra, rb, rc, rd) for x in r.json()["results"]]
            assert all(x["status"] == 200 for x in answers), answers
            topic_of: dict[str, str] = {}
            for x in answers:
                for node_id, topic in x["body"]["queue_map"].items():
                    assert topic_of.setdefault(node_id, topic) == topic
            new = [t for x in answers for t in x["body"]["new_queues"]]
            assert len(new) == len(set(new))  # each queue created by exactly one diff
            assert set(new) | {t for x in answers for t in x["body"]["reused_queues"]} == set(topic_of.values())
        conn = await asyncpg.connect(url.replace("postgresql://", "postgres://"), server_settings={"search_path": schema})
        try:
            assert await conn.fetch("SELECT nid, sim FROM dm_queues GROUP BY nid, sim HAVING count(*) > 1") == []
            assert await conn.fetchval("SELECT count(*) FROM dm_strategies") == 4 * 18
            refs = await conn.fetchval("SELECT count(*) FROM dm_strategy_nodes")
            assert refs == 4 * 18 * 4
        finally:
            await conn.close()


@pytest.mark.parametrize("count", [3, 1001])
async def test_watches_are_registered_once_and_only_new_ones_reported(tmp_path, count):
    from qmtl.dagmanager import store
    from qmtl.dagmanager.tagindex import TagKey, register_watches

    db = Database(sqlite_url(tmp_path / "w.db"))  # beyond 1,000 rows SQLite's bulk INSERT does not say which are new
    try:
        await db.create_all(store.metadata)
        helpers = store.SqlHelpers(db)
        keys = {TagKey.of([f"t{i}"], 60, "any"): [f"q{i}"] for i in range(count)}
        async with db.begin() as conn:
            assert await register_watches(conn, helpers, dict(list(keys.items())[:1]), 1.0) == list(keys)[:1]
        async with db.begin() as conn:
            assert await register_watches(conn, helpers, keys, 2.0) == list(keys)[1:]
        async with db.begin() as conn:
            assert await register_watches(conn, helpers, keys, 3.0) == []
    finally:
        await db.close()
