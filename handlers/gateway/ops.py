"""Health, status and metrics of the Gateway."""

from __future__ import annotations

from typing import TYPE_CHECKING

from connexion import request
from connexion.lifecycle import ConnexionResponse

from qmtl.common.metrics import exposition

if TYPE_CHECKING:
    from qmtl.gateway.service import Gateway


async def health(ctx: Gateway):
    return {"status": "ok", "service": "gateway"}


async def get_status(ctx: Gateway):
    return await ctx.status.report()


async def metrics(ctx: Gateway):
    body, content_type = exposition(ctx.registry, request.headers.get("accept"))
    return ConnexionResponse(status_code=200, body=body, content_type=content_type)


async def ready(ctx: Gateway):
    from qmtl.common.readiness import ready_response

    return ready_response(*await ctx.status.readiness())
