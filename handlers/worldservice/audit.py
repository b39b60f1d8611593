"""The audit log."""

from __future__ import annotations

from handlers.worldservice._common import caller


async def get_audit(ctx, world_id, limit=50, cursor=None):
    return await ctx.audit_page(caller(ctx), world_id, limit=limit, cursor=cursor)
