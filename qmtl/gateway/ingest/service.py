"""Strategy ingest: accept, persist, queue, diff — and never lose an accepted submission.

:class:`IngestService` composes one object per concept, each given its collaborators:

* :class:`~.submit.Admission` – ``POST /strategies``: checks, admission, persist before ack, enqueue
* :class:`~.worker.Workers` – the workers driving the FSM, with the diffs of :class:`~.diff.DiffClient`
* :class:`~.recovery.Recovery` – startup reconciliation and the reconcile loop (rebuild, janitor, sweep)
* :class:`~.outage.DagManagerLink` – the DAG Manager's availability, the fallback queue's flush
* :class:`~.fsm.Fsm` – FSM steps (mirror, Redis, relay) and ``GET /strategies/{id}/status``

over the stores (:class:`~.store.IngestStore`, :class:`~.redisq.RedisIngest`) and what this process
holds (:mod:`.state`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from qmtl.gateway.backends import Backend
from qmtl.gateway.ingest.diff import DiffClient
from qmtl.gateway.ingest.fallback import FallbackQueue
from qmtl.gateway.ingest.fsm import Fsm, Relay
from qmtl.gateway.ingest.metrics import IngestMetrics
from qmtl.gateway.ingest.outage import DagManagerLink
from qmtl.gateway.ingest.queues import QueueLookup
from qmtl.gateway.ingest.recovery import Recovery
from qmtl.gateway.ingest.redisq import RedisIngest
from qmtl.gateway.ingest.state import IngestTuning, ProcessState, RateMeter
from qmtl.gateway.ingest.store import IngestStore
from qmtl.gateway.ingest.submit import Admission
from qmtl.gateway.ingest.worker import Workers
from qmtl.store import Database

if TYPE_CHECKING:
    from qmtl.common.config import GatewayConfig


class IngestService:
    """``metrics`` and ``fallback`` come from the Gateway's factory (the status part reads the
    fallback queue's size too); ``degradation`` is the status part's level and ``relay`` the
    events part, each None in a build without that part."""

    def __init__(self, settings: GatewayConfig, *, db: Database, kv: Any, kv_prefix: str, dagmanager: Backend,
                 metrics: IngestMetrics, fallback: FallbackQueue, queues: QueueLookup,
                 degradation: Callable[[], str] | None = None, relay: Relay | None = None) -> None:
        self.worker_count = max(0, int(settings.workers))
        self.dagmanager = dagmanager
        self.metrics = metrics
        self.fallback = fallback
        self.queues = queues
        self.store = IngestStore(db)
        self.redis = RedisIngest(kv, kv_prefix)
        self.tuning = IngestTuning(diff_budget_ms_per_node=float(settings.diff_budget_ms_per_node),
                                   diff_budget_ms_per_diff=float(settings.diff_budget_ms_per_diff))
        self.local = local = ProcessState()
        rate = RateMeter()
        self.link = DagManagerLink(dagmanager, redis=self.redis, fallback=fallback, local=local, tuning=self.tuning)
        self.fsm = Fsm(store=self.store, redis=self.redis, metrics=metrics, fallback=fallback, local=local, relay=relay)
        self.admission = Admission(insert_sentinel=bool(settings.insert_sentinel), store=self.store, redis=self.redis,
                                   metrics=metrics, fsm=self.fsm, queues=queues, dagmanager=dagmanager, link=self.link,
                                   fallback=fallback, local=local, rate=rate, degradation=degradation)
        self.workers = Workers(store=self.store, redis=self.redis, metrics=metrics, fsm=self.fsm,
                               diffs=DiffClient(dagmanager, metrics=metrics, tuning=self.tuning), link=self.link,
                               dagmanager=dagmanager, queues=queues, local=local, tuning=self.tuning, rate=rate)
        self.recovery = Recovery(store=self.store, redis=self.redis, metrics=metrics, fallback=fallback, link=self.link,
                                 local=local, tuning=self.tuning)
        self._tasks: list[asyncio.Task] = []

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self.local.stopping = False
        await self.store.start()
        await self.recovery.at_startup()
        self._tasks = [asyncio.create_task(self.workers.run(i), name=f"ingest-worker-{i}") for i in range(self.worker_count)]
        self._tasks.append(asyncio.create_task(self.recovery.loop(), name="ingest-reconcile"))

    async def stop(self) -> None:
        self.local.stopping = True
        tasks = list(self._tasks)
        if self.link.probe_task is not None:
            tasks.append(self.link.probe_task)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        self.link.probe_task = None
        await self.store.stop()

    # -- the routes and views -------------------------------------------------------------------
    async def submit(self, body: Mapping[str, Any], *, subject: str | None = None) -> tuple[dict, dict]:
        """``POST /strategies`` (see :mod:`.submit`)."""
        return await self.admission.submit(body, subject=subject)

    async def status(self, sid: str) -> dict:
        """``GET /strategies/{id}/status`` (see :mod:`.fsm`)."""
        return await self.fsm.status(sid)

    @property
    def dagmanager_up(self) -> bool:
        return self.link.up.is_set()

    @property
    def rebuilds(self) -> int:
        return self.recovery.rebuilds
