"""Evaluate: a plan under the world's default policy and its current activation, from
strategies in the request or those known from observations. Changes nothing (audited).
Applying a plan is :mod:`.apply`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from qmtl.common.errors import Conflict
from qmtl.worldservice import policy as pol
from qmtl.worldservice import store, views
from qmtl.worldservice.audit import AuditLog
from qmtl.worldservice.params import ts_body, unique_strategy_ids
from qmtl.worldservice.policies import Policies
from qmtl.worldservice.rbac import READER, Identity
from qmtl.worldservice.repository import Repository


class Plans:
    def __init__(self, repo: Repository, audit: AuditLog, policies: Policies) -> None:
        self.repo = repo
        self.audit = audit
        self.policies = policies

    async def evaluate(self, actor: Identity, world_id: str, body: Mapping[str, Any]) -> dict:
        """A plan under the default policy and the current activation; changes nothing (audited).

        Without ``strategies`` in the body (the documented Aug-2025 form ``{"as_of": ...}``),
        the strategies judged are those known from observations: each one's latest metrics
        recorded with ``PUT /worlds/{id}/observations`` (``strategies``)."""
        actor.require(world_id, READER, "evaluating a world")
        views.require_storable_text(body)
        supplied = body.get("strategies")
        if supplied is not None:
            unique_strategy_ids(supplied, "/strategies")
        when = ts_body(body["as_of"], "/as_of") if body.get("as_of") else self.repo.now()
        async with self.repo.db.connect() as conn:
            world = await self.repo.world(conn, world_id)
            version = int(world["default_policy_version"] or 0)
            policy = await self.policies.policy(conn, world_id, version)
            if policy is None:
                raise Conflict(f"world {world_id!r} has no default policy to evaluate with")
            entries = await self.repo.entries(conn, world_id)
            if supplied is None:
                so = store.strategy_observations
                rows = (await conn.execute(
                    sa.select(so).where(so.c.world_id == world_id).order_by(so.c.strategy_id))).mappings().all()
        current = {(e["strategy_id"], e["side"]): (e["active"], e["weight"]) for e in entries}
        if supplied is not None:
            source = "from the request"
            inputs = [
                pol.StrategyInput(
                    strategy_id=s["strategy_id"],
                    metrics={k: float(v) for k, v in s["metrics"].items()},
                    samples=s.get("samples"),
                    data_end=ts_body(s["data_end"], f"/strategies/{i}/data_end") if s.get("data_end") else None,
                    sides=tuple(s.get("sides") or pol.SIDES),
                )
                for i, s in enumerate(supplied)
            ]
        else:
            source = "known from observations"
            inputs = [
                pol.StrategyInput(
                    strategy_id=r["strategy_id"],
                    metrics={k: float(v) for k, v in (r["metrics"] or {}).items()},
                    samples=int(r["samples"]) if r["samples"] is not None else None,
                    data_end=store.utc(r["data_end"]),
                    sides=tuple(r["sides"] or pol.SIDES),
                )
                for r in rows
            ]
        plan = pol.make_plan(policy, inputs, current, when)
        rejected = len(inputs) - len(plan.topk)
        notes = (
            f"policy v{version} at {views.iso(when)}: {len(inputs)} strateg{'y' if len(inputs) == 1 else 'ies'} judged "
            f"({source}); {len(plan.topk)} selected, {rejected} rejected, {len(plan.kept)} kept (active, not judged)"
        )
        if supplied is None and not inputs:
            notes += "; no strategy observations are recorded for this world (PUT /worlds/{id}/observations with strategies)"
        out = {
            "world_id": world_id,
            "policy_version": version,
            "as_of": views.iso(when),
            "activate": plan.activate,
            "deactivate": plan.deactivate,
            "reasons": plan.reasons,
            "scores": {k: v for k, v in plan.scores.items() if math.isfinite(v)},
            "topk": plan.topk,
            "promote": plan.promote,
            "demote": plan.demote,
            "notes": notes,
        }
        async with self.repo.db.begin() as conn:
            await self.audit.record(
                conn, world_id, actor, "plan.evaluated",
                {"strategies": len(inputs), "source": "request" if supplied is not None else "observations", "as_of": out["as_of"]},
                {"policy_version": version, "activate": plan.activate, "deactivate": plan.deactivate, "reasons": plan.reasons,
                 "topk": plan.topk},
            )
        return out
