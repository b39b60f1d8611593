"""Worlds: create, list, read, update, delete (soft: a deleted world's id is never reused)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from qmtl.common.errors import Conflict
from qmtl.contracts.constants import WorldState
from qmtl.worldservice import store, views
from qmtl.worldservice.audit import AuditLog
from qmtl.worldservice.params import decode_cursor, encode_cursor
from qmtl.worldservice.rbac import OWNER, READER, Identity
from qmtl.worldservice.repository import Repository


def world_out(row: Mapping[str, Any]) -> dict:
    """A world row as the World schema has it."""
    return {
        "world_id": row["world_id"],
        "name": row["name"],
        "description": row["description"] or "",
        "owner": row["owner"],
        "labels": dict(row["labels"] or {}),
        "state": row["state"],
        "default_policy_version": int(row["default_policy_version"] or 0),
        "allow_live": bool(row["allow_live"]),
        "circuit_breaker": bool(row["circuit_breaker"]),
        "apply_run_id": row["apply_run_id"],
        "created_at": views.iso(row["created_at"]),
        "updated_at": views.iso(row["updated_at"]),
    }


def _exists(world_id: str, state: str) -> Conflict:
    if state == WorldState.DELETED:
        return Conflict(f"world id {world_id!r} belonged to a deleted world and cannot be reused")
    return Conflict(f"world {world_id!r} already exists")


class Worlds:
    def __init__(self, repo: Repository, audit: AuditLog) -> None:
        self.repo = repo
        self.audit = audit

    async def create(self, actor: Identity, body: Mapping[str, Any]) -> dict:
        world_id = body["world_id"]
        actor.require(world_id, OWNER, "creating a world")
        views.require_storable_text(body)
        now = self.repo.now()
        values = {
            "world_id": world_id,
            "name": body["name"],
            "description": body.get("description", ""),
            "owner": body.get("owner") or actor.subject,
            "labels": dict(body.get("labels") or {}),
            "state": WorldState.ACTIVE,
            "default_policy_version": 0,
            "allow_live": bool(body.get("allow_live", False)),
            "circuit_breaker": bool(body.get("circuit_breaker", False)),
            "rev": 0,
            "gate_epoch": 0,
            "gate_changed_at": None,
            "apply_run_id": None,
            "apply_started_at": None,
            "created_at": now,
            "updated_at": now,
        }
        async with self.repo.lock(world_id):
            try:
                async with self.repo.db.begin() as conn:
                    existing = (
                        await conn.execute(sa.select(store.worlds.c.state).where(store.worlds.c.world_id == world_id))
                    ).scalar_one_or_none()
                    if existing is not None:
                        raise _exists(world_id, existing)
                    await conn.execute(store.worlds.insert().values(**values))
                    out = world_out(values)
                    await self.audit.record(conn, world_id, actor, "world.created", body, out)
            except IntegrityError:
                raise _exists(world_id, WorldState.ACTIVE) from None
        return out

    async def list(self, actor: Identity, *, limit: int = 100, cursor: str | None = None) -> dict:
        w = store.worlds
        q = sa.select(w).where(w.c.state != WorldState.DELETED).order_by(w.c.world_id).limit(limit + 1)
        if cursor:
            q = q.where(w.c.world_id > decode_cursor(cursor))
        if not actor.has("*", READER):
            readable = [wid for wid in actor.world_roles if wid != "*" and actor.has(wid, READER)]
            q = q.where(w.c.world_id.in_(readable))
        async with self.repo.db.connect() as conn:
            rows = (await conn.execute(q)).mappings().all()
        page = rows[:limit]
        next_cursor = encode_cursor(page[-1]["world_id"]) if len(rows) > limit else None
        return {"worlds": [world_out(r) for r in page], "next_cursor": next_cursor}

    async def get(self, actor: Identity, world_id: str) -> dict:
        actor.require(world_id, READER, "reading a world")
        async with self.repo.db.connect() as conn:
            return world_out(await self.repo.world(conn, world_id))

    async def update(self, actor: Identity, world_id: str, body: Mapping[str, Any]) -> dict:
        actor.require(world_id, OWNER, "updating a world")
        views.require_storable_text(body)
        async with self.repo.write(world_id) as (conn, world):
            changes = {k: v for k, v in body.items() if world.get(k) != v}
            if "labels" in changes:
                changes["labels"] = dict(changes["labels"])
            now = self.repo.now()
            entries = await self.repo.entries(conn, world_id)
            before = views.view(world, entries, include_freeze=False)
            new = dict(world, **changes, updated_at=now)
            if views.gate_of(new, include_freeze=False) != views.gate_of(world, include_freeze=False):
                new["gate_epoch"] = int(world["gate_epoch"] or 0) + 1
                new["gate_changed_at"] = now
            values = {k: new[k] for k in (*changes, "updated_at", "gate_epoch", "gate_changed_at")}
            await conn.execute(store.worlds.update().where(store.worlds.c.world_id == world_id).values(**values))
            emitted = await self.repo.emit_activation(conn, world_id, before, views.view(new, entries, include_freeze=False))
            out = world_out(new)
            await self.audit.record(conn, world_id, actor, "world.updated", body, {"changed": sorted(changes), "activation_events": emitted})
        return out

    async def delete(self, actor: Identity, world_id: str) -> None:
        actor.require(world_id, OWNER, "deleting a world")
        async with self.repo.write(world_id) as (conn, world):
            if world["apply_run_id"]:
                raise Conflict(f"apply {world['apply_run_id']!r} is in flight on world {world_id!r}; delete it afterwards", headers={"Retry-After": "1"})
            now = self.repo.now()
            entries = await self.repo.entries(conn, world_id)
            before = views.view(world, entries, include_freeze=False)
            new = dict(world, state=WorldState.DELETED, updated_at=now, gate_epoch=int(world["gate_epoch"] or 0) + 1, gate_changed_at=now)
            await conn.execute(
                store.worlds.update()
                .where(store.worlds.c.world_id == world_id)
                .values(state=WorldState.DELETED, updated_at=now, gate_epoch=new["gate_epoch"], gate_changed_at=now)
            )
            emitted = await self.repo.emit_activation(conn, world_id, before, views.view(new, entries, include_freeze=False))
            await self.audit.record(conn, world_id, actor, "world.deleted", {}, {"state": WorldState.DELETED, "activation_events": emitted})
