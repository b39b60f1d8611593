"""The Connexion stack a service runs, assembled through Connexion 3's extension points.

Nothing here patches Connexion: every piece is a subclass plugged in where Connexion takes
one, and is built once per operation when the app is set up, so a request pays only for
its own work.

* :func:`contract_app` — a :class:`connexion.middleware.ConnexionMiddleware` (Connexion's
  documented way to put its stack in front of any ASGI app) around :class:`ContractASGIApp`,
  with :func:`middlewares` as its ``middlewares`` list.
* :class:`ContractASGIApp` — Connexion's ``AsyncASGIApp`` with ``api_cls`` set to an API
  whose ``make_operation`` returns a :class:`ContractOperation`: the handler's decorator
  chain (parameters in, response out) and its URI parser are built once per operation
  (Connexion 3.3's ``AsyncOperation`` rebuilds both on every request).
* :class:`CompiledRequestValidation` / :class:`CompiledResponseValidation` — Connexion's
  validation middlewares (same ``RoutedMiddleware`` slots, same checks, same problems) whose
  per-operation objects build the URI parser, the parameter validator and the compiled
  body schemas of every documented media type (:class:`~qmtl.contracts.connexion31.CompiledSchema`)
  once, instead of on every request and every response.
* :func:`middlewares` — Connexion's default list minus ``SwaggerUIMiddleware`` (the docs are
  served by :mod:`qmtl.contracts.docs`), with ``SecurityMiddleware`` replaced by
  :class:`~qmtl.contracts.security.SpecSecurity` and the two validation middlewares by the
  compiled ones above.

The subclasses lean on Connexion internals that are not a published API (``api_cls``,
``make_operation``, the operation classes' constructors); :mod:`qmtl.contracts.connexion_patch`
checks the installed Connexion is one they were written for before any app is built, and
``tests/unit/test_connexion_stack.py`` checks those hooks still exist and behave.
"""

from __future__ import annotations

import functools
import logging
import typing as t

from connexion import utils
from connexion.apps.asynchronous import AsyncApi, AsyncASGIApp
from connexion.datastructures import MediaTypeDict
from connexion.decorators import StarletteDecorator
from connexion.exceptions import UnsupportedMediaTypeProblem
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
from connexion.middleware.security import SecurityMiddleware
from connexion.middleware.swagger_ui import SwaggerUIMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from qmtl.contracts.connexion31 import VALIDATOR_MAP, CompiledSchema

if t.TYPE_CHECKING:
    from connexion.jsonifier import Jsonifier
    from connexion.operations import AbstractOperation

logger = logging.getLogger("connexion.middleware.validation")  # where Connexion logs the same


# --------------------------------------------------------------------------- the handlers


class ContractOperation:
    """What Connexion's ``AsyncOperation`` does per request (build a ``StarletteDecorator``,
    run its ``decorate()``: parameter and response decorators, ``inspect.signature`` of the
    handler; build a URI parser), done once per operation. The request is read from the
    ``scope``/``receive`` the router passes, the same objects Connexion's context holds."""

    def __init__(self, operation: AbstractOperation, *, jsonifier: Jsonifier, pythonic_params: bool) -> None:
        self.operation_id = operation.operation_id
        decorator = StarletteDecorator(pythonic_params=pythonic_params, jsonifier=jsonifier)
        self._framework = decorator.framework
        self._handler = decorator.decorate(operation.function)
        self._uri_parser = operation.uri_parser_class(operation.parameters, operation.body_definition())
        functools.update_wrapper(self, operation.function)  # Starlette's Route reads __name__

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = self._framework.get_request(uri_parser=self._uri_parser, scope=scope, receive=receive)
        response = await self._handler(request)
        await response(scope, receive, send)


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

    def validate_mime_type(self, mime_type: str) -> None:
        if self._consumes is not None and mime_type.lower() not in self._consumes:
            raise UnsupportedMediaTypeProblem(detail=f"Invalid Content-type ({mime_type}), "
                                                     f"expected {self._operation.consumes}")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._parameters.validate(scope)
        mime_type, encoding = self.extract_content_type(scope["headers"])
        self.validate_mime_type(mime_type)
        compiled = self._bodies.get(mime_type)
        schema = compiled.schema if compiled is not None else self._operation.body_schema(mime_type)
        if schema:
            body_validator = _validator_for(self._validator_map["body"], mime_type)
            if body_validator is not None:
                extra = {"compiled": compiled} if getattr(body_validator, "takes_compiled", False) else {}
                validator = body_validator(
                    schema=schema,
                    **extra,
                    required=self._required,
                    nullable=utils.is_nullable(self._operation.body_definition(mime_type)),
                    encoding=encoding,
                    strict_validation=self.strict_validation,
                    uri_parser=self._uri_parser,
                )
                receive, scope = await validator.wrap_receive(receive, scope=scope)
        await self.next_app(scope, receive, send)


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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def wrapped_send(message: t.MutableMapping[str, t.Any]) -> None:
            nonlocal send
            if message["type"] == "http.response.start":
                headers = message["headers"]
                mime_type, encoding = self.extract_content_type(headers)
                if message["status"] < 400:
                    self.validate_mime_type(mime_type)
                status = str(message["status"])
                definition = self._operation.response_definition(status, mime_type)
                self.validate_required_headers(headers, definition)
                body_validator = _validator_for(self._validator_map["response"], mime_type)
                if body_validator is not None:
                    compiled = self._compiled.get((status, mime_type))
                    # Connexion's own validators (form data, streams) take no compiled schema
                    extra = {"compiled": compiled} if getattr(body_validator, "takes_compiled", False) else {}
                    validator = body_validator(
                        scope,
                        schema=compiled.schema if compiled is not None else self._operation.response_schema(status, mime_type),
                        **extra,
                        nullable=utils.is_nullable(definition),
                        encoding=encoding,
                    )
                    send = validator.wrap_send(send)
            await send(message)

        await self.next_app(scope, receive, wrapped_send)


class CompiledResponseValidationAPI(ResponseValidationAPI):
    def make_operation(self, operation: AbstractOperation) -> t.Any:
        if not self.validate_responses:
            return self.next_app
        return CompiledResponseValidationOperation(self.next_app, operation=operation, validator_map=self.validator_map)


class CompiledResponseValidation(ResponseValidationMiddleware):
    api_cls = CompiledResponseValidationAPI


# --------------------------------------------------------------------------- the stack


def middlewares(security: t.Callable[[ASGIApp], ASGIApp]) -> list[t.Any]:
    """Connexion's default middleware list with our replacements (see the module docstring).
    Order kept: errors, routing, security (after routing, before validation), validation,
    lifespan, context."""
    replace: dict[t.Any, t.Any] = {
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
