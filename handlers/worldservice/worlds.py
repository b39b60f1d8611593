"""/worlds and /worlds/{world_id}."""

from __future__ import annotations

from handlers.worldservice._common import caller


async def list_worlds(ctx, limit=100, cursor=None):
    return await ctx.list_worlds(caller(ctx), limit=limit, cursor=cursor)


async def create_world(ctx, body):
    world = await ctx.create_world(caller(ctx), body)
    return world, 201, {"Location": f"/worlds/{world['world_id']}"}


async def get_world(ctx, world_id):
    return await ctx.get_world(caller(ctx), world_id)


async def update_world(ctx, world_id, body):
    return await ctx.update_world(caller(ctx), world_id, body)


async def delete_world(ctx, world_id):
    await ctx.delete_world(caller(ctx), world_id)
    return None, 204
