"""Two DAG Manager processes (``qmtl dagmanager``) on one PostgreSQL schema (issue 11):
concurrent diffs of the same new DAG through both make exactly one queue per node (each
created by one of them); the periodic GC runs once per interval across them (a lease) and
collects each released queue once; a change a dead process left unannounced is announced
by the next one to start."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests.helpers.replicas import client, dag_node, metric_sum, poll, processes, service_env

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


async def test_two_dag_managers_diffing_one_new_dag_make_one_queue_per_node(kafka_bootstrap, pg_schema, tmp_path):
    url, schema = pg_schema
    env = service_env("dagmanager", pg_schema, kafka_bootstrap, gc_interval_seconds=0.3, queue_ttl_seconds=0)
    with processes(tmp_path, "dagmanager", 2, env) as procs:
        async with client(procs[0]) as c0, client(procs[1]) as c1:
            all_topics: set[str] = set()
            for round_ in range(4):
                nodes = [dag_node(f"r{round_}-n{i}", tags=(f"t{i % 5}",)) for i in range(60)]
                r0, r1 = await asyncio.gather(
                    c0.post("/diff", json={"strategy_id": f"a-{round_}", "dag": {"nodes": nodes}}),
                    c1.post("/diff", json={"strategy_id": f"b-{round_}", "dag": {"nodes": nodes}}),
                )
                assert r0.status_code == 200 and r1.status_code == 200, (r0.text, r1.text)
                d0, d1 = r0.json(), r1.json()
                assert d0["queue_map"] == d1["queue_map"] and len(d0["queue_map"]) == len(nodes)
                topics = set(d0["queue_map"].values())
                assert len(topics) == len(nodes)
                # each queue was created by exactly one of the two diffs
                assert set(d0["new_queues"]) | set(d1["new_queues"]) == topics
                assert not set(d0["new_queues"]) & set(d1["new_queues"])
                all_topics |= topics

            conn = await asyncpg.connect(url.replace("postgresql://", "postgres://"), server_settings={"search_path": schema})
            try:
                per_node = await conn.fetch("SELECT nid, sim, count(*) AS n FROM dm_queues GROUP BY nid, sim HAVING count(*) > 1")
                assert per_node == []
                assert await conn.fetchval("SELECT count(*) FROM dm_queues") == len(all_topics)

                # release everything: the queues (TTL 0) are collected once, by whichever replica
                for round_ in range(4):
                    for prefix, c in (("a", c0), ("b", c1)):
                        assert (await c.delete(f"/strategies/{prefix}-{round_}")).status_code == 200

                async def collected() -> bool:
                    return await conn.fetchval("SELECT count(*) FROM dm_queues") == 0

                await poll(collected, what="GC to collect the released queues")
            finally:
                await conn.close()
            assert await metric_sum(procs, "dm_gc_collected_total") == len(all_topics)

            async def one_skipped() -> bool:  # the replicas take turns: a pass is left to the other
                return await metric_sum(procs, "dm_gc_skipped_total") >= 1

            await poll(one_skipped, what="a GC pass left to the other replica")


async def test_a_change_left_unannounced_by_a_dead_process_is_announced_at_the_next_start(pg_schema):
    """The notifier's queue is in memory: a process that dies after a diff committed and
    before it recomputed the watches leaves the change unannounced; the next DAG Manager
    process to start recomputes every watch and announces it."""
    from qmtl.bus.base import TOPIC_QUEUES
    from qmtl.bus.inproc import InProcessBus
    from qmtl.bus.keys import queue_key
    from qmtl.common.config import Config
    from qmtl.contracts.events import event_validators
    from qmtl.dagmanager.app import create_service
    from qmtl.store.sql import Database
    from tests.helpers.bus import take

    url, schema = pg_schema
    bus = InProcessBus(validator=event_validators())
    await bus.start()
    sub = await bus.subscribe([TOPIC_QUEUES], consumer_id="rec", from_beginning=True)
    db = Database(url, schema=schema)
    try:
        first = create_service(Config(), bus=bus, db=db)
        await first.start()
        await first.queues.by_tag(["lost"], 60)  # a watched key
        first.notifier.queues_changed = lambda changes: None  # "dies" before announcing
        result = await first.diffs.diff("s-lost", {"nodes": [dag_node("lost-1", tags=("lost",))]})
        await first.stop()

        second = create_service(Config(), bus=bus, db=db)
        await second.start()
        await second.drain()
        [msg] = await take(sub, 1)
        assert msg.key == queue_key(["lost"], 60) and msg.value["queues"] == result.new_queues
        await second.stop()
    finally:
        await sub.close()
        await db.close()
        await bus.close()
