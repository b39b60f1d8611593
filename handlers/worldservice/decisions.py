"""Observations and decisions."""

from __future__ import annotations

from handlers.worldservice._common import caller, not_modified, quoted


async def record_observation(ctx, world_id, body):
    return await ctx.record_observation(caller(ctx), world_id, body)


async def get_observation(ctx, world_id):
    return await ctx.get_decision_state(caller(ctx), world_id)


async def decide(ctx, world_id, as_of=None):
    envelope = await ctx.decide(caller(ctx), world_id, as_of)
    headers = {"ETag": quoted(envelope["etag"]), "Cache-Control": f"max-age={ctx.decision_ttl_seconds}"}
    if not_modified(envelope["etag"]):
        return None, 304, {"ETag": headers["ETag"]}
    return envelope, 200, headers
