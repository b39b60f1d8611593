"""The Gateway's degradation level and dependency health (``GET /status``, SPEC §2, §4).

Dependencies checked: ``redis`` (the KV store), ``database``, ``dagmanager``
and ``worldservice`` (``Backend.probe()``: one short ``GET /health`` outside the retry
budget, no effect on the breaker). Checks run concurrently, each bounded by
``PROBE_TIMEOUT``; their result is cached for ``gateway.status_cache_ttl`` seconds and
shared by concurrent callers (one evaluation in flight at a time), so a flood of
``/status`` calls does not flood the dependencies. Circuit-breaker states are read live
on every call (they cost nothing).

Degradation rule (documented in ``specs/openapi.yaml`` under ``/status``):

=========  ==============================================================================
NORMAL     every dependency healthy
PARTIAL    Redis and the database healthy; the DAG Manager and/or WorldService not
           (submissions wait in the fallback queue; worlds answers fall back to safe
           decisions / inactive activation)
MINIMAL    exactly one of Redis and the database unhealthy (durable ingest state at
           risk: new submissions are refused with 503)
STATIC     Redis and the database both unhealthy (only static and cached answers)
=========  ==============================================================================

The report also shows the ControlBus (kind, this replica's consumer identity, whether it has
caught up, offset lag per topic, reconnects) and the signing key ring (source, whether it is
shared with the other replicas, kids and which one signs). ``status`` is ``degraded`` when
the level is not NORMAL **or** the ControlBus cannot reach the other services (the
in-process bus of a process running the Gateway alone: see
:func:`qmtl.bus.base.isolation_problem`; logged at startup too).

``readiness()`` is ``GET /ready`` (rules in ``specs/openapi.yaml`` under ``/ready``).

``level()`` is synchronous for hot paths (the ingest route): it returns the level of
the last evaluation and, when that is older than the cache TTL, schedules a refresh in
the background. ``await current_level()`` waits for a fresh one when stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sized
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from qmtl.bus.base import ControlBus, isolation_problem
from qmtl.common.readiness import Check, evaluate
from qmtl.gateway.backends import Backend
from qmtl.store import Database

if TYPE_CHECKING:
    from qmtl.gateway.events.consumer import ControlBusConsumer
    from qmtl.gateway.events.tokens import Tokens

log = logging.getLogger(__name__)

NORMAL, PARTIAL, MINIMAL, STATIC = "NORMAL", "PARTIAL", "MINIMAL", "STATIC"
LEVELS = (NORMAL, PARTIAL, MINIMAL, STATIC)
PROBE_TIMEOUT = 1.0


def degradation_level(health: dict[str, bool]) -> str:
    """The rule in the module docstring; a dependency missing from ``health`` counts as healthy."""
    redis_ok = health.get("redis", True)
    db_ok = health.get("database", True)
    if not redis_ok and not db_ok:
        return STATIC
    if not redis_ok or not db_ok:
        return MINIMAL
    if not health.get("dagmanager", True) or not health.get("worldservice", True):
        return PARTIAL
    return NORMAL


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class EventStreamView(Protocol):
    """What the report reads of the events component: its ControlBus consumer and signing keys."""

    @property
    def consumer(self) -> ControlBusConsumer: ...

    @property
    def tokens(self) -> Tokens: ...


class StatusMonitor:
    """``events`` and ``fallback`` (the ingest's local queue) are None in builds without those parts."""

    def __init__(self, *, kv: Any, db: Database, bus: ControlBus, worldservice: Backend, dagmanager: Backend, ttl: float,
                 events: EventStreamView | None = None, fallback: Sized | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.kv, self.db, self.bus = kv, db, bus
        self.worldservice, self.dagmanager = worldservice, dagmanager
        self.events = events
        self.fallback = fallback
        self.ttl = max(0.0, float(ttl))
        self._clock = clock
        self._deps: dict[str, dict] | None = None
        self._level = NORMAL
        self._checked_at: float | None = None
        self._inflight: asyncio.Task | None = None
        self._stopped = False
        self._answered: set[str] = set()  # backends seen healthy since start (see readiness())

    # -- component protocol ------------------------------------------------------------
    async def start(self) -> None:
        self._stopped = False

    async def stop(self) -> None:
        self._stopped = True
        task, self._inflight = self._inflight, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- checks ------------------------------------------------------------------------
    def _checks(self) -> dict[str, Callable[[], Awaitable[bool]]]:
        kv = self.kv
        return {
            "redis": lambda: _kv_ping(kv),
            "database": self.db.ping,
            "dagmanager": self.dagmanager.probe,
            "worldservice": self.worldservice.probe,
        }

    async def _evaluate(self) -> dict[str, dict]:
        checks = self._checks()

        async def run(name: str, fn: Callable[[], Awaitable[bool]]) -> dict:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(PROBE_TIMEOUT):
                    ok = bool(await fn())
                detail = "reachable" if ok else "unreachable or failing"
            except TimeoutError:
                ok, detail = False, f"no answer within {PROBE_TIMEOUT * 1000:.0f} ms"
            except Exception as exc:  # a check never breaks /status
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            took = (time.perf_counter() - started) * 1000
            return {"healthy": ok, "detail": f"{detail} ({took:.0f} ms)", "checked_at": _now_iso()}

        results = await asyncio.gather(*(run(n, f) for n, f in checks.items()))
        deps = dict(zip(checks, results))
        self._deps = deps
        self._level = degradation_level({n: d["healthy"] for n, d in deps.items()})
        self._checked_at = self._clock()
        return deps

    def _fresh(self) -> bool:
        return self._checked_at is not None and self._clock() - self._checked_at < self.ttl

    async def _dependencies(self) -> tuple[dict[str, dict], bool]:
        """(dependency health, served from cache?)"""
        if self._fresh() and self._deps is not None:
            return self._deps, True
        task = self._inflight
        if task is None or task.done():
            task = asyncio.ensure_future(self._evaluate())
            self._inflight = task
        # shield: one caller giving up must not cancel the evaluation others wait for
        return await asyncio.shield(task), False

    # -- public ------------------------------------------------------------------------
    def level(self) -> str:
        """The last evaluated level (NORMAL before the first evaluation); refreshes in the background when stale."""
        if not self._fresh() and not self._stopped and (self._inflight is None or self._inflight.done()):
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to schedule
                self._inflight = asyncio.get_running_loop().create_task(self._evaluate())
        return self._level

    async def current_level(self) -> str:
        await self._dependencies()
        return self._level

    def breakers(self) -> dict[str, dict]:
        return {"worldservice": self.worldservice.snapshot(), "dagmanager": self.dagmanager.snapshot()}

    async def report(self) -> dict:
        deps, cached = await self._dependencies()
        level = self._level
        bus = self.controlbus()
        out: dict[str, Any] = {
            "status": "ok" if level == NORMAL and not bus.get("problem") else "degraded",
            "degradation": level,
            "dependencies": deps,
            "breakers": self.breakers(),
            "cached": cached,
            "controlbus": bus,
        }
        if self.fallback is not None:
            out["fallback_queue"] = len(self.fallback)
        if self.events is not None:
            out["signing_keys"] = self.events.tokens.describe()
        return out

    def controlbus(self) -> dict[str, Any]:
        """The ControlBus as this replica sees it (no I/O: the lag is the last measured)."""
        bus = self.bus
        out: dict[str, Any] = {"kind": "inproc" if bus.in_process else "kafka"}
        problem = isolation_problem(bus, "gateway")
        if problem:
            out["problem"] = problem
        if self.events is not None:
            consumer = self.events.consumer
            out["consumer_id"] = consumer.consumer_id
            out["caught_up"] = consumer.ready.is_set()
            out["reconnects"] = consumer.stats["reconnects"]
            if consumer.offset_lag is not None:
                out["lag"] = dict(consumer.offset_lag)
        return out

    async def readiness(self) -> tuple[bool, dict]:
        """``GET /ready``: see ``specs/openapi.yaml``."""
        deps: dict[str, dict] = {}
        events = self.events

        async def dependencies() -> None:
            if not deps:
                deps.update((await self._dependencies())[0])

        def dependency(name: str) -> Callable[[], Awaitable[tuple[bool, str]]]:
            async def check() -> tuple[bool, str]:
                await dependencies()
                ok = bool(deps[name]["healthy"])
                if ok:
                    self._answered.add(name)
                return ok, deps[name]["detail"]
            return check

        async def controlbus() -> tuple[bool, str]:
            bus = self.bus
            problem = isolation_problem(bus, "gateway")
            if problem:
                return False, problem
            kind = "in-process" if bus.in_process else "kafka"
            if events is None:
                return True, f"{kind} ControlBus (no event stream in this build)"
            consumer = events.consumer
            lag = await consumer.update_lag_metrics()
            behind = sum(lag.values()) if lag else None
            where = f"{behind} behind" if behind is not None else "lag unknown: the bus does not answer"
            if consumer.ready.is_set():
                return True, f"{kind} ControlBus; consumer {consumer.consumer_id} caught up ({where})"
            return False, f"{kind} ControlBus; consumer {consumer.consumer_id} catching up ({where})"

        checks = [Check("controlbus", controlbus), Check("redis", dependency("redis")), Check("database", dependency("database"))]
        for name in ("worldservice", "dagmanager"):
            # Required until it has answered once; afterwards an outage degrades this Gateway
            # (fallback queue, safe decisions) without taking every replica out of the pool.
            checks.append(Check(name, dependency(name), required=name not in self._answered))
        if events is not None:
            tokens = events.tokens

            async def keys() -> tuple[bool, str]:
                return True, f"signing with {tokens.ring.signer.kid} ({tokens.source})"

            async def keys_shared() -> tuple[bool, str]:
                return tokens.shared, tokens.sharing_note()

            checks += [Check("signing_keys", keys), Check("signing_keys_shared", keys_shared, required=False)]
        return await evaluate("gateway", checks, timeout=PROBE_TIMEOUT * 3)


async def _kv_ping(kv: Any) -> bool:
    return bool(await kv.ping())
