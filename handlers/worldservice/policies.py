"""Policy versions, the default policy and the policy state hash."""

from __future__ import annotations

from typing import TYPE_CHECKING

from handlers.worldservice._common import caller

if TYPE_CHECKING:
    from qmtl.worldservice.service import WorldService


async def list_policies(ctx: WorldService, world_id):
    return await ctx.policies.list(caller(ctx), world_id)


async def create_policy(ctx: WorldService, world_id, body):
    policy = await ctx.policies.create(caller(ctx), world_id, body)
    return policy, 201, {"Location": f"/worlds/{world_id}/policies/{policy['version']}"}


async def get_policy(ctx: WorldService, world_id, version):
    return await ctx.policies.get(caller(ctx), world_id, version)


async def set_default_policy(ctx: WorldService, world_id, v):
    return await ctx.policies.set_default(caller(ctx), world_id, v)


async def get_policy_state_hash(ctx: WorldService, world_id):
    return await ctx.policies.state_hash(caller(ctx), world_id)
