"""The strategy FSM's steps and reads: every transition is appended to the database mirror
first, then set in Redis, then relayed as a ``progress`` frame (the stream is a notification:
a relay that fails never stops the FSM). ``GET /strategies/{id}/status`` reads Redis and, when
Redis has nothing, the mirror (putting the state back into Redis, and an unfinished strategy
back on the FIFO)."""

from __future__ import annotations

import inspect
import logging
from typing import Any, Protocol

from qmtl.common.errors import NotFound, ServiceUnavailable
from qmtl.contracts.constants import StrategyState
from qmtl.gateway.ingest.fallback import FallbackQueue
from qmtl.gateway.ingest.metrics import IngestMetrics
from qmtl.gateway.ingest.redisq import TERMINAL, RedisIngest
from qmtl.gateway.ingest.state import TRANSIENT, ProcessState
from qmtl.gateway.ingest.store import IngestStore, StrategyRecord, iso

log = logging.getLogger(__name__)


class Relay(Protocol):
    """Where FSM frames go (the events part's ``relay_local``)."""

    def relay_local(self, type: str, data: dict, *, key: str, world_id: str | None = None) -> Any: ...


class Fsm:
    """``relay`` is None in a build without the events part."""

    def __init__(self, *, store: IngestStore, redis: RedisIngest, metrics: IngestMetrics, fallback: FallbackQueue,
                 local: ProcessState, relay: Relay | None) -> None:
        self.store = store
        self.redis = redis
        self.metrics = metrics
        self.fallback = fallback
        self.local = local
        self.relay = relay

    # -- steps ------------------------------------------------------------------------------------
    async def transition(self, record: StrategyRecord, status: str, detail: dict | None = None) -> None:
        sid = record.strategy_id
        await self.store.append(sid, status, detail)  # the mirror first: never behind what clients saw
        await self.redis.set_state(sid, status, self.extra(status, detail))
        self.metrics.fsm.labels(status).inc()
        await self.send("progress", {"strategy_id": sid, "status": status}, sid, record.world_id)

    async def transitions(self, items: list[tuple[StrategyRecord, str, dict | None]]) -> None:
        """One FSM step of several strategies: one mirror commit, one Redis round trip."""
        await self.store.append_batch([(r.strategy_id, status, detail) for r, status, detail in items])
        await self.redis.set_states_many([(r.strategy_id, [(status, self.extra(status, detail))]) for r, status, detail in items])
        for r, status, _detail in items:
            self.metrics.fsm.labels(status).inc()
            await self.send("progress", {"strategy_id": r.strategy_id, "status": status}, r.strategy_id, r.world_id)

    @staticmethod
    def extra(status: str, detail: dict | None) -> dict[str, Any]:
        """What the Redis FSM hash keeps besides the status."""
        if status == StrategyState.DIFFED and detail:
            return {"queue_map": detail["queue_map"], "tag_queries": detail["tag_queries"], "sentinel_id": detail["sentinel_id"]}
        if status == StrategyState.FAILED and detail:
            return {"error": detail.get("error")}
        return {}

    async def send(self, type_: str, data: dict, key: str, world_id: str | None) -> None:
        """A frame to the relay (``progress``, ``queue_map``)."""
        if self.relay is None:
            return
        try:
            res = self.relay.relay_local(type_, data, key=key, world_id=world_id)
            if inspect.isawaitable(res):
                await res
        except Exception:  # the stream is a notification; the FSM must still advance
            self.metrics.relay_errors.inc()
            log.exception("ingest: relaying %s for %s failed", type_, key)

    # -- reads ------------------------------------------------------------------------------------
    async def status(self, sid: str) -> dict:
        """``GET /strategies/{id}/status``."""
        try:
            state = await self.redis.get_state(sid)
        except TRANSIENT as exc:
            log.info("ingest: Redis unavailable for status of %s (%r); reading the mirror", sid, exc)
            state = None
        if state is None or "status" not in state:
            state = await self.restore(sid)
            if state is None:
                raise NotFound(f"no strategy {sid!r}")
        out: dict[str, Any] = {"strategy_id": sid, "status": state["status"]}
        for k in ("queue_map", "tag_queries", "sentinel_id", "error", "updated_at", "run_type", "world_id"):
            v = state.get(k)
            if v not in (None, ""):
                out[k] = v
        return out

    async def restore(self, sid: str) -> dict | None:
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
            if mirrored.status not in TERMINAL and sid not in self.local.inflight and sid not in self.fallback:
                await self.redis.push(sid)
                self.local.wakeup.set()
                self.metrics.recoveries.labels("restore").inc()
        except TRANSIENT as exc:  # Redis is down: the answer still comes from the mirror
            log.info("ingest: could not re-cache the state of %s in Redis (%r)", sid, exc)
        return {k: v for k, v in state.items() if v is not None}
