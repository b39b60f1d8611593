"""The Gateway's ASGI app: the spec (specs/openapi.yaml) + handlers/gateway + a :class:`Gateway`.

:func:`create_service` constructs every collaborator explicitly (backends, then the parts
``auth``, ``worlds``, ``events``, ``ingest``, ``status`` with their typed collaborators) and
returns the :class:`~qmtl.gateway.service.Gateway` handlers receive as ``ctx``;
:func:`create_app` serves it. ``parts`` (default: all) selects the parts to build, for
focused tests and benchmarks; the routes of a part left out answer 501.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Collection
from typing import Any

from prometheus_client import CollectorRegistry

from qmtl.bus.base import ControlBus
from qmtl.common.clock import SYSTEM_CLOCK, Clock
from qmtl.common.config import Config
from qmtl.common.tracing import make_tracer_provider
from qmtl.contracts.app import build_app
from qmtl.gateway.auth import Authenticator, spec_security
from qmtl.gateway.backends import Backend, BackendMetrics
from qmtl.gateway.events import EventsComponent
from qmtl.gateway.ingest import FallbackQueue, IngestMetrics, IngestService, QueueLookup
from qmtl.gateway.ingest.fastpath import SubmitFastPath
from qmtl.gateway.service import ALL_PARTS, Gateway
from qmtl.gateway.status import StatusMonitor
from qmtl.gateway.worlds import DecideFastPath, WorldsProxy
from qmtl.store import Database, make_kv

log = logging.getLogger(__name__)


def create_service(config: Config, *, bus: ControlBus, kv: Any = None, db: Database | None = None, kv_prefix: str | None = None,
                   parts: Collection[str] = ALL_PARTS, tracer_provider: Any = None, clock: Clock = SYSTEM_CLOCK) -> Gateway:
    """The Gateway without HTTP. ``kv``/``db`` default to ``gateway.kv_url``/``config.db_url('gateway')``."""
    if unknown := set(parts) - set(ALL_PARTS):
        raise ValueError(f"unknown Gateway parts {sorted(unknown)}; the parts are {ALL_PARTS}")
    if "auth" not in parts and {"worlds", "events"} & set(parts):
        raise ValueError("the Gateway's worlds and events parts authenticate callers: build 'auth' with them")
    g = config.gateway
    tracer_provider = tracer_provider if tracer_provider is not None else make_tracer_provider(config.tracing, "gateway")
    registry = CollectorRegistry(auto_describe=True)
    kv = kv if kv is not None else make_kv(g.kv_url)
    kv_prefix = kv_prefix if kv_prefix is not None else g.kv_prefix
    db = db if db is not None else Database(config.db_url("gateway"))
    worldservice, dagmanager = _backends(config, registry, tracer_provider, clock)
    auth = Authenticator(g.auth, clock=clock.time) if "auth" in parts else None
    worlds = None
    if "worlds" in parts:
        assert auth is not None
        worlds = WorldsProxy(g, worldservice, registry=registry, authenticator=auth, monotonic=clock.monotonic, wall=clock.time)
    events = None
    if "events" in parts:
        assert auth is not None
        events = EventsComponent(config, bus=bus, db=db, registry=registry, auth=auth, worldservice=worldservice,
                                 dagmanager=dagmanager, tracer_provider=tracer_provider, wall=clock.time)
        if worlds is not None:  # cached decide/activation entries follow the bus (PolicyUpdated, ActivationUpdated)
            events.on_world_change(worlds.world_changed)
    ingest_metrics = IngestMetrics.create(registry) if "ingest" in parts else None
    fallback = FallbackQueue(max(1, int(g.fallback_queue_size)), on_change=ingest_metrics.fallback_size.set) if ingest_metrics else None
    status = None
    if "status" in parts:
        status = StatusMonitor(kv=kv, db=db, bus=bus, worldservice=worldservice, dagmanager=dagmanager, events=events,
                               fallback=fallback, ttl=g.status_cache_ttl, clock=clock.monotonic)
    ingest = None
    if ingest_metrics is not None and fallback is not None:
        ingest = IngestService(g, db=db, kv=kv, kv_prefix=kv_prefix, dagmanager=dagmanager, metrics=ingest_metrics,
                               fallback=fallback, queues=QueueLookup(dagmanager, feed=events.queue_feed if events else None),
                               degradation=status.level if status else None, relay=events)
    return Gateway(config, registry=registry, bus=bus, kv=kv, kv_prefix=kv_prefix, db=db, worldservice=worldservice,
                   dagmanager=dagmanager, tracer_provider=tracer_provider, auth=auth, worlds=worlds, events=events,
                   ingest=ingest, status=status)


def create_app(config: Config, *, bus: ControlBus, kv: Any = None, db: Database | None = None, kv_prefix: str | None = None,
               parts: Collection[str] = ALL_PARTS, service: Gateway | None = None, tracer_provider: Any = None,
               clock: Clock = SYSTEM_CLOCK) -> Any:
    """The Gateway's ASGI app; ``app.service`` is the :class:`Gateway`. The lifespan starts the bus
    (idempotent) and the parts, then stops them and closes the backends, KV store and database."""
    gw = service or create_service(config, bus=bus, kv=kv, db=db, kv_prefix=kv_prefix, parts=parts,
                                   tracer_provider=tracer_provider, clock=clock)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        await gw.bus.start()  # idempotent: services sharing one in-process bus all call it
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    ws_routes = list(gw.events.ws_routes()) if gw.has("events") else []
    verifiers, anonymous = spec_security(gw)
    app = build_app("gateway", gw, lifespan=lifespan, validate_responses=config.gateway.validate_responses, ws_routes=ws_routes,
                    access_log=config.access_log, tracer_provider=gw.tracer_provider, security=verifiers, anonymous=anonymous,
                    limits=config.gateway.limits)
    if gw.has("worlds"):  # cache hits of GET /worlds/{id}/decide skip the contract stack (see DecideFastPath)
        app.http_app = DecideFastPath(app.http_app, gw.worlds)
    if gw.has("ingest") and gw.has("auth"):  # valid POST /strategies skip the contract stack (see SubmitFastPath)
        app.http_app = SubmitFastPath(app.http_app, gw.auth, gw.ingest)
    # rate limits per caller, in front of everything that answers an operation (fast paths too)
    from qmtl.gateway.ratelimit import RateLimiter

    limiter = RateLimiter(app.http_app, config.gateway, app.spec.bundled, registry=gw.registry, kv=gw.kv, kv_prefix=gw.kv_prefix,
                          auth=gw.auth if gw.has("auth") else None)  # its metrics exist either way
    if limiter.enabled:
        app.http_app = limiter
    from qmtl.contracts.server import register_guard

    register_guard(gw.registry, app.guard)  # the HTTP server's refusals (qmtl.contracts.server)
    app.service = gw  # type: ignore[attr-defined]
    return app


def _backends(config: Config, registry: CollectorRegistry, tracer_provider: Any, clock: Clock) -> tuple[Backend, Backend]:
    """WorldService and the DAG Manager, each on its budget and circuit breaker."""
    g = config.gateway
    metrics = BackendMetrics.create(registry)
    headers = {"X-QMTL-Service-Token": g.service_token} if g.service_token else {}
    worldservice = Backend(
        "worldservice", g.worldservice_url, timeout=g.worldservice_budget.timeout, retries=g.worldservice_budget.retries,
        failure_threshold=g.breaker.failure_threshold, reset_timeout=g.breaker.reset_timeout, metrics=metrics,
        default_headers=headers, operations=_operations("worldservice") if g.breaker.per_operation else None,
        monotonic=clock.monotonic,
    )
    dagmanager = Backend(
        "dagmanager", g.dagmanager_url, timeout=g.dagmanager_budget.timeout, retries=g.dagmanager_budget.retries,
        failure_threshold=g.breaker.failure_threshold, reset_timeout=g.breaker.reset_timeout, metrics=metrics,
        default_headers=headers,  # the DAG Manager authenticates every write by the same service token
        monotonic=clock.monotonic,
    )
    worldservice.instrument(tracer_provider)
    dagmanager.instrument(tracer_provider)
    return worldservice, dagmanager


def _operations(service: str) -> Any:
    """A backend's operations (method + route) from its spec, for per-operation breakers."""
    from qmtl.contracts.limits import OperationTable
    from qmtl.contracts.loader import load_openapi

    return OperationTable(load_openapi(service).bundled)


__all__ = ["create_app", "create_service"]
