"""The live guard: calls that can move a world to live need the caller's explicit consent
(``X-Allow-Live: true``) unless the Gateway runs with ``--allow-live``; without it the answer
is 403 and WorldService is not called (SPEC §4). Each operation names its rule in
``x-qmtl-proxy`` of specs/openapi.yaml; :meth:`LiveGuard.check` applies it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from qmtl.common import correlation
from qmtl.common.errors import Forbidden
from qmtl.contracts.constants import WorldState
from qmtl.gateway.backends import BackendUnavailable
from qmtl.gateway.worlds.replies import Incoming, unavailable, upstream_template

if TYPE_CHECKING:
    from qmtl.gateway.auth import Identity
    from qmtl.gateway.backends import Backend

log = logging.getLogger(__name__)

ALLOW_LIVE_HEADER = "X-Allow-Live"


class LiveGuard:
    def __init__(self, backend: Backend, *, allow_live: bool, refusals: Counter) -> None:
        self.backend = backend
        self.allow_live = allow_live
        self.refusals = refusals  # world_live_guard_refusals{operation}
        self._world_path = upstream_template("get_world")

    def consent(self, req: Incoming) -> bool:
        if self.allow_live:
            return True
        return (req.header(ALLOW_LIVE_HEADER) or "").strip().lower() == "true"

    def refuse(self, operation: str, why: str) -> None:
        self.refusals.labels(operation).inc()
        log.warning("live guard refused %s: %s", operation, why, extra={"correlation_id": correlation.get()})
        raise Forbidden(
            f"{why}: this call can switch the world to live and needs the caller's explicit consent "
            f"({ALLOW_LIVE_HEADER}: true), unless the Gateway runs with --allow-live. WorldService was not called.",
            title="Live Guard", ext={"live_guard": True, "required_header": ALLOW_LIVE_HEADER},
        )

    async def check(self, operation: str, rule: str, world_id: str | None, body: Any, req: Incoming, identity: Identity | None) -> None:
        """Raise 403 when this call can move a world to live and the caller did not consent.

        Rules:

        * ``always`` — apply: it changes which strategies trade.
        * ``activates`` — activation override with ``active: true``.
        * ``create_world`` — a new world with ``allow_live: true``.
        * ``update_world`` — setting ``allow_live: true``; or, on a world that allows live,
          lifting a gate (``state: ACTIVE``, ``circuit_breaker: false``), which can bring a
          ``live`` decision back.
        * ``create_policy`` — ``set_default: true`` on a world that allows live.
        * ``if_world_allows_live`` — set-default and observations: they can promote the
          decision of a world that allows live.
        * ``never`` — everything else.

        "Allows live" is read from WorldService (``GET /worlds/{id}``) only when the caller
        did not consent and the body alone does not decide.
        """
        if rule == "never" or self.consent(req):
            return
        b = body if isinstance(body, Mapping) else {}
        if rule == "always":
            self.refuse(operation, f"{operation} changes which strategies trade in world {world_id!r}")
        elif rule == "activates":
            if b.get("active") is True:
                self.refuse(operation, f"switching strategy {b.get('strategy_id')!r} ({b.get('side')}) on in world {world_id!r}")
        elif rule == "create_world":
            if b.get("allow_live") is True:
                self.refuse(operation, f"creating world {world_id!r} with allow_live: true")
        elif rule == "update_world":
            if b.get("allow_live") is True:
                self.refuse(operation, f"setting allow_live: true on world {world_id!r}")
            lifts = b.get("state") == WorldState["ACTIVE"] or b.get("circuit_breaker") is False
            if lifts and b.get("allow_live") is not False and await self.world_allows_live(world_id, identity):
                self.refuse(operation, f"lifting the gate of world {world_id!r}, which allows live")
        elif rule == "create_policy":
            if b.get("set_default") is True and await self.world_allows_live(world_id, identity):
                self.refuse(operation, f"a new default policy for world {world_id!r}, which allows live")
        elif rule == "if_world_allows_live":
            if await self.world_allows_live(world_id, identity):
                self.refuse(operation, f"{operation} can promote world {world_id!r}, which allows live")
        else:  # pragma: no cover - a programming error in the route table
            raise AssertionError(f"unknown live-guard rule {rule!r}")

    async def world_allows_live(self, world_id: str | None, identity: Identity | None) -> bool:
        """Whether the world may reach live (its ``allow_live``); unknown worlds cannot."""
        headers = identity.forward_headers() if identity is not None else {}
        try:
            resp = await self.backend.request("GET", self._world_path.format(world_id=world_id), headers=headers)
        except BackendUnavailable as exc:
            raise unavailable(exc) from exc
        if resp.status_code != 200:
            return False  # the call itself will get WorldService's answer (404, 403, ...)
        try:
            return bool(resp.json().get("allow_live"))
        except ValueError:
            return False
