"""POST /diff and POST /diff/batch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qmtl.dagmanager.service import DagManagerService


async def diff(ctx: DagManagerService, body: dict[str, Any]) -> dict[str, Any]:
    result = await ctx.diffs.diff(
        body["strategy_id"],
        body["dag"],
        run_type=body.get("run_type"),
        asset=body.get("asset"),
        version=body.get("version"),
    )
    return result.body()


async def diff_batch(ctx: DagManagerService, body: dict[str, Any]) -> dict[str, Any]:
    return {"results": await ctx.diffs.diff_batch(body["diffs"])}
