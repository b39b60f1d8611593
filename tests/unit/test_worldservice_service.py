"""The WorldService object used without HTTP (tests, benchmarks, tools): same rules."""

from __future__ import annotations

import asyncio

import pytest

from qmtl.bus.base import TOPIC_ACTIVATION
from qmtl.bus.inproc import InProcessBus
from qmtl.common.config import Config
from qmtl.common.errors import Conflict, Forbidden, NotFound, Unprocessable
from qmtl.contracts.events import event_validators
from qmtl.store.sql import Database, sqlite_url
from qmtl.worldservice.app import create_service
from qmtl.worldservice.rbac import Identity

DEV = Identity.development("tester")


@pytest.fixture
async def service(tmp_path):
    bus = InProcessBus(validator=event_validators())
    await bus.start()
    db = Database(sqlite_url(tmp_path / "worldservice.db"))
    svc = create_service(Config(), bus=bus, db=db)
    await svc.start()
    yield svc
    await svc.stop()
    await db.close()


async def test_apply_without_http_and_roles(service):
    await service.worlds.create(DEV, {"world_id": "w", "name": "W"})
    reader = Identity.from_claims("r", {"world_roles": {"w": ["reader"]}})
    with pytest.raises(Forbidden):
        await service.applies.apply(reader, "w", {"run_id": "r1", "plan": {"activate": ["s"]}})
    result, replayed = await service.applies.apply(DEV, "w", {"run_id": "r1", "plan": {"activate": ["s"]}})
    assert not replayed and len(result["activated"]) == 2
    assert (await service.activation.get(reader, "w", "s", "short"))["active"] is True
    with pytest.raises(NotFound):
        await service.worlds.get(DEV, "missing")
    with pytest.raises(Unprocessable, match="NUL"):
        await service.worlds.create(DEV, {"world_id": "x", "name": "bad\x00name"})


async def test_a_cancelled_apply_is_rolled_back(service):
    await service.worlds.create(DEV, {"world_id": "w", "name": "W"})
    await service.applies.apply(DEV, "w", {"run_id": "base", "plan": {"activate": ["keep"]}})
    before = await service.activation.get_all(DEV, "w")
    entered = asyncio.Event()

    async def hook(phase, world_id, run_id):
        if phase == "switched":
            entered.set()
            await asyncio.Event().wait()  # hangs until cancelled

    service.applies.hook = hook
    task = asyncio.create_task(service.applies.apply(DEV, "w", {"run_id": "hang", "plan": {"deactivate": ["keep"], "activate": ["new"]}}))
    await asyncio.wait_for(entered.wait(), 5)
    assert (await service.worlds.get(DEV, "w"))["apply_run_id"] == "hang"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await service.worlds.get(DEV, "w"))["apply_run_id"] is None
    assert await service.activation.get_all(DEV, "w") == before


async def test_a_conflict_raised_inside_an_apply_stays_a_conflict(service):
    await service.worlds.create(DEV, {"world_id": "w", "name": "W"})

    def hook(phase, world_id, run_id):
        if phase == "drained":
            raise Conflict("someone else took over")

    service.applies.hook = hook
    with pytest.raises(Conflict, match="took over"):
        await service.applies.apply(DEV, "w", {"run_id": "c", "plan": {"activate": ["s"]}})
    assert (await service.activation.get_all(DEV, "w"))["activations"] == []
    sub = await service.bus.subscribe([TOPIC_ACTIVATION], consumer_id="c", from_beginning=True)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(sub.__anext__(), 0.05)
    await sub.close()


async def test_events_held_back_by_a_bus_outage_are_retried_in_order(tmp_path):
    class Flaky(InProcessBus):
        down = True

        async def publish(self, topic, value, *, key, headers=None):
            if self.down:
                raise ConnectionError("bus down")
            await super().publish(topic, value, key=key, headers=headers)

    bus = Flaky(validator=event_validators())
    await bus.start()
    db = Database(sqlite_url(tmp_path / "worldservice.db"))
    svc = create_service(Config(), bus=bus, db=db)
    svc.outbox.backoff = (0.01, 0.05)  # retry fast
    await svc.start()
    try:
        sub = await bus.subscribe([TOPIC_ACTIVATION], consumer_id="t")
        await svc.worlds.create(DEV, {"world_id": "w", "name": "W"})
        await svc.applies.apply(DEV, "w", {"run_id": "r1", "plan": {"activate": ["a"]}})  # committed, not published
        await svc.applies.apply(DEV, "w", {"run_id": "r2", "plan": {"deactivate": ["a"]}})
        assert (await svc.health())["outbox_pending"] == 4
        bus.down = False
        got = [await asyncio.wait_for(sub.__anext__(), 2) for _ in range(4)]
        assert [(m.value["run_id"], m.value["side"], m.value["active"]) for m in got] == [
            ("r1", "long", True), ("r1", "short", True), ("r2", "long", False), ("r2", "short", False)]
        for _ in range(50):
            if await svc.outbox.pending() == 0:
                break
            await asyncio.sleep(0.02)
        assert await svc.outbox.pending() == 0
        await sub.close()
    finally:
        await svc.stop()
        await db.close()


async def test_health_is_503_when_the_database_is_down(service, monkeypatch):
    from qmtl.common.errors import ServiceUnavailable

    assert (await service.health())["database"] == "ok"

    async def down():
        return False

    monkeypatch.setattr(service.db, "ping", down)
    with pytest.raises(ServiceUnavailable, match="database is unreachable"):
        await service.health()


async def test_embedded_sqlite_rolls_back_an_apply_in_flight_at_start_whatever_its_lease(tmp_path):
    """SQLite is the one-process setup: an apply in flight at start was the previous
    process's, and is rolled back at once (on PostgreSQL only once its lease expired)."""
    from datetime import UTC, datetime, timedelta

    import sqlalchemy as sa

    from qmtl.worldservice import store

    bus = InProcessBus(validator=event_validators())
    await bus.start()
    db = Database(sqlite_url(tmp_path / "worldservice.db"))
    first = create_service(Config(), bus=bus, db=db)
    await first.start()
    await first.worlds.create(DEV, {"world_id": "w", "name": "W"})
    await first.stop()
    async with db.begin() as conn:  # a process died holding a lease for another hour
        await conn.execute(sa.update(store.worlds).values(
            apply_run_id="gone", apply_owner="dead-process", apply_lease_until=datetime.now(UTC) + timedelta(hours=1)))
    second = create_service(Config(), bus=bus, db=db)
    await second.start()
    try:
        assert (await second.worlds.get(DEV, "w"))["apply_run_id"] is None
        assert (await second.activation.get_all(DEV, "w"))["frozen"] is False
    finally:
        await second.stop()
        await db.close()
