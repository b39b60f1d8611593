"""Event stream: descriptors, the token JWKS, and the queue state-hash probe (SPEC §5).

(The world probes, ``/worlds/{id}/activation/state_hash`` and ``.../policy/state_hash``,
are proxied to WorldService by the worlds proxy; ``ctx.events.state_hash(...)`` gives the
Gateway's own view of the same hashes.)

Thin: authentication and scope checks here, everything else in ``ctx.events``
(:mod:`qmtl.gateway.events`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from connexion import request

from qmtl.common.errors import BadRequest
from qmtl.contracts.constants import StreamTopic
from qmtl.gateway.auth import caller

if TYPE_CHECKING:
    from qmtl.gateway.service import Gateway


async def subscribe(ctx: Gateway, body):
    identity = await caller(ctx, request)
    return await ctx.events.describe(identity, body)


async def get_jwks(ctx: Gateway):
    # Verifiers cache the JWKS; a staged key is published before it signs (see KeyRing).
    return ctx.events.tokens.jwks(), 200, {"Cache-Control": "public, max-age=60"}


async def queues_state_hash(ctx: Gateway, tags, interval, match_mode=None):
    await caller(ctx, request)
    try:
        h = await ctx.events.resolved_state_hash(StreamTopic.QUEUES, tags=tags, interval=interval, match_mode=match_mode)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    return {"topic": StreamTopic.QUEUES, "state_hash": h}
