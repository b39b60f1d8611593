"""Observations and decisions."""

from __future__ import annotations

from typing import TYPE_CHECKING

from handlers.worldservice._common import caller, not_modified, quoted

if TYPE_CHECKING:
    from qmtl.worldservice.service import WorldService


async def record_observation(ctx: WorldService, world_id, body):
    return await ctx.decisions.record_observation(caller(ctx), world_id, body)


async def get_observation(ctx: WorldService, world_id):
    return await ctx.decisions.state(caller(ctx), world_id)


async def decide(ctx: WorldService, world_id, as_of=None):
    envelope = await ctx.decisions.decide(caller(ctx), world_id, as_of)
    headers = {"ETag": quoted(envelope["etag"]), "Cache-Control": f"max-age={ctx.decisions.ttl_seconds}"}
    if not_modified(envelope["etag"]):
        return None, 304, {"ETag": headers["ETag"]}
    return envelope, 200, headers
