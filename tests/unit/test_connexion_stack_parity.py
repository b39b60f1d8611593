"""Our Connexion stack answers exactly as Connexion's stock one (issue 16's parse-once stack).

qmtl/contracts/connexion_stack.py computes a handler's arguments from a plan made once per
operation and from the parameters request validation already parsed, and caches the
content-type decisions of request and response validation. This test sends one table of
requests — good and bad: missing and ill-typed path, query and header parameters, arrays
exploded or not, defaults filled, undeclared parameters, JSON and form bodies, wrong content
types, unparsable and non-conforming bodies, bad responses — to an app built with our stack
and to one built with Connexion's own ``AsyncASGIApp`` and default middleware classes (the
same validators, from ``VALIDATOR_MAP``), and asserts the same status, body and headers."""

from __future__ import annotations

import re
import typing as t

import httpx
import pytest
from connexion import request as connexion_request
from connexion.apps.asynchronous import AsyncASGIApp
from connexion.middleware.main import ConnexionMiddleware
from connexion.middleware.security import SecurityMiddleware
from connexion.middleware.swagger_ui import SwaggerUIMiddleware
from connexion.resolver import Resolver

from qmtl.contracts import connexion_patch, connexion_stack
from qmtl.contracts.connexion31 import VALIDATOR_MAP

ANY_JSON = {"application/json": {"schema": {}}}
OK = {"200": {"description": "ok", "content": ANY_JSON}, "default": {"$ref": "#/components/responses/Problem"}}


def _param(name: str, where: str, schema: dict, **extra: t.Any) -> dict:
    return {"name": name, "in": where, "schema": schema, **extra}


SPEC: dict[str, t.Any] = {
    "openapi": "3.1.0",
    "info": {"title": "parity", "version": "1"},
    "paths": {
        "/items/{item_id}": {
            "get": {
                "operationId": "get_item",
                "parameters": [
                    _param("item_id", "path", {"type": "integer", "minimum": 1}, required=True),
                    _param("limit", "query", {"type": "integer", "default": 10, "maximum": 100}),
                    _param("flag", "query", {"type": "boolean"}),
                    _param("ratio", "query", {"type": "number", "exclusiveMinimum": 0}),
                    _param("mode", "query", {"type": "string", "enum": ["a", "b"], "default": "a"}),
                    _param("tags", "query", {"type": "array", "items": {"type": "string"}}, explode=True),
                    _param("ids", "query", {"type": "array", "items": {"type": "integer"}}, explode=False),
                    _param("filter", "query", {"type": "object", "properties": {"x": {"type": "integer"}}},
                           style="deepObject", explode=True),
                    _param("X-Trace", "header", {"type": "string", "pattern": "^[a-z]+$"}),
                    _param("unused", "query", {"type": "string"}),
                ],
                "responses": OK,
            },
        },
        "/names/{name}": {
            "get": {
                "operationId": "get_name",
                "parameters": [
                    _param("name", "path", {"type": "string", "pattern": "^[a-z-]+$"}, required=True),
                    _param("q", "query", {"type": "string", "minLength": 2}, required=True),
                    _param("X-Need", "header", {"type": "string"}, required=True),
                ],
                "responses": OK,
            },
        },
        "/things": {
            "post": {
                "operationId": "post_thing",
                "parameters": [_param("dry", "query", {"type": "boolean", "default": False})],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["n"], "properties": {"n": {"type": "integer", "const": 1},
                                                                         "s": {"type": "string"}},
                    "additionalProperties": False}}}},
                "responses": {"201": {"description": "created", "content": ANY_JSON},
                              "default": {"$ref": "#/components/responses/Problem"}},
            },
        },
        "/named": {
            "put": {
                "operationId": "put_named",
                "requestBody": {"x-body-name": "payload", "content": {"application/json": {"schema": {
                    "type": ["object", "null"], "default": {"d": 1}}}}},
                "responses": OK,
            },
        },
        "/forms": {
            "post": {
                "operationId": "post_form",
                "requestBody": {"content": {"application/x-www-form-urlencoded": {"schema": {
                    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}}}},
                "responses": OK,
            },
        },
        "/anything/{world_id}": {
            "post": {
                "operationId": "any_kwargs",
                "parameters": [_param("world_id", "path", {"type": "string"}, required=True),
                               _param("page", "query", {"type": "integer", "default": 1}),
                               _param("opt", "query", {"type": "string"})],
                "requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}},
                "responses": OK,
            },
            "get": {
                "operationId": "any_kwargs_get",
                "parameters": [_param("world_id", "path", {"type": "string"}, required=True),
                               _param("opt", "query", {"type": "string"})],
                "responses": OK,
            },
        },
        "/context/{world_id}": {
            "get": {
                "operationId": "with_context",
                "parameters": [_param("world_id", "path", {"type": "string"}, required=True)],
                "responses": OK,
            },
        },
        "/replies/{kind}": {
            "get": {
                "operationId": "reply",
                "parameters": [_param("kind", "path", {"type": "string"}, required=True)],
                "responses": {
                    "200": {"description": "ok", "content": {"application/json": {"schema": {
                        "type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}}}},
                        "headers": {"X-Required": {"required": True, "schema": {"type": "string"}}}},
                    "204": {"description": "empty"},
                    "default": {"$ref": "#/components/responses/Problem"},
                },
            },
        },
    },
    "components": {"responses": {"Problem": {"description": "problem", "content": {
        "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}},
        "schemas": {"Problem": {"type": "object", "properties": {"title": {"type": "string"}}}}},
}


def _typed(kwargs: dict) -> dict:
    return {k: [type(v).__name__, v.decode("latin-1") if isinstance(v, bytes) else v] for k, v in sorted(kwargs.items())}


def _json(body: t.Any, status: int = 200, headers: dict | None = None) -> tuple:
    """The handler's return value, with the content type Connexion needs when an operation
    also produces problem+json."""
    return body, status, {"Content-Type": "application/json", **(headers or {})}


async def get_item(item_id, limit, mode, flag=None, ratio=None, tags=None, ids=None, filter=None):
    return _json({"kwargs": _typed({"item_id": item_id, "limit": limit, "mode": mode, "flag": flag, "ratio": ratio, "tags": tags, "ids": ids,
                                        "filter": filter}), "trace": connexion_request.headers.get("x-trace")})


async def get_name(name, q):
    return _json({"kwargs": _typed({"name": name, "q": q})})


async def post_thing(body, dry):
    return _json({"kwargs": _typed({"body": body, "dry": dry})}, 201)


async def put_named(payload=None):
    return _json({"kwargs": _typed({"payload": payload})})


async def post_form(body=None):
    return _json({"kwargs": _typed({"body": body})})


async def any_kwargs(**kwargs):
    return _json({"kwargs": _typed(kwargs)})


async def with_context(world_id, context_):
    return _json({"kwargs": _typed({"world_id": world_id, "context_": dict(context_)})})


async def reply(kind):
    from connexion.lifecycle import ConnexionResponse

    if kind == "ok":
        return _json({"id": "x"}, 200, {"X-Required": "yes", "X-Other": "1"})
    if kind == "missing-header":
        return _json({"id": "x"})
    if kind == "bad-body":
        return _json({"id": 1}, 200, {"X-Required": "yes"})
    if kind == "bad-type":
        return ConnexionResponse(status_code=200, body=b"hi", content_type="text/csv", headers={"X-Required": "y"})
    if kind == "empty":
        return None, 204
    if kind == "no-content":  # a status whose schema is compiled by the plan, not with the operation
        return ConnexionResponse(status_code=204, body=b"", content_type="application/json")
    if kind == "undocumented":
        return _json({"any": "thing"}, 202)
    return "plain", 200, {"X-Required": "yes"}


HANDLERS = {f.__name__: f for f in (get_item, get_name, post_thing, put_named, post_form, any_kwargs, with_context, reply)}
HANDLERS["any_kwargs_get"] = any_kwargs


def _resolver() -> Resolver:
    return Resolver(function_resolver=lambda op_id: HANDLERS[op_id])


def _ours() -> t.Any:
    return connexion_stack.contract_app("parity", SPEC, resolver=_resolver(),
                                        middleware_list=connexion_stack.middlewares(SecurityMiddleware))


def _stock() -> t.Any:
    """Connexion's own stack: its ASGI app of ``AsyncOperation``s and its default middleware
    classes (validation included), fed the same validators."""
    stock = [m for m in ConnexionMiddleware.default_middlewares if m is not SwaggerUIMiddleware]
    app = ConnexionMiddleware(AsyncASGIApp(), import_name="parity", middlewares=stock)
    app.add_api(SPEC, resolver=_resolver(), validator_map=VALIDATOR_MAP, validate_responses=True,
                strict_validation=False, pythonic_params=False)
    return app


JSON = {"content-type": "application/json"}
REQUESTS: list[tuple[str, str, dict]] = [
    # path, query and header parameters: typed, defaults filled, arrays, objects
    ("GET", "/items/3", {}),
    ("GET", "/items/3?limit=7&flag=true&ratio=0.5&mode=b", {}),
    ("GET", "/items/3?flag=false&tags=a&tags=b&ids=1,2,3", {}),
    ("GET", "/items/3?filter[x]=4&unused=zz&undeclared=1", {"X-Trace": "abc"}),
    ("GET", "/items/3?tags=", {}),
    ("GET", "/items/3?limit=1&limit=2", {}),
    ("GET", "/items/0", {}),
    ("GET", "/items/abc", {}),
    ("GET", "/items/3?limit=x", {}),
    ("GET", "/items/3?limit=1000", {}),
    ("GET", "/items/3?flag=maybe", {}),
    ("GET", "/items/3?ratio=0", {}),
    ("GET", "/items/3?mode=c", {}),
    ("GET", "/items/3?ids=1,x", {}),
    ("GET", "/items/3?filter[x]=y", {}),
    ("GET", "/items/3", {"X-Trace": "ABC"}),
    ("GET", "/names/ab-c?q=hello", {"X-Need": "1"}),
    ("GET", "/names/ab-c?q=hello", {}),
    ("GET", "/names/ab-c", {"X-Need": "1"}),
    ("GET", "/names/ab-c?q=h", {"X-Need": "1"}),
    ("GET", "/names/AB?q=hello", {"X-Need": "1"}),
    ("GET", "/names/ab%2Dc?q=h%C3%A9llo", {"X-Need": "1"}),
    # JSON bodies
    ("POST", "/things", {"json": {"n": 1}}),
    ("POST", "/things?dry=true", {"json": {"n": 1, "s": "x"}}),
    ("POST", "/things", {"json": {"n": 2}}),
    ("POST", "/things", {"json": {"n": 1, "extra": 1}}),
    ("POST", "/things", {"content": b"{not json", "headers": JSON}),
    ("POST", "/things", {"content": b"", "headers": JSON}),
    ("POST", "/things", {"content": b'{"n": 1}', "headers": {"content-type": "application/json; charset=utf-8"}}),
    ("POST", "/things", {"content": b'{"n": 1}', "headers": {"content-type": "Application/JSON"}}),
    ("POST", "/things", {"content": b'{"n": 1}', "headers": {"content-type": "text/plain"}}),
    ("POST", "/things", {"content": b'{"n": 1}'}),
    ("POST", "/things", {"content": b"\xff\xfe", "headers": JSON}),
    ("POST", "/things?dry=nope", {"json": {"n": 1}}),
    ("PUT", "/named", {"json": {"a": 1}}),
    ("PUT", "/named", {"content": b"null", "headers": JSON}),
    ("PUT", "/named", {}),
    # form bodies (Connexion's own decorator chain)
    ("POST", "/forms", {"data": {"a": "3", "b": "x"}}),
    ("POST", "/forms", {"data": {"a": "x"}}),
    # a handler taking **kwargs
    ("POST", "/anything/w1?opt=o&undeclared=1", {"json": {"k": [1, 2]}}),
    ("POST", "/anything/w1", {}),
    ("GET", "/anything/w1?opt=o", {}),
    ("GET", "/context/w1", {}),
    # responses: headers, statuses, content types the spec does not allow
    ("GET", "/replies/ok", {}),
    ("GET", "/replies/missing-header", {}),
    ("GET", "/replies/bad-body", {}),
    ("GET", "/replies/bad-type", {}),
    ("GET", "/replies/empty", {}),
    ("GET", "/replies/plain", {}),
    ("GET", "/replies/no-content", {}),
    ("GET", "/replies/undocumented", {}),
    # routing
    ("GET", "/nowhere", {}),
    ("DELETE", "/things", {}),
    ("GET", "/things/", {}),
    ("POST", "/things/", {"json": {"n": 1}}),
    ("HEAD", "/items/3", {}),
    ("PUT", "/items/3", {}),
    ("GET", "/items/3/", {}),
    ("GET", "/items/3/extra", {}),
    ("GET", "/items/", {}),
    ("GET", "/items//", {}),
    ("GET", "/items/+3", {}),
    ("GET", "/anything/a%2Fb?opt=o", {}),
    ("GET", "/replies/ok/", {}),
]


async def _send(client: httpx.AsyncClient, method: str, url: str, options: dict) -> httpx.Response:
    if options and not {"json", "content", "data", "headers"} & set(options):
        options = {"headers": options}  # a GET row's options are its headers
    return await client.request(method, url, **options)


def _comparable(response: httpx.Response) -> tuple:
    headers = {k: v for k, v in response.headers.items() if k in ("content-type", "content-length", "x-required", "x-other",
                                                                   "allow", "location", "etag")}
    return response.status_code, headers, response.content


@pytest.mark.parametrize(("method", "url", "options"), REQUESTS, ids=[f"{m} {u} {o}"[:90] for m, u, o in REQUESTS])
async def test_our_stack_answers_as_connexion_stock_stack(method: str, url: str, options: dict) -> None:
    connexion_patch.prepare()
    answers = []
    for app in (_ours(), _stock()):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                     base_url="http://t") as client:
            # twice: the second request meets the decisions our stack remembers
            answers.append([_comparable(await _send(client, method, url, options)) for _ in range(2)])
    ours, stock = answers
    assert ours == stock


def test_our_stack_routes_with_shaped_routers() -> None:
    app = _ours()
    _, stack = app._build_middleware_stack()
    routing = next(m for m in stack if isinstance(m, connexion_stack.ShapedRouting))
    assert isinstance(routing.router.routes[-1].app, connexion_stack.ShapedRouter)


async def test_the_table_reaches_the_handlers_through_our_plan() -> None:
    """The table is not vacuous: valid requests reach the handler with typed, defaulted arguments."""
    connexion_patch.prepare()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_ours()), base_url="http://t") as client:
        got = (await client.get("/items/3?flag=true&ids=1,2", headers={"X-Trace": "abc"})).json()
        assert got["kwargs"]["item_id"] == ["int", 3] and got["kwargs"]["limit"] == ["int", 10]
        assert got["kwargs"]["flag"] == ["bool", True] and got["kwargs"]["ids"] == ["list", [1, 2]]
        assert got["kwargs"]["mode"] == ["str", "a"] and got["trace"] == "abc"
        assert (await client.post("/things", json={"n": 1})).json()["kwargs"]["dry"] == ["bool", False]
        assert (await client.put("/named", json={"a": 1})).json()["kwargs"]["payload"] == ["dict", {"a": 1}]


@pytest.mark.parametrize("service", ["gateway", "worldservice", "dagmanager"])
async def test_shaped_routing_picks_the_operation_starlette_picks_on_the_real_specs(service: str) -> None:
    """Every operation of each service's spec, its path filled in (and varied), routed by
    Connexion's routing middleware and by ours: the same operation, or the same answer."""
    from connexion.middleware.routing import RoutingMiddleware
    from connexion.spec import Specification

    from qmtl.contracts.loader import load_openapi

    connexion_patch.prepare()
    doc = load_openapi(service).bundled
    spec = Specification.from_dict(doc)

    async def reached(routing_cls: type, method: str, path: str) -> tuple:
        seen: list[t.Any] = []

        async def after(scope: t.Any, receive: t.Any, send: t.Any) -> None:
            seen.append(scope.get("extensions", {}).get("connexion_routing", {}).get("operation_id"))
            await send({"type": "http.response.start", "status": 299, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        routing = routing_cls(after)
        routing.add_api(spec, resolver=Resolver(function_resolver=lambda _op: get_item))
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "root_path": "",
                 "query_string": b"", "headers": [], "scheme": "http", "server": ("t", 80)}
        try:
            await routing(scope, receive, send)
        except Exception as exc:  # Starlette raises 404/405 as HTTPException under an app
            return ("raised", type(exc).__name__, getattr(exc, "status_code", None))
        return (tuple(seen), sent[0]["status"] if sent else None)

    paths = [re.sub(r"\{[^}]+\}", "1", p) for p in doc["paths"]]
    paths += [p + "/" for p in paths] + [p + "/x" for p in paths] + ["/", "/nowhere", "//"]
    operations = set()
    for path in paths:
        for method in ("GET", "POST", "PUT", "DELETE"):
            ours = await reached(connexion_stack.ShapedRouting, method, path)
            assert ours == await reached(RoutingMiddleware, method, path), (method, path)
            if ours[0] and ours[0][0]:
                operations.add(ours[0][0])
    assert len(operations) == sum(1 for item in doc["paths"].values() for m in item if m in ("get", "post", "put", "delete"))
