"""Recovery: nothing accepted is lost, whatever fails. At startup, then by a loop every
``reconcile_interval`` seconds:

* Redis lost its data (the ``epoch`` key is gone) → every strategy the mirror says is not
  finished is re-enqueued and its FSM state restored; finished ones are restored lazily
  (``status`` reads the mirror when Redis has nothing, :mod:`.fsm`).
* ids left in the processing list by a dead worker (no lock, seen twice) → back on the FIFO
  (the janitor, every ``janitor_interval`` seconds).
* every ``sweep_interval`` seconds, and at startup: any unfinished strategy that is in no
  queue (e.g. a Gateway died with ids in its local fallback queue) → re-enqueued.
* the fallback queue is flushed to the FIFO while the DAG Manager takes diffs (:mod:`.outage`).
"""

from __future__ import annotations

import asyncio
import logging
import time

from qmtl.gateway.ingest.fallback import FallbackQueue
from qmtl.gateway.ingest.metrics import IngestMetrics
from qmtl.gateway.ingest.outage import DagManagerLink
from qmtl.gateway.ingest.redisq import RedisIngest
from qmtl.gateway.ingest.state import TRANSIENT, IngestTuning, ProcessState
from qmtl.gateway.ingest.store import IngestStore

log = logging.getLogger(__name__)


class Recovery:
    def __init__(self, *, store: IngestStore, redis: RedisIngest, metrics: IngestMetrics, fallback: FallbackQueue,
                 link: DagManagerLink, local: ProcessState, tuning: IngestTuning) -> None:
        self.store = store
        self.redis = redis
        self.metrics = metrics
        self.fallback = fallback
        self.link = link
        self.local = local
        self.tuning = tuning
        self._suspects: set[str] = set()
        self.rebuilds = 0

    async def at_startup(self) -> None:
        try:
            if await self.redis.epoch() is None:
                # normal on a fresh Redis (first start, or a new embedded run): not a warning
                await self._rebuild("no epoch marker in Redis at startup", level=logging.INFO)
            else:
                await self._sweep("startup")
        except TRANSIENT as exc:
            log.warning("ingest: startup reconciliation deferred (%r); the reconcile loop retries", exc)

    async def loop(self) -> None:
        last_janitor = last_sweep = time.monotonic()
        while not self.local.stopping:
            await asyncio.sleep(self.tuning.reconcile_interval)
            try:
                if await self.redis.epoch() is None:
                    await self._rebuild("Redis lost the ingest state (epoch marker gone)")
                    last_sweep = time.monotonic()
                if len(self.fallback) and self.link.up.is_set():
                    await self.link.flush_fallback()
                now = time.monotonic()
                if now - last_janitor >= self.tuning.janitor_interval:
                    last_janitor = now
                    await self._janitor()
                if now - last_sweep >= self.tuning.sweep_interval:
                    last_sweep = now
                    await self._sweep("periodic")
                fifo, _ = await self.redis.depth()
                self.metrics.fifo_depth.set(fifo)
            except TRANSIENT as exc:
                log.debug("ingest: reconciliation deferred (%r)", exc)

    async def _rebuild(self, reason: str, *, level: int = logging.WARNING) -> None:
        token = await self.redis.claim_rebuild()
        if token is None:
            return  # another replica is rebuilding
        try:
            log.log(level, "ingest: %s; rebuilding the FSM from the database mirror", reason)
            await self._sweep("rebuild", restore_state=True)
            await self.redis.mark_epoch()
            self.rebuilds += 1
        finally:
            await self.redis.release_rebuild(token)

    async def _sweep(self, reason: str, *, restore_state: bool = False) -> int:
        """Re-enqueue every unfinished strategy (per the mirror) that is in no queue."""
        pending = await self.store.pending()
        if not pending:
            return 0
        present = await self.redis.queued_ids()
        inflight = self.local.inflight
        missing = [sid for sid, _status in pending
                   if sid not in present and sid not in self.fallback and sid not in inflight]
        for sid, status in pending:
            if restore_state and sid not in inflight:
                record = self.local.records.get(sid)
                extra = {"sentinel_id": record.sentinel_id, "world_id": record.world_id, "run_type": record.run_type} if record else {}
                await self.redis.set_state(sid, status, extra, persist=True)
        for i in range(0, len(missing), 500):
            await self.redis.push(*missing[i:i + 500])
            self.local.wakeup.set()
        if missing:
            self.metrics.recoveries.labels(reason).inc(len(missing))
            log.warning("ingest: re-enqueued %d unfinished strategies (%s)", len(missing), reason)
        return len(missing)

    async def _janitor(self) -> None:
        """Ids left on the processing list by a worker that died (no lock, seen twice)."""
        suspects: set[str] = set()
        for sid in await self.redis.processing_ids():
            if sid in self.local.inflight or await self.redis.locked(sid):
                continue
            if sid in self._suspects:
                if await self.redis.requeue_from_processing(sid):
                    self.local.wakeup.set()
                    self.metrics.recoveries.labels("janitor").inc()
                    log.warning("ingest: strategy %s was orphaned on the processing list; re-queued", sid)
            else:
                suspects.add(sid)
        self._suspects = suspects
