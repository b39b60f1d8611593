"""The worlds proxy over HTTP against a real WorldService process (SPEC §4).

One WorldService process (``rbac: enforce``, decision ttl 300 s) serves the module; every
test builds its own in-process Gateway (all components) and its own worlds. Outages, short ttls and
breakers are in ``test_gateway_worlds_outage.py``; authentication in
``test_gateway_worlds_auth.py``. Every HTTP answer is checked not to be a 500.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid

import httpx
import pytest
from jsonschema import Draft202012Validator

from qmtl.bus.inproc import InProcessBus
from qmtl.contracts.loader import load_openapi, load_schema_files, schema_registry
from qmtl.gateway.app import create_app
from tests.helpers.server import serve
from tests.helpers.wsproc import SERVICE_TOKEN, WORLDS_PARTS, WorldServiceProcess, client, gateway_config, metric

ADMIN = {"sub": "test-admin", "world_roles": {"*": ["owner"]}}
LIVE_POLICY = "hysteresis: {promote_after: 1, demote_after: 1, max_mode: live}\n"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    proc = WorldServiceProcess(tmp_path_factory.mktemp("ws"), service_token=SERVICE_TOKEN,
                               env={"QMTL__WORLDSERVICE__RBAC": "enforce", "QMTL__WORLDSERVICE__DECISION_TTL": "300s"})
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
async def gw(ws, tmp_path):
    """The whole Gateway (every component, as in production); the other modules build only
    the components the worlds proxy needs (auth, worlds, status)."""
    ws.start()  # a test of this module may have stopped it
    app = create_app(gateway_config(tmp_path, ws.url), bus=InProcessBus())
    async with serve(app) as url, client(url) as c:
        c.app = app  # type: ignore[attr-defined]
        yield c


def wid(prefix: str = "w") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def direct(ws: WorldServiceProcess) -> httpx.AsyncClient:
    """A client straight to WorldService, as a trusted admin (to look behind the Gateway)."""
    claims = base64.urlsafe_b64encode(json.dumps(ADMIN).encode()).decode().rstrip("=")
    return httpx.AsyncClient(base_url=ws.url, timeout=10, headers={
        "X-QMTL-Service-Token": SERVICE_TOKEN, "X-QMTL-Subject": ADMIN["sub"], "X-QMTL-Claims": claims})


async def ws_metric(ws, name: str, **labels: str) -> float:
    async with httpx.AsyncClient(base_url=ws.url, timeout=10) as c:
        return metric((await c.get("/metrics")).text, name, **labels)


async def audit(ws, world_id: str) -> list[dict]:
    async with direct(ws) as c:
        r = await c.get(f"/worlds/{world_id}/audit", params={"limit": 500})
        assert r.status_code == 200, r.text
        return r.json()["records"]


async def make_world(gw, world_id: str, *, allow_live: bool = False) -> dict:
    headers = {"X-Allow-Live": "true"} if allow_live else {}
    r = await gw.post("/worlds", json={"world_id": world_id, "name": world_id, "allow_live": allow_live}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


def is_problem(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body = r.json()
    assert body["status"] == status
    assert body["correlation_id"] == r.headers["x-correlation-id"]
    return body


# --------------------------------------------------------------------------- every route


def test_every_worldservice_route_is_in_the_gateway_spec_under_the_same_path():
    ws_ops = {(route, method) for route, method, _ in load_openapi("worldservice").operations()}
    gw_ops = {(route, method): op for route, method, op in load_openapi("gateway").operations()}
    proxied = {op for op in ws_ops if op[0] not in ("/health", "/ready", "/metrics")}  # each service has its own
    assert proxied, "WorldService spec has no routes"
    missing = sorted(proxied - set(gw_ops))
    assert not missing, f"WorldService routes not proxied by the Gateway: {missing}"
    for key in proxied:
        assert gw_ops[key]["tags"][0] == "worlds", key


async def test_crud_policies_observations_evaluate_and_audit_through_the_gateway(gw, ws):
    w = wid()
    created = await make_world(gw, w)
    assert created["world_id"] == w and created["owner"] == "dev-user"
    r = await gw.get(f"/worlds/{w}")
    assert r.status_code == 200 and r.json()["name"] == w
    r = await gw.get("/worlds", params={"limit": 500})
    assert r.status_code == 200 and w in [x["world_id"] for x in r.json()["worlds"]]
    r = await gw.put(f"/worlds/{w}", json={"description": "through the gateway"})
    assert r.status_code == 200 and r.json()["description"] == "through the gateway"

    r = await gw.post(f"/worlds/{w}/policies", json={"yaml": LIVE_POLICY})
    assert r.status_code == 201, r.text
    assert r.headers["location"].endswith(f"/worlds/{w}/policies/1")
    assert r.json()["version"] == 1
    r = await gw.post(f"/worlds/{w}/policies", json={"yaml": "gates: {metric: x, op: '=>', value: 1}\n"})
    is_problem(r, 422)  # WorldService's own validation, passed on
    r = await gw.get(f"/worlds/{w}/policies")
    assert r.status_code == 200 and [p["version"] for p in r.json()["policies"]] == [1]
    r = await gw.get(f"/worlds/{w}/policies/1")
    assert r.status_code == 200 and r.json()["yaml"] == LIVE_POLICY
    r = await gw.post(f"/worlds/{w}/set-default", params={"v": 1})
    assert r.status_code == 200 and r.json()["default_policy_version"] == 1
    r = await gw.get(f"/worlds/{w}/policy/state_hash")
    assert r.status_code == 200 and r.json()["topic"] == "policy"

    obs = {"data_end": "2026-01-01T00:00:00Z", "samples": 10, "metrics": {"sharpe": 1.0}}
    r = await gw.put(f"/worlds/{w}/observations", json=obs)
    assert r.status_code == 200 and r.json()["mode"] == "dryrun"  # not allow_live: never above dryrun
    r = await gw.get(f"/worlds/{w}/observations")
    assert r.status_code == 200 and r.json()["mode"] == "dryrun"

    r = await gw.post(f"/worlds/{w}/evaluate", json={"strategies": [{"strategy_id": "s-1", "metrics": {"sharpe": 2.0}}]})
    assert r.status_code == 200, r.text
    plan = r.json()
    r = await gw.get(f"/worlds/{w}/activations")
    assert r.status_code == 200 and r.json()["activations"] == []
    r = await gw.get(f"/worlds/{w}/activation/state_hash")
    assert r.status_code == 200 and r.json()["topic"] == "activation"

    r = await gw.get(f"/worlds/{w}/audit", params={"limit": 2})
    assert r.status_code == 200 and len(r.json()["records"]) == 2 and r.json()["next_cursor"]
    r2 = await gw.get(f"/worlds/{w}/audit", params={"limit": 2, "cursor": r.json()["next_cursor"]})
    assert r2.status_code == 200 and r2.json()["records"][0]["id"] != r.json()["records"][0]["id"]
    events = [rec["event"] for rec in await audit(ws, w)]
    for event in ("world.created", "world.updated", "policy.created", "policy.rejected", "policy.default_set",
                  "observation.recorded", "plan.evaluated"):
        assert event in events, (event, events)
    assert plan["world_id"] == w

    r = await gw.delete(f"/worlds/{w}")
    assert r.status_code == 204 and r.content == b""
    is_problem(await gw.get(f"/worlds/{w}"), 404)


async def test_worldservice_errors_are_passed_on_as_problems(gw):
    is_problem(await gw.get("/worlds/no-such-world"), 404)
    is_problem(await gw.get("/worlds/no-such-world/decide"), 404)
    is_problem(await gw.get("/worlds/no-such-world/activation", params={"strategy_id": "s", "side": "long"}), 404)
    w = wid()
    await make_world(gw, w)
    is_problem(await gw.post("/worlds", json={"world_id": w, "name": "again"}), 409)
    # the Gateway validates against the same contract before calling WorldService
    is_problem(await gw.get("/worlds/NOT_A_SLUG"), 400)
    is_problem(await gw.get(f"/worlds/{w}/activation", params={"strategy_id": "s"}), 400)
    is_problem(await gw.post(f"/worlds/{w}/apply", json={"run_id": "r"}, headers={"X-Allow-Live": "true"}), 422)
    # conflicting apply: same run_id, another plan
    ok = await gw.post(f"/worlds/{w}/apply", json={"run_id": "r-1", "plan": {"activate": ["s-1"]}}, headers={"X-Allow-Live": "true"})
    assert ok.status_code == 200 and ok.headers["idempotent-replayed"] == "false"
    again = await gw.post(f"/worlds/{w}/apply", json={"run_id": "r-1", "plan": {"activate": ["s-1"]}}, headers={"X-Allow-Live": "true"})
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    is_problem(await gw.post(f"/worlds/{w}/apply", json={"run_id": "r-1", "plan": {"activate": ["s-2"]}},
                             headers={"X-Allow-Live": "true"}), 409)


# --------------------------------------------------------------------------- decide cache


async def test_decide_second_call_is_a_cache_hit_and_worldservice_is_not_asked_again(gw, ws):
    w = wid()
    await make_world(gw, w)
    before = await ws_metric(ws, "world_decide_latency_ms_count")
    first = await gw.get(f"/worlds/{w}/decide")
    assert first.status_code == 200, first.text
    assert first.headers["x-qmtl-cache"] == "miss"
    body = first.json()
    Draft202012Validator(load_schema_files()["decision_envelope.schema.json"], registry=schema_registry()).validate(body)
    assert body["ttl"] == "300s" and body["effective_mode"] == "backtest"
    assert first.headers["etag"] == f'"{body["etag"]}"'
    assert first.headers["cache-control"] == "private, max-age=300"
    second = await gw.get(f"/worlds/{w}/decide")
    assert second.status_code == 200 and second.headers["x-qmtl-cache"] == "hit"
    assert second.json() == body and second.headers["etag"] == first.headers["etag"]
    assert await ws_metric(ws, "world_decide_latency_ms_count") == before + 1  # asked once
    # another as_of is another cache entry
    r = await gw.get(f"/worlds/{w}/decide", params={"as_of": "2026-01-01T00:00:00Z"})
    assert r.headers["x-qmtl-cache"] == "miss" and r.json()["as_of"].startswith("2026-01-01T00:00:00")
    r = await gw.get(f"/worlds/{w}/decide", params={"as_of": "2026-01-01T00:00:00Z"})
    assert r.headers["x-qmtl-cache"] == "hit"
    assert await ws_metric(ws, "world_decide_latency_ms_count") == before + 2
    metrics = (await gw.get("/metrics")).text
    assert metric(metrics, "world_decide_requests_total", result="hit") == 2
    assert metric(metrics, "world_decide_requests_total", result="miss") == 2
    assert metric(metrics, "world_decide_cache_hit_ratio") == 0.5
    assert metric(metrics, "gateway_world_decide_latency_ms_count") == 4
    assert "\nworld_decide_latency_ms_count" not in metrics  # one name, one meaning: that one is WorldService's


async def test_decide_etag_and_if_none_match_304(gw):
    w = wid()
    await make_world(gw, w)
    r = await gw.get(f"/worlds/{w}/decide")
    etag = r.headers["etag"]
    for inm in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        nm = await gw.get(f"/worlds/{w}/decide", headers={"If-None-Match": inm})
        assert nm.status_code == 304, (inm, nm.status_code)
        assert nm.content == b"" and nm.headers["etag"] == etag and nm.headers["x-qmtl-cache"] == "hit"
    changed = await gw.get(f"/worlds/{w}/decide", headers={"If-None-Match": '"something-else"'})
    assert changed.status_code == 200 and changed.headers["etag"] == etag
    # a client etag is honoured on a Gateway miss too (another replica's answer, an evicted entry)
    gw.app.service.worlds.decisions.pop((w, ""))
    r = await gw.get(f"/worlds/{w}/decide", headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.headers["x-qmtl-cache"] == "miss" and r.headers["etag"] == etag


async def test_a_write_through_the_gateway_forgets_the_worlds_cached_decisions(gw):
    w = wid()
    await make_world(gw, w)
    r = await gw.get(f"/worlds/{w}/decide")
    assert r.json()["reason"] == "no default policy"
    r = await gw.post(f"/worlds/{w}/policies", json={"yaml": LIVE_POLICY, "set_default": True})
    assert r.status_code == 201
    r = await gw.get(f"/worlds/{w}/decide")
    assert r.headers["x-qmtl-cache"] == "miss" and r.json()["reason"] == "no observation recorded"


async def test_decide_needs_the_reader_role_even_on_a_cache_hit(ws, tmp_path):
    w = wid()
    cfg = gateway_config(tmp_path, ws.url)
    cfg.gateway.auth.dev_roles = {w: ["owner"]}  # the development identity may read only this world
    app = create_app(cfg, bus=InProcessBus(), parts=WORLDS_PARTS)
    async with serve(app) as url, client(url) as c:
        await make_world(c, w)
        other = wid()
        async with direct(ws) as d:
            assert (await d.post("/worlds", json={"world_id": other, "name": "other"})).status_code == 201
        assert (await c.get(f"/worlds/{w}/decide")).status_code == 200
        is_problem(await c.get(f"/worlds/{other}/decide"), 403)
        # plant the other world's decision in the cache: the role check still runs
        app.service.worlds.decisions.put((other, ""), app.service.worlds.decisions.get((w, "")))
        is_problem(await c.get(f"/worlds/{other}/decide"), 403)
        is_problem(await c.get(f"/worlds/{other}/activation", params={"strategy_id": "s", "side": "long"}), 403)


# --------------------------------------------------------------------------- activation cache


async def test_activation_is_revalidated_upstream_with_if_none_match(gw, ws):
    w = wid()
    await make_world(gw, w)
    params = {"strategy_id": "s-1", "side": "long"}
    r = await gw.get(f"/worlds/{w}/activation", params=params)
    assert r.status_code == 200 and r.headers["x-qmtl-cache"] == "miss"
    unknown = r.json()
    assert unknown["active"] is False and unknown["weight"] == 0  # a strategy the world never had
    before_304 = await ws_metric(ws, "world_activation_not_modified_total")
    r = await gw.get(f"/worlds/{w}/activation", params=params)
    assert r.status_code == 200 and r.headers["x-qmtl-cache"] == "revalidated" and r.json() == unknown
    assert await ws_metric(ws, "world_activation_not_modified_total") == before_304 + 1  # WorldService answered 304

    ok = await gw.put(f"/worlds/{w}/activation", json={"strategy_id": "s-1", "side": "long", "active": True, "weight": 0.5},
                      headers={"X-Allow-Live": "true"})
    assert ok.status_code == 200, ok.text
    r = await gw.get(f"/worlds/{w}/activation", params=params)
    assert r.headers["x-qmtl-cache"] == "miss"  # changed upstream: a new body and etag
    active = r.json()
    assert active["active"] is True and active["weight"] == 0.5 and active["etag"] != unknown["etag"]
    assert r.headers["etag"] == f'"{active["etag"]}"' and ok.headers["etag"] == r.headers["etag"]
    nm = await gw.get(f"/worlds/{w}/activation", params=params, headers={"If-None-Match": r.headers["etag"]})
    assert nm.status_code == 304 and nm.content == b"" and nm.headers["etag"] == r.headers["etag"]
    assert nm.headers["x-qmtl-cache"] == "revalidated"
    stale = await gw.get(f"/worlds/{w}/activation", params=params, headers={"If-None-Match": f'"{unknown["etag"]}"'})
    assert stale.status_code == 200 and stale.json()["active"] is True

    # suspending the world gates it off: the cached active entry is not what is served
    r = await gw.put(f"/worlds/{w}", json={"state": "SUSPENDED"})
    assert r.status_code == 200
    r = await gw.get(f"/worlds/{w}/activation", params=params)
    assert r.json()["active"] is False and r.headers["x-qmtl-gated"] == "suspended" and r.headers["x-qmtl-cache"] == "miss"
    metrics = (await gw.get("/metrics")).text
    hits = metric(metrics, "world_activation_requests_total", result="revalidated")
    total = sum(metric(metrics, "world_activation_requests_total", result=x) for x in ("hit", "miss", "revalidated", "safe-default"))
    assert hits == 3 and total == 6
    assert metric(metrics, "world_activation_cache_hit_ratio") == pytest.approx(hits / total)


# --------------------------------------------------------------------------- live guard


async def _applies(ws, w: str) -> list[dict]:
    return [r for r in await audit(ws, w) if r["event"].startswith("apply")]


async def test_live_guard_apply_needs_x_allow_live_and_worldservice_is_not_called(gw, ws):
    w = wid()
    await make_world(gw, w)
    body = {"run_id": "r-guard", "plan": {"activate": ["s-1"]}}
    before = sum([await ws_metric(ws, "world_apply_total", outcome=o) for o in ("succeeded", "replayed", "rolled_back", "conflict")])
    for headers in ({}, {"X-Allow-Live": "false"}, {"X-Allow-Live": "yes"}):
        refused = is_problem(await gw.post(f"/worlds/{w}/apply", json=body, headers=headers), 403)
        assert refused["live_guard"] is True and "X-Allow-Live: true" in refused["detail"]
    after = sum([await ws_metric(ws, "world_apply_total", outcome=o) for o in ("succeeded", "replayed", "rolled_back", "conflict")])
    assert after == before and await _applies(ws, w) == []  # WorldService never saw them
    r = await gw.post(f"/worlds/{w}/apply", json=body, headers={"X-Allow-Live": "TRUE"})
    assert r.status_code == 200 and r.json()["ok"] is True
    assert [a["event"] for a in await _applies(ws, w)] == ["apply.succeeded"]
    metrics = (await gw.get("/metrics")).text
    assert metric(metrics, "world_live_guard_refusals_total", operation="apply") == 3


async def test_live_guard_on_every_call_that_can_move_a_world_to_live(gw, ws):
    live = wid("live")
    # creating a world that allows live
    is_problem(await gw.post("/worlds", json={"world_id": live, "name": "x", "allow_live": True}), 403)
    is_problem(await gw.get(f"/worlds/{live}"), 404)  # not created
    await make_world(gw, live, allow_live=True)
    # a world without allow_live: nothing here can make it live, so no header needed
    calm = wid("calm")
    await make_world(gw, calm)
    assert (await gw.post(f"/worlds/{calm}/policies", json={"yaml": LIVE_POLICY, "set_default": True})).status_code == 201
    obs = {"data_end": "2026-01-01T00:00:00Z", "samples": 1, "metrics": {}}
    assert (await gw.put(f"/worlds/{calm}/observations", json=obs)).status_code == 200
    assert (await gw.put(f"/worlds/{calm}", json={"state": "ACTIVE"})).status_code == 200
    # switching allow_live on
    is_problem(await gw.put(f"/worlds/{calm}", json={"allow_live": True}), 403)
    # on the world that allows live: policies made default, set-default, observations, lifting a gate
    is_problem(await gw.post(f"/worlds/{live}/policies", json={"yaml": LIVE_POLICY, "set_default": True}), 403)
    assert (await gw.post(f"/worlds/{live}/policies", json={"yaml": LIVE_POLICY})).status_code == 201  # a draft cannot
    is_problem(await gw.post(f"/worlds/{live}/set-default", params={"v": 1}), 403)
    ok = await gw.post(f"/worlds/{live}/set-default", params={"v": 1}, headers={"X-Allow-Live": "true"})
    assert ok.status_code == 200
    is_problem(await gw.put(f"/worlds/{live}/observations", json=obs), 403)
    assert (await gw.put(f"/worlds/{live}", json={"circuit_breaker": True})).status_code == 200  # gating off: never guarded
    is_problem(await gw.put(f"/worlds/{live}", json={"circuit_breaker": False}), 403)
    # activation override: on is guarded, off is not
    on = {"strategy_id": "s-1", "side": "long", "active": True}
    is_problem(await gw.put(f"/worlds/{calm}/activation", json=on), 403)
    assert (await gw.put(f"/worlds/{calm}/activation", json=dict(on, active=False))).status_code == 200
    events = {w: [r["event"] for r in await audit(ws, w)] for w in (live, calm)}
    assert "observation.recorded" not in events[live]
    assert events[live].count("policy.default_set") == 1 and events[live].count("policy.created") == 1
    assert "world.updated" in events[calm] and events[calm].count("activation.override") == 1
    async with direct(ws) as d:
        world = (await d.get(f"/worlds/{calm}")).json()
    assert world["allow_live"] is False


async def test_allow_live_gateway_needs_no_header(ws, tmp_path):
    app = create_app(gateway_config(tmp_path, ws.url, allow_live=True), bus=InProcessBus(), parts=WORLDS_PARTS)
    async with serve(app) as url, client(url) as c:
        w = wid()
        r = await c.post("/worlds", json={"world_id": w, "name": "x", "allow_live": True})
        assert r.status_code == 201
        r = await c.post(f"/worlds/{w}/apply", json={"run_id": "r", "plan": {"activate": ["s"]}})
        assert r.status_code == 200
        r = await c.put(f"/worlds/{w}/activation", json={"strategy_id": "s", "side": "long", "active": True})
        assert r.status_code == 200


def test_allow_live_from_the_command_line_and_the_config():
    from qmtl.cli import build_parser, overrides_from_args
    from qmtl.common.config import load_config

    for argv in (["gw", "--allow-live"], ["up", "--allow-live"]):
        cfg = load_config(environ={}, overrides=overrides_from_args(build_parser().parse_args(argv)))
        assert cfg.gateway.allow_live is True, argv
    for argv in (["gw"], ["up"]):
        cfg = load_config(environ={}, overrides=overrides_from_args(build_parser().parse_args(argv)))
        assert cfg.gateway.allow_live is False, argv
    assert load_config(environ={"QMTL__GATEWAY__ALLOW_LIVE": "true"}).gateway.allow_live is True


# --------------------------------------------------------------------------- identity and correlation


async def test_subject_and_correlation_id_reach_the_audit_log_and_the_logs(gw, ws, caplog):
    w = wid()
    caplog.set_level(logging.INFO, logger="qmtl.gateway.worlds")
    r = await gw.post("/worlds", json={"world_id": w, "name": "x"}, headers={"X-Correlation-ID": "corr-create-1"})
    assert r.status_code == 201 and r.headers["x-correlation-id"] == "corr-create-1"
    r = await gw.post(f"/worlds/{w}/apply", json={"run_id": "r", "plan": {"activate": ["s"]}}, headers={"X-Allow-Live": "true"})
    generated = r.headers["x-correlation-id"]
    assert r.status_code == 200 and len(generated) == 32
    records = {rec["event"]: rec for rec in await audit(ws, w)}
    assert records["world.created"]["correlation_id"] == "corr-create-1"
    assert records["apply.succeeded"]["correlation_id"] == generated
    assert records["world.created"]["actor"] == records["apply.succeeded"]["actor"] == "dev-user"
    logged = {getattr(rec, "correlation_id", None) for rec in caplog.records}
    assert {"corr-create-1", generated} <= logged
    # an invalid client id is replaced, never echoed
    r = await gw.get(f"/worlds/{w}", headers={"X-Correlation-ID": "bad id\twith spaces"})
    assert r.status_code == 200 and r.headers["x-correlation-id"] != "bad id\twith spaces"
    # errors carry it too
    body = is_problem(await gw.post(f"/worlds/{w}/apply", json={"run_id": "r2", "plan": {}}, headers={"X-Correlation-ID": "corr-err"}), 403)
    assert body["correlation_id"] == "corr-err"


async def test_client_supplied_identity_headers_are_not_trusted(gw, ws):
    w = wid()
    forged = base64.urlsafe_b64encode(json.dumps({"sub": "mallory", "world_roles": {"*": ["owner"]}}).encode()).decode()
    r = await gw.post("/worlds", json={"world_id": w, "name": "x"},
                      headers={"X-QMTL-Subject": "mallory", "X-QMTL-Claims": forged, "X-QMTL-Service-Token": "guess"})
    assert r.status_code == 201
    assert r.json()["owner"] == "dev-user"
    assert [rec["actor"] for rec in await audit(ws, w)] == ["dev-user"]


async def test_a_wrong_service_token_is_a_bad_gateway_not_an_unauthorized_caller(ws, tmp_path):
    app = create_app(gateway_config(tmp_path, ws.url, service_token="not-the-shared-token"), bus=InProcessBus(),
                     parts=WORLDS_PARTS)
    async with serve(app) as url, client(url) as c:
        body = is_problem(await c.get("/worlds"), 502)
        assert "service_token" in body["detail"]
