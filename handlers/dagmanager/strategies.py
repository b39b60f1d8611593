"""DELETE /strategies/{strategy_id}."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qmtl.dagmanager.service import DagManagerService


async def release_strategy(ctx: DagManagerService, strategy_id: str) -> dict[str, Any]:
    return await ctx.strategies.release(strategy_id)
