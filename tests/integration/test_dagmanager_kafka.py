"""The DAG Manager on Kafka, over the wire against librdkafka's mock cluster (no fake of
aiokafka): data-topic creation through the admin client with its fallback to broker
auto-creation (the mock has no CreateTopics), and QueueUpdated on a Kafka ControlBus."""

from __future__ import annotations

import asyncio
import hashlib
import logging

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from qmtl.bus.base import TOPIC_QUEUES
from qmtl.bus.kafka import KafkaBus
from qmtl.bus.keys import queue_key
from qmtl.common.config import Config
from qmtl.common.nodeid import compute_node_id
from qmtl.contracts.events import event_validators
from qmtl.dagmanager.app import create_app
from qmtl.dagmanager.topics import KafkaTopicAdmin
from qmtl.store.sql import Database, sqlite_url
from tests.helpers.server import serve
from tests.kafka_mock import kafka_bootstrap, kafka_cluster  # noqa: F401  (fixtures)

pytestmark = pytest.mark.kafka

WAIT = 15.0


def node(key: str, tags=("price",)) -> dict:
    code = hashlib.sha256(f"code:{key}".encode()).hexdigest()
    n = {"node_type": "Compute", "code_hash": code, "config_hash": "c", "schema_hash": "s",
         "interval": 60, "period": 1, "tags": list(tags), "inputs": []}
    n["node_id"] = compute_node_id("Compute", code, "c", "s")
    return n


async def describe(bootstrap: str, topics: list[str]) -> dict[str, int]:
    """topic → partition count, as the cluster reports it (no auto-creation here)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        listed = set(await admin.list_topics())
        found = {t: None for t in topics if t in listed}
        if found:
            for t in await admin.describe_topics(list(found)):
                found[t["topic"]] = len(t["partitions"])
        return found  # type: ignore[return-value]
    finally:
        await admin.close()


async def test_topic_admin_falls_back_to_broker_auto_creation_once(kafka_bootstrap, caplog):
    caplog.set_level(logging.WARNING, logger="qmtl.dagmanager.topics")
    admin = KafkaTopicAdmin(kafka_bootstrap, request_timeout_ms=5000)
    await admin.start()
    try:
        assert admin.mode == "kafka-admin"
        await asyncio.wait_for(admin.create_many(["dm_t_one", "dm_t_two"], 4, {"retention.ms": "60000"}), WAIT)
        assert admin.mode == "kafka-auto-create"
        assert await describe(kafka_bootstrap, ["dm_t_one", "dm_t_two"]) == {"dm_t_one": 4, "dm_t_two": 4}
        await asyncio.wait_for(admin.create("dm_t_one", 4, {}), WAIT)  # idempotent
        await asyncio.wait_for(admin.create("dm_t_three", 4, {}), WAIT)
        assert "dm_t_three" in await describe(kafka_bootstrap, ["dm_t_three"])
        warnings = [r for r in caplog.records if "does not support CreateTopics" in r.getMessage()]
        assert len(warnings) == 1  # logged once, not per topic
        assert await admin.delete("dm_t_two") is False  # no admin API: left to retention
        assert "dm_t_two" in await describe(kafka_bootstrap, ["dm_t_two"])
    finally:
        await admin.close()


async def test_diff_creates_its_topics_on_kafka_and_queue_updated_goes_over_a_kafka_bus(kafka_bootstrap, tmp_path):
    cfg = Config()
    cfg.controlbus.kind = "kafka"
    cfg.controlbus.bootstrap_servers = kafka_bootstrap
    cfg.dagmanager.kafka_admin = True
    bus = KafkaBus(kafka_bootstrap, validator=event_validators(), client_id="dm-test")
    reader = KafkaBus(kafka_bootstrap, validator=event_validators(), client_id="dm-test-reader")
    db = Database(sqlite_url(tmp_path / "dm.db"))
    app = create_app(cfg, bus=bus, db=db, gc_interval=0)
    try:
        await reader.start()
        async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=30) as client:
            sub = await reader.subscribe([TOPIC_QUEUES], consumer_id="dm-kafka-test", from_beginning=True)
            try:
                r = await client.get("/queues/by_tag", params={"tags": "btc", "interval": 60})
                assert r.status_code == 200 and r.json()["queues"] == []
                r = await client.post("/diff", json={"strategy_id": "k1", "asset": "btc",
                                                     "dag": {"nodes": [node("a", ("btc",)), node("b")]}})
                assert r.status_code == 200, r.text
                new = r.json()["new_queues"]
                assert len(new) == 2
                assert await describe(kafka_bootstrap, new) == dict.fromkeys(new, 4)  # they exist on the cluster
                health = (await client.get("/health")).json()
                assert health["topic_admin"] == "kafka-auto-create"

                msg = await asyncio.wait_for(sub.__anext__(), WAIT)
                assert msg.key == queue_key(["btc"], 60)
                assert msg.value["type"] == "QueueUpdated" and msg.value["tags"] == ["btc"]
                assert msg.value["queues"] == [r.json()["queue_map"][node("a")["node_id"]]]
            finally:
                await sub.close()
    finally:
        await reader.close()
        await bus.close()
        await db.close()


async def test_an_unreachable_kafka_neither_stops_the_service_nor_fails_a_diff(tmp_path):
    from tests.helpers.server import free_port

    cfg = Config()
    cfg.controlbus.bootstrap_servers = f"127.0.0.1:{free_port()}"  # nothing listens there
    cfg.dagmanager.kafka_admin = True
    db = Database(sqlite_url(tmp_path / "dm.db"))
    from qmtl.bus.inproc import InProcessBus

    app = create_app(cfg, bus=InProcessBus(validator=event_validators()), db=db, gc_interval=0)
    try:
        async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=30) as client:
            r = await asyncio.wait_for(
                client.post("/diff", json={"strategy_id": "k2", "dag": {"nodes": [node("z")]}}), WAIT
            )
            assert r.status_code == 200 and len(r.json()["new_queues"]) == 1  # the queue exists regardless
            metrics = (await client.get("/metrics")).text
            assert "dm_topic_create_failures_total 1.0" in metrics
    finally:
        await db.close()
