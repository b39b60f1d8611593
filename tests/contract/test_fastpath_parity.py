"""The Gateway's fast paths answer exactly as the full contract stack (Connexion) would.

Two ASGI layers answer in front of Connexion: ``DecideFastPath`` (cache hits of
``GET /worlds/{world_id}/decide``) and ``SubmitFastPath`` (valid ``POST /strategies``). Each
takes its route, parameters, statuses and schemas from its operation in specs/openapi.yaml.
Here every request is sent twice to the same running Gateway — once through the whole app
(fast path first) and once straight to the stack below the fast path, behind the same
correlation middleware — and the answers must match: status, body (shape and, where no id or
time differs, bytes), and the headers that matter (content-type, ETag, Location, caching,
correlation id). Valid requests must be *served* by the fast path (its counter moves), and
invalid ones must reach the stack (it does not).
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx
import pytest

from qmtl.bus.inproc import InProcessBus
from qmtl.contracts.app import CorrelationMiddleware
from qmtl.contracts.constants import operation
from qmtl.contracts.events import schema_validator
from qmtl.gateway.app import create_app
from qmtl.gateway.ingest.fastpath import SubmitFastPath
from qmtl.gateway.worlds import DecideFastPath
from tests.helpers.ingest_stack import ingest_stack, node, submission
from tests.helpers.server import serve
from tests.helpers.wsproc import WORLDS_PARTS, client, gateway_config
from tests.integration import test_gateway_worlds as _worlds

ws = _worlds.ws  # the module-scoped WorldService process fixture, shared with the worlds proxy tests

# Headers whose values must be equal on both paths (when either has them).
SAME_HEADERS = ("content-type", "etag", "x-qmtl-cache", "cache-control", "location", "retry-after", "www-authenticate")


def layer(app: Any, kind: type) -> Any:
    """The ``kind`` fast-path layer in the Gateway's HTTP chain."""
    inner = app.http_app
    while not isinstance(inner, kind):
        inner = inner.app
    return inner


def stack_client(fast: Any) -> httpx.AsyncClient:
    """A client of the contract stack below ``fast``, behind the same correlation middleware."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=CorrelationMiddleware(fast.app)), base_url="http://gw", timeout=15)


def comparable(r: httpx.Response, *, volatile: tuple[str, ...] = ()) -> tuple:
    body: Any = None
    if r.content:
        body = r.json()
        if isinstance(body, dict):
            body = {k: ("<varies>" if k in volatile else v) for k, v in body.items() if k != "correlation_id"}
    headers = {h: r.headers.get(h) for h in SAME_HEADERS}
    if headers["cache-control"]:  # max-age counts down in whole seconds: its form must match, not its value
        headers["cache-control"] = re.sub(r"\d+", "N", headers["cache-control"])
    return r.status_code, headers, body


async def both(fast_client: httpx.AsyncClient, stack: httpx.AsyncClient, method: str, url: str, *,
               stack_json: Any = None, **kw: Any) -> tuple[httpx.Response, httpx.Response]:
    """The same request through the whole app and through the stack (``stack_json``: another body for it)."""
    cid_a, cid_b = f"fast-{uuid.uuid4().hex}", f"stack-{uuid.uuid4().hex}"
    headers = dict(kw.pop("headers", {}) or {})
    a = await fast_client.request(method, url, headers={**headers, "X-Correlation-ID": cid_a}, **kw)
    if stack_json is not None:
        kw["json"] = stack_json
    b = await stack.request(method, url, headers={**headers, "X-Correlation-ID": cid_b}, **kw)
    # the caller's correlation id is echoed by both (and carried in problem bodies)
    assert a.headers["x-correlation-id"] == cid_a and b.headers["x-correlation-id"] == cid_b
    for r, cid in ((a, cid_a), (b, cid_b)):
        if r.headers.get("content-type") == "application/problem+json":
            assert r.json()["correlation_id"] == cid
    return a, b


# --------------------------------------------------------------------------- decide


async def test_decide_fast_path_route_comes_from_the_spec(ws, tmp_path):
    op = operation("gateway", DecideFastPath.OPERATION)
    app = create_app(gateway_config(tmp_path, ws.url), bus=InProcessBus(), parts=WORLDS_PARTS)
    fast = layer(app, DecideFastPath)
    assert (fast.op.method, fast.op.path) == (op.method, op.path) == ("GET", "/worlds/{world_id}/decide")
    assert fast.statuses == (200, 304) and {"200", "304"} <= set(op.statuses)
    assert app.service.worlds.decide_key_param == op.query_params[0]


async def test_decide_fast_path_answers_as_the_contract_stack(ws, tmp_path):
    app = create_app(gateway_config(tmp_path, ws.url), bus=InProcessBus(), parts=WORLDS_PARTS)
    async with serve(app) as url, client(url) as gw:
        fast = layer(app, DecideFastPath)
        stack = stack_client(fast)
        w = f"w-{uuid.uuid4().hex[:10]}"
        r = await gw.post("/worlds", json={"world_id": w, "name": w})
        assert r.status_code == 201, r.text
        as_of = "2026-01-01T00:00:00Z"
        for params in ({}, {"as_of": as_of}):  # fill the cache (a miss takes the full path)
            first = await gw.get(f"/worlds/{w}/decide", params=params)
            assert first.status_code == 200 and first.headers["x-qmtl-cache"] == "miss", first.text
        etag = first.headers["etag"]

        # valid: cache hits, served by the fast path; the stack answers the same hit
        served = fast.served
        hits = [
            ("plain", f"/worlds/{w}/decide", {}, {}),
            ("as_of", f"/worlds/{w}/decide", {"as_of": as_of}, {}),
            ("not modified", f"/worlds/{w}/decide", {"as_of": as_of}, {"If-None-Match": etag}),
            ("modified", f"/worlds/{w}/decide", {}, {"If-None-Match": '"something-else"'}),
        ]
        for name, url_, params, headers in hits:
            a, b = await both(gw, stack, "GET", url_, params=params, headers=headers)
            assert comparable(a) == comparable(b), name
            assert a.content == b.content, name  # the same bytes: the cached body
            assert a.headers["x-qmtl-cache"] == "hit", name
        assert fast.served == served + len(hits)
        nm = await gw.get(f"/worlds/{w}/decide", params={"as_of": as_of}, headers={"If-None-Match": etag})
        assert nm.status_code == 304 and nm.headers["etag"] == etag and not nm.content
        assert schema_validator(operation("gateway", "decide").response_schemas["200"]).is_valid(first.json())

        # invalid or not cached: the fast path declines and the stack answers (both ways alike)
        served = fast.served
        declined = [
            ("bad world id", "/worlds/Not_A_Slug!/decide", {}, 400),
            ("unknown world", f"/worlds/{w}-nope/decide", {}, 404),
            ("bad as_of", f"/worlds/{w}/decide", {"as_of": "yesterday"}, 400),
            ("empty as_of", f"/worlds/{w}/decide", {"as_of": ""}, 400),
            ("another parameter too", f"/worlds/{w}/decide", {"as_of": as_of, "x": "1"}, 200),
        ]
        for name, url_, params, status in declined:
            a, b = await both(gw, stack, "GET", url_, params=params)
            assert a.status_code == status, (name, a.text)
            assert comparable(a, volatile=("detail",)) == comparable(b, volatile=("detail",)), name
            if status >= 400:
                assert a.headers["content-type"] == "application/problem+json", name
                assert set(a.json()) == set(b.json()), name
        assert fast.served == served  # none of these was the fast path's
        # not cached yet: the fast path declines and the full path fetches it (a miss)
        r = await gw.get(f"/worlds/{w}/decide", params={"as_of": "2026-01-02T00:00:00Z"})
        assert r.status_code == 200 and r.headers["x-qmtl-cache"] == "miss" and fast.served == served
        # a caller who fails authentication is the stack's to answer (here: no auth configured,
        # so a hit is served to everyone; the auth variant is in test_gateway_worlds_auth.py)
        await stack.aclose()


async def test_decide_fast_path_only_intercepts_its_own_route(ws, tmp_path):
    """A path that merely looks like decide (extra segment, other method) reaches the stack."""
    app = create_app(gateway_config(tmp_path, ws.url), bus=InProcessBus(), parts=WORLDS_PARTS)
    async with serve(app) as url, client(url) as gw:
        fast = layer(app, DecideFastPath)
        served = fast.served
        r = await gw.get("/worlds/a/b/decide")
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
        r = await gw.post("/worlds/a/decide", json={})
        assert r.status_code == 405
        assert fast.served == served


# --------------------------------------------------------------------------- submit



@pytest.mark.redis
@pytest.mark.postgres
async def test_submit_fast_path_answers_as_the_contract_stack(redis_kv, pg_schema):
    op = operation("gateway", "submit_strategy")
    async with ingest_stack(redis_kv, pg_schema) as s:
        fast = layer(s.gw, SubmitFastPath)
        assert (fast.op.method, fast.op.path, fast.status) == (op.method, op.path, 202)
        stack = stack_client(fast)
        ids = ("strategy_id", "sentinel_id")

        # valid: served by the fast path; the stack accepts an equivalent DAG the same way
        served = fast.served
        a, b = await both(s.client, stack, "POST", "/strategies", json=submission([node("Compute", "9a11")]),
                          stack_json=submission([node("Compute", "9a10")]))
        assert a.status_code == 202, a.text
        assert fast.served == served + 1
        ca, cb = comparable(a, volatile=ids), comparable(b, volatile=ids)
        assert ca[0] == cb[0] and ca[2] == cb[2]
        for h in SAME_HEADERS:  # Location names each its own strategy; everything else is equal
            if h != "location":
                assert ca[1][h] == cb[1][h], h
        for r in (a, b):
            assert r.headers["location"] == f"/strategies/{r.json()['strategy_id']}/status"
            assert schema_validator(op.response_schemas["202"]).is_valid(r.json())

        # the same DAG again: 409 with the first strategy's id and Location, on both paths
        a, b = await both(s.client, stack, "POST", "/strategies", json=submission([node("Compute", "9a11")]))
        assert a.status_code == 409 and comparable(a) == comparable(b)

        # rules the ingest judges after the schema (the fast path serves and renders them)
        good = node("Compute", "9a12")
        for name, body in [
            ("crc guard", submission([good], crc=1)),
            ("node id", submission([dict(good, node_id="1" * 64)])),
            ("dag schema", submission([dict(good, interval=-1)])),
            ("dag_json neither base64 nor JSON", {**submission([good]), "dag_json": "!!"}),
        ]:
            a, b = await both(s.client, stack, "POST", "/strategies", json=body)
            assert a.status_code in (400, 422) and comparable(a) == comparable(b), name

        # what the stack must judge is declined, then answered by the stack alike
        declined = fast.declined
        for name, kw, status in [
            ("body schema", {"json": {"dag_json": "x"}}, 422),
            ("not JSON", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400),
            ("not UTF-8", {"content": b'{"dag_json": "\xff"}', "headers": {"content-type": "application/json"}}, 400),
        ]:
            a, b = await both(s.client, stack, "POST", "/strategies", **kw)
            assert a.status_code == status, (name, a.text)
            assert comparable(a, volatile=("detail",)) == comparable(b, volatile=("detail",)), name
        assert fast.declined == declined + 3
        # another content type never looks like the operation's: straight to the stack (415)
        a, b = await both(s.client, stack, "POST", "/strategies", content=b"x", headers={"content-type": "text/plain"})
        assert a.status_code == 415 and comparable(a) == comparable(b)
        assert fast.declined == declined + 3
        await stack.aclose()
