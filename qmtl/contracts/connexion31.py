"""Draft 2020-12 validators for Connexion 3.3 (its ``validator_map`` extension point).

Why this module exists (see DESIGN.md, "Facts measured"): Connexion 3.3 validates
parameters and bodies with Draft 4, which silently ignores 2020-12 keywords (``const``,
``$defs``, ``prefixItems``, numeric ``exclusiveMinimum`` ...). (It also refuses OpenAPI 3.1
at load time: :mod:`qmtl.contracts.connexion_patch` handles that.)

What it does, and nothing more:

* :class:`CompiledSchema`: a schema compiled once with jsonschema-rs (the fast "valid"
  answer) and jsonschema (the explanation of an invalid instance).
* ``VALIDATOR_MAP`` supplies parameter, request-body and response-body validators
  built on ``Draft202012Validator`` (with format checking). Body schema violations
  answer **422** with every error's JSON pointer; unparsable bodies (bad JSON, bad
  UTF-8) answer **400**.

Drop this module when Connexion supports OpenAPI 3.1 natively.
"""

from __future__ import annotations

import itertools
import json
import logging
import typing as t

from connexion.datastructures import MediaTypeDict
from connexion.exceptions import BadRequestProblem, NonConformingResponseBody, ProblemException
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


def pointer(path: t.Iterable[t.Any]) -> str:
    """RFC 6901 JSON pointer of a path."""
    parts = [str(p).replace("~", "~0").replace("/", "~1") for p in path]
    return "/" + "/".join(parts) if parts else ""


class CompiledSchema:
    """One JSON Schema compiled once: a jsonschema-rs validator (~100x faster than
    jsonschema) to accept valid instances quickly, and the pure-Python Draft 2020-12
    validator that decides and explains whenever jsonschema-rs does not say "valid" (or
    cannot compile the schema). Built when an operation is set up
    (:mod:`qmtl.contracts.connexion_stack`), never per request.

    ``components``: the document's Components Object, which Connexion's
    ``OpenAPIOperation.with_definitions`` inserts into the (shared) schema dicts it hands
    out. Its references are already resolved, and once it sits in a schema that it also
    contains (the Problem schema of a shared response) the schema is a cycle that
    jsonschema-rs refuses ("Recursion limit reached"), so the fast validator is compiled
    from a copy without it."""

    __slots__ = ("fast", "schema", "slow")

    def __init__(self, schema: dict, components: dict | None = None) -> None:
        self.schema = schema
        self.slow = Draft202012Validator(schema, format_checker=_FORMAT_CHECKER)
        try:
            import jsonschema_rs

            plain = _without(schema, components) if components else schema
            self.fast: t.Any = jsonschema_rs.validator_for(plain, validate_formats=True)
        except Exception as exc:  # an unsupported keyword or regex: stay on the slow path
            logger.debug("no jsonschema-rs validator for a schema (%s); using jsonschema only", exc)
            self.fast = None

    def is_valid_fast(self, instance: t.Any) -> bool:
        """True when jsonschema-rs accepts ``instance``; False means "ask the slow validator"."""
        if self.fast is None:
            return False
        try:
            return bool(self.fast.is_valid(instance))
        except Exception:  # e.g. a string with a lone surrogate, an int beyond 64 bits
            return False


def _without(node: t.Any, components: dict, seen: dict[int, t.Any] | None = None) -> t.Any:
    """A copy of ``node`` without the ``components`` members that are ``components`` itself."""
    if not isinstance(node, (dict, list)):
        return node
    seen = {} if seen is None else seen
    if id(node) in seen:  # shared subschemas stay shared in the copy (local to one copy)
        return seen[id(node)]
    if isinstance(node, list):
        out_list: list[t.Any] = []
        seen[id(node)] = out_list
        out_list.extend(_without(v, components, seen) for v in node)
        return out_list
    out: dict[str, t.Any] = {}
    seen[id(node)] = out
    for key, value in node.items():
        if key == "components" and value is components:
            continue
        out[key] = _without(value, components, seen)
    return out


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

    takes_compiled = True  # the stack hands it the schema compiled once per operation

    def __init__(self, *, schema: dict, compiled: CompiledSchema | None = None, **kwargs: t.Any) -> None:
        super().__init__(schema=schema, **kwargs)
        self._compiled = compiled if compiled is not None and compiled.schema is schema else CompiledSchema(schema)

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
        if self._compiled.is_valid_fast(body):
            return
        errors = schema_errors(self._compiled.slow, body)
        if errors:
            raise UnprocessableBodyProblem(errors)


class JSONResponse2020Validator(AbstractResponseBodyValidator):
    """Response body validator: Draft 2020-12 (a non-conforming response is our bug: 500)."""

    takes_compiled = True  # the stack hands it the schema compiled once per operation

    def __init__(self, scope: t.Any, *, schema: dict, compiled: CompiledSchema | None = None, **kwargs: t.Any) -> None:
        super().__init__(scope, schema=schema, **kwargs)
        self._compiled = compiled if compiled is not None and compiled.schema is schema else CompiledSchema(schema)

    def _parse(self, stream: t.Generator[bytes, None, None]) -> t.Any:
        raw = b"".join(stream).decode(self._encoding or "utf-8")
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise NonConformingResponseBody(f"Response body is not JSON: {exc}") from exc

    def _validate(self, body: t.Any) -> None:
        if self._compiled.is_valid_fast(body):
            return
        errors = schema_errors(self._compiled.slow, body)
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
    """Parameter validator using Draft 2020-12 instead of Draft 4; each parameter's schema
    is compiled when the validator is built (once per operation)."""

    def __init__(self, parameters: t.Iterable[dict], uri_parser: t.Any, strict_validation: bool = False,
                 security_query_params: t.Any = None) -> None:
        parameters = list(parameters)
        super().__init__(parameters, uri_parser, strict_validation, security_query_params)
        self._compiled = {(p.get("in"), p.get("name")): CompiledSchema(p.get("schema", p)) for p in parameters}

    def validate_parameter(self, parameter_type: str, value: t.Any, param: dict,
                           param_name: str | None = None) -> str | None:
        if is_nullable(param) and is_null(value):
            return None
        if value is not None:
            schema = param.get("schema", param)
            compiled = self._compiled.get((param.get("in"), param.get("name")))
            if compiled is None or compiled.schema is not schema:
                compiled = CompiledSchema(schema)
            if compiled.is_valid_fast(value):  # jsonschema-rs accepts: done (~1 µs)
                return None
            error = best_match(itertools.islice(compiled.slow.iter_errors(value), _SCANNED_ERRORS))
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
