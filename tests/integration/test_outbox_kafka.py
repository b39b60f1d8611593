"""Writes never wait on the ControlBus (issue 15 item 4), on the wire: a WorldService and a
DAG Manager process on PostgreSQL and librdkafka's mock Kafka cluster. With the broker
down, concurrent writes to both all answer (before the broker is back: they are awaited
first), their events wait in the outboxes (reported by /health), and once the broker
returns every event is published, in order per key (world; (tags, interval))."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest

from qmtl.bus.base import TOPIC_ACTIVATION, TOPIC_QUEUES
from qmtl.bus.keys import queue_key
from tests.helpers.bus import wait_until
from tests.helpers.replicas import Recorder, client, dag_node, processes, service_env

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

WORLDS = [f"ow{i}" for i in range(4)]
CHAIN = 5  # sequential writes per world (and diffs per tag key)
TAGS = ["ta", "tb"]


def first_occurrences(messages, field) -> list:
    """Values of ``field`` in arrival order, repeats (at-least-once re-deliveries) dropped."""
    seen: set[str] = set()
    out = []
    for m in messages:
        text = json.dumps(m.value, sort_keys=True)
        if text not in seen:
            seen.add(text)
            out.append(m.value[field])
    return out


async def test_writes_answer_while_kafka_is_down_and_events_follow_in_order(fresh_kafka_cluster, pg_schema, tmp_path, event_validator):
    cluster = fresh_kafka_cluster
    bootstrap = cluster.bootstrap_servers
    ws_env = service_env("worldservice", pg_schema, bootstrap)
    dm_env = service_env("dagmanager", pg_schema, bootstrap)
    with processes(tmp_path, "worldservice", 1, ws_env) as [ws], processes(tmp_path, "dagmanager", 1, dm_env) as [dm]:
        async with client(ws) as wsc, client(dm) as dmc, Recorder(bootstrap, event_validator, [TOPIC_ACTIVATION, TOPIC_QUEUES]) as rec:
            for w in [*WORLDS, "w"]:
                assert (await wsc.post("/worlds", json={"world_id": w, "name": w})).status_code == 201
            for tag in TAGS:  # watched keys: their set changes are announced
                r = await dmc.get("/queues/by_tag", params={"tags": tag, "interval": 60})
                assert r.status_code == 200 and r.json()["queues"] == []

            cluster.broker_down()

            async def chain(world: str) -> list[int]:
                codes = []
                for i in range(CHAIN):
                    body = {"strategy_id": "s", "side": "long", "active": True, "weight": round((i + 1) / 10, 1)}
                    codes.append((await wsc.put(f"/worlds/{world}/activation", json=body)).status_code)
                return codes

            async def one(world: str, sid: str) -> int:
                body = {"strategy_id": sid, "side": "long", "active": True, "weight": 1.0}
                return (await wsc.put(f"/worlds/{world}/activation", json=body)).status_code

            async def diffs(tag: str) -> list[int]:
                codes = []
                for i in range(CHAIN):
                    body = {"strategy_id": f"st-{tag}-{i}", "dag": {"nodes": [dag_node(f"{tag}-{i}", tags=(tag,))]}}
                    codes.append((await dmc.post("/diff", json=body)).status_code)
                return codes

            # the case (5 concurrent writes to one world) next to concurrent chains
            results = await asyncio.gather(
                *(one("w", f"s{i}") for i in range(5)), *(chain(w) for w in WORLDS), *(diffs(t) for t in TAGS)
            )
            # Every write answered while the broker is still down (it comes back only below).
            assert results[:5] == [200] * 5
            assert results[5:5 + len(WORLDS)] == [[200] * CHAIN] * len(WORLDS)
            assert results[5 + len(WORLDS):] == [[200] * CHAIN] * len(TAGS)
            health = (await wsc.get("/health")).json()
            assert health["outbox_pending"] == 5 + CHAIN * len(WORLDS)  # committed, none published, none lost
            assert health["outbox_oldest_age_seconds"] > 0
            assert (await dmc.get("/health")).json()["outbox_pending"] >= len(TAGS)

            cluster.broker_up()

            def all_published() -> bool:
                done_w = all(len(set(first_occurrences(rec.of(TOPIC_ACTIVATION, w), "weight"))) == CHAIN for w in WORLDS)
                done_q = all(
                    any(len(m.value["queues"]) == CHAIN for m in rec.of(TOPIC_QUEUES, queue_key([t], 60))) for t in TAGS
                )
                return done_w and done_q and len({m.value["strategy_id"] for m in rec.of(TOPIC_ACTIVATION, "w")}) == 5

            await wait_until(all_published, timeout=60, what="every event after the broker returned")

            for w in WORLDS:  # per world: the order the writes were committed in
                assert first_occurrences(rec.of(TOPIC_ACTIVATION, w), "weight") == [0.1, 0.2, 0.3, 0.4, 0.5]
            for t in TAGS:  # per (tags, interval): each announced set contains the previous one
                sets = [set(m.value["queues"]) for m in rec.of(TOPIC_QUEUES, queue_key([t], 60))]
                assert all(a < b for a, b in itertools.pairwise(sets) if a != b), sets
                final = (await dmc.get("/queues/by_tag", params={"tags": t, "interval": 60})).json()["queues"]
                assert sets[-1] == set(final) and len(final) == CHAIN

            async def drained() -> bool:
                return (await wsc.get("/health")).json()["outbox_pending"] == 0 and (
                    await dmc.get("/health")).json()["outbox_pending"] == 0

            for _ in range(300):
                if await drained():
                    break
                await asyncio.sleep(0.05)
            assert await drained()
