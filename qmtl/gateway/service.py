"""The Gateway service object: what every handler in ``handlers/gateway/`` receives as ``ctx``.

Built by :func:`qmtl.gateway.app.create_service`, which constructs each collaborator
explicitly. It holds the configuration, the metrics registry, the ControlBus, the KV store
(Redis), the database, the two backends (``worldservice``, ``dagmanager``: budget and
circuit breaker each) and the parts:

* ``auth``     – verifies callers' bearer JWTs (:mod:`qmtl.gateway.auth`)
* ``worlds``   – the worlds proxy with caches, live guard, identity propagation (:mod:`qmtl.gateway.worlds`)
* ``events``   – descriptor tokens, ControlBus consumer, state, WebSocket fan-out (:mod:`qmtl.gateway.events`)
* ``ingest``   – strategy ingest FSM, FIFO worker, fallback queue (:mod:`qmtl.gateway.ingest`)
* ``status``   – degradation level and dependency health (:mod:`qmtl.gateway.status`)

A focused build (tests, benchmarks) leaves parts out; reading a part that was not built
raises the 501 problem its routes answer.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from prometheus_client import CollectorRegistry

from qmtl.bus.base import ControlBus
from qmtl.common.config import Config
from qmtl.common.errors import ServiceError
from qmtl.gateway.backends import Backend
from qmtl.store import Database

if TYPE_CHECKING:
    from qmtl.gateway.auth import Authenticator
    from qmtl.gateway.events import EventsComponent
    from qmtl.gateway.ingest import IngestService
    from qmtl.gateway.status import StatusMonitor
    from qmtl.gateway.worlds import WorldsProxy

log = logging.getLogger(__name__)

ALL_PARTS = ("auth", "worlds", "events", "ingest", "status")  # also their start order (stopped in reverse)


class Part(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def not_built(name: str) -> NoReturn:
    err = ServiceError(f"the Gateway's {name} component is not part of this build", title="Not Implemented")
    err.status = 501
    raise err


class Gateway:
    def __init__(self, config: Config, *, registry: CollectorRegistry, bus: ControlBus, kv: Any, kv_prefix: str,
                 db: Database, worldservice: Backend, dagmanager: Backend, tracer_provider: Any = None,
                 auth: Authenticator | None = None, worlds: WorldsProxy | None = None, events: EventsComponent | None = None,
                 ingest: IngestService | None = None, status: StatusMonitor | None = None) -> None:
        self.config = config
        self.registry = registry
        self.bus = bus
        self.kv = kv
        self.kv_prefix = kv_prefix
        self.db = db
        self.worldservice = worldservice
        self.dagmanager = dagmanager
        self.tracer_provider = tracer_provider
        self._auth, self._worlds, self._events, self._ingest, self._status = auth, worlds, events, ingest, status

    # -- the parts (501 when left out of this build) -------------------------------------
    @property
    def auth(self) -> Authenticator:
        return self._auth if self._auth is not None else not_built("auth")

    @property
    def worlds(self) -> WorldsProxy:
        return self._worlds if self._worlds is not None else not_built("worlds")

    @property
    def events(self) -> EventsComponent:
        return self._events if self._events is not None else not_built("events")

    @property
    def ingest(self) -> IngestService:
        return self._ingest if self._ingest is not None else not_built("ingest")

    @property
    def status(self) -> StatusMonitor:
        return self._status if self._status is not None else not_built("status")

    def parts(self) -> dict[str, Part]:
        """The parts of this build, in start order."""
        built: dict[str, Part | None] = {"auth": self._auth, "worlds": self._worlds, "events": self._events,
                                         "ingest": self._ingest, "status": self._status}
        return {name: part for name, part in built.items() if part is not None}

    def has(self, name: str) -> bool:
        return name in self.parts()

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        for name, part in self.parts().items():
            await part.start()
            log.debug("gateway component %s started", name)

    async def stop(self) -> None:
        for name, part in reversed(list(self.parts().items())):
            started = time.monotonic()
            try:
                await part.stop()
            except Exception:  # keep stopping the others
                log.exception("stopping gateway component %s failed", name)
            took = time.monotonic() - started
            if took > 2.0:  # a slow stop is named (a shutdown should take well under a second)
                log.warning("stopping gateway component %s took %.1f s", name, took)
        await self.worldservice.close()
        await self.dagmanager.close()
        with contextlib.suppress(Exception):
            await self.kv.aclose()
        await self.db.close()
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()  # flushes the spans still batched
