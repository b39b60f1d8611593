"""DELETE /strategies/{strategy_id}."""

from __future__ import annotations

from qmtl.dagmanager.service import DagManagerService


async def release_strategy(ctx: DagManagerService, strategy_id: str):
    return await ctx.release_strategy(strategy_id)
