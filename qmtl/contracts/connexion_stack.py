"""The Connexion stack a service runs, assembled through Connexion 3's extension points.

Nothing here patches Connexion: every piece is a subclass plugged in where Connexion takes
one, and is built once per operation when the app is set up, so a request pays only for
its own work.

* :func:`contract_app` — a :class:`connexion.middleware.ConnexionMiddleware` (Connexion's
  documented way to put its stack in front of any ASGI app) around :class:`ContractASGIApp`,
  with :func:`middlewares` as its ``middlewares`` list.
* :class:`ContractASGIApp` — Connexion's ``AsyncASGIApp`` with ``api_cls`` set to an API
  whose ``make_operation`` returns a :class:`ContractOperation`: what Connexion's parameter
  decorator works out from the handler and the operation (arguments, sanitised names, query
  defaults) is planned once per operation, and the handler is called with the keyword
  arguments that decorator would build, from the parameters request validation already
  parsed (:data:`PARSED_REQUEST`); Connexion 3.3's ``AsyncOperation`` rebuilds its decorator
  chain on every request and parses the parameters a second time.
* :class:`CompiledRequestValidation` / :class:`CompiledResponseValidation` — Connexion's
  validation middlewares (same ``RoutedMiddleware`` slots, same checks, same problems) whose
  per-operation objects build the URI parser, the parameter validator and the compiled
  body schemas of every documented media type (:class:`~qmtl.contracts.connexion31.CompiledSchema`)
  once, instead of on every request and every response, and remember what they decided
  for each Content-Type value (and response status).
* :func:`middlewares` — Connexion's default list minus ``SwaggerUIMiddleware`` (the docs are
  served by :mod:`qmtl.contracts.docs`), with ``SecurityMiddleware`` replaced by
  :class:`~qmtl.contracts.security.SpecSecurity` and the two validation middlewares by the
  compiled ones above.

The subclasses lean on Connexion internals that are not a published API (``api_cls``,
``make_operation``, the operation classes' constructors); :mod:`qmtl.contracts.connexion_patch`
checks the installed Connexion is one they were written for before any app is built, and
``tests/unit/test_connexion_stack.py`` checks those hooks still exist and behave, and
``tests/unit/test_connexion_stack_parity.py`` that this stack answers every request of a
table exactly as Connexion's stock one does.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import typing as t

from connexion import utils
from connexion.apps.asynchronous import AsyncApi, AsyncASGIApp
from connexion.context import context as connexion_context
from connexion.datastructures import MediaTypeDict
from connexion.decorators import StarletteDecorator
from connexion.decorators.parameter import (
    CONTEXT_NAME,
    _get_body_argument,
    _get_query_defaults,
    _get_val_from_param,
    pythonic,
    sanitized,
    unwrap_decorators,
)
from connexion.exceptions import UnsupportedMediaTypeProblem
from connexion.http_facts import FORM_CONTENT_TYPES
from connexion.lifecycle import ConnexionRequest
from connexion.middleware.main import ConnexionMiddleware
from connexion.middleware.request_validation import (
    RequestValidationAPI,
    RequestValidationMiddleware,
    RequestValidationOperation,
)
from connexion.middleware.response_validation import (
    ResponseValidationAPI,
    ResponseValidationMiddleware,
    ResponseValidationOperation,
)
from connexion.middleware.routing import RoutingMiddleware
from connexion.middleware.security import SecurityMiddleware
from connexion.middleware.swagger_ui import SwaggerUIMiddleware
from connexion.operations import OpenAPIOperation
from python_multipart.multipart import parse_options_header
from starlette.routing import BaseRoute, Match, Mount, Route, Router, get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from qmtl.contracts.connexion31 import VALIDATOR_MAP, CompiledSchema

if t.TYPE_CHECKING:
    from connexion.jsonifier import Jsonifier
    from connexion.operations import AbstractOperation

logger = logging.getLogger("connexion.middleware.validation")  # where Connexion logs the same


# --------------------------------------------------------------------------- the handlers

PARSED_REQUEST = "qmtl.parsed_request"
"""``scope["extensions"]`` key under which request validation leaves the request whose
parameters it parsed (:meth:`~qmtl.contracts.connexion31.Parameter2020Validator.validate`),
with the operation it was parsed for, so the handler stage does not parse them again."""


def parsed_request(scope: Scope, operation_id: str | None) -> ConnexionRequest | None:
    """The request whose path and query parameters request validation parsed for
    ``operation_id`` (None when validation did not run for it), taken out of the scope."""
    found = (scope.get("extensions") or {}).pop(PARSED_REQUEST, None)  # it holds the scope: no cycle left behind
    if found is not None and found[0] == operation_id:
        return t.cast(ConnexionRequest, found[1])
    return None


class ContractOperation:
    """The handler stage of one operation, built once (Connexion 3.3's ``AsyncOperation``
    builds a ``StarletteDecorator`` and runs its ``decorate()`` — ``inspect.signature`` of
    the handler, the parameter and response decorators, a URI parser — on every request).

    The handler's keyword arguments are those of Connexion's parameter decorator
    (``connexion.decorators.parameter.prep_kwargs``: path parameters, query parameters
    over their defaults, the body, the security context), computed from a plan made once
    per operation — which arguments the handler takes, their sanitised names, the query
    defaults — and from the path and query parameters request validation already parsed
    (:data:`PARSED_REQUEST`); the coercions are Connexion's own functions. The return
    value goes through Connexion's response decorator unchanged. A request with a form or
    multipart body (files, form fields typed from the schema) takes Connexion's decorator
    chain as it is."""

    def __init__(self, operation: AbstractOperation, *, jsonifier: Jsonifier, pythonic_params: bool) -> None:
        self.operation_id = operation.operation_id
        self._operation = operation
        decorator = StarletteDecorator(pythonic_params=pythonic_params, jsonifier=jsonifier)
        self._framework = decorator.framework
        self._handler = decorator.decorate(operation.function)  # Connexion's chain (form bodies)
        function = decorator._sync_async_decorator(operation.function)
        self._call = decorator._response_decorator_cls(framework=decorator.framework, jsonifier=jsonifier)(function)
        self._uri_parser = operation.uri_parser_class(operation.parameters, operation.body_definition())
        # what AsyncParameterDecorator works out from the operation and the handler
        arguments, has_kwargs = utils.inspect_function_arguments(unwrap_decorators(function))
        sanitize = pythonic if pythonic_params else sanitized
        self._arguments, self._has_kwargs, self._sanitize = arguments, has_kwargs, sanitize
        self._path = {p["name"]: p for p in operation.parameters if p["in"] == "path"}
        self._path_names = {name: sanitize(name) for name in self._path}
        query = {p["name"]: p for p in operation.parameters if p["in"] == "query"}
        self._query_defaults = _get_query_defaults(query)
        self._query = {name: (sanitize(name), p) for name, p in query.items()
                       if has_kwargs or sanitize(name) in arguments}  # the others are never passed
        self._reads_body = sanitize(operation.body_name(None)) in arguments or has_kwargs
        self._body_argument = (operation.method.upper() != "TRACE" and operation.is_request_body_defined
                               and (len(arguments) > 0 or has_kwargs))
        self._context_name = CONTEXT_NAME in arguments
        self._planned = isinstance(operation, OpenAPIOperation)  # body_name() ignores the content type
        functools.update_wrapper(self, operation.function)  # Starlette's Route reads __name__

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = parsed_request(scope, self.operation_id)
        if request is None:
            request = ConnexionRequest(scope, uri_parser=self._uri_parser)
        content_type = _header(scope, b"content-type")
        mimetype = _mimetype(content_type) if content_type is not None else "application/octet-stream"
        if mimetype in FORM_CONTENT_TYPES or not self._planned:
            response = await self._handler(self._framework.get_request(uri_parser=self._uri_parser, scope=scope, receive=receive))
        else:
            response = await self._call(**await self._kwargs(scope, receive, request, mimetype))
        await response(scope, receive, send)

    async def _kwargs(self, scope: Scope, receive: Receive, parsed: ConnexionRequest, mimetype: str) -> dict[str, t.Any]:
        """``prep_kwargs`` of Connexion's parameter decorator, for a request without a form body."""
        body = None
        if self._reads_body:
            body = await ConnexionRequest(scope, receive, uri_parser=self._uri_parser).get_body()
        kwargs: dict[str, t.Any] = {}
        for name, value in parsed.path_params.items():
            definition = self._path.get(name)
            if definition is not None:
                kwargs[self._path_names[name]] = _get_val_from_param(value, definition)
            else:  # Connexion passes path parameters the spec does not declare as they are
                kwargs[self._sanitize(name)] = value
        if self._query:
            query = parsed.query_params
            if self._query_defaults:
                query = utils.deep_merge(copy.deepcopy(self._query_defaults), query)
            for name, value in query.items():
                wanted = self._query.get(name)
                if wanted is not None:
                    kwargs[wanted[0]] = _get_val_from_param(value, wanted[1])
        if self._body_argument:
            kwargs.update(_get_body_argument(body, operation=self._operation, arguments=self._arguments,
                                             has_kwargs=self._has_kwargs, sanitize=self._sanitize, content_type=mimetype))
        context = (scope.get("extensions") or {}).get("connexion_context")
        if context:
            for key, value in context.items():
                if self._has_kwargs or key in self._arguments:
                    kwargs[key] = value
        if self._context_name:
            kwargs[CONTEXT_NAME] = connexion_context
        return kwargs


def _header(scope: Scope, name: bytes) -> str | None:
    """The first ``name`` header of the request (Starlette's ``Headers.get``: the server lower-cases names)."""
    for key, value in scope.get("headers") or ():
        if key == name:
            return t.cast(bytes, value).decode("latin-1")
    return None


@functools.lru_cache(maxsize=64)
def _mimetype(content_type: str) -> str:
    """``ConnexionRequest.mimetype``."""
    mimetype, _ = parse_options_header(content_type)
    return mimetype.decode()


class ContractApi(AsyncApi):
    def make_operation(self, operation: AbstractOperation) -> t.Any:
        return ContractOperation(operation, jsonifier=self.jsonifier, pythonic_params=self.pythonic_params)


class ContractASGIApp(AsyncASGIApp):
    """The innermost app: Connexion's router of operations, each a :class:`ContractOperation`."""

    api_cls = ContractApi


# --------------------------------------------------------------------------- validation


def _validator_for(validators: MediaTypeDict, mime_type: str) -> t.Any:
    try:
        return validators[mime_type]
    except KeyError:
        logger.info("Skipping validation. No validator registered for content type: %s.", mime_type)
        return None


def _compiled_bodies(operation: AbstractOperation) -> dict[str, CompiledSchema]:
    out: dict[str, CompiledSchema] = {}
    for media_type in operation.consumes:
        schema = operation.body_schema(media_type)
        if isinstance(schema, dict) and schema:
            out[media_type] = CompiledSchema(schema, _components(operation))
    return out


def _components(operation: AbstractOperation) -> dict | None:
    return getattr(operation, "components", None) or None  # OpenAPIOperation's Components Object


class CompiledRequestValidationOperation(RequestValidationOperation):
    """Connexion's request validation of one operation, its parts built once: the URI
    parser, the parameter validator (schemas compiled), the accepted media types and the
    compiled body schema of each. A request whose media type is not one the spec lists
    verbatim (a wildcard match, other letter case) is validated as Connexion does it."""

    def __init__(self, next_app: ASGIApp, *, operation: AbstractOperation, strict_validation: bool = False,
                 validator_map: dict | None = None) -> None:
        super().__init__(next_app, operation=operation, strict_validation=strict_validation, validator_map=validator_map)
        self._uri_parser = operation.uri_parser_class(operation.parameters, operation.body_definition())
        self._parameters = self._validator_map["parameter"](
            operation.parameters, uri_parser=self._uri_parser, strict_validation=strict_validation,
            security_query_params=self.security_query_params)
        self._consumes = MediaTypeDict([(c.lower(), None) for c in operation.consumes]) if operation.consumes else None
        self._bodies = _compiled_bodies(operation)
        self._required = operation.request_body.get("required", False)
        self._operation_id = operation.operation_id
        self._plans: dict[bytes | None, _RequestPlan] = {}

    def validate_mime_type(self, mime_type: str) -> None:
        if self._consumes is not None and mime_type.lower() not in self._consumes:
            raise UnsupportedMediaTypeProblem(detail=f"Invalid Content-type ({mime_type}), "
                                                     f"expected {self._operation.consumes}")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # ParameterValidator.validate(scope), the request it parses left for the handler stage
        request = ConnexionRequest(scope, uri_parser=self._uri_parser)
        self._parameters.validate_request(request)
        extensions = scope.setdefault("extensions", {})
        extensions[PARSED_REQUEST] = (self._operation_id, request)
        try:
            plan = self._plans.get(_content_type(scope["headers"])) or self._plan(scope["headers"])
            if plan.schema:
                if plan.validator is None:
                    logger.info("Skipping validation. No validator registered for content type: %s.", plan.mime_type)
                else:
                    validator = plan.validator(
                        schema=plan.schema,
                        **plan.extra,
                        required=self._required,
                        nullable=plan.nullable,
                        encoding=plan.encoding,
                        strict_validation=self.strict_validation,
                        uri_parser=self._uri_parser,
                    )
                    receive, scope = await validator.wrap_receive(receive, scope=scope)
            await self.next_app(scope, receive, send)
        finally:  # the handler stage takes it out; a request that never gets there leaves no cycle either
            extensions.pop(PARSED_REQUEST, None)

    def _plan(self, headers: list[tuple[bytes, bytes]]) -> _RequestPlan:
        """What Connexion's request validation works out from the request's Content-Type
        (checking it is one the operation accepts), remembered per Content-Type value."""
        mime_type, encoding = self.extract_content_type(headers)
        self.validate_mime_type(mime_type)
        compiled = self._bodies.get(mime_type)
        schema = compiled.schema if compiled is not None else self._operation.body_schema(mime_type)
        body_validator = None
        with contextlib.suppress(KeyError):
            body_validator = self._validator_map["body"][mime_type]
        plan = _RequestPlan(mime_type=mime_type, encoding=encoding, schema=schema, validator=body_validator,
                            extra=_compiled_for(body_validator, compiled, schema, self._operation),
                            nullable=utils.is_nullable(self._operation.body_definition(mime_type)))
        if len(self._plans) < _CACHED_CONTENT_TYPES:
            self._plans[_content_type(headers)] = plan
        return plan


def _compiled_for(validator: t.Any, compiled: CompiledSchema | None, schema: t.Any, operation: AbstractOperation) -> dict:
    """The ``compiled`` argument of one of our body validators: the schema compiled when the
    operation was built, or — a schema that was not (a 304's, a media type matched by a
    wildcard) — compiled now, once per plan, instead of by the validator on every request.
    Connexion's own validators (form data, streams) take no compiled schema."""
    if not getattr(validator, "takes_compiled", False):
        return {}
    if compiled is None and isinstance(schema, dict):
        compiled = CompiledSchema(schema, _components(operation))
    return {"compiled": compiled}


class _RequestPlan(t.NamedTuple):
    mime_type: str
    encoding: str
    schema: t.Any
    validator: t.Any
    extra: dict
    nullable: bool


_CACHED_CONTENT_TYPES = 32  # distinct Content-Type values remembered per operation (clients choose them)


def _content_type(headers: t.Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The Content-Type value ``connexion.utils.extract_content_type`` reads: the first header so named, any case."""
    for key, value in headers:
        if key.lower() == b"content-type":
            return value
    return None


class CompiledRequestValidationAPI(RequestValidationAPI):
    def make_operation(self, operation: AbstractOperation) -> RequestValidationOperation:
        return CompiledRequestValidationOperation(self.next_app, operation=operation,
                                                  strict_validation=self.strict_validation,
                                                  validator_map=self.validator_map)


class CompiledRequestValidation(RequestValidationMiddleware):
    api_cls = CompiledRequestValidationAPI


class CompiledResponseValidationOperation(ResponseValidationOperation):
    """Connexion's response validation of one operation, the schema of each documented
    (status, media type) compiled once."""

    def __init__(self, next_app: ASGIApp, *, operation: AbstractOperation, validator_map: dict | None = None) -> None:
        super().__init__(next_app, operation=operation, validator_map=validator_map)
        self._compiled: dict[tuple[str, str], CompiledSchema] = {}
        for status, response in (operation.responses or {}).items():
            for media_type in (response or {}).get("content") or {}:
                schema = operation.response_schema(str(status), media_type)
                if isinstance(schema, dict) and schema:
                    self._compiled[(str(status), media_type)] = CompiledSchema(schema, _components(operation))
        self._plans: dict[tuple[int, bytes | None], _ResponsePlan] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def wrapped_send(message: t.MutableMapping[str, t.Any]) -> None:
            nonlocal send
            if message["type"] == "http.response.start":
                headers = message["headers"]
                status = message["status"]
                plan = self._plans.get((status, _content_type(headers))) or self._plan(status, headers)
                if plan.required_headers:
                    self.validate_required_headers(headers, plan.definition)
                if plan.validator is None:
                    logger.info("Skipping validation. No validator registered for content type: %s.", plan.mime_type)
                else:
                    send = plan.validator(scope, schema=plan.schema, **plan.extra, nullable=plan.nullable,
                                          encoding=plan.encoding).wrap_send(send)
            await send(message)

        await self.next_app(scope, receive, wrapped_send)

    def _plan(self, status: int, headers: list[tuple[bytes, bytes]]) -> _ResponsePlan:
        """What Connexion's response validation works out from a response's status and
        Content-Type (checking the content type is one the operation produces), remembered
        per (status, Content-Type value)."""
        mime_type, encoding = self.extract_content_type(headers)
        if status < 400:
            self.validate_mime_type(mime_type)
        code = str(status)
        definition = self._operation.response_definition(code, mime_type)
        body_validator = _validator_for(self._validator_map["response"], mime_type)
        compiled = self._compiled.get((code, mime_type))
        schema = compiled.schema if compiled is not None else self._operation.response_schema(code, mime_type)
        plan = _ResponsePlan(
            mime_type=mime_type,
            definition=definition,
            required_headers=any(v.get("required", False) for v in definition.get("headers", {}).values()),
            validator=body_validator,
            schema=schema,
            extra=_compiled_for(body_validator, compiled, schema, self._operation),
            nullable=utils.is_nullable(definition),
            encoding=encoding,
        )
        if len(self._plans) < _CACHED_CONTENT_TYPES:
            self._plans[(status, _content_type(headers))] = plan
        return plan


class _ResponsePlan(t.NamedTuple):
    mime_type: str
    definition: dict
    required_headers: bool
    validator: t.Any
    schema: t.Any
    extra: dict
    nullable: bool
    encoding: str


class CompiledResponseValidationAPI(ResponseValidationAPI):
    def make_operation(self, operation: AbstractOperation) -> t.Any:
        if not self.validate_responses:
            return self.next_app
        return CompiledResponseValidationOperation(self.next_app, operation=operation, validator_map=self.validator_map)


class CompiledResponseValidation(ResponseValidationMiddleware):
    api_cls = CompiledResponseValidationAPI


# --------------------------------------------------------------------------- routing

# regexes of the path convertors that never match "/" (Starlette's and Connexion's int and float)
_ONE_SEGMENT = {"[^/]+", "[0-9]+", r"[0-9]+(\.[0-9]+)?", r"[+-]?[0-9]*(\.[0-9]*)?", r"[+-]?[0-9]+",
                "[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"}


class _Shape(t.NamedTuple):
    """What a route's path template says about the paths it can match: ``segments`` of
    them, the first and last literal (None: a parameter there); ``None`` for a route that
    may match any path (a convertor that matches "/", a route that is not a Route)."""

    segments: int
    first: str | None
    last: str | None


def _shape(route: t.Any) -> _Shape | None:
    if not isinstance(route, Route) or any(type(c).regex not in _ONE_SEGMENT for c in route.param_convertors.values()):
        return None
    parts = route.path.split("/")
    if len(parts) < 2 or parts[0]:
        return None
    return _Shape(len(parts), None if "{" in parts[1] else parts[1], None if "{" in parts[-1] else parts[-1])


class ShapedRouter(Router):
    """The router of one API's operations (Connexion's ``RoutingAPI`` router, same routes, same
    default): a request first tries, in their order, only the routes whose template can match
    its path — the same number of segments, the same literal first and last segment — and the
    first that matches it fully (path and method) serves it, as in Starlette's ``Router``,
    since a route left out cannot match. Anything else (no full match: a 405, a redirect, the
    default) is Starlette's ``Router.app`` over every route."""

    def __init__(self, router: Router) -> None:
        super().__init__(routes=router.routes, default=router.default, redirect_slashes=router.redirect_slashes)
        self._indexed = -1
        self._by_length: dict[int, list[tuple[_Shape | None, BaseRoute]]] = {}
        self._any_length: list[tuple[_Shape | None, BaseRoute]] = []

    def _index(self) -> None:
        """Each path length → the routes that may match a path of that many segments, in order."""
        shapes = [(_shape(r), r) for r in self.routes]
        self._any_length = [(shape, r) for shape, r in shapes if shape is None]
        self._by_length = {n: [(shape, r) for shape, r in shapes if shape is None or shape.segments == n]
                           for n in {shape.segments for shape, _ in shapes if shape is not None}}
        self._indexed = len(self.routes)

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if self._indexed != len(self.routes):
                self._index()
            parts = get_route_path(scope).split("/")
            first, last = parts[1] if len(parts) > 1 else None, parts[-1]
            for shape, route in self._by_length.get(len(parts), self._any_length):
                if shape is not None and (shape.first not in (None, first) or shape.last not in (None, last)):
                    continue
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    if "router" not in scope:
                        scope["router"] = self
                    scope["route"] = route
                    scope.update(child_scope)
                    await route.handle(scope, receive, send)
                    return
        await super().app(scope, receive, send)


class ShapedRouting(RoutingMiddleware):
    """Connexion's routing middleware, each API's router a :class:`ShapedRouter`."""

    def add_api(self, specification: t.Any, base_path: str | None = None, arguments: dict | None = None,
                **kwargs: t.Any) -> None:
        super().add_api(specification, base_path=base_path, arguments=arguments, **kwargs)
        mount = self.router.routes[-1]  # the Mount add_api just added
        if isinstance(mount, Mount) and type(mount._base_app) is Router and mount.app is mount._base_app:
            mount._base_app = mount.app = ShapedRouter(mount._base_app)


# --------------------------------------------------------------------------- the stack


def middlewares(security: t.Callable[[ASGIApp], ASGIApp]) -> list[t.Any]:
    """Connexion's default middleware list with our replacements (see the module docstring).
    Order kept: errors, routing, security (after routing, before validation), validation,
    lifespan, context."""
    replace: dict[t.Any, t.Any] = {
        RoutingMiddleware: ShapedRouting,
        SecurityMiddleware: security,
        RequestValidationMiddleware: CompiledRequestValidation,
        ResponseValidationMiddleware: CompiledResponseValidation,
    }
    return [replace.get(m, m) for m in ConnexionMiddleware.default_middlewares if m is not SwaggerUIMiddleware]


def contract_app(import_name: str, spec: dict, *, resolver: t.Any, middleware_list: list[t.Any],
                 lifespan: t.Callable | None = None, validate_responses: bool = True,
                 resolver_error: int | None = None) -> ConnexionMiddleware:
    """The Connexion stack serving ``spec`` (a bundled OpenAPI document) with handlers from
    ``resolver``: Connexion's ``ConnexionMiddleware`` around :class:`ContractASGIApp`."""
    app = ConnexionMiddleware(ContractASGIApp(), import_name=import_name, lifespan=lifespan, middlewares=middleware_list)
    app.add_api(
        spec,
        resolver=resolver,
        validator_map=VALIDATOR_MAP,
        validate_responses=validate_responses,
        strict_validation=False,
        pythonic_params=False,
        resolver_error=resolver_error,
    )
    return app
