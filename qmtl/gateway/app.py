"""The Gateway's app factory: one context object holding every component, no globals.

Components (each a module of ``qmtl.gateway`` with a ``build(ctx)`` function returning an
object with ``async start()`` and ``async stop()``, built in this order, started in this
order and stopped in reverse):

* ``auth``     – verifies callers' bearer JWTs (``qmtl.gateway.auth``)
* ``worlds``   – the worlds proxy with caches, live guard, identity propagation (``qmtl.gateway.worlds``)
* ``events``   – descriptor tokens, ControlBus consumer, state, WebSocket fan-out (``qmtl.gateway.events``)
* ``ingest``   – strategy ingest FSM, FIFO worker, fallback queue (``qmtl.gateway.ingest``)
* ``status``   – degradation level and dependency health (``qmtl.gateway.status``)

Handlers reach them as ``ctx.<name>``. Backends (``ctx.worldservice``, ``ctx.dagmanager``)
carry each backend's budget and circuit breaker.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry

from qmtl.bus.base import ControlBus
from qmtl.common import tracing
from qmtl.common.config import Config
from qmtl.common.tracing import make_tracer_provider
from qmtl.contracts.app import build_app
from qmtl.gateway.backends import Backend, BackendMetrics
from qmtl.store import Database, make_kv

log = logging.getLogger(__name__)

COMPONENTS = ("auth", "worlds", "events", "ingest", "status")


class GatewayContext:
    def __init__(self, config: Config, *, bus: ControlBus, kv: Any = None, db: Database | None = None,
                 kv_prefix: str | None = None, components: Sequence[str] | None = None, tracer_provider: Any = None) -> None:
        self.config = config
        self.bus = bus
        self.tracer_provider = tracer_provider if tracer_provider is not None else make_tracer_provider(config.tracing, "gateway")
        self.registry = CollectorRegistry(auto_describe=True)
        self.kv = kv if kv is not None else make_kv(config.gateway.kv_url)
        self.kv_prefix = kv_prefix if kv_prefix is not None else config.gateway.kv_prefix
        self.db = db if db is not None else Database(config.db_url("gateway"))
        g = config.gateway
        backend_metrics = BackendMetrics.create(self.registry)
        headers = {"X-QMTL-Service-Token": g.service_token} if g.service_token else {}
        self.worldservice = Backend(
            "worldservice", g.worldservice_url, timeout=g.worldservice_budget.timeout, retries=g.worldservice_budget.retries,
            failure_threshold=g.breaker.failure_threshold, reset_timeout=g.breaker.reset_timeout, metrics=backend_metrics,
            default_headers=headers, operations=_operations("worldservice") if g.breaker.per_operation else None,
        )
        self.dagmanager = Backend(
            "dagmanager", g.dagmanager_url, timeout=g.dagmanager_budget.timeout, retries=g.dagmanager_budget.retries,
            failure_threshold=g.breaker.failure_threshold, reset_timeout=g.breaker.reset_timeout, metrics=backend_metrics,
            default_headers=headers,  # the DAG Manager authenticates every write by the same service token
        )
        tracing.instrument_httpx(self.worldservice.client, self.tracer_provider)
        tracing.instrument_httpx(self.dagmanager.client, self.tracer_provider)
        self.components: dict[str, Any] = {}
        for name in COMPONENTS:
            if components is not None and name not in components:
                continue  # left out on purpose (focused tests, benchmarks): its routes answer 501
            module = _component_module(name)
            if module is None:
                continue
            component = module.build(self)
            self.components[name] = component
            setattr(self, name, component)
        worlds, events = self.components.get("worlds"), self.components.get("events")
        if worlds is not None and events is not None:
            # Caches follow the bus: every PolicyUpdated / ActivationUpdated this replica
            # consumes drops the world's cached decide and activation entries.
            events.on_world_change(worlds.world_changed)
        if events is not None and "ingest" in self.components:
            # /queues/watch follows the event relay (SPEC §5), through an explicit interface
            self.components["ingest"].queues.feed = events.queue_feed

    def __getattr__(self, name: str) -> Any:
        if name in COMPONENTS:
            from qmtl.common.errors import ServiceError

            err = ServiceError(f"the Gateway's {name} component is not part of this build", title="Not Implemented")
            err.status = 501
            raise err
        raise AttributeError(name)

    async def start(self) -> None:
        for name, component in self.components.items():
            await component.start()
            log.debug("gateway component %s started", name)

    async def stop(self) -> None:
        for name, component in reversed(list(self.components.items())):
            try:
                await component.stop()
            except Exception:  # keep stopping the others
                log.exception("stopping gateway component %s failed", name)
        await self.worldservice.close()
        await self.dagmanager.close()
        with contextlib.suppress(Exception):
            await self.kv.aclose()
        await self.db.close()
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()  # flushes the spans still batched


def _operations(service: str) -> Any:
    """A backend's operations (method + route) from its spec, for per-operation breakers."""
    from qmtl.contracts.limits import OperationTable
    from qmtl.contracts.loader import load_openapi

    return OperationTable(load_openapi(service).bundled)


def _component_module(name: str) -> Any:
    try:
        return importlib.import_module(f"qmtl.gateway.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"qmtl.gateway.{name}":
            raise
        log.warning("gateway component %s is not built; its routes answer 501", name)
        return None


def create_app(config: Config, *, bus: ControlBus, kv: Any = None, db: Database | None = None, kv_prefix: str | None = None,
               components: Sequence[str] | None = None, tracer_provider: Any = None) -> Any:
    """The Gateway's ASGI app. ``components`` (default: all of :data:`COMPONENTS`) selects which
    components to build — for focused tests and benchmarks; production builds them all."""
    ctx = GatewayContext(config, bus=bus, kv=kv, db=db, kv_prefix=kv_prefix, components=components, tracer_provider=tracer_provider)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any):
        await bus.start()  # idempotent: services sharing one in-process bus all call it
        await ctx.start()
        try:
            yield
        finally:
            await ctx.stop()

    ws_routes = []
    events = ctx.components.get("events")
    if events is not None:
        ws_routes = list(events.ws_routes())
    from qmtl.gateway.auth import spec_security

    verifiers, anonymous = spec_security(ctx)
    app = build_app("gateway", ctx, lifespan=lifespan, validate_responses=config.gateway.validate_responses, ws_routes=ws_routes,
                    access_log=config.access_log, tracer_provider=ctx.tracer_provider, security=verifiers, anonymous=anonymous, limits=config.gateway.limits)
    worlds = ctx.components.get("worlds")
    if worlds is not None:  # cache hits of GET /worlds/{id}/decide skip the contract stack (see DecideFastPath)
        from qmtl.gateway.worlds import DecideFastPath

        app.http_app = DecideFastPath(app.http_app, worlds)
    if ctx.components.get("ingest") is not None:  # valid POST /strategies skip the contract stack (see SubmitFastPath)
        from qmtl.gateway.ingest.fastpath import SubmitFastPath

        app.http_app = SubmitFastPath(app.http_app, ctx)
    # rate limits per caller, in front of everything that answers an operation (fast paths too)
    from qmtl.gateway.ratelimit import RateLimiter

    limiter = RateLimiter(app.http_app, ctx, app.spec.bundled)  # its metrics exist either way
    if limiter.enabled:
        app.http_app = limiter
    from qmtl.contracts.server import register_guard

    register_guard(ctx.registry, app.guard)  # the HTTP server's refusals (qmtl.contracts.server)
    app.ctx = ctx  # type: ignore[attr-defined]
    return app
