"""The ingest workers (``gateway.workers`` tasks per process).

A worker pops ids with BLMOVE into a processing list (up to ``batch_size`` at once), takes
``lock:{id}`` (``SET NX PX 60000``), and drives the FSM ``queued → processing → diffed →
completed | failed`` (:mod:`.fsm`); the diff result is relayed as a ``queue_map`` frame
(``diffed`` and ``completed`` share one mirror commit and one Redis round trip). A DAG Manager
that does not answer sends the id back to ``queued`` and into the fallback queue
(:mod:`.outage`). During a burst (more than ``burst_rate`` submissions/s) workers give the acks
priority. Duplicates on the FIFO are harmless: a worker that cannot take the lock, or finds the
strategy finished, drops its copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

from qmtl.common import logs
from qmtl.contracts.constants import StrategyState
from qmtl.gateway.backends import Backend, BackendUnavailable
from qmtl.gateway.ingest.diff import DiffClient
from qmtl.gateway.ingest.fsm import Fsm
from qmtl.gateway.ingest.metrics import IngestMetrics
from qmtl.gateway.ingest.outage import DagManagerLink
from qmtl.gateway.ingest.queues import QueueLookup
from qmtl.gateway.ingest.redisq import TERMINAL, RedisIngest
from qmtl.gateway.ingest.state import TRANSIENT, IngestTuning, ProcessState, RateMeter
from qmtl.gateway.ingest.store import IngestStore, StrategyRecord

log = logging.getLogger(__name__)


class Workers:
    def __init__(self, *, store: IngestStore, redis: RedisIngest, metrics: IngestMetrics, fsm: Fsm, diffs: DiffClient,
                 link: DagManagerLink, dagmanager: Backend, queues: QueueLookup, local: ProcessState, tuning: IngestTuning,
                 rate: RateMeter) -> None:
        self.store = store
        self.redis = redis
        self.metrics = metrics
        self.fsm = fsm
        self.diffs = diffs
        self.link = link
        self.dagmanager = dagmanager
        self.queues = queues
        self.local = local
        self.tuning = tuning
        self.rate = rate

    async def run(self, n: int) -> None:
        """Worker ``n``'s loop, until the service stops."""
        logs.label_task(f"ingest-worker-{n}")
        backoff = 0.05
        while not self.local.stopping:
            await self.link.up.wait()
            self.local.wakeup.clear()  # before the pop: a push after this point sets it again
            started = time.monotonic()
            try:
                sid = await self.redis.pop(self.tuning.pop_timeout)
                sids = [sid, *await self.redis.pop_more(self.tuning.batch_size - 1)] if sid is not None else []
            except TRANSIENT as exc:
                log.debug("ingest worker %d: Redis unavailable (%r)", n, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            if not sids:
                if time.monotonic() - started < self.tuning.pop_timeout / 2:
                    # the store did not block (the in-memory substitute answers BLMOVE at
                    # once): wait for a local push or the pop timeout instead of spinning
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.tuning.pop_timeout):
                            await self.local.wakeup.wait()
                continue
            self.local.inflight.update(sids)
            try:
                with logs.working_on_batch("strategy", sids):
                    await self._process_batch(sids)
            except TRANSIENT as exc:
                log.warning("ingest worker %d: strategies %s interrupted by a store error (%r); they are retried", n, sids, exc)
                await asyncio.sleep(0.5)
            except Exception as exc:  # a bug must not kill the worker, nor loop on the same strategies
                log.exception("ingest worker %d: strategies %s failed unexpectedly", n, sids)
                for sid in sids:
                    await self._fail_unexpectedly(sid, exc)
            finally:
                self.local.inflight.difference_update(sids)

    async def _fail_unexpectedly(self, sid: str, exc: Exception) -> None:
        record = self.local.records.pop(sid, None)
        try:
            record = record or await self.store.record(sid)
            if record is not None:
                await self.fsm.transition(record, StrategyState.FAILED, {"error": f"internal error in the Gateway: {type(exc).__name__}: {exc}"})
        except Exception:  # the original error is logged above; this one too
            log.exception("ingest: could not record the failure of %s", sid)

    async def _process_batch(self, sids: list[str]) -> None:
        """Drive a batch of popped ids as far as they go now. Per batch: one Redis round trip
        for the locks, one mirror commit and one Redis round trip per FSM step of the whole
        batch, the diffs in POST /diff/batch requests (see :meth:`DiffClient.diff_all`), one round
        trip to take the ids off the processing list and one to unlock them."""
        locks = await self.redis.lock_and_status_many(sids)
        held: dict[str, str] = {}
        todo: list[tuple[str, str | None]] = []
        finished: list[str] = []
        for sid, (token, status) in zip(sids, locks):
            if token is None:  # another worker holds it: drop this copy
                finished.append(sid)
            else:
                held[sid] = token
                todo.append((sid, status))
        try:
            done = await self._run_batch(todo)
            finished.extend(done)
        except (asyncio.CancelledError, *TRANSIENT):
            with contextlib.suppress(*TRANSIENT):
                await self.redis.push_front(*[sid for sid, _ in todo])
            finished.extend(sid for sid, _ in todo)  # re-queued; take them off the processing list
            raise
        except Exception:
            finished.extend(sid for sid, _ in todo)  # the worker records them as failed
            raise
        finally:
            with contextlib.suppress(*TRANSIENT):
                await self.redis.done_many(finished)
            with contextlib.suppress(*TRANSIENT):
                await self.redis.unlock_many(held)

    async def _run_batch(self, todo: list[tuple[str, str | None]]) -> list[str]:
        """Returns the ids that are off the processing list's hands (all of them)."""
        records = {sid: self.local.records[sid] for sid, _ in todo if sid in self.local.records}
        unknown = [sid for sid, _ in todo if sid not in records]
        if unknown:
            records.update(await self.store.records(unknown))
        active: list[StrategyRecord] = []
        breaker = self.dagmanager.breaker
        for sid, status in todo:
            record = records.get(sid)
            if record is None:
                self.metrics.lost_requests.inc()
                log.error("ingest: strategy %s is queued but has no database record; dropped (counted in lost_requests_total)", sid)
                continue
            if status is None:
                restored = await self.fsm.restore(sid)
                status = restored["status"] if restored else StrategyState.QUEUED
            if status in TERMINAL:
                self.local.records.pop(sid, None)
                continue
            if not self.link.up.is_set() or breaker.retry_after() > 0:
                # the DAG Manager is not taking calls (breaker open, or its half-open probe is
                # in flight): wait in the fallback queue without changing state
                self.link.park(sid)
                if breaker.state == "open":
                    self.link.down(BackendUnavailable("dagmanager", "circuit breaker open", breaker.retry_after()))
                continue
            active.append(record)
        if active:
            await self._yield_to_ingest()
            await self.fsm.transitions([(r, StrategyState.PROCESSING, None) for r in active])
            outcomes = await self.diffs.diff_all(active)
            await self._finish(active, outcomes)
        return [sid for sid, _ in todo]

    async def _yield_to_ingest(self) -> None:
        deadline = time.monotonic() + self.tuning.ingest_yield_max
        while self.rate.per_second() > self.tuning.burst_rate and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a rate, no event to wait on
            await asyncio.sleep(0.02)

    async def _finish(self, records: list[StrategyRecord], outcomes: list[tuple[str, Any]]) -> None:
        """Every outcome of a batch in one mirror commit and one Redis round trip, then relayed
        per strategy in order: diffed → queue_map → completed; failed; or back to queued (the
        DAG Manager did not answer: the id waits in the fallback queue)."""
        rows: list[tuple[str, str, dict | None]] = []
        states: list[tuple[str, list[tuple[str, Mapping[str, Any] | None]]]] = []
        down: BackendUnavailable | None = None
        extra = self.fsm.extra
        for rec, (kind, value) in zip(records, outcomes):
            sid = rec.strategy_id
            if kind == "ok":
                rows += [(sid, StrategyState.DIFFED, value), (sid, StrategyState.COMPLETED, None)]
                states.append((sid, [(StrategyState.DIFFED, extra(StrategyState.DIFFED, value)), (StrategyState.COMPLETED, None)]))
            elif kind == "refused":
                detail = {"error": value}
                rows.append((sid, StrategyState.FAILED, detail))
                states.append((sid, [(StrategyState.FAILED, extra(StrategyState.FAILED, detail))]))
            else:
                down = value
                detail = {"reason": f"DAG Manager unavailable: {value.reason}"}
                rows.append((sid, StrategyState.QUEUED, detail))
                states.append((sid, [(StrategyState.QUEUED, extra(StrategyState.QUEUED, detail))]))
        await self.store.append_batch(rows)  # the mirror first: never behind what clients saw
        await self.redis.set_states_many(states)
        if any(kind == "ok" and value["new_queues"] for kind, value in outcomes):
            self.queues.queues_changed()
        send = self.fsm.send
        for rec, (kind, value) in zip(records, outcomes):
            sid, world = rec.strategy_id, rec.world_id
            if kind == "ok":
                self.metrics.fsm.labels(StrategyState.DIFFED).inc()
                self.metrics.fsm.labels(StrategyState.COMPLETED).inc()
                await send("progress", {"strategy_id": sid, "status": StrategyState.DIFFED}, sid, world)
                await send("queue_map", {"strategy_id": sid, "queue_map": value["queue_map"], "tag_queries": value["tag_queries"],
                                         "sentinel_id": value["sentinel_id"]}, sid, world)
                await send("progress", {"strategy_id": sid, "status": StrategyState.COMPLETED}, sid, world)
                self.local.records.pop(sid, None)
            elif kind == "refused":
                self.metrics.fsm.labels(StrategyState.FAILED).inc()
                await send("progress", {"strategy_id": sid, "status": StrategyState.FAILED}, sid, world)
                self.local.records.pop(sid, None)
            else:
                self.metrics.fsm.labels(StrategyState.QUEUED).inc()
                await send("progress", {"strategy_id": sid, "status": StrategyState.QUEUED}, sid, world)
                self.link.park(sid)
        if down is not None:
            self.link.down(down)
