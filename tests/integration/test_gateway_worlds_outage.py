"""Real WorldService outages (process killed, frozen, restarted) seen through the Gateway:
safe decisions, inactive activation, 503s, budgets, the circuit breaker and /status.
No answer in any of these is a 500 (the client fails the test on one)."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest
from jsonschema import Draft202012Validator
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from qmtl.bus.inproc import InProcessBus
from qmtl.common.clock import ManualClock
from qmtl.contracts.loader import load_schema_files, schema_registry
from qmtl.gateway.app import create_app
from tests.helpers.clocked import clocked_gateway
from tests.helpers.server import serve
from tests.helpers.wsproc import SERVICE_TOKEN, WORLDS_PARTS, WorldServiceProcess, client, gateway_config, metric

LIVE = {"X-Allow-Live": "true"}
LIVE_POLICY = "hysteresis: {promote_after: 1, demote_after: 1, max_mode: live}\n"
OBS = {"data_end": "2026-01-01T00:00:00Z", "samples": 1, "metrics": {"sharpe": 1.0}}


def schema(name: str) -> Draft202012Validator:
    return Draft202012Validator(load_schema_files()[name], registry=schema_registry(), format_checker=Draft202012Validator.FORMAT_CHECKER)


def new_ws(tmp_path, ttl: str) -> WorldServiceProcess:
    proc = WorldServiceProcess(tmp_path / f"ws-{uuid.uuid4().hex[:6]}", service_token=SERVICE_TOKEN,
                               env={"QMTL__WORLDSERVICE__RBAC": "enforce", "QMTL__WORLDSERVICE__DECISION_TTL": ttl})
    proc.start()
    return proc


@pytest.fixture
def ws_ttl2(tmp_path):
    proc = new_ws(tmp_path, "2s")
    yield proc
    proc.stop()


@pytest.fixture
def ws_ttl0(tmp_path):
    proc = new_ws(tmp_path, "0s")
    yield proc
    proc.stop()


@pytest.fixture
async def dagmanager_standin():
    """A healthy stand-in for the DAG Manager's /health, counting probes."""
    hits = {"n": 0}

    async def health(_request):
        hits["n"] += 1
        return JSONResponse({"status": "ok"})

    async with serve(Starlette(routes=[Route("/health", health)])) as url:
        yield url, hits


async def live_world(c) -> str:
    """A world whose decision is `live` (allow_live, a live policy, two passing observations)."""
    w = f"live-{uuid.uuid4().hex[:8]}"
    assert (await c.post("/worlds", json={"world_id": w, "name": w, "allow_live": True}, headers=LIVE)).status_code == 201
    assert (await c.post(f"/worlds/{w}/policies", json={"yaml": LIVE_POLICY, "set_default": True}, headers=LIVE)).status_code == 201
    for _ in range(2):
        r = await c.put(f"/worlds/{w}/observations", json=OBS, headers=LIVE)
        assert r.status_code == 200, r.text
    assert r.json()["mode"] == "live"
    return w


async def test_stale_decision_with_worldservice_down_is_a_safe_backtest_never_live(ws_ttl2, tmp_path):
    ws = ws_ttl2
    clock = ManualClock()
    cfg = gateway_config(tmp_path, ws.url, breaker={"failure_threshold": 3, "reset_timeout": 0.5})
    app = clocked_gateway(cfg, clock, bus=InProcessBus(), parts=WORLDS_PARTS)
    async with serve(app) as url, client(url) as c:
        w = await live_world(c)
        first = await c.get(f"/worlds/{w}/decide")
        assert first.headers["x-qmtl-cache"] == "miss" and first.json()["effective_mode"] == "live"
        assert first.json()["ttl"] == "2s"
        live_etag = first.headers["etag"]
        ws.stop()  # a real outage: connections refused from now on
        clock.advance(1.9)
        fresh = await c.get(f"/worlds/{w}/decide")  # still within the ttl: the fresh entry is served
        assert fresh.headers["x-qmtl-cache"] == "hit" and fresh.json()["effective_mode"] == "live"
        clock.advance(0.2)  # 2.1 s after the fetch: expired
        for attempt in range(3):  # connect errors, then the breaker open: the same safe answer
            r = await c.get(f"/worlds/{w}/decide", headers={"If-None-Match": live_etag})
            assert r.status_code == 200, attempt
            body = r.json()
            schema("decision_envelope.schema.json").validate(body)
            assert body["effective_mode"] == "backtest" and body["world_id"] == w
            assert r.headers["x-qmtl-cache"] == "safe-default" and r.headers["cache-control"] == "no-store"
            assert body["ttl"] == "0s" and body["etag"].startswith("safe-") and r.headers["etag"] == f'"{body["etag"]}"'
            assert "WorldService unavailable" in body["reason"] and "(live, policy v1)" in body["reason"], body["reason"]
            assert "not served stale" in body["reason"]
        assert "circuit breaker open" in body["reason"]
        # a client that holds the safe etag gets 304 while nothing changes
        nm = await c.get(f"/worlds/{w}/decide", headers={"If-None-Match": r.headers["etag"]})
        assert nm.status_code == 304 and nm.headers["x-qmtl-cache"] == "safe-default"
        # WorldService back: the breaker's half-open probe succeeds and the real decision returns
        ws.start()
        clock.advance(0.6)  # the breaker's cool-off (0.5 s): its next call is the half-open probe
        back = await c.get(f"/worlds/{w}/decide")
        assert back.status_code == 200 and back.headers["x-qmtl-cache"] in ("miss", "revalidated")
        assert back.json()["effective_mode"] == "live"
        metrics = (await c.get("/metrics")).text
        assert metric(metrics, "world_decide_requests_total", result="safe-default") == 4
        assert metric(metrics, "gateway_proxy_errors_total", backend="worldservice", status="connect_error") >= 1
        assert metric(metrics, "gateway_proxy_errors_total", backend="worldservice", status="circuit_open") >= 1


async def test_ttl_zero_is_not_cached(ws_ttl0, tmp_path):
    ws = ws_ttl0
    app = create_app(gateway_config(tmp_path, ws.url), bus=InProcessBus(), parts=WORLDS_PARTS)
    async with serve(app) as url, client(url) as c:
        w = f"z-{uuid.uuid4().hex[:8]}"
        assert (await c.post("/worlds", json={"world_id": w, "name": w})).status_code == 201
        async with httpx.AsyncClient(base_url=ws.url) as d:
            before = metric((await d.get("/metrics")).text, "world_decide_latency_ms_count")
            for _ in range(3):
                r = await c.get(f"/worlds/{w}/decide")
                assert r.status_code == 200 and r.json()["ttl"] == "0s"
                assert r.headers["x-qmtl-cache"] == "miss" and r.headers["cache-control"] == "no-store"
            assert metric((await d.get("/metrics")).text, "world_decide_latency_ms_count") == before + 3
        assert (w, "") not in app.service.worlds.decisions
        ws.stop()
        r = await c.get(f"/worlds/{w}/decide")
        assert r.status_code == 200 and r.headers["x-qmtl-cache"] == "safe-default"
        assert r.json()["effective_mode"] == "backtest" and "no cached decision" in r.json()["reason"]


async def test_activation_is_inactive_when_worldservice_is_down_and_other_routes_are_503(ws_ttl2, tmp_path):
    ws = ws_ttl2
    app = create_app(gateway_config(tmp_path, ws.url, breaker={"failure_threshold": 100, "reset_timeout": 10.0}),
                     bus=InProcessBus(), parts=WORLDS_PARTS)
    async with serve(app) as url, client(url) as c:
        w = f"a-{uuid.uuid4().hex[:8]}"
        assert (await c.post("/worlds", json={"world_id": w, "name": w})).status_code == 201
        r = await c.post(f"/worlds/{w}/apply", json={"run_id": "r-1", "plan": {"activate": [{"strategy_id": "s-1", "side": "long", "weight": 0.7}]}},
                         headers=LIVE)
        assert r.status_code == 200
        params = {"strategy_id": "s-1", "side": "long"}
        r = await c.get(f"/worlds/{w}/activation", params=params)
        assert r.json()["active"] is True and r.json()["weight"] == 0.7
        active_etag = r.headers["etag"]
        ws.stop()
        for p in (params, {"strategy_id": "never-seen", "side": "short"}):
            r = await c.get(f"/worlds/{w}/activation", params=p, headers={"If-None-Match": active_etag})
            assert r.status_code == 200
            body = r.json()
            schema("activation_envelope.schema.json").validate(body)
            assert body["active"] is False and body["weight"] == 0 and body["strategy_id"] == p["strategy_id"]
            assert r.headers["x-qmtl-cache"] == "safe-default" and body["etag"].startswith("safe-")
            assert "WorldService unavailable" in body["reason"]
        # routes without a safe answer: 503 problem+json with Retry-After
        for method, path, kw in (("GET", f"/worlds/{w}", {}), ("GET", "/worlds", {}),
                                 ("POST", f"/worlds/{w}/apply", {"json": {"run_id": "r-2", "plan": {"activate": ["s-2"]}}, "headers": LIVE}),
                                 ("PUT", f"/worlds/{w}/activation", {"json": {"strategy_id": "s-1", "side": "long", "active": False}})):
            r = await c.request(method, path, **kw)
            assert r.status_code == 503, (method, path, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            assert int(r.headers["retry-after"]) >= 1 and r.json()["backend"] == "worldservice"
        # the live guard still answers without WorldService
        assert (await c.post(f"/worlds/{w}/apply", json={"run_id": "r-3", "plan": {}})).status_code == 403
        metrics = (await c.get("/metrics")).text
        assert metric(metrics, "world_activation_requests_total", result="safe-default") == 2


async def test_budget_timeouts_and_retries_only_for_idempotent_calls(ws_ttl2, tmp_path, dagmanager_standin):
    ws = ws_ttl2
    dm_url, _ = dagmanager_standin
    # the SPEC budget: 300 ms per attempt, 2 retries (idempotent calls only), breaker after 5 failures
    cfg = gateway_config(tmp_path, ws.url, dagmanager_url=dm_url, worldservice_budget={"timeout": 0.3, "retries": 2}, status_cache_ttl=0.0)
    assert cfg.gateway.breaker.failure_threshold == 5
    app = create_app(cfg, bus=InProcessBus(), parts=WORLDS_PARTS)
    async with serve(app) as url, client(url) as c:
        w = f"t-{uuid.uuid4().hex[:8]}"  # no need for it to exist: WorldService will not answer
        ws.freeze()  # the process holds its port and answers nothing: timeouts, not refusals
        try:
            started = time.monotonic()
            r = await c.get(f"/worlds/{w}/decide")
            took = time.monotonic() - started
            assert r.status_code == 200 and r.headers["x-qmtl-cache"] == "safe-default"
            assert "no answer within 300 ms" in r.json()["reason"]
            assert took >= 0.9, took  # three attempts waited their 300 ms out (no upper bound: not a timing test)
            status = (await c.get("/status")).json()
            ws_b, dm_b = status["breakers"]["worldservice"], status["breakers"]["dagmanager"]
            assert (ws_b["timeout_ms"], ws_b["retries"], dm_b["timeout_ms"], dm_b["retries"]) == (300, 2, 500, 1)  # SPEC budgets
            assert status["breakers"]["worldservice"]["failures"] == 3  # 1 attempt + 2 retries
            assert status["breakers"]["worldservice"]["state"] == "closed"
            r = await c.post("/worlds", json={"world_id": w + "-2", "name": "x"})  # not idempotent: one attempt
            assert r.status_code == 503
            status = (await c.get("/status")).json()
            # one breaker per operation: the backend shows its worst one (decide's 3 failures; POST has 1)
            assert status["breakers"]["worldservice"]["failures"] == 3
            assert status["dependencies"]["worldservice"]["healthy"] is False
            r = await c.get(f"/worlds/{w}/activation", params={"strategy_id": "s", "side": "long"})
            assert r.json()["active"] is False  # 3 failures of its own: its breaker stays closed
            assert (await c.get("/status")).json()["breakers"]["worldservice"]["state"] == "closed"
            r = await c.get(f"/worlds/{w}/decide")  # decide's 4th and 5th failures open decide's breaker
            assert r.status_code == 200 and r.headers["x-qmtl-cache"] == "safe-default"
            status = (await c.get("/status")).json()
            assert status["breakers"]["worldservice"]["state"] == "open"
            assert status["breakers"]["worldservice"]["operations"] == {"GET /worlds/{world_id}/decide": "open"}
            metrics = (await c.get("/metrics")).text
            assert metric(metrics, "gateway_circuit_breaker_operation_state", backend="worldservice",
                          operation="GET /worlds/{world_id}/decide") == 2
            assert metric(metrics, "gateway_proxy_errors_total", backend="worldservice", status="timeout") == 3
        finally:
            ws.thaw()


async def test_breaker_opens_half_opens_and_closes_seen_in_status(ws_ttl2, tmp_path, dagmanager_standin):
    ws = ws_ttl2
    dm_url, _ = dagmanager_standin
    clock = ManualClock()
    cfg = gateway_config(tmp_path, ws.url, dagmanager_url=dm_url, breaker={"failure_threshold": 2, "reset_timeout": 1.0},
                         status_cache_ttl=0.0)
    app = clocked_gateway(cfg, clock, bus=InProcessBus(), parts=WORLDS_PARTS)
    validator = schema("gateway_status.schema.json")

    async with serve(app) as url, client(url) as c:
        async def status() -> dict:
            r = await c.get("/status")
            assert r.status_code == 200
            validator.validate(r.json())
            return r.json()

        s = await status()
        assert s["degradation"] == "NORMAL" and s["status"] == "ok"
        assert s["breakers"]["worldservice"]["state"] == "closed" and s["breakers"]["dagmanager"]["state"] == "closed"
        assert all(d["healthy"] for d in s["dependencies"].values()) and set(s["dependencies"]) == {"redis", "database", "dagmanager", "worldservice"}
        ws.stop()
        r = await c.get("/worlds")
        assert r.status_code == 503
        s = await status()
        assert s["breakers"]["worldservice"]["state"] == "open" and s["breakers"]["worldservice"]["failures"] == 2
        assert s["dependencies"]["worldservice"]["healthy"] is False
        assert s["degradation"] == "PARTIAL" and s["status"] == "degraded"
        r = await c.get("/worlds")  # refused by the open breaker, at once
        assert r.status_code == 503 and "circuit breaker open" in r.json()["detail"]
        assert 1 <= int(r.headers["retry-after"]) <= 1
        metrics = (await c.get("/metrics")).text
        assert metric(metrics, "gateway_circuit_breaker_state", backend="worldservice") == 2
        clock.advance(1.05)  # past the breaker's cool-off (1 s)
        s = await status()
        assert s["breakers"]["worldservice"]["state"] == "half_open"
        assert metric((await c.get("/metrics")).text, "gateway_circuit_breaker_state", backend="worldservice") == 1
        ws.start()
        r = await c.get("/worlds")  # the half-open probe
        assert r.status_code == 200
        s = await status()
        assert s["breakers"]["worldservice"]["state"] == "closed" and s["breakers"]["worldservice"]["failures"] == 0
        assert s["degradation"] == "NORMAL"
        assert metric((await c.get("/metrics")).text, "gateway_circuit_breaker_state", backend="worldservice") == 0

        # a failed half-open probe opens the breaker again
        ws.stop()
        for _ in range(2):
            await c.get("/worlds")
        assert (await status())["breakers"]["worldservice"]["state"] == "open"
        clock.advance(1.05)  # past the breaker's cool-off (1 s)
        assert (await status())["breakers"]["worldservice"]["state"] == "half_open"
        assert (await c.get("/worlds")).status_code == 503
        assert (await status())["breakers"]["worldservice"]["state"] == "open"


async def test_status_dependency_health_is_cached_briefly(ws_ttl2, tmp_path, dagmanager_standin):
    dm_url, hits = dagmanager_standin
    cfg = gateway_config(tmp_path, ws_ttl2.url, dagmanager_url=dm_url, status_cache_ttl=0.5)
    clock = ManualClock()
    app = clocked_gateway(cfg, clock, bus=InProcessBus(), parts=WORLDS_PARTS)
    async with serve(app) as url, client(url) as c:
        first = await c.get("/status")
        burst = await asyncio.gather(*(c.get("/status") for _ in range(20)))
        assert first.json()["cached"] is False and all(r.json()["cached"] is True for r in burst)
        assert hits["n"] == 1  # 21 calls, one probe
        assert app.service.status.level() == "NORMAL"
        clock.advance(0.6)  # past the status cache ttl (0.5 s)
        again = await c.get("/status")
        assert again.json()["cached"] is False and hits["n"] == 2
