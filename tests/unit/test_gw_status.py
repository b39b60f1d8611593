"""The Gateway's /status component (qmtl/gateway/status.py): degradation rule, caching,
single evaluation in flight, failing and hanging checks."""

from __future__ import annotations

import asyncio

import pytest
from jsonschema import Draft202012Validator

from qmtl.bus.inproc import InProcessBus
from qmtl.contracts.loader import load_schema_files, schema_registry
from qmtl.gateway import status as st
from qmtl.gateway.ingest.fallback import FallbackQueue


@pytest.mark.parametrize("health,level", [
    ({"redis": True, "database": True, "dagmanager": True, "worldservice": True}, "NORMAL"),
    ({"redis": True, "database": True, "dagmanager": False, "worldservice": True}, "PARTIAL"),
    ({"redis": True, "database": True, "dagmanager": True, "worldservice": False}, "PARTIAL"),
    ({"redis": True, "database": True, "dagmanager": False, "worldservice": False}, "PARTIAL"),
    ({"redis": False, "database": True, "dagmanager": True, "worldservice": True}, "MINIMAL"),
    ({"redis": True, "database": False, "dagmanager": False, "worldservice": False}, "MINIMAL"),
    ({"redis": False, "database": False, "dagmanager": True, "worldservice": True}, "STATIC"),
    ({"redis": False, "database": False, "dagmanager": False, "worldservice": False}, "STATIC"),
])
def test_degradation_rule(health, level):
    assert st.degradation_level(health) == level


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class Dep:
    def __init__(self, ok=True, delay=0.0, error=None):
        self.ok, self.delay, self.error, self.calls = ok, delay, error, 0

    async def __call__(self):
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error:
            raise self.error
        return self.ok


class Breakered:
    def __init__(self, dep, name):
        self.probe, self.name = dep, name

    def snapshot(self):
        return {"name": self.name, "state": "closed", "failures": 0, "retry_after": 0.0}


class Ctx:
    def __init__(self, **deps):
        self.deps = {n: deps.get(n, Dep()) for n in ("redis", "database", "dagmanager", "worldservice")}

        class KV:
            ping = self.deps["redis"]

        class DB:
            ping = self.deps["database"]

        self.kv, self.db = KV(), DB()
        self.dagmanager = Breakered(self.deps["dagmanager"], "dagmanager")
        self.worldservice = Breakered(self.deps["worldservice"], "worldservice")
        self.bus = InProcessBus()

    def collaborators(self):
        return {"kv": self.kv, "db": self.db, "bus": self.bus, "worldservice": self.worldservice, "dagmanager": self.dagmanager}


VALIDATOR = Draft202012Validator(load_schema_files()["gateway_status.schema.json"], registry=schema_registry(),
                                 format_checker=Draft202012Validator.FORMAT_CHECKER)


async def test_report_is_cached_for_the_ttl_and_validates():
    ctx, clock = Ctx(dagmanager=Dep(ok=False)), Clock()
    mon = st.StatusMonitor(**ctx.collaborators(), ttl=2.0, clock=clock)
    first = await mon.report()
    VALIDATOR.validate(first)
    assert first["degradation"] == "PARTIAL" and first["status"] == "degraded" and first["cached"] is False
    assert first["dependencies"]["dagmanager"]["healthy"] is False and first["dependencies"]["redis"]["healthy"] is True
    clock.t += 1.9
    assert (await mon.report())["cached"] is True
    assert all(d.calls == 1 for d in ctx.deps.values())
    clock.t += 0.2
    assert (await mon.report())["cached"] is False
    assert all(d.calls == 2 for d in ctx.deps.values())


async def test_concurrent_reports_share_one_evaluation():
    ctx = Ctx(worldservice=Dep(delay=0.05))
    mon = st.StatusMonitor(**ctx.collaborators(), ttl=0.0)  # no caching at all: still one evaluation in flight at a time
    reports = await asyncio.gather(*(mon.report() for _ in range(10)))
    assert ctx.deps["worldservice"].calls == 1 and {r["degradation"] for r in reports} == {"NORMAL"}


async def test_failing_and_hanging_checks_are_unhealthy_not_errors(monkeypatch):
    monkeypatch.setattr(st, "PROBE_TIMEOUT", 0.05)
    ctx = Ctx(redis=Dep(error=ConnectionError("refused")), database=Dep(delay=1.0))
    report = await st.StatusMonitor(**ctx.collaborators(), ttl=1.0).report()
    VALIDATOR.validate(report)
    assert report["degradation"] == "STATIC"
    assert "ConnectionError" in report["dependencies"]["redis"]["detail"]
    assert "no answer within 50 ms" in report["dependencies"]["database"]["detail"]


async def test_level_is_synchronous_and_refreshes_in_the_background():
    ctx, clock = Ctx(), Clock()
    mon = st.StatusMonitor(**ctx.collaborators(), ttl=1.0, clock=clock)
    assert mon.level() == "NORMAL"  # before any evaluation; schedules one
    await asyncio.sleep(0.01)
    assert ctx.deps["redis"].calls == 1
    ctx.deps["redis"].ok = False
    clock.t += 2
    assert mon.level() == "NORMAL"  # stale: the last known level, refresh scheduled
    await asyncio.sleep(0.01)
    assert mon.level() == "MINIMAL"
    assert await mon.current_level() == "MINIMAL"
    await mon.stop()


async def test_fallback_queue_size_from_the_ingest_fallback_queue():
    ctx = Ctx()
    fallback = FallbackQueue(10)
    for i in range(7):
        fallback.put(f"s-{i}")
    report = await st.StatusMonitor(**ctx.collaborators(), fallback=fallback, ttl=1.0).report()
    VALIDATOR.validate(report)
    assert report["fallback_queue"] == 7
