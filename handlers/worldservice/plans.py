"""Evaluate (a read-only plan) and the 2-phase apply."""

from __future__ import annotations

from typing import TYPE_CHECKING

from handlers.worldservice._common import caller

if TYPE_CHECKING:
    from qmtl.worldservice.service import WorldService


async def evaluate(ctx: WorldService, world_id, body):
    return await ctx.plans.evaluate(caller(ctx), world_id, body)


async def apply(ctx: WorldService, world_id, body):
    result, replayed = await ctx.applies.apply(caller(ctx), world_id, body)
    return result, 200, {"Idempotent-Replayed": "true" if replayed else "false"}
