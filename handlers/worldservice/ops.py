"""GET /health, GET /metrics."""

from __future__ import annotations

from connexion.lifecycle import ConnexionResponse


async def health(ctx):
    return await ctx.health()


async def metrics(ctx):
    return ConnexionResponse(status_code=200, body=ctx.metrics.render(), content_type=ctx.metrics.content_type)
