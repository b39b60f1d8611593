"""Health, status and metrics of the Gateway."""

from connexion import request
from connexion.lifecycle import ConnexionResponse

from qmtl.common.metrics import exposition


async def health(ctx):
    return {"status": "ok", "service": "gateway"}


async def get_status(ctx):
    return await ctx.status.report()


async def metrics(ctx):
    body, content_type = exposition(ctx.registry, request.headers.get("accept"))
    return ConnexionResponse(status_code=200, body=body, content_type=content_type)


async def ready(ctx):
    from qmtl.common.readiness import ready_response

    return ready_response(*await ctx.status.readiness())
