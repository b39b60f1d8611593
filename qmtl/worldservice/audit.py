"""The audit log: every write records who did what, in the write's own transaction
(:meth:`AuditLog.record`), and readers page through it newest first (:meth:`AuditLog.page`)."""

from __future__ import annotations

from collections.abc import Mapping

import sqlalchemy as sa

from qmtl.common import correlation
from qmtl.common.errors import BadRequest
from qmtl.worldservice import store, views
from qmtl.worldservice.params import decode_cursor, encode_cursor
from qmtl.worldservice.rbac import READER, Identity
from qmtl.worldservice.repository import Conn, Repository


class AuditLog:
    def __init__(self, repo: Repository) -> None:
        self.repo = repo

    async def record(self, conn: Conn, world_id: str, actor: Identity, event: str, request: Mapping, result: Mapping) -> None:
        """In the caller's transaction: ``actor`` did ``event`` (with the request's correlation id)."""
        await self.record_as(conn, world_id, actor.subject, event, request, result, correlation_id=correlation.get())

    async def record_as(self, conn: Conn, world_id: str, subject: str, event: str, request: Mapping, result: Mapping,
                        *, correlation_id: str | None) -> None:
        """In the caller's transaction, for a subject that is not a caller (the service itself)."""
        await conn.execute(
            store.audit.insert().values(
                world_id=world_id,
                actor=subject,
                event=event,
                request=dict(request),
                result=dict(result),
                created_at=self.repo.now(),
                correlation_id=correlation_id,
            )
        )

    async def page(self, actor: Identity, world_id: str, *, limit: int = 50, cursor: str | None = None) -> dict:
        actor.require(world_id, READER, "reading the audit log")
        before_id: int | None = None
        if cursor:
            raw = decode_cursor(cursor)
            if not raw.isdigit():
                raise BadRequest(f"invalid cursor {cursor!r}", ext={"errors": [{"parameter": "cursor", "message": "invalid cursor"}]})
            before_id = int(raw)
        async with self.repo.db.connect() as conn:
            await self.repo.world(conn, world_id, include_deleted=True)
            a = store.audit
            q = sa.select(a).where(a.c.world_id == world_id).order_by(a.c.id.desc()).limit(limit + 1)
            if before_id is not None:
                q = q.where(a.c.id < before_id)
            rows = (await conn.execute(q)).mappings().all()
        page = rows[:limit]
        return {
            "world_id": world_id,
            "records": [
                {
                    "id": encode_cursor(str(r["id"])),
                    "world_id": r["world_id"],
                    "actor": r["actor"],
                    "event": r["event"],
                    "request": dict(r["request"] or {}),
                    "result": dict(r["result"] or {}),
                    "created_at": views.iso(r["created_at"]),
                    "correlation_id": r["correlation_id"],
                }
                for r in page
            ],
            "next_cursor": encode_cursor(str(page[-1]["id"])) if len(rows) > limit else None,
        }
