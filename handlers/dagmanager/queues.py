"""GET /queues/by_tag, GET /queues."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qmtl.contracts.constants import DEFAULT_MATCH_MODE

if TYPE_CHECKING:
    from qmtl.dagmanager.service import DagManagerService


async def queues_by_tag(ctx: DagManagerService, tags: str, interval: int, match_mode: str | None = None,
                        match: str | None = None) -> dict[str, Any]:
    # match_mode wins over the deprecated alias `match`; the default is `any`
    mode = match_mode or match or DEFAULT_MATCH_MODE
    return await ctx.queues.by_tag(tags.split(","), interval, mode)


async def list_queues(ctx: DagManagerService, limit: int = 100, offset: int = 0, tag: str | None = None) -> dict[str, Any]:
    return await ctx.queues.list_queues(limit=limit, offset=offset, tag=tag)
