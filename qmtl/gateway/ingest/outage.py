"""The DAG Manager's availability as the ingest sees it: while it does not take diffs, ids
wait in the local fallback queue; a probe (with backoff) notices when it answers its health
check again and its circuit breaker admits calls, and the fallback queue is flushed to the
Redis FIFO."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from qmtl.common.tasks import detach
from qmtl.gateway.backends import Backend, BackendUnavailable
from qmtl.gateway.ingest.fallback import FallbackQueue
from qmtl.gateway.ingest.redisq import RedisIngest
from qmtl.gateway.ingest.state import TRANSIENT, IngestTuning, ProcessState

log = logging.getLogger(__name__)


class DagManagerLink:
    def __init__(self, backend: Backend, *, redis: RedisIngest, fallback: FallbackQueue, local: ProcessState,
                 tuning: IngestTuning) -> None:
        self.backend = backend
        self.redis = redis
        self.fallback = fallback
        self.local = local
        self.tuning = tuning
        self.up = asyncio.Event()  # cleared while the DAG Manager does not take diffs
        self.up.set()
        self.probe_task: asyncio.Task | None = None

    def retry_after(self) -> int:
        """``Retry-After`` seconds for a refused submission."""
        ra = self.backend.breaker.retry_after() if not self.up.is_set() else 0
        return max(1, round(ra) or self.tuning.retry_after)

    def park(self, sid: str) -> None:
        if not self.fallback.put(sid):
            # full: back on the Redis FIFO (workers wait while the DAG Manager is down)
            detach(self._push_back(sid))

    async def _push_back(self, sid: str) -> None:
        try:
            await self.redis.push_front(sid)
            self.local.wakeup.set()
        except TRANSIENT as exc:
            log.warning("ingest: could not re-queue %s (%r); the sweep re-enqueues it", sid, exc)

    def down(self, exc: BackendUnavailable) -> None:
        if self.up.is_set():
            log.warning("ingest: DAG Manager unavailable (%s); accepted strategies wait in the fallback queue", exc.reason)
            self.up.clear()
        if self.probe_task is None or self.probe_task.done():
            self.probe_task = asyncio.create_task(self._probe(), name="ingest-dm-probe")

    async def _probe(self) -> None:
        delay, cap = self.tuning.probe_backoff
        while not self.local.stopping:
            await asyncio.sleep(delay)
            breaker = self.backend.breaker
            if breaker.state != "open" and await self.backend.probe():
                break
            delay = min(delay * 2, cap)
        log.warning("ingest: DAG Manager answers again; flushing %d strategies from the fallback queue", len(self.fallback))
        self.up.set()
        with contextlib.suppress(*TRANSIENT):
            await self.flush_fallback()

    async def flush_fallback(self) -> None:
        while len(self.fallback) and self.up.is_set():
            batch = self.fallback.peek(500)
            await self.redis.push(*batch)
            self.fallback.remove(batch)
            self.local.wakeup.set()
