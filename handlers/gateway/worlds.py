"""Worlds proxy: WorldService's API under the same paths (``ctx.worlds``, qmtl/gateway/worlds.py).

Each handler names the WorldService operation, its method, whether a retry is safe
(idempotent) and its live-guard rule; the proxy does the rest.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from connexion import context
from connexion.lifecycle import ConnexionResponse

from qmtl.gateway.worlds import Incoming, Reply, Route

# method, retry-safe?, live-guard rule (WorldsProxy.live_guard), forgets cached decisions?
_GET = Route("GET", idempotent=True)
_CREATE_WORLD = Route("POST", idempotent=False, live_guard="create_world")
_UPDATE_WORLD = Route("PUT", idempotent=True, live_guard="update_world", changes_decisions=True)
_DELETE_WORLD = Route("DELETE", idempotent=True, changes_decisions=True)
_CREATE_POLICY = Route("POST", idempotent=False, live_guard="create_policy", changes_decisions=True)
_SET_DEFAULT = Route("POST", idempotent=True, live_guard="if_world_allows_live", changes_decisions=True)
# PUT, but each observation advances the hysteresis counters: never retried.
_OBSERVATION = Route("PUT", idempotent=False, live_guard="if_world_allows_live", changes_decisions=True)
_OVERRIDE = Route("PUT", idempotent=True, live_guard="activates")
# POST, but read-only: safe to retry.
_EVALUATE = Route("POST", idempotent=True)
# Retried on the budget only because WorldService makes it idempotent by run_id.
_APPLY = Route("POST", idempotent=True, live_guard="always")


def _incoming() -> Incoming:
    scope = context.scope
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
    return Incoming(headers, scope.get("query_string", b"").decode("latin-1"))


def _respond(reply: Reply) -> ConnexionResponse:
    headers = dict(reply.headers)
    if reply.content_type:
        return ConnexionResponse(status_code=reply.status, body=reply.body, content_type=reply.content_type, headers=headers)
    return ConnexionResponse(status_code=reply.status, body=reply.body or b"", headers=headers)


async def _forward(ctx, operation: str, route: Route, path: str, world_id: str | None = None, body=None) -> ConnexionResponse:
    return _respond(await ctx.worlds.forward(operation, route, path, _incoming(), world_id=world_id, body=body))


# -- worlds ------------------------------------------------------------------------------

async def list_worlds(ctx, limit=None, cursor=None):
    return await _forward(ctx, "list_worlds", _GET, "/worlds")


async def create_world(ctx, body):
    return await _forward(ctx, "create_world", _CREATE_WORLD, "/worlds",
                          world_id=body.get("world_id"), body=body)


async def get_world(ctx, world_id):
    return await _forward(ctx, "get_world", _GET, f"/worlds/{world_id}", world_id)


async def update_world(ctx, world_id, body):
    return await _forward(ctx, "update_world", _UPDATE_WORLD, f"/worlds/{world_id}",
                          world_id, body)


async def delete_world(ctx, world_id):
    return await _forward(ctx, "delete_world", _DELETE_WORLD, f"/worlds/{world_id}", world_id)


# -- policies ----------------------------------------------------------------------------

async def list_policies(ctx, world_id):
    return await _forward(ctx, "list_policies", _GET, f"/worlds/{world_id}/policies", world_id)


async def create_policy(ctx, world_id, body):
    return await _forward(ctx, "create_policy", _CREATE_POLICY,
                          f"/worlds/{world_id}/policies", world_id, body)


async def get_policy(ctx, world_id, version):
    return await _forward(ctx, "get_policy", _GET, f"/worlds/{world_id}/policies/{int(version)}", world_id)


async def set_default_policy(ctx, world_id, v):
    return await _forward(ctx, "set_default_policy", _SET_DEFAULT,
                          f"/worlds/{world_id}/set-default", world_id)


async def get_policy_state_hash(ctx, world_id):
    return await _forward(ctx, "get_policy_state_hash", _GET, f"/worlds/{world_id}/policy/state_hash", world_id)


# -- decisions ---------------------------------------------------------------------------

async def record_observation(ctx, world_id, body):
    return await _forward(ctx, "record_observation", _OBSERVATION,
                          f"/worlds/{world_id}/observations", world_id, body)


async def get_observation(ctx, world_id):
    return await _forward(ctx, "get_observation", _GET, f"/worlds/{world_id}/observations", world_id)


async def decide(ctx, world_id, as_of=None):
    req = _incoming()
    raw_as_of = _raw_query_value(req.query, "as_of")  # the caller's text: part of the cache key
    return _respond(await ctx.worlds.decide(world_id, req, raw_as_of))


# -- activation --------------------------------------------------------------------------

async def get_activation(ctx, world_id, strategy_id, side):
    return _respond(await ctx.worlds.activation(world_id, _incoming(), strategy_id, side))


async def override_activation(ctx, world_id, body):
    return await _forward(ctx, "override_activation", _OVERRIDE,
                          f"/worlds/{world_id}/activation", world_id, body)


async def list_activations(ctx, world_id):
    return await _forward(ctx, "list_activations", _GET, f"/worlds/{world_id}/activations", world_id)


async def get_activation_state_hash(ctx, world_id):
    return await _forward(ctx, "get_activation_state_hash", _GET, f"/worlds/{world_id}/activation/state_hash", world_id)


# -- plans -------------------------------------------------------------------------------

async def evaluate(ctx, world_id, body):
    return await _forward(ctx, "evaluate", _EVALUATE, f"/worlds/{world_id}/evaluate", world_id, body)


async def apply(ctx, world_id, body):
    return await _forward(ctx, "apply", _APPLY, f"/worlds/{world_id}/apply",
                          world_id, body)


# -- audit -------------------------------------------------------------------------------

async def get_audit(ctx, world_id, limit=None, cursor=None):
    return await _forward(ctx, "get_audit", _GET, f"/worlds/{world_id}/audit", world_id)


def _raw_query_value(query: str, name: str) -> str | None:
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == name:
            return value
    return None
