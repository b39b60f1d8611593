"""POST /diff and POST /diff/batch."""

from __future__ import annotations

from qmtl.dagmanager.service import DagManagerService


async def diff(ctx: DagManagerService, body: dict):
    result = await ctx.diff(
        body["strategy_id"],
        body["dag"],
        run_type=body.get("run_type"),
        asset=body.get("asset"),
        version=body.get("version"),
    )
    return result.body()


async def diff_batch(ctx: DagManagerService, body: dict):
    return {"results": await ctx.diff_batch(body["diffs"])}
