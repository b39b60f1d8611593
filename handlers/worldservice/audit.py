"""The audit log."""

from __future__ import annotations

from typing import TYPE_CHECKING

from handlers.worldservice._common import caller

if TYPE_CHECKING:
    from qmtl.worldservice.service import WorldService


async def get_audit(ctx: WorldService, world_id, limit=50, cursor=None):
    return await ctx.audit.page(caller(ctx), world_id, limit=limit, cursor=cursor)
