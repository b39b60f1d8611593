"""Activation: one entry (read, conditional operator override), the whole set and its
state hash. What readers see of the stored entries is shaped by :mod:`.views` (gates)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from qmtl.common import http
from qmtl.common.errors import Conflict, PreconditionFailed
from qmtl.contracts.constants import StreamTopic
from qmtl.worldservice import store, views
from qmtl.worldservice.audit import AuditLog
from qmtl.worldservice.rbac import OPERATOR, READER, Identity
from qmtl.worldservice.repository import Repository


class Activation:
    def __init__(self, repo: Repository, audit: AuditLog) -> None:
        self.repo = repo
        self.audit = audit

    async def get(self, actor: Identity, world_id: str, strategy_id: str, side: str) -> dict:
        """The entry as readers see it; an entry the world never had reads inactive (weight 0)."""
        return (await self.get_gated(actor, world_id, strategy_id, side))[0]

    async def get_gated(self, actor: Identity, world_id: str, strategy_id: str, side: str) -> tuple[dict, str | None]:
        """``(envelope, gate)``: gate says why the world reads inactive (apply, suspended, circuit_breaker) or None."""
        actor.require(world_id, READER, "reading activation")
        async with self.repo.db.connect() as conn:
            world = await self.repo.world(conn, world_id)
            a = store.activations
            row = (
                await conn.execute(
                    sa.select(a).where(a.c.world_id == world_id, a.c.strategy_id == strategy_id, a.c.side == side)
                )
            ).mappings().first()
        gate = views.gate_of(world, include_freeze=True)
        if row is None:
            return views.absent_envelope(world, strategy_id, side), gate
        return views.envelope(world, views.entry_from_row(row), gate), gate

    async def get_all(self, actor: Identity, world_id: str) -> dict:
        actor.require(world_id, READER, "reading activation")
        async with self.repo.db.connect() as conn:
            world = await self.repo.world(conn, world_id)
            entries = await self.repo.entries(conn, world_id)
        v = views.view(world, entries, include_freeze=True)
        return {
            "world_id": world_id,
            "state_hash": views.state_hash(v),
            "frozen": bool(world["apply_run_id"]),
            "activations": [v[k] for k in sorted(v)],
        }

    async def state_hash(self, actor: Identity, world_id: str) -> dict:
        full = await self.get_all(actor, world_id)
        return {"world_id": world_id, "topic": StreamTopic.ACTIVATION, "state_hash": full["state_hash"]}

    async def override(self, actor: Identity, world_id: str, body: Mapping[str, Any], *, if_match: str | None = None) -> dict:
        """Operator override of one entry; ``if_match`` (an etag or ``*``) makes it conditional (412)."""
        actor.require(world_id, OPERATOR, "overriding activation")
        views.require_storable_text(body)
        sid, side, active = body["strategy_id"], body["side"], bool(body["active"])
        weight = float(body.get("weight", 1.0)) if active else 0.0
        async with self.repo.write(world_id) as (conn, world):
            if world["apply_run_id"]:
                raise Conflict(
                    f"apply {world['apply_run_id']!r} is in flight on world {world_id!r}; retry after it completes",
                    headers={"Retry-After": "1"},
                )
            entries = await self.repo.entries(conn, world_id)
            current = next((e for e in entries if e["strategy_id"] == sid and e["side"] == side), None)
            if if_match is not None:
                seen = views.envelope(world, current, views.gate_of(world, include_freeze=True)) if current else views.absent_envelope(world, sid, side)
                if not http.if_match(if_match, seen["etag"]):
                    raise PreconditionFailed(
                        f"the activation of {sid}/{side} changed (etag {seen['etag']}); read it again",
                        ext={"etag": seen["etag"]},
                    )
            before = views.view(world, entries, include_freeze=False)
            changed = current is None or current["active"] != active or not math.isclose(current["weight"], weight, abs_tol=1e-12)
            if changed:
                now = self.repo.now()
                entry = {
                    "strategy_id": sid, "side": side, "active": active, "weight": weight,
                    "etag": views.entry_etag(world_id, sid, side, active, weight, world["rev"]),
                    "run_id": None, "ts": now,
                }
                await self.repo.put_entry(conn, world_id, entry, exists=current is not None)
                entries = [e for e in entries if (e["strategy_id"], e["side"]) != (sid, side)] + [entry]
                current = entry
            after = views.view(world, entries, include_freeze=False)
            emitted = await self.repo.emit_activation(conn, world_id, before, after)
            assert current is not None
            out = views.envelope(world, current, views.gate_of(world, include_freeze=True))
            await self.audit.record(
                conn, world_id, actor, "activation.override", dict(body),
                {"changed": changed, "active": out["active"], "weight": out["weight"], "etag": out["etag"], "activation_events": emitted},
            )
        return out
