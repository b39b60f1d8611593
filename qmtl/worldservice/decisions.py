"""Observations and decisions: an observation judges the world's latest data under its
default policy and advances its hysteresis (``ws_decisions``, plus each strategy's latest
metrics in ``ws_strategy_observations``); a decision reads the effective mode at ``as_of``
from that state (a pure read, the DecisionEnvelope)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from qmtl.common.config import ConfigError
from qmtl.common.errors import Conflict, NotFound
from qmtl.contracts.constants import WorldState
from qmtl.worldservice import policy as pol
from qmtl.worldservice import store, views
from qmtl.worldservice.audit import AuditLog
from qmtl.worldservice.decision_cache import DecisionCache, DecisionInputs
from qmtl.worldservice.metrics import WorldServiceMetrics
from qmtl.worldservice.params import ts_body, ts_param, unique_strategy_ids
from qmtl.worldservice.policies import Policies
from qmtl.worldservice.rbac import OPERATOR, READER, Identity
from qmtl.worldservice.repository import Conn, Repository


def _ttl_seconds(ttl: str) -> int:
    try:
        return int(pol.parse_duration(ttl))
    except ValueError as exc:
        raise ConfigError(f"worldservice.decision_ttl: {exc}") from None


def _hysteresis(row: Mapping[str, Any] | None) -> pol.HysteresisState | None:
    if row is None:
        return None
    since = store.utc(row["mode_since"])
    assert since is not None  # NOT NULL
    return pol.HysteresisState(mode=row["mode"], since=since, passes=int(row["passes"]), fails=int(row["fails"]), mode_reason=row["mode_reason"])


def _state_out(row: Mapping[str, Any]) -> dict:
    return {
        "world_id": row["world_id"],
        "policy_version": int(row["policy_version"]),
        "mode": row["mode"],
        "mode_since": views.iso(row["mode_since"]),
        "consecutive_passes": int(row["passes"]),
        "consecutive_fails": int(row["fails"]),
        "passed": bool(row["passed"]),
        "score": float(row["score"]),
        "reasons": list(row["reasons"]),
        "observation": {"data_end": views.iso(row["data_end"]), "samples": int(row["samples"]), "metrics": dict(row["metrics"])},
        "recorded_at": views.iso(row["recorded_at"]),
    }


class Decisions:
    def __init__(self, repo: Repository, audit: AuditLog, policies: Policies, metrics: WorldServiceMetrics, *, ttl: str,
                 cache: DecisionCache) -> None:
        """``ttl``: the envelopes' ``ttl`` (a duration, e.g. ``10s``; also their max-age)."""
        self.repo = repo
        self.audit = audit
        self.policies = policies
        self.metrics = metrics
        self.ttl = ttl
        self.ttl_seconds = _ttl_seconds(ttl)
        self.cache = cache
        # decide reads the world's decision inputs and its hysteresis state in one statement
        # (one round trip, only the columns a decision depends on), or only its rev to
        # confirm a cached entry (see qmtl.worldservice.decision_cache)
        w, d = store.worlds, store.decisions
        self._inputs_query = (
            sa.select(w.c.rev, w.c.default_policy_version, w.c.allow_live, w.c.state, w.c.circuit_breaker,
                      d.c.world_id.label("d_world_id"), d.c.mode, d.c.mode_since, d.c.passes, d.c.fails, d.c.mode_reason,
                      d.c.data_end)
            .select_from(w.outerjoin(d, d.c.world_id == w.c.world_id))
            .where(w.c.world_id == sa.bindparam("world_id"), w.c.state != WorldState.DELETED)
        )
        self._rev_query = sa.select(w.c.rev).where(w.c.world_id == sa.bindparam("world_id"), w.c.state != WorldState.DELETED)

    async def record_observation(self, actor: Identity, world_id: str, body: Mapping[str, Any]) -> dict:
        """Judge the world's latest data under its default policy and advance its hysteresis."""
        actor.require(world_id, OPERATOR, "recording an observation")
        views.require_storable_text(body)
        async with self.repo.write(world_id) as (conn, world):
            version = int(world["default_policy_version"] or 0)
            policy = await self.policies.policy(conn, world_id, version)
            if policy is None:
                raise Conflict(f"world {world_id!r} has no default policy to judge observations with")
            now = self.repo.now()
            data_end = ts_body(body["data_end"], "/data_end")
            samples = int(body["samples"])
            metrics = {k: float(v) for k, v in body["metrics"].items()}
            d = store.decisions
            row = (await conn.execute(sa.select(d).where(d.c.world_id == world_id))).mappings().first()
            state = _hysteresis(row) or pol.initial_state(now)
            reasons: list[str] = []
            if row is not None and int(row["policy_version"]) != version:
                state = pol.HysteresisState(state.mode, state.since, 0, 0, state.mode_reason)
                reasons.append(f"policy changed from v{row['policy_version']} to v{version}: counters reset")
            judgement = pol.judge(policy, metrics=metrics, samples=samples, data_end=data_end, now=now)
            new_state, step = pol.step_hysteresis(policy, state, judgement.passed, now, allow_live=bool(world["allow_live"]))
            reasons = list(judgement.reasons) + reasons + [step]
            values = {
                "world_id": world_id,
                "policy_version": version,
                "mode": new_state.mode,
                "mode_since": new_state.since,
                "mode_reason": new_state.mode_reason,
                "passes": new_state.passes,
                "fails": new_state.fails,
                "passed": judgement.passed,
                "score": judgement.score if judgement.score is not None and math.isfinite(judgement.score) else 0.0,
                "reasons": reasons,
                "data_end": data_end,
                "samples": samples,
                "metrics": metrics,
                "recorded_at": now,
            }
            if row is None:
                await conn.execute(d.insert().values(**values))
            else:
                await conn.execute(d.update().where(d.c.world_id == world_id).values(**values))
            await self._record_strategy_observations(conn, world_id, body.get("strategies") or [], now)
            out = _state_out(values)
            await self.audit.record(
                conn, world_id, actor, "observation.recorded", dict(body),
                {"passed": judgement.passed, "mode": new_state.mode, "previous_mode": state.mode, "reasons": reasons},
            )
        return out

    async def _record_strategy_observations(self, conn: Conn, world_id: str, strategies: Sequence[Mapping[str, Any]], now: datetime) -> None:
        """Keep each strategy's latest data (what an evaluate without ``strategies`` judges)."""
        unique_strategy_ids(strategies, "/strategies")
        so = store.strategy_observations
        for i, s in enumerate(strategies):
            values = {
                "metrics": {k: float(v) for k, v in s["metrics"].items()},
                "samples": s.get("samples"),
                "data_end": ts_body(s["data_end"], f"/strategies/{i}/data_end") if s.get("data_end") else None,
                "sides": list(s["sides"]) if s.get("sides") else None,
                "recorded_at": now,
            }
            where = (so.c.world_id == world_id) & (so.c.strategy_id == s["strategy_id"])
            res = await conn.execute(so.update().where(where).values(**values))
            if not res.rowcount:
                await conn.execute(so.insert().values(world_id=world_id, strategy_id=s["strategy_id"], **values))

    async def state(self, actor: Identity, world_id: str) -> dict:
        """The world's decision state (hysteresis and latest observation)."""
        actor.require(world_id, READER, "reading the decision state")
        async with self.repo.db.connect() as conn:
            await self.repo.world(conn, world_id)
            d = store.decisions
            row = (await conn.execute(sa.select(d).where(d.c.world_id == world_id))).mappings().first()
        if row is None:
            raise NotFound(f"world {world_id!r} has no observation recorded")
        return _state_out(row)

    async def decide(self, actor: Identity, world_id: str, as_of: str | datetime | None = None) -> dict:
        """The DecisionEnvelope at ``as_of`` (default now). A pure read."""
        actor.require(world_id, READER, "reading a decision")
        started = time.perf_counter()
        when = ts_param(as_of, "as_of") if as_of is not None else self.repo.now()
        inputs = await self._inputs(world_id)
        mode, reason = pol.decide(
            inputs.policy,
            inputs.state,
            data_end=inputs.data_end,
            as_of=when,
            allow_live=inputs.allow_live,
            suspended=inputs.suspended,
            circuit_breaker=inputs.circuit_breaker,
        )
        version = inputs.policy_version
        envelope = {
            "world_id": world_id,
            "policy_version": version,
            "effective_mode": mode,
            "reason": reason,
            "as_of": views.iso(when),
            "ttl": self.ttl,
            "etag": views.decision_etag(world_id, version, mode, reason),
        }
        self.metrics.decide_latency_ms.observe((time.perf_counter() - started) * 1000)
        return envelope

    async def _inputs(self, world_id: str) -> DecisionInputs:
        """The world's decision inputs: from the cache when they are current, else one read."""
        cached = self.cache.get(world_id)
        if cached is not None and not self.cache.shared_database:
            return cached
        generation = self.cache.generation()
        async with self.repo.db.connect() as conn:
            if cached is not None:
                rev = (await conn.execute(self._rev_query, {"world_id": world_id})).scalar_one_or_none()
                if rev == cached.rev:
                    return cached
            row = (await conn.execute(self._inputs_query, {"world_id": world_id})).mappings().first()
            if row is None:
                raise NotFound(f"world {world_id!r} not found")
            version = int(row["default_policy_version"] or 0)
            policy = await self.policies.policy(conn, world_id, version)  # cached per (world, version) after the first read
        observed = row["d_world_id"] is not None
        inputs = DecisionInputs(
            rev=int(row["rev"]),
            policy_version=version,
            policy=policy,
            state=_hysteresis(row) if observed else None,
            data_end=store.utc(row["data_end"]) if observed else None,
            allow_live=bool(row["allow_live"]),
            suspended=row["state"] == WorldState.SUSPENDED,
            circuit_breaker=bool(row["circuit_breaker"]),
        )
        self.cache.put(world_id, generation, inputs)
        return inputs
