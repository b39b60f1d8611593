"""The WorldService ASGI app: the spec (specs/worldservice.yaml) + handlers/worldservice + a WorldService."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from qmtl.bus.base import ControlBus
from qmtl.common.clock import SYSTEM_CLOCK, Clock
from qmtl.common.config import Config, ConfigError
from qmtl.common.tracing import make_tracer_provider
from qmtl.contracts.app import build_app
from qmtl.store.sql import Database
from qmtl.worldservice.activation import Activation
from qmtl.worldservice.apply import Applies, ApplyHook
from qmtl.worldservice.audit import AuditLog
from qmtl.worldservice.decision_cache import DecisionCache
from qmtl.worldservice.decisions import Decisions
from qmtl.worldservice.metrics import WorldServiceMetrics
from qmtl.worldservice.outbox import Outbox
from qmtl.worldservice.plans import Plans
from qmtl.worldservice.policies import Policies
from qmtl.worldservice.policy import PolicyParser
from qmtl.worldservice.rbac import Authenticator
from qmtl.worldservice.repository import Repository
from qmtl.worldservice.service import WorldService
from qmtl.worldservice.worlds import Worlds

logger = logging.getLogger(__name__)


def create_service(config: Config, *, bus: ControlBus, db: Database | None = None,
                   metrics: WorldServiceMetrics | None = None, apply_hook: ApplyHook | None = None,
                   clock: Clock = SYSTEM_CLOCK) -> WorldService:
    """The service object (no HTTP), every part built here. ``db`` defaults to
    ``config.db_url('worldservice')``; ``apply_hook`` is called between apply phases
    (tests, fault injection); ``clock`` is the service's time (apply leases always compare
    real wall-clock times, see :mod:`.apply`)."""
    cfg = config.worldservice
    if cfg.rbac == "enforce" and not cfg.service_token:
        raise ConfigError("worldservice.rbac is 'enforce' but worldservice.service_token is empty: no caller could ever be trusted")
    db = db or Database(config.db_url("worldservice"), schema=cfg.database_schema or None)
    metrics = metrics or WorldServiceMetrics()
    outbox = Outbox(db, bus, metrics, poll_interval=float(cfg.outbox_poll_seconds))
    decision_cache = DecisionCache(shared_database=not db.is_sqlite)
    repo = Repository(db, outbox, clock=lambda: datetime.fromtimestamp(clock.time(), UTC), on_write=decision_cache.invalidate)
    audit = AuditLog(repo)
    policies = Policies(repo, audit, PolicyParser(), metrics)
    return WorldService(
        cfg,
        db=db,
        bus=bus,
        metrics=metrics,
        auth=Authenticator(mode=cfg.rbac, service_token=cfg.service_token, dev_subject=cfg.dev_subject),
        outbox=outbox,
        worlds=Worlds(repo, audit),
        policies=policies,
        decisions=Decisions(repo, audit, policies, metrics, ttl=cfg.decision_ttl, cache=decision_cache),
        activation=Activation(repo, audit),
        plans=Plans(repo, audit, policies),
        applies=Applies(repo, audit, metrics, drain_seconds=float(cfg.apply_drain_seconds),
                        lease_seconds=float(cfg.apply_lease_seconds), hook=apply_hook),
        audit=audit,
    )


def create_app(config: Config, *, bus: ControlBus, db: Database | None = None, service: WorldService | None = None,
               tracer_provider: Any = None) -> Any:
    """The ASGI app. Its lifespan starts the bus (idempotent) and the service (tables,
    recovery, outbox), then stops the service and closes the database when it opened it. ``app.service`` is the WorldService
    (tests set ``app.service.applies.hook`` or read ``app.service.metrics``)."""
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
