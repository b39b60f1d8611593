"""GET /sentinels/{sentinel_id}, POST /callbacks/sentinel-traffic."""

from __future__ import annotations

from qmtl.dagmanager.service import DagManagerService


async def get_sentinel(ctx: DagManagerService, sentinel_id: str):
    return await ctx.get_sentinel(sentinel_id)


async def sentinel_traffic(ctx: DagManagerService, body: dict):
    stored = await ctx.set_sentinel_weight(
        weight=body["weight"], sentinel_id=body.get("sentinel_id"), version=body.get("version")
    )
    return stored, 202
