"""Build a service's ASGI app from its OpenAPI spec.

Routing and request/response validation come from the spec through Connexion, assembled
in :mod:`qmtl.contracts.connexion_stack` (Draft 2020-12 validators in
:mod:`qmtl.contracts.connexion31`, the version check and the one 3.1 patch in
:mod:`qmtl.contracts.connexion_patch`). Operation handlers
live in ``handlers/<service>/<tag>.py``: the module is the operation's first tag,
the function its ``operationId``. A handler whose first parameter is ``ctx``
receives the service object passed to :func:`build_app` (no globals).

The returned app is a small ASGI dispatcher: WebSocket scopes go to a Starlette
``Router`` of ``WebSocketRoute``s, everything else to the Connexion app (which
keeps its lifespan and problem+json error handling). An outer middleware sets the
correlation id for every request and echoes it on the response.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import json
import logging
import re
import socket
import struct
import typing as t

from connexion.exceptions import ResolverError
from connexion.lifecycle import ConnexionRequest, ConnexionResponse
from connexion.problem import problem
from connexion.resolver import Resolver
from starlette.routing import Router, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from qmtl.common import correlation
from qmtl.common.errors import ServiceError
from qmtl.common.logs import AccessLog, RouteTemplates
from qmtl.common.tracing import instrument_asgi
from qmtl.contracts import connexion_patch, docs
from qmtl.contracts.connexion_stack import contract_app, middlewares
from qmtl.contracts.limits import RequestLimits, bound_text
from qmtl.contracts.loader import OpenAPISpec, load_openapi
from qmtl.contracts.server import ConnectionGuard

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class HandlerResolver(Resolver):
    """operationId + first tag → ``handlers.<service>.<tag>.<operationId>``, ctx bound."""

    def __init__(self, package: str, ctx: t.Any) -> None:
        super().__init__()
        self.package = package
        self.ctx = ctx

    def resolve_operation_id(self, operation: t.Any) -> str:
        tags = operation._operation.get("tags") or []  # Connexion keeps the raw operation here
        if not tags:
            raise ResolverError(f"operation {operation.operation_id!r} has no tag naming its handler module")
        module = tags[0].lower().replace("-", "_").replace(" ", "_")
        return f"{self.package}.{module}.{operation.operation_id}"

    def resolve(self, operation: t.Any) -> t.Any:
        # A proxied operation (``x-qmtl-proxy``) without a handler of its own is served by
        # its module's generic ``proxy`` handler (Connexion still routes and validates it).
        if "x-qmtl-proxy" in operation._operation:
            operation_id = self.resolve_operation_id(operation)
            module_name, func_name = operation_id.rsplit(".", 1)
            with contextlib.suppress(ImportError):
                if not hasattr(importlib.import_module(module_name), func_name):
                    from connexion.resolver import Resolution

                    return Resolution(self.resolve_function_from_operation_id(f"{module_name}.proxy"), operation_id)
        return super().resolve(operation)

    def resolve_function_from_operation_id(self, operation_id: str) -> t.Callable:
        module_name, func_name = operation_id.rsplit(".", 1)
        try:
            module = importlib.import_module(module_name)
            func = getattr(module, func_name)
        except (ImportError, AttributeError) as exc:
            raise ResolverError(f"cannot resolve handler {operation_id!r}: {exc}") from exc
        return bind_ctx(func, self.ctx)


def bind_ctx(func: t.Callable, ctx: t.Any) -> t.Callable:
    """Wrap a handler: bind ``ctx`` as its first argument (when it takes one) and turn a
    plain return value (``body``, ``(body, status)`` or ``(body, status, headers)``) into
    a JSON response with an explicit content type, which Connexion needs when an
    operation declares both ``application/json`` and ``application/problem+json``.
    Connexion inspects the signature to pass parameters, so the wrapper carries the
    handler's signature minus ``ctx``."""
    if not inspect.iscoroutinefunction(func):
        raise TypeError(f"handler {func.__module__}.{func.__name__} must be async")
    sig = inspect.signature(func)
    params = list(sig.parameters.values())
    takes_ctx = bool(params) and params[0].name == "ctx"

    @functools.wraps(func)
    async def bound(*args: t.Any, **kwargs: t.Any) -> t.Any:
        result = await (func(ctx, *args, **kwargs) if takes_ctx else func(*args, **kwargs))
        return to_response(result)

    del bound.__wrapped__  # Connexion unwraps decorators; it must see our signature
    bound.__signature__ = sig.replace(parameters=params[1:] if takes_ctx else params)  # type: ignore[attr-defined]
    return bound


def to_response(result: t.Any) -> t.Any:
    if isinstance(result, (ConnexionResponse,)) or hasattr(result, "status_code"):
        return result
    status, headers = 200, None
    if isinstance(result, tuple):
        if len(result) == 2:
            result, status = result
        elif len(result) == 3:
            result, status, headers = result
        else:
            raise TypeError("a handler returns body, (body, status) or (body, status, headers)")
    if result is None and status in (204, 304):
        return ConnexionResponse(status_code=status, body=b"", headers=headers or {})
    return json_response(result, status, headers)


def problem_response(status: int, title: str, detail: str, *, ext: dict | None = None, headers: dict | None = None) -> ConnexionResponse:
    ext = dict(ext or {})
    cid = correlation.get()
    if cid:
        ext.setdefault("correlation_id", cid)
    # a detail that quotes what the caller sent never grows with it
    return problem(status=status, title=title, detail=bound_text(detail), ext=ext, headers=headers)


def _service_error(_req: ConnexionRequest, exc: ServiceError) -> ConnexionResponse:
    if exc.status >= 500:
        logger.warning("%s: %s", exc.title, exc.detail)
    return problem_response(exc.status, exc.title, exc.detail, ext=exc.ext, headers=exc.headers)


def _problem_exception(_req: ConnexionRequest, exc: t.Any) -> ConnexionResponse:
    ext = dict(exc.ext or {})
    return problem_response(exc.status, exc.title or "Error", exc.detail or "", ext=ext, headers=exc.headers)


def _http_exception(_req: ConnexionRequest, exc: t.Any) -> ConnexionResponse:
    from connexion.http_facts import HTTP_STATUS_CODES

    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", None) or HTTP_STATUS_CODES.get(status, "Error")
    return problem_response(status, HTTP_STATUS_CODES.get(status, "Error"), str(detail), headers=getattr(exc, "headers", None))


def _unicode_error(_req: ConnexionRequest, exc: UnicodeDecodeError) -> ConnexionResponse:
    return problem_response(400, "Bad Request", f"Request is not valid UTF-8: {exc}")


def _unexpected(_req: ConnexionRequest, exc: Exception) -> ConnexionResponse:
    logger.error("unhandled error: %r", exc, exc_info=exc)
    return problem_response(500, "Internal Server Error", "An unexpected error occurred; the correlation id identifies it in the logs.")


class CorrelationMiddleware:
    """Outermost middleware: correlation id in, correlation id out (HTTP and WebSocket)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        cid = None
        for name, value in scope.get("headers", ()):
            if name == b"x-correlation-id":
                cid = value.decode("latin-1")
                break
        if not cid or not correlation.valid(cid):
            cid = correlation.new_correlation_id()
        token = correlation.correlation_id.set(cid)
        header = (b"x-correlation-id", cid.encode())

        async def send_with_cid(message: t.MutableMapping[str, t.Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-correlation-id"]
                headers.append(header)
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_cid)
        finally:
            correlation.correlation_id.reset(token)


class DeprecationHeaders:
    """Every response of an operation the spec marks ``deprecated: true`` carries the headers
    of its ``x-qmtl-deprecation`` (``deprecation`` → RFC 9745 ``Deprecation``, ``link`` →
    RFC 8288 ``Link`` to the successor) — the parameter 400s and 401s Connexion answers before
    the handler runs included. Headers a response already has are left alone."""

    def __init__(self, app: ASGIApp, rules: list[tuple[str, re.Pattern[str], list[tuple[bytes, bytes]]]]) -> None:
        self.app = app
        self.rules = rules

    @classmethod
    def wrap(cls, app: ASGIApp, doc: dict) -> ASGIApp:
        rules = []
        for route, item in (doc.get("paths") or {}).items():
            for method, op in item.items():
                if not isinstance(op, dict) or not op.get("deprecated"):
                    continue
                marks = op.get("x-qmtl-deprecation") or {}
                headers = [(name, str(marks[key]).encode("latin-1")) for key, name in
                           (("deprecation", b"deprecation"), ("link", b"link"), ("sunset", b"sunset")) if key in marks]
                if headers:
                    pattern = "".join("[^/]+" if part.startswith("{") else re.escape(part)
                                      for part in re.split(r"(\{[^}]+\})", route))
                    rules.append((method.upper(), re.compile(pattern + "$"), headers))
        return cls(app, rules) if rules else app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            for rule_method, pattern, headers in self.rules:
                if (method == rule_method or (method == "HEAD" and rule_method == "GET")) and pattern.match(path):
                    await self.app(scope, receive, self._sender(send, headers))
                    return
        await self.app(scope, receive, send)

    @staticmethod
    def _sender(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
        async def send_marked(message: t.MutableMapping[str, t.Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend(h for h in extra if h[0] not in present)
                message["headers"] = headers
            await send(message)

        return send_marked


class Dispatcher:
    """WebSocket scopes → Starlette router; everything else → the Connexion app.

    ``limits`` (a :class:`~qmtl.contracts.limits.RequestLimits` factory) bounds every HTTP
    request before it reaches ``http_app`` — whatever ``http_app`` is replaced with later."""

    def __init__(self, http_app: ASGIApp, ws_routes: t.Sequence[WebSocketRoute] = (), *,
                 spec: OpenAPISpec,
                 guard: ConnectionGuard,
                 access_log: t.Callable[[ASGIApp], ASGIApp] | None = None,
                 limits: t.Callable[[ASGIApp], ASGIApp] | None = None,
                 tracer_provider: t.Any = None) -> None:
        self.http_app = http_app
        self.ws_router = Router(routes=list(ws_routes)) if ws_routes else None
        # the loaded spec the app serves, and the HTTP server's bounds (header timeout,
        # connection cap): the service registers the guard's metrics on its registry, the
        # server runs it (qmtl.contracts.server.server_options)
        self.spec = spec
        self.guard = guard
        inner: ASGIApp = limits(self._dispatch) if limits else self._dispatch
        # correlation id first, so the access line (written when the response ends) carries it;
        # the access log outside the limits, so their refusals are logged like any answer;
        # tracing outermost: the span covers the rest
        self.inner: ASGIApp = instrument_asgi(CorrelationMiddleware(access_log(inner) if access_log else inner),
                                              tracer_provider)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            if self.ws_router is None:
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.ws_router(scope, receive, send)
            return
        await self.http_app(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            scope[ABORT_KEY] = _connection_aborter(send)
        await self.inner(scope, receive, send)


# ASGI has no way to drop a connection at once: a server closes it gracefully, which for a
# peer that never reads means waiting forever for its send buffer to drain. WebSocket scopes
# carry, under this key, a callable that aborts the underlying connection (uvicorn's
# protocols expose their transport on the object whose bound method ``send`` is); it
# returns False when the server offers no way to.
ABORT_KEY = "qmtl.abort_connection"


def _connection_aborter(send: Send) -> t.Callable[[], bool]:
    def abort() -> bool:
        transport = getattr(getattr(send, "__self__", None), "transport", None)
        if transport is None or not hasattr(transport, "abort"):
            return False
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Reset rather than FIN: what is queued for this peer is dropped with the socket
            # instead of lingering in the kernel for as long as the peer keeps its window shut.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        return True

    return abort


def build_app(
    service: str,
    ctx: t.Any,
    *,
    lifespan: t.Callable | None = None,
    validate_responses: bool = True,
    ws_routes: t.Sequence[WebSocketRoute] = (),
    spec: OpenAPISpec | None = None,
    resolver_error: int | None = None,
    access_log: bool = True,
    tracer_provider: t.Any = None,
    security: t.Mapping[str, t.Any] | None = None,
    anonymous: t.Callable[[], t.Awaitable[t.Any]] | None = None,
    limits: t.Any = None,
) -> Dispatcher:
    """The ASGI app of ``service`` (``gateway``, ``worldservice`` or ``dagmanager``).

    ``resolver_error=501`` lets operations whose handler is not built yet answer 501
    problem+json (documented in the spec) instead of refusing to start; without it a
    missing handler stops the service at startup.

    ``security`` maps each security scheme of the spec to its verifier and ``anonymous``
    admits the spec's ``{}`` alternative (see :mod:`qmtl.contracts.security`, which takes
    the place of Connexion's own security middleware: authentication before validation).
    ``limits`` is the service's ``limits`` config section (body size, JSON depth, body read
    timeout; see :mod:`qmtl.contracts.limits`); the defaults apply when it is None.
    """
    connexion_patch.prepare()  # the Connexion version check and the OpenAPI 3.1 patch, once
    spec = spec or load_openapi(service)
    # the bundled spec, Swagger UI 5 and the AsyncAPI page are served by qmtl.contracts.docs
    app = contract_app(
        f"qmtl.{service}",
        spec.bundled,
        resolver=HandlerResolver(f"handlers.{service}", ctx),
        middleware_list=middlewares(_security(spec.bundled, security or {}, anonymous)),
        lifespan=lifespan,
        validate_responses=validate_responses,
        resolver_error=resolver_error,
    )
    from connexion.exceptions import ProblemException
    from starlette.exceptions import HTTPException

    app.add_error_handler(ServiceError, _service_error)
    app.add_error_handler(ProblemException, _problem_exception)
    app.add_error_handler(HTTPException, _http_exception)
    app.add_error_handler(UnicodeDecodeError, _unicode_error)
    app.add_error_handler(Exception, _unexpected)
    if limits is None:
        from qmtl.common.config import LimitsConfig

        limits = LimitsConfig()
    doc = spec.bundled
    routes = RouteTemplates(doc.get("paths") or {})
    return Dispatcher(docs.mount(DeprecationHeaders.wrap(app, doc), spec), ws_routes,
                      access_log=lambda inner: AccessLog(inner, routes, service=service, enabled=access_log),
                      limits=lambda inner: RequestLimits(inner, doc, limits, routes=routes),
                      spec=spec, guard=ConnectionGuard(limits, name=service), tracer_provider=tracer_provider)


def _security(doc: dict, verifiers: t.Mapping[str, t.Any], anonymous: t.Any) -> t.Callable[[ASGIApp], ASGIApp]:
    """:class:`~qmtl.contracts.security.SpecSecurity` for the spec, in the place of Connexion's
    SecurityMiddleware (after routing, before request validation)."""
    from qmtl.contracts.security import SpecSecurity

    return functools.partial(SpecSecurity, doc=doc, verifiers=verifiers, anonymous=anonymous)


def json_response(body: t.Any, status: int = 200, headers: dict | None = None, content_type: str = "application/json") -> ConnexionResponse:
    """A JSON response with an explicit content type (needed when the operation also lists problem+json)."""
    return ConnexionResponse(
        status_code=status,
        body=json.dumps(body, separators=(",", ":")),
        content_type=content_type,
        headers=headers or {},
    )
