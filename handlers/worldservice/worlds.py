"""/worlds and /worlds/{world_id}."""

from __future__ import annotations

from typing import TYPE_CHECKING

from handlers.worldservice._common import caller

if TYPE_CHECKING:
    from qmtl.worldservice.service import WorldService


async def list_worlds(ctx: WorldService, limit=100, cursor=None):
    return await ctx.worlds.list(caller(ctx), limit=limit, cursor=cursor)


async def create_world(ctx: WorldService, body):
    world = await ctx.worlds.create(caller(ctx), body)
    return world, 201, {"Location": f"/worlds/{world['world_id']}"}


async def get_world(ctx: WorldService, world_id):
    return await ctx.worlds.get(caller(ctx), world_id)


async def update_world(ctx: WorldService, world_id, body):
    return await ctx.worlds.update(caller(ctx), world_id, body)


async def delete_world(ctx: WorldService, world_id):
    await ctx.worlds.delete(caller(ctx), world_id)
    return None, 204
