"""Worlds proxy: WorldService's API under the same paths (``ctx.worlds``, qmtl/gateway/worlds/proxy.py).

Every proxied operation carries ``x-qmtl-proxy`` in specs/openapi.yaml: the WorldService
operation it forwards to, whether a retry is safe (idempotent), its live-guard rule and
whether it changes decisions. Connexion routes and validates each operation; all of them
but the two cached reads (``decide``, ``get_activation``) are served by :func:`proxy`,
which forwards the request's own method, path and query.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from connexion import context
from connexion.lifecycle import ConnexionResponse

from qmtl.contracts.constants import proxy_rules
from qmtl.contracts.security import IDENTITY_KEY
from qmtl.gateway.worlds import Incoming, Reply, Route

if TYPE_CHECKING:
    from qmtl.gateway.service import Gateway


@cache
def _route(operation_id: str) -> Route:
    rule = proxy_rules("gateway")[operation_id]
    return Route(rule.method, idempotent=rule.idempotent, live_guard=rule.live_guard, changes_decisions=rule.changes_decisions)


def _incoming() -> Incoming:
    scope = context.scope
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
    return Incoming(headers, scope.get("query_string", b"").decode("latin-1"), scope.get(IDENTITY_KEY))


def _respond(reply: Reply) -> ConnexionResponse:
    headers = dict(reply.headers)
    if reply.content_type:
        return ConnexionResponse(status_code=reply.status, body=reply.body, content_type=reply.content_type, headers=headers)
    return ConnexionResponse(status_code=reply.status, body=reply.body or b"", headers=headers)


async def proxy(ctx: Gateway, body=None, **params):
    """Any proxied operation without a handler of its own: forwarded as the caller sent it
    (path and query), with the rules of its ``x-qmtl-proxy``. The world it concerns is the
    path's ``world_id`` or, when creating one, the body's."""
    operation_id = context.operation.operation_id.rsplit(".", 1)[-1]  # Connexion qualifies it with the module
    scope = context.scope
    raw_path = scope.get("raw_path")  # as sent (percent-encoded); some servers put the query in it
    path = raw_path.split(b"?", 1)[0].decode("latin-1") if raw_path else scope["path"]
    world_id = params.get("world_id") or (body.get("world_id") if isinstance(body, dict) else None)
    return _respond(await ctx.worlds.forward(operation_id, _route(operation_id), path, _incoming(), world_id=world_id, body=body))


# -- the two cached reads ----------------------------------------------------------------

async def decide(ctx: Gateway, world_id, as_of=None):
    req = _incoming()
    raw_as_of = _raw_query_value(req.query, ctx.worlds.decide_key_param)  # the caller's text: part of the cache key
    return _respond(await ctx.worlds.decide(world_id, req, raw_as_of))


async def get_activation(ctx: Gateway, world_id, strategy_id, side):
    return _respond(await ctx.worlds.activation(world_id, _incoming(), strategy_id, side))


def _raw_query_value(query: str, name: str) -> str | None:
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == name:
            return value
    return None
