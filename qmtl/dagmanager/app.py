"""The DAG Manager's ASGI app: ``create_app(config, bus=..., db=..., topic_admin=...)``.

Routes come from ``specs/dagmanager.yaml``; handlers (``handlers/dagmanager/``) call the
:class:`~qmtl.dagmanager.service.DagManagerService` passed to them as ``ctx``. The
lifespan creates the tables, starts the topic admin, the Gateway callback sender, the
tag-index notifier and the periodic GC, and stops all of them on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from qmtl.bus.base import ControlBus
from qmtl.common.config import Config
from qmtl.common.tracing import make_tracer_provider
from qmtl.contracts.app import build_app
from qmtl.store.sql import Database

from .callbacks import GatewayCallback
from .metrics import DagManagerMetrics
from .service import DagManagerService
from .tagindex import schema_allows_match_mode
from .topics import TopicAdmin, make_topic_admin

log = logging.getLogger(__name__)


def create_service(
    config: Config,
    *,
    bus: ControlBus,
    db: Database | None = None,
    topic_admin: TopicAdmin | None = None,
    clock: Callable[[], float] = time.time,
    callback_timeout: float = 2.0,
) -> DagManagerService:
    """The service without HTTP (benchmarks, embedding). ``service.owns_db`` says whether
    the caller must not close ``db`` itself."""
    dm = config.dagmanager
    owns_db = db is None
    db = db or Database(config.db_url("dagmanager"), schema=dm.database_schema or None)
    metrics = DagManagerMetrics()
    metrics.sentinel_label.cap = dm.metric_label_cap
    service = DagManagerService(
        db,
        bus,
        topic_admin=topic_admin or make_topic_admin(config),
        callback=GatewayCallback(dm.gateway_callback_url, metrics=metrics, timeout=callback_timeout,
                                 service_token=dm.service_token),
        metrics=metrics,
        queue_ttl_seconds=dm.queue_ttl_seconds,
        partitions=config.controlbus.num_partitions,
        clock=clock,
        include_match_mode=schema_allows_match_mode(),
        outbox_poll_seconds=dm.outbox_poll_seconds,
    )
    service.owns_db = owns_db  # type: ignore[attr-defined]
    return service


def create_app(
    config: Config,
    *,
    bus: ControlBus,
    db: Database | None = None,
    topic_admin: TopicAdmin | None = None,
    clock: Callable[[], float] = time.time,
    gc_interval: float | None = None,
    callback_timeout: float = 2.0,
    tracer_provider: Any = None,
) -> Any:
    """The DAG Manager app. ``clock`` (epoch seconds) is injectable for GC tests;
    ``gc_interval`` overrides ``dagmanager.gc_interval_seconds`` (0 or less: no periodic GC)."""
    service = create_service(config, bus=bus, db=db, topic_admin=topic_admin, clock=clock, callback_timeout=callback_timeout)
    interval = config.dagmanager.gc_interval_seconds if gc_interval is None else gc_interval
    if tracer_provider is None:
        tracer_provider = make_tracer_provider(config.tracing, "dagmanager")
    service.callback.tracer_provider = tracer_provider

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any):
        await bus.start()  # idempotent: services sharing one in-process bus all call it
        await service.start()
        gc_task = asyncio.create_task(service.gc_loop(interval), name="dagmanager-gc") if interval and interval > 0 else None
        log.info("DAG Manager ready: topic admin %s, GC every %ss, callback %s", service.topic_admin.mode,
                 interval if gc_task else "never", service.callback.url or "off")
        try:
            yield
        finally:
            if gc_task is not None:
                gc_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await gc_task
            await service.stop()
            if getattr(service, "owns_db", False):
                await service.db.close()
            if tracer_provider is not None:
                tracer_provider.shutdown()

    from qmtl.contracts.security import api_key_header, service_token_verifier

    if not config.dagmanager.service_token:
        log.warning("DAG Manager writes are UNAUTHENTICATED: dagmanager.service_token is empty (development only; "
                    "set it to the control plane's service token)")
    verifiers = {"serviceToken": service_token_verifier(
        config.dagmanager.service_token, header=api_key_header("dagmanager", "serviceToken"), open_when_unset=True)}
    app = build_app("dagmanager", service, lifespan=lifespan, validate_responses=config.dagmanager.validate_responses,
                    access_log=config.access_log, tracer_provider=tracer_provider, security=verifiers, limits=config.dagmanager.limits)
    from qmtl.contracts.server import register_guard

    register_guard(service.metrics.registry, app.guard)  # the HTTP server's refusals (qmtl.contracts.server)
    app.ctx = service  # type: ignore[attr-defined]
    return app


__all__ = ["create_app", "create_service"]
