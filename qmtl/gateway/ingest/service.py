"""Strategy ingest: accept, persist, queue, diff — and never lose an accepted submission.

``submit`` (``POST /strategies``) runs the checks of :mod:`.dag` in order, then:

* **admission** – refused with 503 + ``Retry-After`` when the degradation level is MINIMAL or
  STATIC (``degradation``: the status part's level, when that part is in the build), or when the DAG Manager is
  down and the local fallback queue is full. A duplicate is still answered 409 then.
* **persist before ack** – the submission (DAG with its VersionSentinel, meta, run type,
  world, content hash) and its ``queued`` event are committed to the database (group
  commit); the content hash is unique there, so two replicas cannot both accept the same
  DAG: the loser answers 409 with the first ``strategy_id``.
* **enqueue** – FSM ``queued`` in Redis and the id on the FIFO (one round trip); when the
  DAG Manager is known to be down, or Redis refuses, the id waits in the local fallback
  queue instead.
* **ack** – 202 ``{strategy_id, queue_map, sentinel_id}`` with ``Location``. ``queue_map``
  holds, for each TagQueryNode, the queues matching it now (asked of the DAG Manager while
  the submission is being persisted). When the DAG Manager cannot answer, the lists are
  empty: the ``queue_map`` frame on the event stream and ``GET /strategies/{id}/status``
  carry the full map once the diff has run.

Workers (``gateway.workers`` tasks) pop ids with BLMOVE into a processing list, take
``lock:{id}`` (``SET NX PX 60000``), and drive the FSM ``queued → processing → diffed →
completed | failed``; every transition is appended to the mirror first, then set in Redis,
then relayed as a ``progress`` frame; the diff result is relayed as a ``queue_map`` frame
(``diffed`` and ``completed`` share one mirror commit and one Redis round trip). A DAG
Manager that does not answer sends the id back to ``queued`` and into the fallback queue.
During a burst (more than ``burst_rate`` submissions/s) workers give the acks priority.

Valid submissions usually arrive through :mod:`.fastpath` (in front of Connexion); the
handler in ``handlers/gateway/strategies.py`` serves the rest. Both call :meth:`submit`.

Recovery, by a loop every ``reconcile_interval`` seconds:

* Redis lost its data (the ``epoch`` key is gone) → every strategy the mirror says is not
  finished is re-enqueued and its FSM state restored; finished ones are restored lazily
  (``status`` reads the mirror when Redis has nothing).
* ids left in the processing list by a dead worker (no lock, seen twice) → back on the FIFO.
* every ``sweep_interval`` seconds, and at startup: any unfinished strategy that is in no
  queue (e.g. a Gateway died with ids in its local fallback queue) → re-enqueued.
* the fallback queue is flushed to the FIFO once the DAG Manager answers its health probe
  (with backoff) and its circuit breaker admits calls again.

Duplicates on the FIFO are harmless: a worker that cannot take the lock, or finds the
strategy finished, drops its copy.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from qmtl.common import correlation, logs
from qmtl.common.errors import BadGateway, Conflict, NotFound, ServiceError, ServiceUnavailable
from qmtl.common.tasks import detach
from qmtl.contracts.constants import StrategyState
from qmtl.gateway.backends import Backend, BackendUnavailable
from qmtl.gateway.ingest import dag as dagmod
from qmtl.gateway.ingest.fallback import FallbackQueue
from qmtl.gateway.ingest.metrics import IngestMetrics
from qmtl.gateway.ingest.queues import QueueLookup
from qmtl.gateway.ingest.redisq import TERMINAL, RedisIngest
from qmtl.gateway.ingest.store import IngestStore, StrategyRecord, iso
from qmtl.store import Database

if TYPE_CHECKING:
    from qmtl.common.config import GatewayConfig

log = logging.getLogger(__name__)

TRANSIENT = (RedisError, OSError, SQLAlchemyError, ConnectionError)
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,31}$")
_ASSET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,63}$")
_RECORD_CACHE = 50_000


def new_strategy_id() -> str:
    return "s-" + uuid.uuid4().hex[:20]


class Relay(Protocol):
    """Where FSM frames go (the events component's ``relay_local``)."""

    def relay_local(self, type: str, data: dict, *, key: str, world_id: str | None = None) -> Any: ...


class IngestService:
    """``metrics`` and ``fallback`` come from the Gateway's factory (the status part reads the
    fallback queue's size too); ``degradation`` is the status part's level and ``relay`` the
    events part, each None in a build without that part."""

    def __init__(self, settings: GatewayConfig, *, db: Database, kv: Any, kv_prefix: str, dagmanager: Backend,
                 metrics: IngestMetrics, fallback: FallbackQueue, queues: QueueLookup,
                 degradation: Callable[[], str] | None = None, relay: Relay | None = None) -> None:
        g = settings
        self.dagmanager = dagmanager
        self.degradation = degradation
        self.relay = relay
        self.insert_sentinel = bool(g.insert_sentinel)
        self.workers = max(0, int(g.workers))
        self.metrics = metrics
        self.store = IngestStore(db)
        self.redis = RedisIngest(kv, kv_prefix)
        self.fallback = fallback
        self.queues = queues
        # timings (seconds); tests shorten them
        self.pop_timeout = 1.0
        self.reconcile_interval = 1.0
        self.janitor_interval = 5.0
        self.sweep_interval = 30.0
        self.probe_backoff = (0.1, 2.0)
        self.watch_poll_interval = 1.0
        self.retry_after = 5
        # acks first during a burst: while submissions arrive faster than ``burst_rate`` per
        # second (more than the diffs can follow anyway), a worker waits up to
        # ``ingest_yield_max`` s before each diff, so that in one process (``qmtl up``) the
        # diffs do not take the CPU the acks need (G-02). Below that rate workers run freely;
        # during a burst each still makes progress, and all drain at full speed after it.
        self.burst_rate = 200.0
        self.ingest_yield_max = 1.0
        # a worker takes up to ``batch_size`` waiting ids at once: their FSM steps share the
        # mirror commits and Redis round trips; their diffs go in POST /diff/batch requests
        self.batch_size = 32
        self.diff_batch_nodes = 2_000  # a batch request carries at most this many nodes
        self.diff_budget_ms_per_node = float(g.diff_budget_ms_per_node)
        self.diff_budget_ms_per_diff = float(g.diff_budget_ms_per_diff)
        self.diff_batch_max = 8  # diffs per POST /diff/batch (the spec allows 64)
        # two lanes, one request in flight each per process: small DAGs (batched), and DAGs
        # of more than ``diff_batch_nodes`` nodes, so a large diff never holds up small ones
        # here; the DAG Manager applies diffs one at a time on SQLite, so more requests in
        # flight would only queue there, on their budget
        self._diff_slots = asyncio.Semaphore(1)
        self._large_slots = asyncio.Semaphore(1)
        self._rate = _RateMeter()
        self._records: collections.OrderedDict[str, StrategyRecord] = collections.OrderedDict()
        self._inflight: set[str] = set()
        self._suspects: set[str] = set()
        self._dm_up = asyncio.Event()
        self._dm_up.set()
        self._wakeup = asyncio.Event()  # set when this process puts ids on the FIFO
        self._probe_task: asyncio.Task | None = None
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self.rebuilds = 0

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self._stopping = False
        await self.store.start()
        try:
            if await self.redis.epoch() is None:
                # normal on a fresh Redis (first start, or a new embedded run): not a warning
                await self._rebuild("no epoch marker in Redis at startup", level=logging.INFO)
            else:
                await self._sweep("startup")
        except TRANSIENT as exc:
            log.warning("ingest: startup reconciliation deferred (%r); the reconcile loop retries", exc)
        self._tasks = [asyncio.create_task(self._worker(i), name=f"ingest-worker-{i}") for i in range(self.workers)]
        self._tasks.append(asyncio.create_task(self._reconcile_loop(), name="ingest-reconcile"))

    async def stop(self) -> None:
        self._stopping = True
        tasks = list(self._tasks)
        if self._probe_task is not None:
            tasks.append(self._probe_task)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        self._probe_task = None
        await self.store.stop()

    # -- views for other components -----------------------------------------------------------
    def fallback_queue_size(self) -> int:
        return len(self.fallback)

    @property
    def dagmanager_up(self) -> bool:
        return self._dm_up.is_set()

    # -- POST /strategies -----------------------------------------------------------------------
    async def submit(self, body: Mapping[str, Any], *, subject: str | None = None) -> tuple[dict, dict]:
        started = time.perf_counter()
        self._rate.tick()
        try:
            ack, headers = await self._submit(body, subject)
        except ServiceError as exc:
            self.metrics.submissions.labels(str(exc.status)).inc()
            raise
        self.metrics.submissions.labels("202").inc()
        self.metrics.e2e_latency.observe((time.perf_counter() - started) * 1000.0)
        return ack, headers

    async def _submit(self, body: Mapping[str, Any], subject: str | None) -> tuple[dict, dict]:
        dag = dagmod.decode_dag_json(body["dag_json"])
        dagmod.check_crc(dag, int(body["node_ids_crc32"]))
        dagmod.validate_dag(dag)
        ok, claims = dagmod.precheck_ids(dag["nodes"])
        if not ok:  # nothing reaches the DAG Manager's diff before the ids are verified
            known = await self._collision_lookups(claims) if claims else {}
            dagmod.verify_ids(dag["nodes"], known)
        dagmod.apply_defaults(dag)  # e.g. a TagQueryNode without match_mode is `any` (the schema's default)
        chash = dagmod.content_hash(dag)

        refusal = self._refusal()
        if refusal is not None:
            owner = await self._owner_if_reachable(chash)
            if owner is not None:
                raise self._duplicate(owner)
            raise ServiceUnavailable(f"the Gateway does not accept new strategies now: {refusal}", retry_after=self._retry_after())

        meta = body.get("meta")
        sid = new_strategy_id()
        stored = dag
        sentinel_id = None
        if self.insert_sentinel:
            stored, sentinel_id = dagmod.insert_sentinel(dag, sid, _meta_str(meta, "version", _VERSION_RE))
        record = StrategyRecord(
            strategy_id=sid, content_hash=chash, dag_json=json.dumps(stored, separators=(",", ":")), meta=meta,
            run_type=body["run_type"],
            world_id=body.get("world_id"), sentinel_id=sentinel_id, submitted_by=subject,
            correlation_id=correlation.get(),
        )
        lookups = asyncio.ensure_future(self._tag_query_map(dag))
        try:
            owner = await self.store.accept(record)
        except TRANSIENT as exc:
            lookups.cancel()
            log.warning("ingest: cannot persist strategy %s: %r", sid, exc)
            raise ServiceUnavailable("the strategy could not be stored durably; nothing was accepted", retry_after=2) from exc
        except BaseException:
            lookups.cancel()
            raise
        if owner != sid:
            lookups.cancel()
            raise self._duplicate(owner)
        # durable from here on: whatever happens next, the sweep finds it
        self._remember(record)
        self.metrics.fsm.labels(StrategyState.QUEUED).inc()
        await self._enqueue_accepted(record)
        await self._relay("progress", {"strategy_id": sid, "status": StrategyState.QUEUED}, sid, record.world_id)
        queue_map = await lookups
        ack: dict[str, Any] = {"strategy_id": sid, "queue_map": queue_map}
        if sentinel_id is not None:
            ack["sentinel_id"] = sentinel_id
        return ack, {"Location": f"/strategies/{sid}/status"}

    def _refusal(self) -> str | None:
        if self.degradation is not None:
            level = self.degradation()
            if level in ("MINIMAL", "STATIC"):
                return f"degradation level {level}"
        if self.fallback.full() and not self._dm_up.is_set():
            return f"the DAG Manager is unreachable and the fallback queue is full ({self.fallback.capacity})"
        return None

    def _retry_after(self) -> int:
        ra = self.dagmanager.breaker.retry_after() if not self._dm_up.is_set() else 0
        return max(1, round(ra) or self.retry_after)

    async def _owner_if_reachable(self, chash: str) -> str | None:
        try:
            return await self.store.owner_of(chash)
        except TRANSIENT:
            return None

    @staticmethod
    def _duplicate(owner: str) -> Conflict:
        return Conflict("this DAG was already submitted", ext={"strategy_id": owner},
                        headers={"Location": f"/strategies/{owner}/status"})

    async def _collision_lookups(self, claims: list[str]) -> dict[str, tuple[str, str, str, str]]:
        """For nodes sent with the SHA3-256 id (a claimed SHA-256 collision), the fields the
        DAG Manager's graph holds under the SHA-256 id (read-only ``GET /nodes/{id}``; at most
        32 claims are looked up, the others count as unverified)."""
        claims = claims[:32]

        async def one(digest: str) -> tuple[str, tuple[str, str, str, str] | None]:
            try:
                resp = await self.dagmanager.request("GET", f"/nodes/{digest}")
            except BackendUnavailable as exc:
                raise ServiceUnavailable(f"cannot verify a claimed NodeID collision: the DAG Manager is unavailable ({exc.reason})",
                                         retry_after=self._retry_after()) from exc
            if resp.status_code != 200:
                return digest, None
            body = resp.json()
            try:
                return digest, (body["node_type"], body["code_hash"], body["config_hash"], body["schema_hash"])
            except (KeyError, TypeError):
                return digest, None

        found = await asyncio.gather(*(one(d) for d in claims))
        return {d: f for d, f in found if f is not None}

    async def _tag_query_map(self, dag: Mapping[str, Any]) -> dict[str, list[str]]:
        queries = dagmod.tag_queries(dag)
        if not queries:
            return {}
        out: dict[str, list[str]] = {nid: [] for nid in queries}
        if not self._dm_up.is_set() or self.dagmanager.breaker.state == "open":
            return out  # filled in later by the queue_map frame / status

        async def one(nid: str, q: tuple[tuple[str, ...], int, str]) -> None:
            try:
                out[nid] = await self.queues.matching(*q)
            except (BackendUnavailable, BadGateway, ServiceError) as exc:
                log.info("ingest: queue lookup for TagQueryNode %s failed (%s); the diff fills it in", nid, exc)

        await asyncio.gather(*(one(nid, q) for nid, q in queries.items()))
        return out

    async def _enqueue_accepted(self, record: StrategyRecord) -> None:
        sid = record.strategy_id
        extra = {"sentinel_id": record.sentinel_id, "world_id": record.world_id, "run_type": record.run_type}
        try:
            if self._dm_up.is_set():
                await self.redis.enqueue_new(sid, extra)
                self._wakeup.set()
                return
            await self.redis.set_state(sid, StrategyState.QUEUED, extra)
        except TRANSIENT as exc:
            log.warning("ingest: Redis refused strategy %s (%r); keeping it in the fallback queue", sid, exc)
        if not self.fallback.put(sid):
            # full: it stays durable in the database and the sweep enqueues it later
            log.warning("ingest: fallback queue full; strategy %s waits for the sweep", sid)

    def _remember(self, record: StrategyRecord) -> None:
        self._records[record.strategy_id] = record
        while len(self._records) > _RECORD_CACHE:
            self._records.popitem(last=False)

    # -- GET /strategies/{id}/status ------------------------------------------------------------
    async def status(self, sid: str) -> dict:
        try:
            state = await self.redis.get_state(sid)
        except TRANSIENT as exc:
            log.info("ingest: Redis unavailable for status of %s (%r); reading the mirror", sid, exc)
            state = None
        if state is None or "status" not in state:
            state = await self._restore(sid)
            if state is None:
                raise NotFound(f"no strategy {sid!r}")
        out: dict[str, Any] = {"strategy_id": sid, "status": state["status"]}
        for k in ("queue_map", "tag_queries", "sentinel_id", "error", "updated_at", "run_type", "world_id"):
            v = state.get(k)
            if v not in (None, ""):
                out[k] = v
        return out

    async def _restore(self, sid: str) -> dict | None:
        """The FSM state from the mirror, put back into Redis (when Redis answers)."""
        try:
            mirrored = await self.store.state(sid)
            record = await self.store.record(sid) if mirrored is not None else None
        except TRANSIENT as exc:
            raise ServiceUnavailable("neither Redis nor the database can answer", retry_after=2) from exc
        if mirrored is None or record is None:
            return None
        state: dict[str, Any] = {
            "status": mirrored.status, "updated_at": iso(mirrored.updated_at),
            "sentinel_id": record.sentinel_id, "world_id": record.world_id, "run_type": record.run_type,
        }
        if mirrored.diff:
            state["queue_map"] = mirrored.diff.get("queue_map")
            state["tag_queries"] = mirrored.diff.get("tag_queries")
        if mirrored.status == StrategyState.FAILED:
            state["error"] = mirrored.detail.get("error")
        try:
            await self.redis.set_state(sid, mirrored.status, {k: v for k, v in state.items() if k not in ("status", "updated_at")},
                                       updated_at=state["updated_at"], persist=True)
            if mirrored.status not in TERMINAL and sid not in self._inflight and sid not in self.fallback:
                await self.redis.push(sid)
                self._wakeup.set()
                self.metrics.recoveries.labels("restore").inc()
        except TRANSIENT as exc:  # Redis is down: the answer still comes from the mirror
            log.info("ingest: could not re-cache the state of %s in Redis (%r)", sid, exc)
        return {k: v for k, v in state.items() if v is not None}

    # -- workers --------------------------------------------------------------------------------
    async def _worker(self, n: int) -> None:
        logs.label_task(f"ingest-worker-{n}")
        backoff = 0.05
        while not self._stopping:
            await self._dm_up.wait()
            self._wakeup.clear()  # before the pop: a push after this point sets it again
            started = time.monotonic()
            try:
                sid = await self.redis.pop(self.pop_timeout)
                sids = [sid, *await self.redis.pop_more(self.batch_size - 1)] if sid is not None else []
            except TRANSIENT as exc:
                log.debug("ingest worker %d: Redis unavailable (%r)", n, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            if not sids:
                if time.monotonic() - started < self.pop_timeout / 2:
                    # the store did not block (the in-memory substitute answers BLMOVE at
                    # once): wait for a local push or the pop timeout instead of spinning
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.pop_timeout):
                            await self._wakeup.wait()
                continue
            self._inflight.update(sids)
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
                self._inflight.difference_update(sids)

    async def _fail_unexpectedly(self, sid: str, exc: Exception) -> None:
        record = self._records.pop(sid, None)
        try:
            record = record or await self.store.record(sid)
            if record is not None:
                await self._transition(record, StrategyState.FAILED, {"error": f"internal error in the Gateway: {type(exc).__name__}: {exc}"})
        except Exception:  # the original error is logged above; this one too
            log.exception("ingest: could not record the failure of %s", sid)

    async def _process_batch(self, sids: list[str]) -> None:
        """Drive a batch of popped ids as far as they go now. Per batch: one Redis round trip
        for the locks, one mirror commit and one Redis round trip per FSM step of the whole
        batch, the diffs in POST /diff/batch requests (see :meth:`_diff_all`), one round
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
        records = {sid: self._records[sid] for sid, _ in todo if sid in self._records}
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
                restored = await self._restore(sid)
                status = restored["status"] if restored else StrategyState.QUEUED
            if status in TERMINAL:
                self._records.pop(sid, None)
                continue
            if not self._dm_up.is_set() or breaker.retry_after() > 0:
                # the DAG Manager is not taking calls (breaker open, or its half-open probe is
                # in flight): wait in the fallback queue without changing state
                self._park(sid)
                if breaker.state == "open":
                    self._dagmanager_down(BackendUnavailable("dagmanager", "circuit breaker open", breaker.retry_after()))
                continue
            active.append(record)
        if active:
            await self._yield_to_ingest()
            await self._transitions([(r, StrategyState.PROCESSING, None) for r in active])
            outcomes = await self._diff_all(active)
            await self._finish(active, outcomes)
        return [sid for sid, _ in todo]

    async def _diff_all(self, records: list[StrategyRecord]) -> list[tuple[str, Any]]:
        """Each record's diff outcome: ("ok", diff) | ("refused", error) | ("unavailable", BackendUnavailable).

        Small DAGs go together in ``POST /diff/batch`` requests (at most ``diff_batch_nodes``
        nodes and ``diff_batch_max`` diffs each), a DAG larger than that alone in ``POST /diff``;
        each request's budget grows with its nodes and diffs (``diff_budget_ms_per_node``,
        ``diff_budget_ms_per_diff``). One request is in flight per lane (small, large) and
        Gateway process: the DAG Manager applies diffs one at a time on SQLite, so more would
        only wait there, on their budget."""
        out: list[tuple[str, Any] | None] = [None] * len(records)
        groups: list[list[int]] = []
        weight = 0
        for i, rec in enumerate(records):
            w = _node_count(rec.dag_json)
            if not groups or weight + w > self.diff_batch_nodes or len(groups[-1]) >= self.diff_batch_max:
                groups.append([])
                weight = 0
            groups[-1].append(i)
            weight += w

        async def one(i: int) -> None:
            lane = self._large_slots if _node_count(records[i].dag_json) > self.diff_batch_nodes else self._diff_slots
            async with lane:
                try:
                    out[i] = await self._diff(records[i])
                except Exception as exc:  # a bug must not take the batch down; the strategy fails
                    log.exception("ingest: diff of %s failed unexpectedly", records[i].strategy_id)
                    out[i] = ("refused", f"internal error in the Gateway: {type(exc).__name__}: {exc}")

        async def many(group: list[int]) -> None:
            async with self._diff_slots:
                try:
                    answers = await self._diff_batch([records[i] for i in group])
                except Exception as exc:
                    log.exception("ingest: batch diff failed unexpectedly")
                    answers = [("refused", f"internal error in the Gateway: {type(exc).__name__}: {exc}")] * len(group)
            if answers is None:  # the batch as a whole was refused: one by one, so each gets its own answer
                await asyncio.gather(*(one(i) for i in group))
                return
            for i, answer in zip(group, answers):
                out[i] = answer

        await asyncio.gather(*(one(g[0]) if len(g) == 1 else many(g) for g in groups))
        return out  # type: ignore[return-value]

    def _diff_body(self, record: StrategyRecord) -> str:
        """The POST /diff body of a record, with the stored DAG text as is (not re-serialised)."""
        payload: dict[str, Any] = {"strategy_id": record.strategy_id, "run_type": record.run_type}
        asset = _meta_str(record.meta, "asset", _ASSET_RE)
        if asset:
            payload["asset"] = asset
        head = json.dumps(payload, separators=(",", ":"))
        return head[:-1] + ',"dag":' + record.dag_json + "}"

    def _diff_timeout(self, nodes: int, diffs: int = 1) -> float:
        extra_ms = nodes * self.diff_budget_ms_per_node + (diffs - 1) * self.diff_budget_ms_per_diff
        return self.dagmanager.policy.timeout + extra_ms / 1000.0

    async def _diff_batch(self, records: list[StrategyRecord]) -> list[tuple[str, Any]] | None:
        """One POST /diff/batch; None when the DAG Manager refused the request as a whole."""
        content = ('{"diffs":[' + ",".join(self._diff_body(r) for r in records) + "]}").encode()
        nodes = sum(_node_count(r.dag_json) for r in records)
        started = time.perf_counter()
        try:
            resp = await self.dagmanager.request("POST", "/diff/batch", content=content, headers={"Content-Type": "application/json"},
                                                     idempotent=True, timeout=self._diff_timeout(nodes, len(records)))
        except BackendUnavailable as exc:
            return [("unavailable", exc)] * len(records)
        finally:
            self.metrics.diff_latency.observe((time.perf_counter() - started) * 1000.0)
        if resp.status_code != 200:
            log.info("ingest: POST /diff/batch answered HTTP %s (%s); diffing one by one", resp.status_code, _detail(resp))
            return None
        try:
            results = resp.json()["results"]
            if not isinstance(results, list) or len(results) != len(records):
                raise ValueError(f"not one result per diff ({len(records)})")
        except (ValueError, KeyError, TypeError) as exc:
            return [("refused", f"the DAG Manager's diff answer is malformed: {exc}")] * len(records)
        out: list[tuple[str, Any]] = []
        for rec, item in zip(records, results):
            item = item if isinstance(item, Mapping) else {}
            status = item.get("status")
            problem = item.get("problem") if isinstance(item.get("problem"), Mapping) else {}
            if status == 200:
                out.append(self._diff_outcome(rec, item.get("body")))
            elif isinstance(status, int) and (status >= 500 or status == 429):  # as Backend: worth retrying
                out.append(("unavailable", BackendUnavailable("dagmanager", f"answered HTTP {status} for this diff: {problem.get('detail', '')}")))
            else:
                detail = str(problem.get("detail") or problem.get("title") or item)[:500]
                out.append(("refused", f"the DAG Manager refused the diff (HTTP {status}): {detail}"))
        return out

    async def _diff(self, record: StrategyRecord) -> tuple[str, Any]:
        content = self._diff_body(record).encode()
        started = time.perf_counter()
        try:
            resp = await self.dagmanager.request("POST", "/diff", content=content, headers={"Content-Type": "application/json"},
                                                     idempotent=True,  # a diff is idempotent
                                                     timeout=self._diff_timeout(_node_count(record.dag_json)))
        except BackendUnavailable as exc:
            return "unavailable", exc
        finally:
            self.metrics.diff_latency.observe((time.perf_counter() - started) * 1000.0)
        if resp.status_code >= 400:
            return "refused", f"the DAG Manager refused the diff (HTTP {resp.status_code}): {_detail(resp)}"
        try:
            result = resp.json()
        except ValueError as exc:
            return "refused", f"the DAG Manager's diff answer is malformed: {exc}"
        return self._diff_outcome(record, result)

    @staticmethod
    def _diff_outcome(record: StrategyRecord, result: Any) -> tuple[str, Any]:
        try:
            diff = {
                "queue_map": dict(result["queue_map"]),
                "tag_queries": dict(result.get("tag_queries") or {}),
                "sentinel_id": result.get("sentinel_id") or record.sentinel_id,
                "new_queues": len(result.get("new_queues") or []),
                "reused_queues": len(result.get("reused_queues") or []),
            }
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return "refused", f"the DAG Manager's diff answer is malformed: {exc}"
        return "ok", diff

    async def _finish(self, records: list[StrategyRecord], outcomes: list[tuple[str, Any]]) -> None:
        """Every outcome of a batch in one mirror commit and one Redis round trip, then relayed
        per strategy in order: diffed → queue_map → completed; failed; or back to queued (the
        DAG Manager did not answer: the id waits in the fallback queue)."""
        rows: list[tuple[str, str, dict | None]] = []
        states: list[tuple[str, list[tuple[str, Mapping[str, Any] | None]]]] = []
        down: BackendUnavailable | None = None
        for rec, (kind, value) in zip(records, outcomes):
            sid = rec.strategy_id
            if kind == "ok":
                rows += [(sid, StrategyState.DIFFED, value), (sid, StrategyState.COMPLETED, None)]
                states.append((sid, [(StrategyState.DIFFED, self._extra(StrategyState.DIFFED, value)), (StrategyState.COMPLETED, None)]))
            elif kind == "refused":
                detail = {"error": value}
                rows.append((sid, StrategyState.FAILED, detail))
                states.append((sid, [(StrategyState.FAILED, self._extra(StrategyState.FAILED, detail))]))
            else:
                down = value
                detail = {"reason": f"DAG Manager unavailable: {value.reason}"}
                rows.append((sid, StrategyState.QUEUED, detail))
                states.append((sid, [(StrategyState.QUEUED, self._extra(StrategyState.QUEUED, detail))]))
        await self.store.append_batch(rows)  # the mirror first: never behind what clients saw
        await self.redis.set_states_many(states)
        if any(kind == "ok" and value["new_queues"] for kind, value in outcomes):
            self.queues.queues_changed()
        for rec, (kind, value) in zip(records, outcomes):
            sid, world = rec.strategy_id, rec.world_id
            if kind == "ok":
                self.metrics.fsm.labels(StrategyState.DIFFED).inc()
                self.metrics.fsm.labels(StrategyState.COMPLETED).inc()
                await self._relay("progress", {"strategy_id": sid, "status": StrategyState.DIFFED}, sid, world)
                await self._relay("queue_map", {"strategy_id": sid, "queue_map": value["queue_map"], "tag_queries": value["tag_queries"],
                                                "sentinel_id": value["sentinel_id"]}, sid, world)
                await self._relay("progress", {"strategy_id": sid, "status": StrategyState.COMPLETED}, sid, world)
                self._records.pop(sid, None)
            elif kind == "refused":
                self.metrics.fsm.labels(StrategyState.FAILED).inc()
                await self._relay("progress", {"strategy_id": sid, "status": StrategyState.FAILED}, sid, world)
                self._records.pop(sid, None)
            else:
                self.metrics.fsm.labels(StrategyState.QUEUED).inc()
                await self._relay("progress", {"strategy_id": sid, "status": StrategyState.QUEUED}, sid, world)
                self._park(sid)
        if down is not None:
            self._dagmanager_down(down)

    async def _transitions(self, items: list[tuple[StrategyRecord, str, dict | None]]) -> None:
        """One FSM step of several strategies: one mirror commit, one Redis round trip."""
        await self.store.append_batch([(r.strategy_id, status, detail) for r, status, detail in items])
        await self.redis.set_states_many([(r.strategy_id, [(status, self._extra(status, detail))]) for r, status, detail in items])
        for r, status, _detail in items:
            self.metrics.fsm.labels(status).inc()
            await self._relay("progress", {"strategy_id": r.strategy_id, "status": status}, r.strategy_id, r.world_id)

    async def _yield_to_ingest(self) -> None:
        deadline = time.monotonic() + self.ingest_yield_max
        while self._rate.per_second() > self.burst_rate and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a rate, no event to wait on
            await asyncio.sleep(0.02)

    async def _transition(self, record: StrategyRecord, status: str, detail: dict | None = None) -> None:
        sid = record.strategy_id
        await self.store.append(sid, status, detail)  # the mirror first: never behind what clients saw
        await self.redis.set_state(sid, status, self._extra(status, detail))
        self.metrics.fsm.labels(status).inc()
        await self._relay("progress", {"strategy_id": sid, "status": status}, sid, record.world_id)

    @staticmethod
    def _extra(status: str, detail: dict | None) -> dict[str, Any]:
        """What the Redis FSM hash keeps besides the status."""
        if status == StrategyState.DIFFED and detail:
            return {"queue_map": detail["queue_map"], "tag_queries": detail["tag_queries"], "sentinel_id": detail["sentinel_id"]}
        if status == StrategyState.FAILED and detail:
            return {"error": detail.get("error")}
        return {}

    async def _relay(self, type_: str, data: dict, key: str, world_id: str | None) -> None:
        if self.relay is None:
            return
        try:
            res = self.relay.relay_local(type_, data, key=key, world_id=world_id)
            if inspect.isawaitable(res):
                await res
        except Exception:  # the stream is a notification; the FSM must still advance
            self.metrics.relay_errors.inc()
            log.exception("ingest: relaying %s for %s failed", type_, key)

    def _park(self, sid: str) -> None:
        if not self.fallback.put(sid):
            # full: back on the Redis FIFO (workers wait while the DAG Manager is down)
            detach(self._push_back(sid))

    async def _push_back(self, sid: str) -> None:
        try:
            await self.redis.push_front(sid)
            self._wakeup.set()
        except TRANSIENT as exc:
            log.warning("ingest: could not re-queue %s (%r); the sweep re-enqueues it", sid, exc)

    # -- DAG Manager outage -----------------------------------------------------------------------
    def _dagmanager_down(self, exc: BackendUnavailable) -> None:
        if self._dm_up.is_set():
            log.warning("ingest: DAG Manager unavailable (%s); accepted strategies wait in the fallback queue", exc.reason)
            self._dm_up.clear()
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.create_task(self._probe_dagmanager(), name="ingest-dm-probe")

    async def _probe_dagmanager(self) -> None:
        delay, cap = self.probe_backoff
        while not self._stopping:
            await asyncio.sleep(delay)
            breaker = self.dagmanager.breaker
            if breaker.state != "open" and await self.dagmanager.probe():
                break
            delay = min(delay * 2, cap)
        log.warning("ingest: DAG Manager answers again; flushing %d strategies from the fallback queue", len(self.fallback))
        self._dm_up.set()
        with contextlib.suppress(*TRANSIENT):
            await self._flush_fallback()

    async def _flush_fallback(self) -> None:
        while len(self.fallback) and self._dm_up.is_set():
            batch = self.fallback.peek(500)
            await self.redis.push(*batch)
            self.fallback.remove(batch)
            self._wakeup.set()

    # -- reconciliation ---------------------------------------------------------------------------
    async def _reconcile_loop(self) -> None:
        last_janitor = last_sweep = time.monotonic()
        while not self._stopping:
            await asyncio.sleep(self.reconcile_interval)
            try:
                if await self.redis.epoch() is None:
                    await self._rebuild("Redis lost the ingest state (epoch marker gone)")
                    last_sweep = time.monotonic()
                if len(self.fallback) and self._dm_up.is_set():
                    await self._flush_fallback()
                now = time.monotonic()
                if now - last_janitor >= self.janitor_interval:
                    last_janitor = now
                    await self._janitor()
                if now - last_sweep >= self.sweep_interval:
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
        missing = [sid for sid, _status in pending
                   if sid not in present and sid not in self.fallback and sid not in self._inflight]
        for sid, status in pending:
            if restore_state and sid not in self._inflight:
                record = self._records.get(sid)
                extra = {"sentinel_id": record.sentinel_id, "world_id": record.world_id, "run_type": record.run_type} if record else {}
                await self.redis.set_state(sid, status, extra, persist=True)
        for i in range(0, len(missing), 500):
            await self.redis.push(*missing[i:i + 500])
            self._wakeup.set()
        if missing:
            self.metrics.recoveries.labels(reason).inc(len(missing))
            log.warning("ingest: re-enqueued %d unfinished strategies (%s)", len(missing), reason)
        return len(missing)

    async def _janitor(self) -> None:
        """Ids left on the processing list by a worker that died (no lock, seen twice)."""
        suspects: set[str] = set()
        for sid in await self.redis.processing_ids():
            if sid in self._inflight or await self.redis.locked(sid):
                continue
            if sid in self._suspects:
                if await self.redis.requeue_from_processing(sid):
                    self._wakeup.set()
                    self.metrics.recoveries.labels("janitor").inc()
                    log.warning("ingest: strategy %s was orphaned on the processing list; re-queued", sid)
            else:
                suspects.add(sid)
        self._suspects = suspects


class _RateMeter:
    """Events per second over the last second (ten 100 ms buckets)."""

    def __init__(self) -> None:
        self._buckets = [0] * 10
        self._stamps = [0] * 10

    def tick(self) -> None:
        slot = int(time.monotonic() * 10)
        i = slot % 10
        if self._stamps[i] != slot:
            self._stamps[i], self._buckets[i] = slot, 0
        self._buckets[i] += 1

    def per_second(self) -> float:
        slot = int(time.monotonic() * 10)
        return float(sum(n for n, st in zip(self._buckets, self._stamps) if slot - st < 10))


def _node_count(dag_json: str) -> int:
    """Nodes in a stored DAG, without parsing it (each node object has one ``node_id`` key)."""
    return max(1, dag_json.count('"node_id"'))


def _meta_str(meta: Any, key: str, pattern: re.Pattern) -> str | None:
    if isinstance(meta, Mapping):
        v = meta.get(key)
        if isinstance(v, str) and pattern.match(v):
            return v
    return None


def _detail(resp: Any) -> str:
    try:
        body = resp.json()
        if isinstance(body, Mapping):
            return str(body.get("detail") or body.get("title") or body)[:500]
    except ValueError:
        pass
    return resp.text[:500]
