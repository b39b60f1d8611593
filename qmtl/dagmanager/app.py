"""The DAG Manager: ``create_service`` builds every part, ``create_app`` serves it.

Routes come from ``specs/dagmanager.yaml``; handlers (``handlers/dagmanager/``) call the
:class:`~qmtl.dagmanager.service.DagManagerService` passed to them as ``ctx``. The
lifespan creates the tables, starts the topic admin, the Gateway callback sender, the
tag-index notifier and the periodic GC, and stops all of them on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from qmtl.bus.base import ControlBus
from qmtl.common.clock import SYSTEM_CLOCK, Clock
from qmtl.common.config import Config
from qmtl.common.tracing import make_tracer_provider
from qmtl.contracts.app import Dispatcher, build_app
from qmtl.contracts.events import event_validators
from qmtl.contracts.security import api_key_header, service_token_verifier
from qmtl.contracts.server import register_guard
from qmtl.store.outbox import Outbox, OutboxMetrics
from qmtl.store.sql import Database

from . import store
from .analyze import GrowthAnalyzer
from .callbacks import GatewayCallback
from .diff import Differ
from .gc import GarbageCollector
from .metrics import DagManagerMetrics
from .queues import QueueCatalogue
from .sentinels import Sentinels
from .service import DagManagerService
from .strategies import StrategyReferences
from .tagindex import QueueNotifier, schema_allows_match_mode
from .topics import QueueTopics, TopicAdmin, make_topic_admin
from .transactions import Transactions

log = logging.getLogger(__name__)


def create_service(
    config: Config,
    *,
    bus: ControlBus,
    db: Database | None = None,
    topic_admin: TopicAdmin | None = None,
    callback_timeout: float = 2.0,
    tracer_provider: Any = None,
    clock: Clock = SYSTEM_CLOCK,
) -> DagManagerService:
    """The service without HTTP (benchmarks, embedding), every part built here. Without
    ``db`` the service opens its own (``service.owns_db``); ``tracer_provider`` traces
    the Gateway callbacks."""
    dm = config.dagmanager
    owns_db = db is None
    db = db or Database(config.db_url("dagmanager"), schema=dm.database_schema or None)
    store.tune_sqlite(db)
    metrics = DagManagerMetrics(sentinel_label_cap=dm.metric_label_cap)
    sql = store.SqlHelpers(db)
    txn = Transactions(db)
    callback = GatewayCallback(dm.gateway_callback_url, metrics=metrics, timeout=callback_timeout,
                               service_token=dm.service_token, tracer_provider=tracer_provider)
    outbox = Outbox(db, bus, store.outbox, validate=event_validators().validate, poll_interval=dm.outbox_poll_seconds,
                    name="dagmanager-outbox", metrics=OutboxMetrics(
                        published=lambda _topic: metrics.queue_updated.inc(), failed=metrics.queue_updated_failed.inc,
                        dropped=metrics.queue_updated_failed.inc, pending=metrics.outbox_pending,
                        oldest_age=metrics.outbox_oldest_age))
    notifier = QueueNotifier(db, bus, callback=callback, metrics=metrics, clock=clock.time,
                             include_match_mode=schema_allows_match_mode(), write=txn.write, outbox=outbox)
    topics = QueueTopics(topic_admin or make_topic_admin(config), partitions=config.controlbus.num_partitions,
                         ttl_seconds=dm.queue_ttl_seconds, metrics=metrics)
    analyzer = GrowthAnalyzer(db)
    strategies = StrategyReferences(txn, sql, metrics=metrics, clock=clock.time)
    return DagManagerService(
        db=db, owns_db=owns_db, bus=bus, metrics=metrics, topics=topics, callback=callback, outbox=outbox,
        notifier=notifier, analyzer=analyzer, strategies=strategies,
        diffs=Differ(txn, sql, strategies=strategies, topics=topics, notifier=notifier, analyzer=analyzer, metrics=metrics,
                     queue_ttl_seconds=dm.queue_ttl_seconds, clock=clock.time, monotonic=clock.monotonic),
        queues=QueueCatalogue(db, txn, sql, notifier=notifier, metrics=metrics, clock=clock.time),
        sentinels=Sentinels(db, txn, callback=callback, metrics=metrics, clock=clock.time),
        gc=GarbageCollector(db, txn, sql, topics=topics, notifier=notifier, metrics=metrics, clock=clock.time,
                            instance_id=uuid.uuid4().hex[:12]),
    )


def create_app(
    config: Config,
    *,
    bus: ControlBus,
    db: Database | None = None,
    topic_admin: TopicAdmin | None = None,
    service: DagManagerService | None = None,
    gc_interval: float | None = None,
    tracer_provider: Any = None,
) -> Dispatcher:
    """The DAG Manager app over ``service`` (built by :func:`create_service` from
    ``db``/``topic_admin`` when not given; a caller that builds it passes the same
    ``tracer_provider`` to both). ``gc_interval`` overrides
    ``dagmanager.gc_interval_seconds`` (0 or less: no periodic GC)."""
    if tracer_provider is None:
        tracer_provider = make_tracer_provider(config.tracing, "dagmanager")
    if service is None:
        service = create_service(config, bus=bus, db=db, topic_admin=topic_admin, tracer_provider=tracer_provider)
    dm_service = service
    interval = config.dagmanager.gc_interval_seconds if gc_interval is None else gc_interval

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        await bus.start()  # idempotent: services sharing one in-process bus all call it
        await dm_service.start()
        gc_task = asyncio.create_task(dm_service.gc.loop(interval), name="dagmanager-gc") if interval and interval > 0 else None
        log.info("DAG Manager ready: topic admin %s, GC every %ss, callback %s", dm_service.topics.admin.mode,
                 interval if gc_task else "never", dm_service.callback.url or "off")
        try:
            yield
        finally:
            if gc_task is not None:
                gc_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await gc_task
            await dm_service.stop()
            if dm_service.owns_db:
                await dm_service.db.close()
            if tracer_provider is not None:
                tracer_provider.shutdown()

    if not config.dagmanager.service_token:
        log.warning("DAG Manager writes are UNAUTHENTICATED: dagmanager.service_token is empty (development only; "
                    "set it to the control plane's service token)")
    verifiers = {"serviceToken": service_token_verifier(
        config.dagmanager.service_token, header=api_key_header("dagmanager", "serviceToken"), open_when_unset=True)}
    app = build_app("dagmanager", dm_service, lifespan=lifespan, validate_responses=config.dagmanager.validate_responses,
                    access_log=config.access_log, tracer_provider=tracer_provider, security=verifiers, limits=config.dagmanager.limits)
    register_guard(dm_service.metrics.registry, app.guard)  # the HTTP server's refusals (qmtl.contracts.server)
    return app


__all__ = ["create_app", "create_service"]
