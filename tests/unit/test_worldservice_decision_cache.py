"""The in-process decision cache (qmtl.worldservice.decision_cache): a decide needs no SQL
when nothing changed, and never answers from a state that a write has changed — neither
this process's writes (every write path that changes a decision) nor, on PostgreSQL,
another WorldService's writes on the same database (issue 11's guarantee)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa

from qmtl.bus.inproc import InProcessBus
from qmtl.common.clock import ManualClock
from qmtl.common.config import Config
from qmtl.common.errors import NotFound
from qmtl.contracts.events import event_validators
from qmtl.store.sql import Database, sqlite_url
from qmtl.worldservice import views
from qmtl.worldservice.app import create_service
from qmtl.worldservice.decision_cache import DecisionCache, DecisionInputs
from qmtl.worldservice.rbac import Identity
from qmtl.worldservice.service import WorldService

DEV = Identity.development("tester")
PROMOTE_AT_ONCE = "hysteresis: {promote_after: 1}\n"


@contextlib.asynccontextmanager
async def started(db: Database, clock: ManualClock) -> AsyncIterator[WorldService]:
    bus = InProcessBus(validator=event_validators())
    await bus.start()
    service = create_service(Config(), bus=bus, db=db, clock=clock)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()
        await db.close()


class Statements:
    """Counts the SQL statements a Database runs."""

    def __init__(self, db: Database) -> None:
        self.count = 0
        sa.event.listen(db.engine.sync_engine, "before_cursor_execute", self._seen)

    def _seen(self, *_args: object) -> None:
        self.count += 1


async def every_write_path_is_seen(writer: WorldService, reader: WorldService, clock: ManualClock) -> None:
    """Each write that changes a decision, made on ``writer``, is seen by ``reader``'s next decide."""

    async def decided() -> tuple[int, str, str]:
        d = await reader.decisions.decide(DEV, "w")
        return d["policy_version"], d["effective_mode"], d["reason"]

    def observation() -> dict:
        return {"data_end": views.iso(clock.now()), "samples": 10, "metrics": {"sharpe": 1.0}}

    await writer.worlds.create(DEV, {"world_id": "w", "name": "W"})
    assert await decided() == (0, "backtest", "no default policy")
    assert await decided() == (0, "backtest", "no default policy")  # cached

    await writer.policies.create(DEV, "w", {"yaml": PROMOTE_AT_ONCE, "set_default": True})
    assert (await decided())[:2] == (1, "backtest") and (await decided())[2] == "no observation recorded"

    await writer.decisions.record_observation(DEV, "w", observation())
    assert (await decided())[:2] == (1, "dryrun")

    await writer.worlds.update(DEV, "w", {"allow_live": True})
    clock.advance(1)
    await writer.decisions.record_observation(DEV, "w", observation())
    assert (await decided())[:2] == (1, "live")
    await writer.worlds.update(DEV, "w", {"allow_live": False})
    assert (await decided())[:2] == (1, "dryrun")

    await writer.worlds.update(DEV, "w", {"circuit_breaker": True})
    assert (await decided())[1:] == ("backtest", "circuit breaker engaged")
    await writer.worlds.update(DEV, "w", {"circuit_breaker": False})
    assert (await decided())[:2] == (1, "dryrun")

    await writer.worlds.update(DEV, "w", {"state": "SUSPENDED"})
    assert (await decided())[1:] == ("backtest", "world suspended")
    await writer.worlds.update(DEV, "w", {"state": "ACTIVE"})
    assert (await decided())[:2] == (1, "dryrun")

    await writer.policies.create(DEV, "w", {"yaml": PROMOTE_AT_ONCE + "data_currency: {max_lag: 1m}\n"})
    assert (await decided())[0] == 1  # a draft changes nothing
    await writer.policies.set_default(DEV, "w", 2)
    assert (await decided())[0] == 2
    clock.advance(120)
    assert (await decided())[1] == "backtest"  # as_of moves on: data currency is judged at every read

    await writer.worlds.delete(DEV, "w")
    with pytest.raises(NotFound):
        await decided()


async def test_one_process_every_write_path_and_no_sql_when_nothing_changed(tmp_path):
    clock = ManualClock()
    db = Database(sqlite_url(tmp_path / "worldservice.db"))
    async with started(db, clock) as service:
        await every_write_path_is_seen(service, service, clock)
        await service.worlds.create(DEV, {"world_id": "quiet", "name": "Q"})
        await service.decisions.decide(DEV, "quiet")
        statements = Statements(db)
        for _ in range(3):
            assert (await service.decisions.decide(DEV, "quiet"))["reason"] == "no default policy"
        assert statements.count == 0  # SQLite is one process: its own writes are the only ones


@pytest.mark.postgres
async def test_two_services_on_one_postgresql_never_serve_a_stale_decision(pg_schema):
    url, schema = pg_schema
    clock = ManualClock()
    async with started(Database(url, schema=schema), clock) as writer, \
            started(Database(url, schema=schema), clock) as reader:
        await every_write_path_is_seen(writer, reader, clock)
        await writer.worlds.create(DEV, {"world_id": "quiet", "name": "Q"})
        await reader.decisions.decide(DEV, "quiet")
        statements = Statements(reader.db)
        await reader.decisions.decide(DEV, "quiet")
        assert statements.count == 1  # only the world's rev, to confirm the cached entry


def test_a_read_that_overlapped_a_write_is_not_kept():
    cache = DecisionCache(shared_database=False)
    inputs = DecisionInputs(rev=1, policy_version=0, policy=None, state=None, data_end=None,
                            allow_live=False, suspended=False, circuit_breaker=False)
    generation = cache.generation()  # a read starts ...
    cache.invalidate("w")  # ... a write on the world starts (or ends) meanwhile ...
    cache.put("w", generation, inputs)  # ... what the read saw is not kept
    assert cache.get("w") is None
    cache.put("w", cache.generation(), inputs)
    assert cache.get("w") is inputs
    cache.invalidate("w")
    assert cache.get("w") is None
