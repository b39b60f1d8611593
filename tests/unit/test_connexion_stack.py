"""The Connexion extension points qmtl.contracts relies on still exist and behave.

qmtl/contracts/connexion_stack.py plugs subclasses into Connexion's middleware list and
``api_cls``/``make_operation`` slots, and qmtl/contracts/connexion_patch.py replaces one
classmethod. A Connexion release that renames or reshapes any of them fails here (not
just the version check, which only compares the version string)."""

from __future__ import annotations

import inspect
import typing as t

import httpx
import pytest
from connexion.apps.asynchronous import AsyncApi, AsyncASGIApp
from connexion.decorators import StarletteDecorator
from connexion.exceptions import InvalidSpecification
from connexion.middleware.abstract import RoutedAPI, RoutedMiddleware
from connexion.middleware.main import ConnexionMiddleware
from connexion.middleware.request_validation import RequestValidationMiddleware, RequestValidationOperation
from connexion.middleware.response_validation import ResponseValidationMiddleware, ResponseValidationOperation
from connexion.middleware.security import SecurityMiddleware
from connexion.middleware.swagger_ui import SwaggerUIMiddleware
from connexion.operations import OpenAPIOperation
from connexion.resolver import Resolver
from connexion.spec import OpenAPISpecification, Specification
from connexion.validators import ParameterValidator

from qmtl.contracts import connexion31, connexion_patch, connexion_stack
from qmtl.contracts.connexion_patch import ConnexionVersionError, check_version


def test_the_installed_connexion_is_supported_and_others_are_refused_by_name():
    installed = check_version()
    assert ".".join(installed.split(".")[:2]) in connexion_patch.SUPPORTED
    for other in ("4.0.0", "3.2.1", "2.14.2"):
        with pytest.raises(ConnexionVersionError) as err:
            check_version(other)
        message = str(err.value)
        assert f"connexion {other} is installed" in message and "3.3.x" in message


# --------------------------------------------------------------------------- the patch

SPEC31: dict[str, t.Any] = {
    "openapi": "3.1.0",
    "info": {"title": "t", "version": "1"},
    "paths": {
        "/items/{item_id}": {
            "post": {
                "operationId": "post_item",
                "parameters": [{"name": "item_id", "in": "path", "required": True,
                                "schema": {"type": "string", "pattern": "^[a-z]+$"}}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["n"], "properties": {"n": {"const": 1}},
                    "additionalProperties": False}}}},
                "responses": {
                    "200": {"description": "ok", "content": {"application/json": {"schema": {
                        "type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}}}}},
                    "default": {"$ref": "#/components/responses/Problem"},
                },
            }
        }
    },
    "components": {"responses": {"Problem": {"description": "problem", "content": {
        "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}},
        "schemas": {"Problem": {"type": "object", "properties": {"title": {"type": "string"}}}}},
}


def test_the_patched_classmethod_exists_and_lets_31_documents_through_once():
    # what the patch replaces: a classmethod Specification.__init__ calls with the raw document
    assert "_validate_spec" in Specification.__dict__
    assert isinstance(inspect.getattr_static(OpenAPISpecification, "_validate_spec"), classmethod)
    assert "self._validate_spec(raw_spec)" in inspect.getsource(Specification.__init__)
    connexion_patch.prepare()
    patched = OpenAPISpecification._validate_spec.__func__
    connexion_patch.prepare()  # applied once: a second call wraps nothing
    assert OpenAPISpecification._validate_spec.__func__ is patched
    spec = Specification.from_dict(SPEC31)  # a 3.1 document loads...
    assert isinstance(spec, OpenAPISpecification)
    with pytest.raises(InvalidSpecification):  # ...while a 3.0 one is still checked by Connexion
        Specification.from_dict({"openapi": "3.0.3", "info": {"title": "t"}, "paths": {"/x": {"get": {"responses": 1}}}})


# --------------------------------------------------------------------------- the hooks


def test_the_hooks_the_stack_plugs_into_exist():
    defaults = ConnexionMiddleware.default_middlewares
    for cls in (SecurityMiddleware, RequestValidationMiddleware, ResponseValidationMiddleware, SwaggerUIMiddleware):
        assert cls in defaults
    assert issubclass(AsyncASGIApp, RoutedMiddleware) and AsyncASGIApp.api_cls is AsyncApi
    assert "self.api_cls(" in inspect.getsource(RoutedMiddleware.add_api)
    assert "self.make_operation(operation)" in inspect.getsource(RoutedAPI.add_operation)
    assert list(inspect.signature(RequestValidationOperation.__init__).parameters) == [
        "self", "next_app", "operation", "strict_validation", "validator_map"]
    assert list(inspect.signature(ResponseValidationOperation.__init__).parameters) == [
        "self", "next_app", "operation", "validator_map"]
    for name in ("extract_content_type", "validate_mime_type", "security_query_params"):
        assert hasattr(RequestValidationOperation, name)
    for name in ("extract_content_type", "validate_mime_type", "validate_required_headers"):
        assert hasattr(ResponseValidationOperation, name)
    assert callable(StarletteDecorator.decorate) and StarletteDecorator.framework.get_request
    # what ContractOperation plans from (Connexion's parameter decorator and its helpers)
    from connexion.decorators import parameter

    assert "prep_kwargs(" in inspect.getsource(parameter.AsyncParameterDecorator.__call__)
    for name in ("CONTEXT_NAME", "_get_body_argument", "_get_query_defaults", "_get_val_from_param", "sanitized",
                 "pythonic", "unwrap_decorators", "_get_path_arguments", "_get_query_arguments"):
        assert hasattr(parameter, name), name
    decorator = StarletteDecorator(pythonic_params=False, jsonifier=None)
    assert callable(decorator._sync_async_decorator) and decorator._response_decorator_cls.__name__ == "AsyncResponseDecorator"
    assert "ConnexionRequest(scope, uri_parser=self.uri_parser)" in inspect.getsource(ParameterValidator.validate)
    # why CompiledSchema strips "components": Connexion inserts it into the schemas it hands out
    assert 'schema["schema"]["components"] = self.components' in inspect.getsource(OpenAPIOperation.with_definitions)

    stack = connexion_stack.middlewares(SecurityMiddleware)
    assert SwaggerUIMiddleware not in stack
    assert connexion_stack.CompiledRequestValidation in stack and RequestValidationMiddleware not in stack
    assert connexion_stack.CompiledResponseValidation in stack and ResponseValidationMiddleware not in stack
    assert len(stack) == len(defaults) - 1


async def post_item(item_id: str, body: dict) -> t.Any:
    from connexion.lifecycle import ConnexionResponse

    if item_id == "broken":
        return ConnexionResponse(status_code=200, body=b'{"id": 1}', content_type="application/json")
    return ConnexionResponse(status_code=200, body=b'{"id": "%s"}' % item_id.encode(), content_type="application/json")


async def test_the_stack_serves_validates_and_compiles_once(monkeypatch):
    connexion_patch.prepare()
    built: list[dict] = []
    original = connexion31.CompiledSchema.__init__

    def counting(self: t.Any, schema: dict, components: dict | None = None) -> None:
        built.append(schema)
        original(self, schema, components)

    monkeypatch.setattr(connexion31.CompiledSchema, "__init__", counting)
    app = connexion_stack.contract_app("t", SPEC31, resolver=Resolver(function_resolver=lambda _op: post_item),
                                       middleware_list=connexion_stack.middlewares(SecurityMiddleware))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        ok = await client.post("/items/abc", json={"n": 1})  # first request builds the stack
        assert ok.status_code == 200 and ok.json() == {"id": "abc"}
        at_start = len(built)
        assert at_start > 0
        api = next(iter(app.middleware_stack[-1].apis.values()))[0]
        assert all(isinstance(op, connexion_stack.ContractOperation) for op in api.operations.values())
        for _ in range(3):
            assert (await client.post("/items/abc", json={"n": 1})).status_code == 200
        assert len(built) == at_start  # compiled when the operation was built, never per request
        bad_body = await client.post("/items/abc", json={"n": 2})
        assert bad_body.status_code == 422 and bad_body.json()["errors"][0]["pointer"] == "/n"
        bad_param = await client.post("/items/ABC", json={"n": 1})
        assert bad_param.status_code == 400 and "item_id" in bad_param.json()["detail"]
        bad_type = await client.post("/items/abc", content=b"n=1", headers={"content-type": "text/csv"})
        assert bad_type.status_code == 415
        broken = await client.post("/items/broken", json={"n": 1})
        assert broken.status_code == 500  # a response that breaks the spec is our bug


def test_a_compiled_schema_is_fast_even_when_connexion_made_it_a_cycle():
    components: dict[str, t.Any] = {"schemas": {}}
    problem: dict[str, t.Any] = {"type": "object", "properties": {"title": {"type": "string"}}}
    components["schemas"]["Problem"] = problem
    problem["components"] = components  # what with_definitions does to a shared schema
    compiled = connexion31.CompiledSchema(problem, components)
    assert compiled.fast is not None
    assert compiled.is_valid_fast({"title": "x"}) and not compiled.is_valid_fast({"title": 1})
