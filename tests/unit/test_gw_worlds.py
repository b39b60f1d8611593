"""Unit tests of the worlds proxy (qmtl/gateway/worlds/) against a scripted WorldService
(httpx.MockTransport): what the integration tests cannot make a real WorldService do."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from prometheus_client import CollectorRegistry

from qmtl.common.clock import ManualClock
from qmtl.common.config import load_config
from qmtl.common.errors import BadGateway, Forbidden, ServiceUnavailable
from qmtl.gateway.auth import Authenticator
from qmtl.gateway.backends import Backend, BackendMetrics
from qmtl.gateway.worlds import Incoming, Route, WorldsProxy, parse_ttl
from qmtl.gateway.worlds.safe_defaults import safe_activation

ENVELOPE = {"world_id": "w1", "policy_version": 2, "effective_mode": "live", "reason": "promoted", "as_of": "2026-01-01T00:00:00Z",
            "ttl": "300s", "etag": "e1"}


def proxy_for(handler, clock: ManualClock | None = None, **gateway) -> WorldsProxy:
    """A WorldsProxy in front of ``handler`` (a scripted WorldService), on ``clock``'s time."""
    config = load_config(environ={}, overrides={"gateway": {"worldservice_url": "http://ws", **gateway}})
    registry = CollectorRegistry()
    g = config.gateway
    clock = clock or ManualClock()
    backend = Backend(
        "worldservice", "http://ws", timeout=g.worldservice_budget.timeout, retries=g.worldservice_budget.retries,
        failure_threshold=g.breaker.failure_threshold, reset_timeout=g.breaker.reset_timeout, metrics=BackendMetrics.create(registry),
        client=httpx.AsyncClient(base_url="http://ws", transport=httpx.MockTransport(handler)), monotonic=clock.monotonic,
    )
    return WorldsProxy(g, backend, registry=registry, authenticator=Authenticator(g.auth), monotonic=clock.monotonic, wall=clock.time)


class Upstream:
    """A scripted WorldService: ``answers`` maps a path to a response factory; records calls."""

    def __init__(self, answers):
        self.answers = answers
        self.calls: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request)
        answer = self.answers[request.url.path]
        if not callable(answer):
            return answer
        result = answer(request)
        return await result if asyncio.iscoroutine(result) else result


def envelope_response(env=ENVELOPE, status=200):
    def make(request):
        if request.headers.get("if-none-match") == f'"{env["etag"]}"':
            return httpx.Response(304, headers={"ETag": f'"{env["etag"]}"'})
        return httpx.Response(status, json=env, headers={"ETag": f'"{env["etag"]}"'})

    return make


NOBODY = Incoming({})


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("value,seconds", [("300s", 300), ("0s", 0), ("500ms", 0.5), ("5m", 300), ("2h", 7200), ("1d", 86400),
                                           ("1.5s", 1.5), (30, 30), (0, 0), (None, 300), ("", 300), ("45", 45)])
def test_parse_ttl(value, seconds):
    assert parse_ttl(value, 300) == seconds


@pytest.mark.parametrize("value", ["soon", "-1s", "1w", True, float("inf"), -3, "5 minutes"])
def test_parse_ttl_refuses_what_is_not_a_duration(value):
    with pytest.raises(ValueError):
        parse_ttl(value, 300)


# --------------------------------------------------------------------------- decide


async def test_decide_without_ttl_is_cached_for_the_default_300_s_and_says_so():
    env = {k: v for k, v in ENVELOPE.items() if k != "ttl"}
    up = Upstream({"/worlds/w1/decide": envelope_response(env)})
    proxy = proxy_for(up)
    first = await proxy.decide("w1", NOBODY)
    assert first.headers["X-QMTL-Cache"] == "miss" and first.data()["ttl"] == "300s"
    assert first.headers["Cache-Control"] == "private, max-age=300"
    entry = proxy.decisions.get(("w1", ""))
    assert entry.ttl == 300 and entry.expires_at - entry.fetched_at == pytest.approx(300)
    second = await proxy.decide("w1", NOBODY)
    assert second.headers["X-QMTL-Cache"] == "hit" and len(up.calls) == 1


async def test_decide_default_ttl_comes_from_the_config():
    env = {k: v for k, v in ENVELOPE.items() if k != "ttl"}
    proxy = proxy_for(Upstream({"/worlds/w1/decide": envelope_response(env)}), decide_default_ttl=42.0)
    assert (await proxy.decide("w1", NOBODY)).data()["ttl"] == "42s"
    assert proxy.decisions.get(("w1", "")).ttl == 42


async def test_an_expired_decision_is_revalidated_with_if_none_match():
    up = Upstream({"/worlds/w1/decide": envelope_response()})
    clock = ManualClock()
    proxy = proxy_for(up, clock)
    await proxy.decide("w1", NOBODY)
    clock.advance(300)  # the envelope's ttl: expired
    r = await proxy.decide("w1", NOBODY)
    assert r.headers["X-QMTL-Cache"] == "revalidated" and r.data() == ENVELOPE
    assert up.calls[-1].headers["if-none-match"] == '"e1"'
    assert proxy.decisions.get(("w1", "")).expires_at == clock.monotonic() + 300  # fresh again for a ttl


@pytest.mark.parametrize("answer,why", [
    (httpx.Response(200, json=dict(ENVELOPE, effective_mode="yolo")), "invalid decision"),
    (httpx.Response(200, json=dict(ENVELOPE, policy_version="2")), "invalid decision"),
    (httpx.Response(200, json=dict(ENVELOPE, ttl="whenever")), "invalid decision"),
    (httpx.Response(200, json=dict(ENVELOPE, surprise=1)), "invalid decision"),  # additionalProperties: false
    (httpx.Response(200, content=b"<html>"), "invalid decision"),
    (httpx.Response(500, json={"detail": "boom"}), "answered HTTP 500"),
    (httpx.Response(503, json={"detail": "db down"}), "answered HTTP 503"),
])
async def test_an_unusable_answer_gives_the_safe_decision_and_a_stale_live_is_never_served(answer, why):
    good = True

    def handler(request):
        return httpx.Response(200, json=ENVELOPE) if good else answer

    up = Upstream({"/worlds/w1/decide": handler})
    clock = ManualClock()
    proxy = proxy_for(up, clock, worldservice_budget={"timeout": 0.3, "retries": 0}, breaker={"failure_threshold": 100})
    assert (await proxy.decide("w1", NOBODY)).data()["effective_mode"] == "live"
    clock.advance(300)
    good = False
    r = await proxy.decide("w1", NOBODY)
    body = r.data()
    assert r.status == 200 and r.headers["X-QMTL-Cache"] == "safe-default" and body["effective_mode"] == "backtest"
    assert why in body["reason"] and "(live, policy v2)" in body["reason"] and body["policy_version"] == 2
    proxy._decision_schema(body)  # the safe answer honours the contract


async def test_a_304_without_a_cached_entry_is_not_trusted():
    proxy = proxy_for(Upstream({"/worlds/w1/decide": httpx.Response(304)}))
    r = await proxy.decide("w1", NOBODY)
    assert r.headers["X-QMTL-Cache"] == "safe-default" and "304 to a request without If-None-Match" in r.data()["reason"]


async def test_upstream_404_and_403_are_passed_on_and_a_404_forgets_the_entry():
    state = {"status": 200}

    def handler(request):
        if state["status"] == 200:
            return httpx.Response(200, json=ENVELOPE)
        return httpx.Response(state["status"], json={"title": "x", "status": state["status"], "detail": "nope"},
                              headers={"content-type": "application/problem+json"})

    clock = ManualClock()
    proxy = proxy_for(Upstream({"/worlds/w1/decide": handler}), clock)
    await proxy.decide("w1", NOBODY)
    clock.advance(300)
    state["status"] = 404
    r = await proxy.decide("w1", NOBODY)
    assert r.status == 404 and r.content_type == "application/problem+json" and proxy.decisions.get(("w1", "")) is None
    state["status"] = 403
    assert (await proxy.decide("w1", NOBODY)).status == 403


async def test_concurrent_misses_ask_worldservice_once():
    async def slow(request):
        await asyncio.sleep(0.05)
        return httpx.Response(200, json=ENVELOPE)

    up = Upstream({"/worlds/w1/decide": slow})
    proxy = proxy_for(up)
    replies = await asyncio.gather(*(proxy.decide("w1", NOBODY) for _ in range(20)))
    assert len(up.calls) == 1 and all(r.status == 200 for r in replies)


async def test_the_decide_cache_is_bounded():
    def handler(request):
        world = request.url.path.split("/")[2]
        return httpx.Response(200, json=dict(ENVELOPE, world_id=world))

    proxy = proxy_for(handler, worlds_cache_size=5)
    for i in range(12):
        await proxy.decide(f"w{i}", NOBODY, as_of=None)
    assert len(proxy.decisions) == 5


# --------------------------------------------------------------------------- activation, mapping, guard


async def test_activation_unusable_answer_is_inactive():
    act = {"world_id": "w1", "strategy_id": "s", "side": "long", "active": True, "weight": 1.5, "etag": "a", "ts": "2026-01-01T00:00:00Z"}
    proxy = proxy_for(Upstream({"/worlds/w1/activation": httpx.Response(200, json=act)}))
    r = await proxy.activation("w1", NOBODY, "s", "long")
    assert r.headers["X-QMTL-Cache"] == "safe-default" and r.data()["active"] is False and r.data()["weight"] == 0
    proxy._activation_schema(r.data())


async def test_worldservice_5xx_mapping_on_pass_through_routes():
    answers = {"/worlds/a/apply": httpx.Response(503, json={"title": "Service Unavailable", "status": 503, "detail": "rolled back"},
                                                 headers={"content-type": "application/problem+json", "Retry-After": "2"}),
               "/worlds/b/apply": httpx.Response(500, json={"title": "Internal Server Error", "status": 500, "detail": "bug"}),
               "/worlds/c": httpx.Response(401, json={"detail": "no trusted caller identity"})}
    proxy = proxy_for(Upstream(answers), allow_live=True, breaker={"failure_threshold": 100})
    route = Route("POST", idempotent=True, live_guard="always")
    r = await proxy.forward("apply", route, "/worlds/a/apply", NOBODY, world_id="a", body={})
    assert r.status == 503 and r.data()["detail"] == "rolled back" and r.headers["Retry-After"] == "2"
    with pytest.raises(BadGateway, match="HTTP 500"):
        await proxy.forward("apply", route, "/worlds/b/apply", NOBODY, world_id="b", body={})
    with pytest.raises(BadGateway, match="service credential"):
        await proxy.forward("get_world", Route("GET", idempotent=True), "/worlds/c", NOBODY, world_id="c")


async def test_unreachable_worldservice_is_503_with_retry_after():
    def refuse(request):
        raise httpx.ConnectError("refused", request=request)

    proxy = proxy_for(refuse, breaker={"failure_threshold": 2, "reset_timeout": 7.0})
    with pytest.raises(ServiceUnavailable) as err:
        await proxy.forward("get_world", Route("GET", idempotent=True), "/worlds/x", NOBODY, world_id="x")
    assert err.value.headers["Retry-After"] == "7"  # the breaker opened: its cool-off


async def test_absolute_locations_are_rewritten_to_the_gateway():
    answers = {"/worlds": httpx.Response(201, json={}, headers={"Location": "http://ws/worlds/w9"})}
    proxy = proxy_for(Upstream(answers), public_url="https://gw.example")
    r = await proxy.forward("create_world", Route("POST", idempotent=False, live_guard="create_world"), "/worlds", NOBODY, body={})
    assert r.headers["Location"] == "https://gw.example/worlds/w9"


@pytest.mark.parametrize("rule,body,allows_live,refused", [
    ("always", {}, False, True),
    ("activates", {"active": True}, False, True),
    ("activates", {"active": False}, True, False),
    ("create_world", {"allow_live": True}, False, True),
    ("create_world", {"allow_live": False}, False, False),
    ("update_world", {"allow_live": True}, False, True),
    ("update_world", {"state": "ACTIVE"}, True, True),
    ("update_world", {"state": "ACTIVE"}, False, False),
    ("update_world", {"circuit_breaker": False}, True, True),
    ("update_world", {"circuit_breaker": True}, True, False),
    ("update_world", {"state": "ACTIVE", "allow_live": False}, True, False),
    ("create_policy", {"set_default": True}, True, True),
    ("create_policy", {"set_default": False}, True, False),
    ("create_policy", {"set_default": True}, False, False),
    ("if_world_allows_live", None, True, True),
    ("if_world_allows_live", None, False, False),
    ("never", {"allow_live": True, "active": True}, True, False),
])
async def test_live_guard_rules(rule, body, allows_live, refused):
    answers = {"/worlds/w": httpx.Response(200, json={"allow_live": allows_live}), "/worlds/missing": httpx.Response(404, json={})}
    up = Upstream(answers)
    proxy = proxy_for(up)
    identity = await proxy.identity(NOBODY)
    if refused:
        with pytest.raises(Forbidden) as err:
            await proxy.live_guard("op", rule, "w", body, NOBODY, identity)
        assert err.value.ext["live_guard"] is True
    else:
        await proxy.live_guard("op", rule, "w", body, NOBODY, identity)
    # consent (the header, or --allow-live) lets every one of them through without asking WorldService
    calls = len(up.calls)
    await proxy.live_guard("op", rule, "w", body, Incoming({"x-allow-live": "true"}), identity)
    await proxy_for(up, allow_live=True).live_guard("op", rule, "w", body, NOBODY, identity)
    assert len(up.calls) == calls
    if rule == "if_world_allows_live":  # an unknown world cannot go live; the call itself will 404
        await proxy.live_guard("op", rule, "missing", body, NOBODY, identity)


async def test_fast_path_declines_anything_it_should_not_answer():
    clock = ManualClock()
    proxy = proxy_for(Upstream({"/worlds/w1/decide": envelope_response()}), clock)
    assert proxy.fast_decide("w1", b"", []) is None  # nothing cached yet
    await proxy.decide("w1", NOBODY)
    assert proxy.fast_decide("w1/extra", b"", []) is None
    assert proxy.fast_decide("w1", b"as_of=x&other=1", []) is None
    assert proxy.fast_decide("w1", b"as_of=2026-01-01T00:00:00Z", []) is None  # another key
    reply = await proxy.fast_decide("w1", b"", [(b"if-none-match", b'"e1"')])
    assert reply.status == 304 and reply.headers["X-QMTL-Cache"] == "hit"
    assert await proxy.fast_decide("w1", b"", [(b"authorization", b"Bearer junk")]) is None  # auth fails: full path answers
    clock.advance(300)
    assert proxy.fast_decide("w1", b"", []) is None


def test_safe_envelopes_and_reply_json_round_trip():
    proxy = proxy_for(Upstream({}))
    r = proxy._safe_decision("w1", None, "WorldService unavailable (x)", None)
    proxy._decision_schema(json.loads(r.body))
    assert r.headers["Cache-Control"] == "no-store"
    a = safe_activation("w1", "s", "short", "WorldService unavailable (x)", wall=proxy.wall())
    proxy._activation_schema(a.data())
