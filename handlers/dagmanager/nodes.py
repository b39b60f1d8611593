"""GET /nodes/{node_id}."""

from __future__ import annotations

from qmtl.dagmanager.service import DagManagerService


async def get_node(ctx: DagManagerService, node_id: str):
    return await ctx.get_node(node_id)
