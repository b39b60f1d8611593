"""The SDK against the production engines: ``qmtl up`` on Redis, PostgreSQL (a fresh
database, dropped afterwards) and Kafka (librdkafka's mock cluster) — submit, subscribe,
apply, events through Kafka, TagQueryNode resolution, the gate, and token refresh."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from qmtl.sdk import (
    ActivationGate,
    Dag,
    EventStream,
    GatewayClient,
    Node,
    StreamOptions,
    TagQueryManager,
    TagQueryNode,
)
from tests.conftest import POSTGRES_URL, REDIS_URL
from tests.sdk.live import QmtlUp, wait_until

REDIS_DB = 12  # a database of its own: the Gateway's keys live under the fixed prefix qmtl:gw:
PREFIX = "qmtl:gw:"


def _admin_dsn() -> str:
    return POSTGRES_URL.replace("postgresql://", "postgres://")


@pytest.fixture
async def fresh_database():
    name = "qmtl_sdk_" + uuid.uuid4().hex[:12]
    try:
        conn = await asyncpg.connect(_admin_dsn(), timeout=5)
    except Exception as exc:  # environment failure: fail loudly, never skip
        pytest.fail(f"PostgreSQL is required at {POSTGRES_URL}: {exc!r}")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = POSTGRES_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    conn = await asyncpg.connect(_admin_dsn(), timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def clean_redis():
    import redis.asyncio as aioredis

    url = REDIS_URL.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    kv = aioredis.Redis.from_url(url)
    try:
        await kv.ping()
    except Exception as exc:  # environment failure: fail loudly, never skip
        pytest.fail(f"Redis is required at {url}: {exc!r}")

    async def wipe():
        keys = [k async for k in kv.scan_iter(match=PREFIX + "*")]
        if keys:
            await kv.delete(*keys)

    await wipe()
    yield url
    await wipe()
    await kv.aclose()


async def test_sdk_on_redis_postgresql_and_kafka(tmp_path, kafka_bootstrap, fresh_database, clean_redis):
    up = QmtlUp(tmp_path / "data", env={
        "QMTL__CONTROLBUS__KIND": "kafka",
        "QMTL__CONTROLBUS__BOOTSTRAP_SERVERS": kafka_bootstrap,
        "QMTL__GATEWAY__KV_URL": clean_redis,
        "QMTL__GATEWAY__DATABASE_URL": fresh_database,
        "QMTL__WORLDSERVICE__DATABASE_URL": fresh_database,
        "QMTL__DAGMANAGER__DATABASE_URL": fresh_database,
        "QMTL__GATEWAY__EVENTS__TOKEN_TTL": "3",
    })
    up.start()
    try:
        async with GatewayClient(up.url, validate_responses=True) as client:
            w = "prod-" + uuid.uuid4().hex[:8]
            await client.create_world(w, "production stack")
            tag = "ptag-" + uuid.uuid4().hex[:6]
            tq = TagQueryNode([tag], interval=60)
            consumer = Dag([Node("Compute", code="consume", interval=60, period=1, inputs=[tq])], name=f"consumer-{w}")
            async with EventStream(client, world_id=w, topics=["activation", "policy", "queues"],
                                   queue_keys=[tq.query_key], options=StreamOptions(reconnect_max=0.5)) as stream:
                await stream.wait_synced(30)
                manager = TagQueryManager(client, stream=stream)
                manager.register(consumer)
                await manager.start()
                ack = await client.submit_strategy(consumer, run_type="backtest", world_id=w)
                assert ack["queue_map"][tq.node_id] == []
                # a producer of the tag: its queue reaches the TagQueryNode through Kafka (QueueUpdated)
                producer = Node("StreamInput", code=f"feed {tag}", interval=60, period=5, tags=[tag])
                await client.submit_strategy(Dag([producer]), run_type="backtest")
                await wait_until(lambda: len(tq.queues) == 1, 20, what="the TagQueryNode's queue via Kafka")
                assert (await client.wait_for_status(ack["strategy_id"], timeout=20))["status"] == "completed"

                await client.create_policy(w, "hysteresis: {promote_after: 1, max_mode: dryrun}\n", set_default=True)
                await client.apply(w, {"activate": [{"strategy_id": ack["strategy_id"], "side": "long", "weight": 0.7}]},
                                   consent_live=True)
                gate = ActivationGate(client, stream=stream)
                await wait_until(lambda: gate.is_active(w, ack["strategy_id"], "long"), 20, what="activation via Kafka")
                assert gate.weight(w, ack["strategy_id"], "long") == 0.7
                assert not gate.is_active(w, ack["strategy_id"], "short")
                await wait_until(lambda: stream.state.default_policy(w) is not None, 10, what="the policy via Kafka")
                truth = await client.list_activations(w)
                assert stream.state.activation_hash(w) == truth["state_hash"]
                assert (await client.policy_state_hash(w))["state_hash"] == stream.state.policy_hash(w)
                # the stream lived through token refreshes (TTL 3 s)
                await wait_until(lambda: stream.stats.token_refreshes >= 1, 10, what="a token refresh")
                assert stream.stats.hash_mismatches == 0
                await manager.stop()
    finally:
        up.stop()
