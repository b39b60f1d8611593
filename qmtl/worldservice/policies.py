"""Policy versions of a world: add one (validated), read, list, set the default, the
policy state hash; and the parsed :class:`~qmtl.worldservice.policy.Policy` of a version
(cached per (world, version): a stored version never changes)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from qmtl.bus.base import TOPIC_POLICY
from qmtl.common.errors import NotFound, Unprocessable
from qmtl.common.statehash import policy_state_hash
from qmtl.contracts.constants import PolicyStatus, StreamTopic
from qmtl.worldservice import policy as pol
from qmtl.worldservice import store, views
from qmtl.worldservice.audit import AuditLog
from qmtl.worldservice.metrics import WorldServiceMetrics
from qmtl.worldservice.rbac import OWNER, READER, Identity
from qmtl.worldservice.repository import Conn, Repository
from qmtl.worldservice.worlds import world_out


def _summary(row: Mapping[str, Any]) -> dict:
    return {
        "world_id": row["world_id"],
        "version": int(row["version"]),
        "checksum": row["checksum"],
        "status": row["status"],
        "created_by": row["created_by"],
        "created_at": views.iso(row["created_at"]),
    }


class Policies:
    def __init__(self, repo: Repository, audit: AuditLog, parser: pol.PolicyParser, metrics: WorldServiceMetrics) -> None:
        self.repo = repo
        self.audit = audit
        self.parser = parser
        self.metrics = metrics
        self._cache: dict[tuple[str, int], pol.Policy] = {}

    async def policy(self, conn: Conn, world_id: str, version: int) -> pol.Policy | None:
        """Version ``version`` of the world's policy (None for version 0 or a missing one)."""
        if not version:
            return None
        key = (world_id, int(version))
        cached = self._cache.get(key)
        if cached is None:
            p = store.policies
            text = (
                await conn.execute(sa.select(p.c.yaml).where(p.c.world_id == world_id, p.c.version == version))
            ).scalar_one_or_none()
            if text is None:
                return None
            cached = pol.Policy.from_document(self.parser.parse(text), version=int(version))
            self._cache[key] = cached
        return cached

    async def create(self, actor: Identity, world_id: str, body: Mapping[str, Any]) -> dict:
        actor.require(world_id, OWNER, "adding a policy version")
        views.require_storable_text(body)
        text: str = body["yaml"]
        set_default = bool(body.get("set_default", False))
        digest = pol.checksum(text)
        try:
            document = self.parser.parse(text)
        except pol.PolicyError as exc:
            self.metrics.policy_rejected.inc()
            async with self.repo.write(world_id) as (conn, world):
                await self.audit.record(
                    conn, world_id, actor, "policy.rejected",
                    {"checksum": digest, "set_default": set_default},
                    {"error": str(exc), "errors": exc.errors, "default_policy_version": int(world["default_policy_version"] or 0)},
                )
            errors = []
            for e in exc.errors:
                item = {"pointer": "/yaml", "message": e["message"]}
                if "pointer" in e:
                    item["document_pointer"] = e["pointer"]
                for k in ("line", "column"):
                    if e.get(k) is not None:
                        item[k] = e[k]
                errors.append(item)
            raise Unprocessable(f"{exc}; the world's default policy is unchanged", ext={"errors": errors}) from None
        async with self.repo.write(world_id) as (conn, world):
            p = store.policies
            now = self.repo.now()
            current = (await conn.execute(sa.select(sa.func.max(p.c.version)).where(p.c.world_id == world_id))).scalar_one_or_none()
            version = int(current or 0) + 1
            row = {
                "world_id": world_id,
                "version": version,
                "yaml": text,
                "checksum": digest,
                "status": PolicyStatus.ACTIVE if set_default else PolicyStatus.DRAFT,
                "created_by": actor.subject,
                "created_at": now,
            }
            await conn.execute(p.insert().values(**row))
            if set_default:
                await self._switch_default(conn, world, version, now)
            else:
                await self.repo.outbox.add(conn, TOPIC_POLICY, world_id, views.policy_event(world_id, version, digest, PolicyStatus.DRAFT, now))
            out = dict(_summary(row), yaml=text, document=document)
            await self.audit.record(
                conn, world_id, actor, "policy.created",
                {"checksum": digest, "set_default": set_default},
                {"version": version, "status": row["status"]},
            )
        self._cache[(world_id, version)] = pol.Policy.from_document(document, version=version)
        return out

    async def _switch_default(self, conn: Conn, world: Mapping[str, Any], version: int, now: datetime) -> None:
        """Make ``version`` the default (ACTIVE), the previous default DEPRECATED; events in that order."""
        p = store.policies
        outbox = self.repo.outbox
        world_id = world["world_id"]
        old = int(world["default_policy_version"] or 0)
        if old and old != version:
            await conn.execute(p.update().where(p.c.world_id == world_id, p.c.version == old).values(status=PolicyStatus.DEPRECATED))
            old_sum = (await conn.execute(sa.select(p.c.checksum).where(p.c.world_id == world_id, p.c.version == old))).scalar_one()
            await outbox.add(conn, TOPIC_POLICY, world_id, views.policy_event(world_id, old, old_sum, PolicyStatus.DEPRECATED, now))
        await conn.execute(p.update().where(p.c.world_id == world_id, p.c.version == version).values(status=PolicyStatus.ACTIVE))
        new_sum = (await conn.execute(sa.select(p.c.checksum).where(p.c.world_id == world_id, p.c.version == version))).scalar_one()
        await conn.execute(
            store.worlds.update().where(store.worlds.c.world_id == world_id).values(default_policy_version=version, updated_at=now)
        )
        await outbox.add(conn, TOPIC_POLICY, world_id, views.policy_event(world_id, version, new_sum, PolicyStatus.ACTIVE, now))

    async def list(self, actor: Identity, world_id: str) -> dict:
        actor.require(world_id, READER, "listing policies")
        async with self.repo.db.connect() as conn:
            world = await self.repo.world(conn, world_id)
            p = store.policies
            rows = (await conn.execute(sa.select(p).where(p.c.world_id == world_id).order_by(p.c.version))).mappings().all()
        return {
            "world_id": world_id,
            "default_version": int(world["default_policy_version"] or 0),
            "policies": [_summary(r) for r in rows],
        }

    async def get(self, actor: Identity, world_id: str, version: int) -> dict:
        actor.require(world_id, READER, "reading a policy")
        async with self.repo.db.connect() as conn:
            await self.repo.world(conn, world_id)
            p = store.policies
            row = (await conn.execute(sa.select(p).where(p.c.world_id == world_id, p.c.version == version))).mappings().first()
        if row is None:
            raise NotFound(f"world {world_id!r} has no policy version {version}")
        return dict(_summary(row), yaml=row["yaml"], document=self.parser.parse(row["yaml"]))

    async def set_default(self, actor: Identity, world_id: str, version: int) -> dict:
        actor.require(world_id, OWNER, "setting the default policy")
        async with self.repo.write(world_id) as (conn, world):
            p = store.policies
            exists = (
                await conn.execute(sa.select(p.c.version).where(p.c.world_id == world_id, p.c.version == version))
            ).scalar_one_or_none()
            if exists is None:
                raise NotFound(f"world {world_id!r} has no policy version {version}")
            previous = int(world["default_policy_version"] or 0)
            now = self.repo.now()
            if previous != version:
                await self._switch_default(conn, world, version, now)
                world = dict(world, default_policy_version=version, updated_at=now)
            await self.audit.record(
                conn, world_id, actor, "policy.default_set",
                {"version": version}, {"previous": previous, "default_policy_version": version, "changed": previous != version},
            )
            out = world_out(world)
        return out

    async def state_hash(self, actor: Identity, world_id: str) -> dict:
        actor.require(world_id, READER, "reading the policy state")
        async with self.repo.db.connect() as conn:
            world = await self.repo.world(conn, world_id)
            version = int(world["default_policy_version"] or 0)
            checksum = status = None
            if version:
                p = store.policies
                row = (
                    await conn.execute(sa.select(p.c.checksum, p.c.status).where(p.c.world_id == world_id, p.c.version == version))
                ).first()
                checksum, status = row.checksum, row.status
        return {"world_id": world_id, "topic": StreamTopic.POLICY, "state_hash": policy_state_hash(world_id, version, checksum, status)}
