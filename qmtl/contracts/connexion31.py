"""Adapter that lets Connexion 3.3 serve OpenAPI 3.1 documents with Draft 2020-12 validation.

Why this module exists (see DESIGN.md, "Facts measured"): Connexion 3.3 refuses
OpenAPI 3.1 at load time (it checks documents against its 3.0 meta-schema) and
validates parameters and bodies with Draft 4, which silently ignores 2020-12
keywords (``const``, ``$defs``, ``prefixItems``, numeric ``exclusiveMinimum`` ...).

What it does, and nothing more:

* ``allow_openapi31()`` skips Connexion's own meta-schema check for documents that
  declare ``openapi: 3.1.x`` — those were already validated by openapi-spec-validator
  (3.1-aware) in :mod:`qmtl.contracts.loader` before they reach Connexion. 3.0
  documents keep Connexion's check.
* ``VALIDATOR_MAP`` supplies parameter, request-body and response-body validators
  built on ``Draft202012Validator`` (with format checking). Body schema violations
  answer **422** with every error's JSON pointer; unparsable bodies (bad JSON, bad
  UTF-8) answer **400**.

Drop this module when Connexion supports OpenAPI 3.1 natively.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import typing as t

from connexion.datastructures import MediaTypeDict
from connexion.exceptions import BadRequestProblem, NonConformingResponseBody, ProblemException
from connexion.spec import OpenAPISpecification
from connexion.utils import is_null, is_nullable
from connexion.validators import (
    AbstractRequestBodyValidator,
    AbstractResponseBodyValidator,
    FormDataValidator,
    MultiPartFormDataValidator,
    ParameterValidator,
)
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from qmtl.contracts.limits import (
    DEFAULT_MAX_DEPTH,
    DEPTH_SCOPE_KEY,
    bound_text,
    json_depth_exceeds,
    short_repr,
    too_deep_problem,
)

logger = logging.getLogger(__name__)

_FORMAT_CHECKER = Draft202012Validator.FORMAT_CHECKER
_MAX_ERRORS = 20
_SCANNED_ERRORS = 1000  # violations looked at to pick the most relevant (a 10 MB body can hold millions)


def allow_openapi31() -> None:
    """Make Connexion accept 3.1 documents (validated beforehand by openapi-spec-validator)."""
    current = OpenAPISpecification._validate_spec  # bound classmethod
    if getattr(current.__func__, "_qmtl_31", False):
        return
    original = current.__func__

    def _validate_spec(cls, spec):
        if str(spec.get("openapi", "")).startswith("3.1"):
            return  # validated up front by qmtl.contracts.loader.validate_openapi
        return original(cls, spec)

    _validate_spec._qmtl_31 = True  # type: ignore[attr-defined]
    OpenAPISpecification._validate_spec = classmethod(_validate_spec)


def decorate_handlers_once() -> None:
    """Build each operation's decorator chain once instead of on every request.

    Connexion 3.3's ``AsyncOperation.fn`` creates a new ``StarletteDecorator`` per request,
    and ``ASGIDecorator``'s wrapper runs ``decorate()`` (parameter and response decorators,
    ``inspect.signature`` of the handler) again per request. The chain depends only on the
    handler and the decorator's settings — the request is read from Connexion's context when
    the chain runs — so building it once per operation gives the same behaviour; measured on
    ``POST /strategies`` it saved ~10 % of the CPU per request. Safe to call repeatedly.
    """
    from connexion.apps.asynchronous import AsyncOperation
    from connexion.context import receive as ctx_receive  # the same proxies Connexion passes
    from connexion.context import scope as ctx_scope
    from connexion.decorators.main import ASGIDecorator, StarletteDecorator

    if getattr(AsyncOperation, "_qmtl_decorate_once", False):
        return

    def fn(self: t.Any) -> t.Callable:
        cached = self.__dict__.get("_qmtl_fn")
        if cached is None:
            cached = StarletteDecorator(pythonic_params=self.pythonic_params, jsonifier=self.jsonifier)(self._fn)
            self.__dict__["_qmtl_fn"] = cached
        return cached

    def call(self: t.Any, function: t.Callable) -> t.Callable:
        decorated: t.Callable | None = None

        @functools.wraps(function)
        async def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
            nonlocal decorated
            request = self.framework.get_request(uri_parser=self.uri_parser, scope=ctx_scope, receive=ctx_receive)
            if decorated is None:
                decorated = self.decorate(function)
            return await decorated(request)

        return wrapper

    AsyncOperation.fn = property(fn)
    ASGIDecorator.__call__ = call
    AsyncOperation._qmtl_decorate_once = True


def pointer(path: t.Iterable[t.Any]) -> str:
    """RFC 6901 JSON pointer of a path."""
    parts = [str(p).replace("~", "~0").replace("/", "~1") for p in path]
    return "/" + "/".join(parts) if parts else ""


_FAST: dict[int, tuple[dict, t.Any]] = {}


def fast_validator(schema: dict) -> t.Any:
    """A jsonschema-rs validator for ``schema`` (~100x faster than jsonschema), or None
    when it cannot compile it. Used only to accept valid documents quickly: whenever it
    does not say "valid", the pure-Python validator decides and explains. Connexion
    builds a validator per request from the same schema object: compile it once."""
    cached = _FAST.get(id(schema))
    if cached is not None and cached[0] is schema:
        return cached[1]
    try:
        import jsonschema_rs

        fast = jsonschema_rs.validator_for(schema, validate_formats=True)
    except Exception as exc:  # an unsupported keyword or regex: stay on the slow path
        logger.debug("no jsonschema-rs validator for a schema (%s); using jsonschema only", exc)
        fast = None
    _FAST[id(schema)] = (schema, fast)
    return fast


def fast_is_valid(fast: t.Any, instance: t.Any) -> bool:
    if fast is None:
        return False
    try:
        return bool(fast.is_valid(instance))
    except Exception:  # e.g. a string with a lone surrogate, an int beyond 64 bits
        return False


def schema_errors(validator: Draft202012Validator, instance: t.Any, prefix: str = "") -> list[dict]:
    """Every violation as ``{"pointer", "message"}``, most relevant first, bounded: at most
    ``_MAX_ERRORS`` of them, and a value quoted in a message is cut to a few dozen characters
    (a 10 MB string in the body is not echoed back)."""
    errors = list(itertools.islice(validator.iter_errors(instance), _SCANNED_ERRORS))
    if not errors:
        return []
    first = best_match(errors)
    ordered = [first] + [e for e in errors if e is not first]
    return [
        {"pointer": bound_text(prefix + pointer(e.absolute_path), 200), "message": error_message(e)}
        for e in ordered[:_MAX_ERRORS]
    ]


def error_message(error: t.Any) -> str:
    """A jsonschema error's message with the instance it quotes shortened."""
    message = error.message
    if len(message) > 200:
        quoted = repr(error.instance)
        if len(quoted) > 80 and quoted in message:
            message = message.replace(quoted, short_repr(error.instance))
    return bound_text(message, 500)


class UnprocessableBodyProblem(ProblemException):
    def __init__(self, errors: list[dict]):
        where = errors[0]["pointer"] or "(the whole body)"
        super().__init__(
            status=422,
            title="Unprocessable Content",
            detail=f"Request body does not conform to the schema: {errors[0]['message']} at {where}",
            ext={"errors": errors},
        )


def _reject_constant(name: str) -> t.Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text} is out of range")
    return value


class JSONBody2020Validator(AbstractRequestBodyValidator):
    """Request body validator: JSON, Draft 2020-12, 422 with JSON pointers."""

    def __init__(self, *, schema: dict, **kwargs: t.Any) -> None:
        super().__init__(schema=schema, **kwargs)
        self._validator = Draft202012Validator(schema, format_checker=_FORMAT_CHECKER)
        self._fast = fast_validator(schema)

    async def _parse(self, stream: t.AsyncGenerator[bytes, None], scope: t.Any) -> t.Any:
        raw = b"".join([chunk async for chunk in stream])
        if not raw:
            return None
        depth = (scope or {}).get(DEPTH_SCOPE_KEY, DEFAULT_MAX_DEPTH)
        if json_depth_exceeds(raw, depth):  # before any parser recurses into it
            raise ProblemException(**too_deep_problem(depth))
        try:
            text = raw.decode(self._encoding or "utf-8")
        except (UnicodeDecodeError, LookupError) as exc:
            raise BadRequestProblem(detail=f"Request body is not valid {self._encoding or 'utf-8'}: {exc}") from exc
        try:
            return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
        except json.JSONDecodeError as exc:
            raise BadRequestProblem(
                detail=f"Request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            ) from exc
        except ValueError as exc:  # NaN / Infinity / a float out of range: not JSON (RFC 8259)
            raise BadRequestProblem(detail=f"Request body is not valid JSON: {exc}") from exc

    def _validate(self, body: t.Any) -> None:
        if body is None:
            if not self._nullable:
                raise BadRequestProblem(detail="Request body must not be empty")
            return
        if fast_is_valid(self._fast, body):
            return
        errors = schema_errors(self._validator, body)
        if errors:
            raise UnprocessableBodyProblem(errors)


class JSONResponse2020Validator(AbstractResponseBodyValidator):
    """Response body validator: Draft 2020-12 (a non-conforming response is our bug: 500)."""

    def __init__(self, scope: t.Any, *, schema: dict, **kwargs: t.Any) -> None:
        super().__init__(scope, schema=schema, **kwargs)
        self._validator = Draft202012Validator(schema, format_checker=_FORMAT_CHECKER)
        self._fast = fast_validator(schema)

    def _parse(self, stream: t.Generator[bytes, None, None]) -> t.Any:
        raw = b"".join(stream).decode(self._encoding or "utf-8")
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise NonConformingResponseBody(f"Response body is not JSON: {exc}") from exc

    def _validate(self, body: t.Any) -> None:
        if fast_is_valid(self._fast, body):
            return
        errors = schema_errors(self._validator, body)
        if errors:
            logger.error("response does not conform to the spec: %s", errors)
            raise NonConformingResponseBody(
                detail=f"Response body does not conform to specification: {errors[0]['message']} at {errors[0]['pointer'] or '/'}"
            )


class TextResponseValidator(JSONResponse2020Validator):
    def _parse(self, stream: t.Generator[bytes, None, None]) -> t.Any:
        return b"".join(stream).decode(self._encoding or "utf-8")

    def _validate(self, body: t.Any) -> None:
        if isinstance(body, str) and self._schema.get("type") in (None, "string"):
            return
        super()._validate(body)


class StreamingResponseValidator(AbstractResponseBodyValidator):
    """Streaming media types (``application/x-ndjson``): the body is not buffered or
    validated, so each line reaches the client as it is sent. Without this entry the
    ``*/*json`` validator would match ``x-ndjson`` and hold the stream until it ends."""

    def wrap_send(self, send: t.Any) -> t.Any:
        return send

    def _parse(self, stream: t.Generator[bytes, None, None]) -> t.Any:  # pragma: no cover - never called
        return None

    def _validate(self, body: t.Any) -> None:  # pragma: no cover - never called
        return None


class Parameter2020Validator(ParameterValidator):
    """Parameter validator using Draft 2020-12 instead of Draft 4."""

    _cache: t.ClassVar[dict[int, Draft202012Validator]] = {}

    @staticmethod
    def validate_parameter(parameter_type, value, param, param_name=None):
        if is_nullable(param) and is_null(value):
            return None
        if value is not None:
            schema = param.get("schema", param)
            if fast_is_valid(fast_validator(schema), value):  # jsonschema-rs accepts: done (~1 µs)
                return None
            key = id(schema)
            validator = Parameter2020Validator._cache.get(key)
            if validator is None or validator.schema is not schema:
                validator = Draft202012Validator(schema, format_checker=_FORMAT_CHECKER)
                Parameter2020Validator._cache[key] = validator
            error = best_match(itertools.islice(validator.iter_errors(value), _SCANNED_ERRORS))
            if error is not None:
                name = param_name or param.get("name")
                return f"Invalid {parameter_type} parameter '{name}': {error_message(error)}"
            return None
        if param.get("required"):
            return f"Missing {parameter_type} parameter '{param['name']}'"
        return None


VALIDATOR_MAP = {
    "parameter": Parameter2020Validator,
    "body": MediaTypeDict(
        {
            "*/*json": JSONBody2020Validator,
            "application/x-www-form-urlencoded": FormDataValidator,
            "multipart/form-data": MultiPartFormDataValidator,
        }
    ),
    "response": MediaTypeDict(
        {
            "*/*json": JSONResponse2020Validator,
            "application/x-ndjson": StreamingResponseValidator,
            "text/plain": TextResponseValidator,
        }
    ),
}
