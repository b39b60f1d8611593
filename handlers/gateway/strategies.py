"""Strategy ingest routes (SPEC §2): thin wrappers around ``ctx.ingest``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from connexion import request

from qmtl.gateway.auth import caller

if TYPE_CHECKING:
    from qmtl.gateway.service import Gateway


async def submit_strategy(ctx: Gateway, body):
    identity = await caller(ctx, request)
    ack, headers = await ctx.ingest.submit(body, subject=identity.subject)
    return ack, 202, headers


async def get_strategy_status(ctx: Gateway, strategy_id):
    await caller(ctx, request)
    return await ctx.ingest.status(strategy_id)
