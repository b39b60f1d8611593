"""Activation: one entry (read, override), the whole set, its state hash."""

from __future__ import annotations

from typing import TYPE_CHECKING

from handlers.worldservice._common import caller, header, not_modified, quoted

if TYPE_CHECKING:
    from qmtl.worldservice.service import WorldService


async def get_activation(ctx: WorldService, world_id, strategy_id, side):
    envelope, gate = await ctx.activation.get_gated(caller(ctx), world_id, strategy_id, side)
    if not_modified(envelope["etag"]):
        ctx.metrics.activation_not_modified.inc()
        return None, 304, {"ETag": quoted(envelope["etag"])}
    headers = {"ETag": quoted(envelope["etag"]), "Cache-Control": "no-cache"}
    if gate:
        headers["X-QMTL-Gated"] = gate
    return envelope, 200, headers


async def override_activation(ctx: WorldService, world_id, body):
    envelope = await ctx.activation.override(caller(ctx), world_id, body, if_match=header("If-Match"))
    return envelope, 200, {"ETag": quoted(envelope["etag"])}


async def list_activations(ctx: WorldService, world_id):
    return await ctx.activation.get_all(caller(ctx), world_id)


async def get_activation_state_hash(ctx: WorldService, world_id):
    return await ctx.activation.state_hash(caller(ctx), world_id)
