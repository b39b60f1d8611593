"""GET /sentinels/{sentinel_id}, POST /callbacks/sentinel-traffic."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qmtl.dagmanager.service import DagManagerService


async def get_sentinel(ctx: DagManagerService, sentinel_id: str) -> dict[str, Any]:
    return await ctx.sentinels.get(sentinel_id)


async def sentinel_traffic(ctx: DagManagerService, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    stored = await ctx.sentinels.set_weight(
        weight=body["weight"], sentinel_id=body.get("sentinel_id"), version=body.get("version")
    )
    return stored, 202
