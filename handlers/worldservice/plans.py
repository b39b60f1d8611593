"""Evaluate (a read-only plan) and the 2-phase apply."""

from __future__ import annotations

from handlers.worldservice._common import caller


async def evaluate(ctx, world_id, body):
    return await ctx.evaluate(caller(ctx), world_id, body)


async def apply(ctx, world_id, body):
    result, replayed = await ctx.apply(caller(ctx), world_id, body)
    return result, 200, {"Idempotent-Replayed": "true" if replayed else "false"}
