"""GET /nodes/{node_id}."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qmtl.dagmanager.service import DagManagerService


async def get_node(ctx: DagManagerService, node_id: str) -> dict[str, Any]:
    return await ctx.queues.get_node(node_id)
