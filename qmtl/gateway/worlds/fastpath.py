""":class:`DecideFastPath`: the ASGI layer that answers cache hits of ``GET /worlds/{id}/decide``
in front of the contract stack (what it may serve is decided by :meth:`WorldsProxy.fast_decide`)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol

from qmtl.contracts.constants import Operation, operation
from qmtl.contracts.loader import SpecError
from qmtl.gateway.worlds.replies import Reply


class FastDecider(Protocol):
    def fast_decide(self, world_id: str, query: bytes, raw_headers: Any) -> Awaitable[Reply | None] | None: ...


class DecideFastPath:
    """ASGI layer in front of the contract stack (Connexion) that answers cache hits of
    ``GET /worlds/{id}/decide`` directly; every other request passes through untouched.

    Why: a hit is a dictionary lookup, but the full stack (routing, security, parameter
    decoding, request and response validation) costs ~10x the bare HTTP server. The
    fast path keeps every rule of the route — authentication, the ``reader`` role, ETag
    and ``If-None-Match`` → 304, ``X-QMTL-Cache``, metrics, the correlation id (set by
    the outer middleware) — and declines (full path) whenever there is anything else to
    do: no fresh entry, an unexpected query, a failed authentication or missing role.
    """

    OPERATION = "decide"  # the Gateway operation whose cache hits it answers (specs/openapi.yaml)

    def __init__(self, app: Any, proxy: FastDecider, op: Operation | None = None) -> None:
        self.app = app
        self.proxy = proxy
        # Route, parameters and statuses come from the operation in the spec; a spec this
        # fast path cannot serve by the same rules stops the Gateway at startup.
        self.op = op or operation("gateway", self.OPERATION)
        if len(self.op.path_params) != 1 or len(self.op.query_params) != 1:
            raise SpecError(f"{self.op.method} {self.op.path}: the decide fast path needs one path parameter (the world) "
                            f"and one query parameter (part of the cache key); the spec has {self.op.path_params} "
                            f"and {self.op.query_params}")
        self.world_param = self.op.path_params[0]
        self.statuses = (self.op.status(200), self.op.status(304))  # what a cache hit answers
        self.served = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == self.op.method:
            params = self.op.match(scope["path"])
            if params is not None:
                pending = self.proxy.fast_decide(params[self.world_param], scope.get("query_string", b""), scope.get("headers", ()))
                if pending is not None:
                    reply = await pending
                    if reply is not None and reply.status in self.statuses:
                        self.served += 1
                        await send_reply(send, reply)
                        return
        await self.app(scope, receive, send)


async def send_reply(send: Any, reply: Reply) -> None:
    """Send ``reply`` as an ASGI HTTP response."""
    headers = [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in reply.headers.items()]
    if reply.status not in (204, 304):
        headers.append((b"content-type", (reply.content_type or "application/json").encode("latin-1")))
        headers.append((b"content-length", str(len(reply.body)).encode("latin-1")))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body if reply.status not in (204, 304) else b""})
