"""``POST /strategies``: the checks of :mod:`.dag` in order, then

* **admission** – refused with 503 + ``Retry-After`` when the degradation level is MINIMAL or
  STATIC (``degradation``: the status part's level, when that part is in the build), or when
  the DAG Manager is down and the local fallback queue is full. A duplicate is still answered
  409 then.
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

Valid submissions usually arrive through :mod:`.fastpath` (in front of Connexion); the
handler in ``handlers/gateway/strategies.py`` serves the rest. Both call :meth:`Admission.submit`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from qmtl.common import correlation
from qmtl.common.errors import BadGateway, Conflict, ServiceError, ServiceUnavailable
from qmtl.contracts.constants import StrategyState
from qmtl.gateway.backends import Backend, BackendUnavailable
from qmtl.gateway.ingest import dag as dagmod
from qmtl.gateway.ingest.fallback import FallbackQueue
from qmtl.gateway.ingest.fsm import Fsm
from qmtl.gateway.ingest.metrics import IngestMetrics
from qmtl.gateway.ingest.outage import DagManagerLink
from qmtl.gateway.ingest.queues import QueueLookup
from qmtl.gateway.ingest.redisq import RedisIngest
from qmtl.gateway.ingest.state import TRANSIENT, ProcessState, RateMeter, new_strategy_id
from qmtl.gateway.ingest.store import IngestStore, StrategyRecord

log = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,31}$")


class Admission:
    """``degradation`` is None in a build without the status part."""

    def __init__(self, *, insert_sentinel: bool, store: IngestStore, redis: RedisIngest, metrics: IngestMetrics, fsm: Fsm,
                 queues: QueueLookup, dagmanager: Backend, link: DagManagerLink, fallback: FallbackQueue, local: ProcessState,
                 rate: RateMeter, degradation: Callable[[], str] | None) -> None:
        self.insert_sentinel = insert_sentinel
        self.store = store
        self.redis = redis
        self.metrics = metrics
        self.fsm = fsm
        self.queues = queues
        self.dagmanager = dagmanager
        self.link = link
        self.fallback = fallback
        self.local = local
        self.rate = rate
        self.degradation = degradation

    async def submit(self, body: Mapping[str, Any], *, subject: str | None = None) -> tuple[dict, dict]:
        started = time.perf_counter()
        self.rate.tick()
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
            raise ServiceUnavailable(f"the Gateway does not accept new strategies now: {refusal}", retry_after=self.link.retry_after())

        meta = body.get("meta")
        sid = new_strategy_id()
        stored = dag
        sentinel_id = None
        if self.insert_sentinel:
            stored, sentinel_id = dagmod.insert_sentinel(dag, sid, dagmod.meta_str(meta, "version", _VERSION_RE))
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
        self.local.remember(record)
        self.metrics.fsm.labels(StrategyState.QUEUED).inc()
        await self._enqueue_accepted(record)
        await self.fsm.send("progress", {"strategy_id": sid, "status": StrategyState.QUEUED}, sid, record.world_id)
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
        if self.fallback.full() and not self.link.up.is_set():
            return f"the DAG Manager is unreachable and the fallback queue is full ({self.fallback.capacity})"
        return None

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
                                         retry_after=self.link.retry_after()) from exc
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
        if not self.link.up.is_set() or self.dagmanager.breaker.state == "open":
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
            if self.link.up.is_set():
                await self.redis.enqueue_new(sid, extra)
                self.local.wakeup.set()
                return
            await self.redis.enqueue_new(sid, extra, push=False)  # the id waits in the fallback queue
        except TRANSIENT as exc:
            log.warning("ingest: Redis refused strategy %s (%r); keeping it in the fallback queue", sid, exc)
        if not self.fallback.put(sid):
            # full: it stays durable in the database and the sweep enqueues it later
            log.warning("ingest: fallback queue full; strategy %s waits for the sweep", sid)
