"""The WorldService ASGI app: the spec (specs/worldservice.yaml) + handlers/worldservice + a WorldService."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from qmtl.bus.base import ControlBus
from qmtl.common.config import Config, ConfigError
from qmtl.common.tracing import make_tracer_provider
from qmtl.contracts.app import build_app
from qmtl.store.sql import Database
from qmtl.worldservice.service import WorldService

logger = logging.getLogger(__name__)


def create_service(config: Config, *, bus: ControlBus, db: Database | None = None) -> WorldService:
    """The service object (no HTTP). ``db`` defaults to ``config.db_url('worldservice')``."""
    ws = config.worldservice
    if ws.rbac == "enforce" and not ws.service_token:
        raise ConfigError("worldservice.rbac is 'enforce' but worldservice.service_token is empty: no caller could ever be trusted")
    db = db or Database(config.db_url("worldservice"), schema=ws.database_schema or None)
    return WorldService(config, db=db, bus=bus)


def create_app(config: Config, *, bus: ControlBus, db: Database | None = None, service: WorldService | None = None,
               tracer_provider: Any = None) -> Any:
    """The ASGI app. Its lifespan starts the bus (idempotent) and the service (tables,
    recovery, outbox), then stops the service and closes the database when it opened it. ``app.service`` is the WorldService
    (tests set ``app.service.apply_hook`` or read ``app.service.metrics``)."""
    owns_db = db is None and service is None
    service = service or create_service(config, bus=bus, db=db)
    if tracer_provider is None:
        tracer_provider = make_tracer_provider(config.tracing, "worldservice")

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        await service.bus.start()  # idempotent: services sharing one bus all call it; its owner closes it
        await service.start()
        try:
            yield
        finally:
            await service.stop()
            if owns_db:
                await service.db.close()
            if tracer_provider is not None:
                tracer_provider.shutdown()

    app = build_app(
        "worldservice",
        service,
        lifespan=lifespan,
        validate_responses=config.worldservice.validate_responses,
        access_log=config.access_log,
        tracer_provider=tracer_provider,
        limits=config.worldservice.limits,
    )
    from qmtl.contracts.server import register_guard

    register_guard(service.metrics.registry, app.guard)  # the HTTP server's refusals (qmtl.contracts.server)
    app.service = service  # type: ignore[attr-defined]
    return app
