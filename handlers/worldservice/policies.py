"""Policy versions, the default policy and the policy state hash."""

from __future__ import annotations

from handlers.worldservice._common import caller


async def list_policies(ctx, world_id):
    return await ctx.list_policies(caller(ctx), world_id)


async def create_policy(ctx, world_id, body):
    policy = await ctx.create_policy(caller(ctx), world_id, body)
    return policy, 201, {"Location": f"/worlds/{world_id}/policies/{policy['version']}"}


async def get_policy(ctx, world_id, version):
    return await ctx.get_policy(caller(ctx), world_id, version)


async def set_default_policy(ctx, world_id, v):
    return await ctx.set_default_policy(caller(ctx), world_id, v)


async def get_policy_state_hash(ctx, world_id):
    return await ctx.policy_state_hash(caller(ctx), world_id)
