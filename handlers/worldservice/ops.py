"""GET /health, GET /metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING

from connexion import request
from connexion.lifecycle import ConnexionResponse

from qmtl.common.metrics import exposition

if TYPE_CHECKING:
    from qmtl.worldservice.service import WorldService


async def health(ctx: WorldService):
    return await ctx.health()


async def metrics(ctx: WorldService):
    body, content_type = exposition(ctx.metrics.registry, request.headers.get("accept"))
    return ConnexionResponse(status_code=200, body=body, content_type=content_type)


async def ready(ctx: WorldService):
    from qmtl.common.readiness import ready_response
    from qmtl.worldservice.readiness import readiness

    return ready_response(*await readiness(ctx))
