"""Activation: one entry (read, override), the whole set, its state hash."""

from __future__ import annotations

from handlers.worldservice._common import caller, header, not_modified, quoted


async def get_activation(ctx, world_id, strategy_id, side):
    envelope, gate = await ctx.get_activation_gated(caller(ctx), world_id, strategy_id, side)
    if not_modified(envelope["etag"]):
        ctx.metrics.activation_not_modified.inc()
        return None, 304, {"ETag": quoted(envelope["etag"])}
    headers = {"ETag": quoted(envelope["etag"]), "Cache-Control": "no-cache"}
    if gate:
        headers["X-QMTL-Gated"] = gate
    return envelope, 200, headers


async def override_activation(ctx, world_id, body):
    envelope = await ctx.override_activation(caller(ctx), world_id, body, if_match=header("If-Match"))
    return envelope, 200, {"ETag": quoted(envelope["etag"])}


async def list_activations(ctx, world_id):
    return await ctx.get_activations(caller(ctx), world_id)


async def get_activation_state_hash(ctx, world_id):
    return await ctx.activation_state_hash(caller(ctx), world_id)
