"""Strategy ingest routes (SPEC §2): thin wrappers around ``ctx.ingest``."""

from connexion import request

from qmtl.gateway.auth import caller


async def submit_strategy(ctx, body):
    identity = await caller(ctx, request)
    ack, headers = await ctx.ingest.submit(body, subject=identity.subject)
    return ack, 202, headers


async def get_strategy_status(ctx, strategy_id):
    await caller(ctx, request)
    return await ctx.ingest.status(strategy_id)
