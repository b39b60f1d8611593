"""Health, status and metrics of the Gateway."""

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from connexion.lifecycle import ConnexionResponse


async def health(ctx):
    return {"status": "ok", "service": "gateway"}


async def get_status(ctx):
    return await ctx.status.report()


async def metrics(ctx):
    return ConnexionResponse(status_code=200, body=generate_latest(ctx.registry), content_type=CONTENT_TYPE_LATEST.split(";")[0],
                             headers={"Content-Type": CONTENT_TYPE_LATEST})
