"""WorldService end to end over real HTTP (uvicorn), with a real in-process ControlBus,
on SQLite and on the real PostgreSQL: every rule of SPEC §6 and the events it emits."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from qmtl.bus.base import TOPIC_ACTIVATION, TOPIC_POLICY, BusMessage, ControlBus
from qmtl.bus.inproc import InProcessBus
from qmtl.common.config import Config
from qmtl.common.statehash import activation_state_hash, policy_state_hash
from qmtl.contracts.events import event_validators
from qmtl.store.sql import Database, sqlite_url
from qmtl.worldservice import store
from qmtl.worldservice.app import create_app
from qmtl.worldservice.rbac import encode_claims
from tests.helpers.bus import wait_until
from tests.helpers.server import serve

TOKEN = "test-service-token"

POLICY = """
data_currency: {max_lag: 1h}
samples: {min_samples: 10}
gates:
  all:
    - {metric: sharpe, op: ">=", value: 1.0}
    - any:
        - {metric: max_drawdown, op: "<=", value: 0.2}
        - {metric: win_rate, op: ">", value: 0.55}
score: {weights: {sharpe: 1.0}}
constraints: {min_score: 1.0, max_active: 2, max_weight: 0.5}
hysteresis: {promote_after: 2, demote_after: 1, max_mode: live}
"""
GOOD = {"sharpe": 1.5, "max_drawdown": 0.1}
BAD = {"sharpe": 0.2, "max_drawdown": 0.1}


@pytest.fixture(params=["sqlite", "postgres"])
def db_target(request, tmp_path):
    """(url, schema): a fresh SQLite file or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "worldservice.db"), None
    return request.getfixturevalue("pg_schema")


def ident(subject: str, roles: dict[str, list[str]], token: str | None = TOKEN) -> dict[str, str]:
    h = {"X-QMTL-Subject": subject, "X-QMTL-Claims": encode_claims({"sub": subject, "world_roles": roles})}
    if token is not None:
        h["X-QMTL-Service-Token"] = token
    return h


OWNER_ALL = ident("root", {"*": ["owner"]})


@dataclass
class Env:
    client: httpx.AsyncClient
    app: Any
    bus: ControlBus
    sub: Any
    seen: list[BusMessage] = field(default_factory=list)

    @property
    def service(self):
        return self.app.service

    async def events(self, topic: str | None = None, world: str | None = None) -> list[BusMessage]:
        """Every event published since the last call. Writes answer without waiting for the
        bus, so what they committed is published first (the outbox's own flush)."""
        await self.service.outbox.flush()
        out = []
        while True:
            try:
                msg = await asyncio.wait_for(self.sub.__anext__(), 0.05)
            except TimeoutError:
                break
            event_validators().validate(msg.topic, msg.value)  # valid on the wire too
            out.append(msg)
        self.seen += out
        return [m for m in out if (topic is None or m.topic == topic) and (world is None or m.key == world)]

    async def call(self, method: str, path: str, status: int | tuple[int, ...] = 200, **kw) -> httpx.Response:
        r = await self.client.request(method, path, **kw)
        expected = status if isinstance(status, tuple) else (status,)
        assert r.status_code in expected, f"{method} {path}: {r.status_code} {r.text}"
        if r.status_code >= 400:
            assert r.headers["content-type"].startswith("application/problem+json")
        return r


@contextlib.asynccontextmanager
async def running(target, *, rbac: str = "dev", bus: ControlBus | None = None, ttl: str = "300s", drain: float = 0.0, headers=None) -> AsyncIterator[Env]:
    url, schema = target
    cfg = Config()
    cfg.worldservice.rbac = rbac
    cfg.worldservice.service_token = TOKEN
    cfg.worldservice.decision_ttl = ttl
    cfg.worldservice.apply_drain_seconds = drain
    if bus is None:
        bus = InProcessBus(validator=event_validators())
        await bus.start()
    sub = await bus.subscribe([TOPIC_ACTIVATION, TOPIC_POLICY], consumer_id=f"test-{uuid.uuid4().hex}", from_beginning=False)
    db = Database(url, schema=schema)
    app = create_app(cfg, bus=bus, db=db)
    try:
        async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=20, headers=headers or {}) as client:
            yield Env(client, app, bus, sub)
    finally:
        await sub.close()
        await db.close()


async def make_world(env: Env, world_id: str, *, policy: str | None = POLICY, **extra) -> dict:
    r = await env.call("POST", "/worlds", 201, json={"world_id": world_id, "name": world_id.upper(), **extra}, headers=OWNER_ALL)
    if policy is not None:
        await env.call("POST", f"/worlds/{world_id}/policies", 201, json={"yaml": policy, "set_default": True}, headers=OWNER_ALL)
    return r.json()


def observation(metrics=GOOD, samples=50, data_end="2099-01-01T00:00:00Z"):
    return {"data_end": data_end, "samples": samples, "metrics": metrics}


# --------------------------------------------------------------------------- worlds


async def test_world_crud(db_target):
    async with running(db_target) as env:
        r = await env.call("POST", "/worlds", 201, json={"world_id": "alpha", "name": "Alpha", "labels": {"desk": "fx"}})
        assert r.headers["location"] == "/worlds/alpha"
        w = r.json()
        assert w["owner"] == "dev-user" and w["state"] == "ACTIVE" and w["default_policy_version"] == 0
        assert w["labels"] == {"desk": "fx"} and w["allow_live"] is False and w["apply_run_id"] is None
        await env.call("POST", "/worlds", 409, json={"world_id": "alpha", "name": "again"})
        await env.call("POST", "/worlds", 201, json={"world_id": "beta", "name": "Beta", "owner": "carol"})
        await env.call("POST", "/worlds", 422, json={"world_id": "Not A Slug", "name": "x"})
        assert (await env.call("GET", "/worlds/alpha")).json() == w

        page1 = (await env.call("GET", "/worlds", params={"limit": 1})).json()
        assert [x["world_id"] for x in page1["worlds"]] == ["alpha"] and page1["next_cursor"]
        page2 = (await env.call("GET", "/worlds", params={"limit": 1, "cursor": page1["next_cursor"]})).json()
        assert [x["world_id"] for x in page2["worlds"]] == ["beta"] and page2["next_cursor"] is None

        upd = (await env.call("PUT", "/worlds/alpha", json={"name": "Alpha 2", "allow_live": True})).json()
        assert upd["name"] == "Alpha 2" and upd["allow_live"] and upd["created_at"] == w["created_at"]
        assert upd["updated_at"] > w["updated_at"]
        await env.call("PUT", "/worlds/alpha", 422, json={})
        await env.call("PUT", "/worlds/alpha", 422, json={"state": "DELETED"})
        await env.call("PUT", "/worlds/nope", 404, json={"name": "x"})

        await env.call("DELETE", "/worlds/alpha", 204)
        await env.call("GET", "/worlds/alpha", 404)
        await env.call("DELETE", "/worlds/alpha", 404)
        r = await env.call("POST", "/worlds", 409, json={"world_id": "alpha", "name": "reuse"})
        assert "deleted" in r.json()["detail"]
        assert [x["world_id"] for x in (await env.call("GET", "/worlds")).json()["worlds"]] == ["beta"]
        events = [x["event"] for x in (await env.call("GET", "/worlds/alpha/audit")).json()["records"]]
        assert events == ["world.deleted", "world.updated", "world.created"]


# --------------------------------------------------------------------------- policies


async def test_policy_versions_set_default_and_broken_policy_keeps_default(db_target):
    async with running(db_target) as env:
        await make_world(env, "pw", policy=None)
        v1 = await env.call("POST", "/worlds/pw/policies", 201, json={"yaml": POLICY})
        assert v1.headers["location"] == "/worlds/pw/policies/1"
        v1 = v1.json()
        assert v1["version"] == 1 and v1["status"] == "DRAFT" and v1["document"]["samples"] == {"min_samples": 10}
        assert (await env.call("GET", "/worlds/pw")).json()["default_policy_version"] == 0
        w = (await env.call("POST", "/worlds/pw/set-default", params={"v": 1})).json()
        assert w["default_policy_version"] == 1
        v2 = (await env.call("POST", "/worlds/pw/policies", 201, json={"yaml": "hysteresis: {promote_after: 1}\n", "set_default": True})).json()
        assert v2["version"] == 2 and v2["status"] == "ACTIVE"

        # a YAML syntax error: 422 with line/column, no version created, default unchanged
        r = await env.call("POST", "/worlds/pw/policies", 422, json={"yaml": "gates:\n  all: [\n  - x\n", "set_default": True})
        err = r.json()["errors"][0]
        assert err["pointer"] == "/yaml" and err["line"] >= 2 and "column" in err
        assert "default policy is unchanged" in r.json()["detail"]
        # a schema violation: 422 naming the pointer inside the policy
        r = await env.call("POST", "/worlds/pw/policies", 422, json={"yaml": "constraints: {max_weight: 7}\n", "set_default": True})
        assert r.json()["errors"][0]["document_pointer"] == "/constraints/max_weight"
        listing = (await env.call("GET", "/worlds/pw/policies")).json()
        assert listing["default_version"] == 2
        assert [(p["version"], p["status"]) for p in listing["policies"]] == [(1, "DEPRECATED"), (2, "ACTIVE")]
        assert (await env.call("GET", "/worlds/pw")).json()["default_policy_version"] == 2

        got = (await env.call("GET", "/worlds/pw/policies/1")).json()
        assert got["yaml"] == POLICY and got["checksum"] == v1["checksum"] and got["status"] == "DEPRECATED"
        await env.call("GET", "/worlds/pw/policies/9", 404)
        await env.call("POST", "/worlds/pw/set-default", 404, params={"v": 9})
        await env.call("POST", "/worlds/pw/set-default", 400, params={"v": "two"})
        # setting the current default again changes nothing (no event)
        await env.call("POST", "/worlds/pw/set-default", params={"v": 2})

        events = [(m.value["policy_version"], m.value["status"]) for m in await env.events(TOPIC_POLICY, "pw")]
        assert events == [(1, "DRAFT"), (1, "ACTIVE"), (1, "DEPRECATED"), (2, "ACTIVE")]
        probe = (await env.call("GET", "/worlds/pw/policy/state_hash")).json()
        assert probe == {"world_id": "pw", "topic": "policy", "state_hash": policy_state_hash("pw", 2, v2["checksum"], "ACTIVE")}

        audit = [(x["event"], x["result"]) for x in (await env.call("GET", "/worlds/pw/audit")).json()["records"]]
        rejected = [res for ev, res in audit if ev == "policy.rejected"]
        assert len(rejected) == 2 and all(res["default_policy_version"] == 2 for res in rejected)
        assert env.service.metrics.policy_rejected._value.get() == 2


# --------------------------------------------------------------------------- decisions


async def test_decide_hysteresis_etag_ttl_and_304(db_target):
    async with running(db_target, ttl="120s") as env:
        await make_world(env, "dw", policy=None)
        r = await env.call("GET", "/worlds/dw/decide")
        d0 = r.json()
        assert d0["effective_mode"] == "backtest" and d0["reason"] == "no default policy" and d0["policy_version"] == 0
        assert d0["ttl"] == "120s" and r.headers["cache-control"] == "max-age=120"
        assert r.headers["etag"] == f'"{d0["etag"]}"'
        await env.call("PUT", "/worlds/dw/observations", 409, json=observation())
        await env.call("POST", "/worlds/dw/policies", 201, json={"yaml": POLICY, "set_default": True})
        d1 = (await env.call("GET", "/worlds/dw/decide")).json()
        assert d1["reason"] == "no observation recorded" and d1["etag"] != d0["etag"]
        await env.call("GET", "/worlds/dw/observations", 404)

        # NaN / Infinity are not JSON: 400, nothing recorded
        for bad in (b"NaN", b"1e999"):
            raw = b'{"data_end": "2099-01-01T00:00:00Z", "samples": 50, "metrics": {"sharpe": ' + bad + b"}}"
            await env.call("PUT", "/worlds/dw/observations", 400, content=raw, headers={"content-type": "application/json"})
        await env.call("PUT", "/worlds/dw/observations", 422, json=observation(data_end="2099-01-01T00:00:00"))
        s = (await env.call("PUT", "/worlds/dw/observations", json=observation())).json()
        assert s["mode"] == "backtest" and s["consecutive_passes"] == 1 and s["passed"]
        assert "promote to dryrun after 1 more" in s["reasons"][-1]
        s = (await env.call("PUT", "/worlds/dw/observations", json=observation())).json()
        assert s["mode"] == "dryrun" and s["consecutive_passes"] == 0
        d2 = (await env.call("GET", "/worlds/dw/decide")).json()
        assert d2["effective_mode"] == "dryrun" and d2["policy_version"] == 1 and d2["etag"] != d1["etag"]
        assert "promoted to dryrun" in d2["reason"]

        # cacheable: same decision, same etag (as_of does not change it); If-None-Match → 304
        d2b = (await env.call("GET", "/worlds/dw/decide", params={"as_of": "2098-06-01T00:00:00Z"})).json()
        assert d2b["etag"] == d2["etag"] and d2b["as_of"].startswith("2098-06-01T00:00:00")
        r = await env.call("GET", "/worlds/dw/decide", 304, headers={"If-None-Match": f'"{d2["etag"]}"'})
        assert r.content == b"" and r.headers["etag"] == f'"{d2["etag"]}"'
        await env.call("GET", "/worlds/dw/decide", 200, headers={"If-None-Match": '"other"'})
        # data currency is judged at as_of
        stale = (await env.call("GET", "/worlds/dw/decide", params={"as_of": "2099-01-01T02:00:00Z"})).json()
        assert stale["effective_mode"] == "backtest" and "data stale" in stale["reason"] and stale["etag"] != d2["etag"]
        await env.call("GET", "/worlds/dw/decide", 400, params={"as_of": "yesterday"})

        # never live without allow_live: two more passes stay dryrun
        for _ in range(2):
            s = (await env.call("PUT", "/worlds/dw/observations", json=observation())).json()
        assert s["mode"] == "dryrun" and "highest allowed mode" in s["reasons"][-1]
        await env.call("PUT", "/worlds/dw", json={"allow_live": True})
        for _ in range(2):
            s = (await env.call("PUT", "/worlds/dw/observations", json=observation())).json()
        assert s["mode"] == "live"
        assert (await env.call("GET", "/worlds/dw/decide")).json()["effective_mode"] == "live"
        await env.call("PUT", "/worlds/dw", json={"allow_live": False})
        d = (await env.call("GET", "/worlds/dw/decide")).json()
        assert d["effective_mode"] == "dryrun" and "allow_live is false" in d["reason"]
        await env.call("PUT", "/worlds/dw", json={"allow_live": True})

        # one failing observation demotes (demote_after 1); a failing gate says why
        s = (await env.call("PUT", "/worlds/dw/observations", json=observation(metrics=BAD))).json()
        assert s["mode"] == "dryrun" and not s["passed"] and any("gate failed: sharpe >= 1" in x for x in s["reasons"])
        s = (await env.call("PUT", "/worlds/dw/observations", json=observation(samples=3))).json()
        assert s["mode"] == "backtest" and "insufficient samples: 3 < 10" in s["reasons"]
        assert (await env.call("GET", "/worlds/dw/observations")).json() == s

        # a new default policy: the hysteresis counters restart under it, the mode is kept
        await env.call("PUT", "/worlds/dw/observations", json=observation())
        await env.call("POST", "/worlds/dw/policies", 201, json={"yaml": POLICY.replace("promote_after: 2", "promote_after: 3"), "set_default": True})
        s = (await env.call("PUT", "/worlds/dw/observations", json=observation())).json()
        assert s["policy_version"] == 2 and s["mode"] == "backtest" and s["consecutive_passes"] == 1
        assert "policy changed from v1 to v2: counters reset" in s["reasons"]
        assert (await env.call("GET", "/worlds/dw/decide")).json()["policy_version"] == 2

        await env.call("PUT", "/worlds/dw", json={"circuit_breaker": True})
        d = (await env.call("GET", "/worlds/dw/decide")).json()
        assert d == dict(d, effective_mode="backtest", reason="circuit breaker engaged")
        assert env.service.metrics.decide_latency_ms._sum.get() > 0
        metrics = (await env.call("GET", "/metrics")).text
        assert "world_decide_latency_ms_count" in metrics


# --------------------------------------------------------------------------- activation


async def test_activation_etag_304_override_and_gating(db_target):
    async with running(db_target) as env:
        await make_world(env, "aw")
        q = {"strategy_id": "s-1", "side": "long"}
        r = await env.call("GET", "/worlds/aw/activation", params=q)
        unknown = r.json()
        assert unknown["active"] is False and unknown["weight"] == 0 and r.headers["etag"] == f'"{unknown["etag"]}"'
        assert r.headers["cache-control"] == "no-cache"
        r = await env.call("GET", "/worlds/aw/activation", 304, params=q, headers={"If-None-Match": r.headers["etag"]})
        assert r.content == b""
        await env.call("GET", "/worlds/aw/activation", 400, params={"strategy_id": "s-1", "side": "up"})
        await env.call("GET", "/worlds/nope/activation", 404, params=q)

        on = (await env.call("PUT", "/worlds/aw/activation", json={**q, "active": True, "weight": 0.3})).json()
        assert on["active"] and on["weight"] == 0.3 and on["etag"] != unknown["etag"]
        r = await env.call("GET", "/worlds/aw/activation", 200, params=q, headers={"If-None-Match": f'"{unknown["etag"]}"'})
        assert r.json() == on
        # the same override again changes nothing: same etag, no event
        assert (await env.call("PUT", "/worlds/aw/activation", json={**q, "active": True, "weight": 0.3})).json()["etag"] == on["etag"]
        # If-Match: a stale etag is 412, the current one works
        await env.call("PUT", "/worlds/aw/activation", 412, json={**q, "active": False}, headers={"If-Match": f'"{unknown["etag"]}"'})
        off = (await env.call("PUT", "/worlds/aw/activation", json={**q, "active": False}, headers={"If-Match": f'"{on["etag"]}"'})).json()
        assert off["active"] is False and off["weight"] == 0 and off["etag"] not in (on["etag"], unknown["etag"])
        # toggling back gives a new etag, never an old one
        on2 = (await env.call("PUT", "/worlds/aw/activation", json={**q, "active": True, "weight": 0.3})).json()
        assert on2["etag"] not in (on["etag"], off["etag"])
        await env.call("PUT", "/worlds/aw/activation", json={"strategy_id": "s-2", "side": "short", "active": True})

        events = await env.events(TOPIC_ACTIVATION, "aw")
        assert [(e.value["strategy_id"], e.value["active"], e.value["etag"]) for e in events] == [
            ("s-1", True, on["etag"]), ("s-1", False, off["etag"]), ("s-1", True, on2["etag"]), ("s-2", True, events[-1].value["etag"])]
        assert all("run_id" not in e.value for e in events)
        full = (await env.call("GET", "/worlds/aw/activations")).json()
        assert events[-1].value["state_hash"] == full["state_hash"] == activation_state_hash(full["activations"])
        assert (await env.call("GET", "/worlds/aw/activation/state_hash")).json()["state_hash"] == full["state_hash"]

        # circuit breaker: every entry reads inactive (with a new etag and X-QMTL-Gated), events say so
        await env.call("PUT", "/worlds/aw", json={"circuit_breaker": True})
        r = await env.call("GET", "/worlds/aw/activation", params=q)
        gated = r.json()
        assert gated["active"] is False and gated["weight"] == 0 and r.headers["x-qmtl-gated"] == "circuit_breaker"
        assert gated["etag"] != on2["etag"]
        events = await env.events(TOPIC_ACTIVATION, "aw")
        assert sorted((e.value["strategy_id"], e.value["active"]) for e in events) == [("s-1", False), ("s-2", False)]
        await env.call("PUT", "/worlds/aw", json={"circuit_breaker": False})
        r = await env.call("GET", "/worlds/aw/activation", params=q)
        back = r.json()
        assert back["active"] and back["weight"] == 0.3 and "x-qmtl-gated" not in r.headers
        assert back["etag"] not in (on2["etag"], gated["etag"])  # new, so caches and dedup see the change
        events = await env.events(TOPIC_ACTIVATION, "aw")
        assert sorted((e.value["strategy_id"], e.value["active"]) for e in events) == [("s-1", True), ("s-2", True)]
        assert events[-1].value["ts"] >= gated["ts"]
        assert events[-1].value["state_hash"] == (await env.call("GET", "/worlds/aw/activation/state_hash")).json()["state_hash"]


# --------------------------------------------------------------------------- evaluate and apply


async def test_evaluate_is_read_only_and_its_plan_can_be_applied(db_target):
    async with running(db_target) as env:
        await make_world(env, "ew")
        await env.call("POST", "/worlds/ew/apply", json={"run_id": "seed", "plan": {"activate": ["old"]}})
        await env.events()
        before = (await env.call("GET", "/worlds/ew/activations")).json()
        body = {
            "as_of": "2099-01-01T00:10:00Z",
            "strategies": [
                {"strategy_id": "old", "samples": 50, "data_end": "2099-01-01T00:00:00Z", "metrics": BAD},
                {"strategy_id": "a", "samples": 50, "data_end": "2099-01-01T00:00:00Z", "metrics": {"sharpe": 2.0, "win_rate": 0.6}},
                {"strategy_id": "b", "samples": 50, "data_end": "2099-01-01T00:00:00Z", "metrics": {"sharpe": 3.0, "max_drawdown": 0.1}},
                {"strategy_id": "c", "samples": 50, "data_end": "2099-01-01T00:00:00Z", "metrics": {"sharpe": 2.5, "max_drawdown": 0.1}},
                {"strategy_id": "few", "samples": 2, "data_end": "2099-01-01T00:00:00Z", "metrics": GOOD},
                {"strategy_id": "stale", "samples": 50, "data_end": "2098-12-31T00:00:00Z", "metrics": GOOD},
            ],
        }
        plan = (await env.call("POST", "/worlds/ew/evaluate", json=body)).json()
        assert plan["policy_version"] == 1 and plan["as_of"].startswith("2099-01-01T00:10:00")
        assert {(e["strategy_id"], e["side"], e["weight"]) for e in plan["activate"]} == {
            ("b", "long", 0.5), ("b", "short", 0.5), ("c", "long", 0.5), ("c", "short", 0.5)}
        assert {(e["strategy_id"], e["side"]) for e in plan["deactivate"]} == {("old", "long"), ("old", "short")}
        assert "max_active 2 reached" in plan["reasons"]["a"]
        assert "insufficient samples" in plan["reasons"]["few"] and "data stale" in plan["reasons"]["stale"]
        assert plan["scores"]["b"] == 3.0
        assert plan["topk"] == ["b", "c"] and plan["promote"] == ["b", "c"] and plan["demote"] == ["old"]
        assert plan["notes"].startswith("policy v1") and "6 strategies judged (from the request)" in plan["notes"]
        # read-only: nothing changed, nothing published
        assert (await env.call("GET", "/worlds/ew/activations")).json() == before
        assert await env.events() == []
        audit = (await env.call("GET", "/worlds/ew/audit", params={"limit": 1})).json()["records"][0]
        assert audit["event"] == "plan.evaluated" and audit["result"]["deactivate"] == plan["deactivate"]
        await env.call("POST", "/worlds/ew/evaluate", 422, json={"strategies": [{"strategy_id": "x", "metrics": {}}] * 2})

        # the evaluation result is a plan apply accepts as it is
        result = (await env.call("POST", "/worlds/ew/apply", json={"run_id": "from-eval", "plan": plan})).json()
        assert len(result["activated"]) == 4 and len(result["deactivated"]) == 2
        after = (await env.call("GET", "/worlds/ew/activations")).json()
        active = sorted((a["strategy_id"], a["side"], a["weight"]) for a in after["activations"] if a["active"])
        assert active == [("b", "long", 0.5), ("b", "short", 0.5), ("c", "long", 0.5), ("c", "short", 0.5)]

        await make_world(env, "nopolicy", policy=None)
        await env.call("POST", "/worlds/nopolicy/evaluate", 409, json={"strategies": []})


async def test_evaluate_without_strategies_judges_the_strategies_known_from_observations(db_target):
    """The documented Aug-2025 body is just {"as_of": ...}: the strategies judged are the ones
    whose latest metrics were recorded with an observation (`strategies`)."""
    async with running(db_target) as env:
        await make_world(env, "ow")
        await env.call("POST", "/worlds/ow/apply", json={"run_id": "seed", "plan": {"activate": ["s9", "s3"]}})
        empty = (await env.call("POST", "/worlds/ow/evaluate", json={"as_of": "2099-01-01T00:10:00Z"})).json()
        assert empty["topk"] == [] and empty["activate"] == [] and empty["deactivate"] == []
        assert "no strategy observations" in empty["notes"] and empty["reasons"] == {"s3": "kept: active and not evaluated",
                                                                                    "s9": "kept: active and not evaluated"}
        world_obs = {"data_end": "2099-01-01T00:00:00Z", "samples": 50, "metrics": GOOD}
        strategies = [
            {"strategy_id": "s1", "samples": 50, "data_end": "2099-01-01T00:00:00Z", "metrics": {"sharpe": 3.0, "max_drawdown": 0.1}},
            {"strategy_id": "s2", "samples": 50, "data_end": "2099-01-01T00:00:00Z", "metrics": {"sharpe": 2.0, "max_drawdown": 0.1}},
            {"strategy_id": "s9", "samples": 50, "data_end": "2099-01-01T00:00:00Z", "metrics": BAD},
        ]
        state = (await env.call("PUT", "/worlds/ow/observations", json={**world_obs, "strategies": strategies})).json()
        assert state["consecutive_passes"] == 1  # the world's own observation counts as before
        # a later observation replaces a strategy's metrics; strategies it does not name stay known
        await env.call("PUT", "/worlds/ow/observations", json={**world_obs, "strategies": [
            {"strategy_id": "s2", "samples": 50, "data_end": "2099-01-01T00:00:00Z", "metrics": {"sharpe": 2.5, "max_drawdown": 0.1}}]})
        await env.call("PUT", "/worlds/ow/observations", 422, json={**world_obs, "strategies": [strategies[0], strategies[0]]})
        await env.events()
        before = (await env.call("GET", "/worlds/ow/activations")).json()
        plan = (await env.call("POST", "/worlds/ow/evaluate", json={"as_of": "2099-01-01T00:10:00Z"})).json()
        # max_active 2, and s3 (active, no observation) keeps its slot: one slot left for s1/s2/s9
        assert plan["topk"] == ["s1"] and plan["promote"] == ["s1"] and plan["demote"] == ["s9"]
        assert plan["scores"]["s2"] == 2.5 and "max_active 2 reached" in plan["reasons"]["s2"]
        assert plan["reasons"]["s3"] == "kept: active and not evaluated"
        assert {(e["strategy_id"], e["side"]) for e in plan["deactivate"]} == {("s9", "long"), ("s9", "short")}
        assert "3 strategies judged (known from observations)" in plan["notes"]
        assert (await env.call("GET", "/worlds/ow/activations")).json() == before and await env.events() == []
        audit = (await env.call("GET", "/worlds/ow/audit", params={"limit": 1})).json()["records"][0]
        assert audit["event"] == "plan.evaluated" and audit["request"]["source"] == "observations"
        # caller-supplied strategies still win over the known ones
        supplied = (await env.call("POST", "/worlds/ow/evaluate", json={"strategies": [strategies[1]]})).json()
        assert "1 strategy judged (from the request)" in supplied["notes"] and "s9" not in supplied["scores"]


async def test_apply_two_phase_idempotent_single_flight(db_target):
    async with running(db_target) as env:
        await make_world(env, "xw")
        plan = {"activate": ["s-1", {"strategy_id": "s-2", "side": "long", "weight": 0.25}], "deactivate": []}
        r = await env.call("POST", "/worlds/xw/apply", json={"run_id": "r1", "plan": plan})
        first = r.json()
        assert r.headers["idempotent-replayed"] == "false" and first["ok"] and first["run_id"] == "r1"
        assert sorted((a["strategy_id"], a["side"], a["weight"]) for a in first["activated"]) == [
            ("s-1", "long", 1.0), ("s-1", "short", 1.0), ("s-2", "long", 0.25)]
        events = await env.events(TOPIC_ACTIVATION, "xw")
        assert [(e.value["strategy_id"], e.value["side"]) for e in events] == [("s-1", "long"), ("s-1", "short"), ("s-2", "long")]
        assert all(e.value["run_id"] == "r1" and e.value["state_hash"] == first["state_hash"] for e in events)
        probe = (await env.call("GET", "/worlds/xw/activation/state_hash")).json()["state_hash"]
        assert probe == first["state_hash"] == activation_state_hash([e.value for e in events])

        # a repeat returns the stored result, publishes nothing; a different plan under the same run_id is 409
        r = await env.call("POST", "/worlds/xw/apply", json={"run_id": "r1", "plan": plan})
        assert r.json() == first and r.headers["idempotent-replayed"] == "true"
        assert await env.events() == []
        await env.call("POST", "/worlds/xw/apply", 409, json={"run_id": "r1", "plan": {"activate": ["other"]}})
        await env.call("POST", "/worlds/xw/apply", 422, json={"run_id": "bad", "plan": {"activate": ["s-9"], "deactivate": ["s-9"]}})

        # hold r2 in flight between freeze and switch
        frozen, release = asyncio.Event(), asyncio.Event()

        async def hook(phase, world_id, run_id):
            if phase == "frozen" and run_id == "r2":
                frozen.set()
                await release.wait()

        env.service.applies.hook = hook
        r2_plan = {"activate": [], "deactivate": ["s-1"]}
        task = asyncio.create_task(env.client.post("/worlds/xw/apply", json={"run_id": "r2", "plan": r2_plan}))
        await asyncio.wait_for(frozen.wait(), 10)
        # frozen: reads gate every entry off, with distinct etags and the reason
        r = await env.call("GET", "/worlds/xw/activation", params={"strategy_id": "s-2", "side": "long"})
        assert r.json()["active"] is False and r.headers["x-qmtl-gated"] == "apply"
        assert r.json()["etag"] != first["activated"][2]["etag"]
        snap = (await env.call("GET", "/worlds/xw/activations")).json()
        assert snap["frozen"] is True and not any(a["active"] for a in snap["activations"])
        assert (await env.call("GET", "/worlds/xw")).json()["apply_run_id"] == "r2"
        # single flight: another run_id is 409 (transient), overrides too
        r = await env.call("POST", "/worlds/xw/apply", 409, json={"run_id": "r3", "plan": {"activate": ["s-3"]}})
        assert r.json()["run_id_in_flight"] == "r2" and r.headers["retry-after"] == "1"
        await env.call("PUT", "/worlds/xw/activation", 409, json={"strategy_id": "s-2", "side": "long", "active": False})
        # the same run_id while in flight waits for it and gets its result
        dup = asyncio.create_task(env.client.post("/worlds/xw/apply", json={"run_id": "r2", "plan": r2_plan}))
        await asyncio.sleep(0.05)
        assert not dup.done()
        release.set()
        r2 = await asyncio.wait_for(task, 10)
        assert r2.status_code == 200 and r2.headers["idempotent-replayed"] == "false"
        d2 = await asyncio.wait_for(dup, 10)
        assert d2.status_code == 200 and d2.json() == r2.json() and d2.headers["idempotent-replayed"] == "true"
        result = r2.json()
        assert sorted((a["strategy_id"], a["side"], a["active"]) for a in result["deactivated"]) == [("s-1", "long", False), ("s-1", "short", False)]
        events = await env.events(TOPIC_ACTIVATION, "xw")
        assert [(e.value["strategy_id"], e.value["side"], e.value["active"], e.value["run_id"]) for e in events] == [
            ("s-1", "long", False, "r2"), ("s-1", "short", False, "r2")]
        # unfrozen, and the untouched entry reads as before
        r = await env.call("GET", "/worlds/xw/activation", params={"strategy_id": "s-2", "side": "long"})
        assert r.json()["active"] and r.json()["etag"] == first["activated"][2]["etag"] and "x-qmtl-gated" not in r.headers
        assert (await env.call("GET", "/worlds/xw")).json()["apply_run_id"] is None
        # r3 goes through now
        await env.call("POST", "/worlds/xw/apply", json={"run_id": "r3", "plan": {"activate": ["s-3"]}})
        # a suspended world refuses applies
        await env.call("PUT", "/worlds/xw", json={"state": "SUSPENDED"})
        await env.call("POST", "/worlds/xw/apply", 409, json={"run_id": "r4", "plan": {"activate": ["s-4"]}})
        outcomes = env.service.metrics.apply_total
        assert outcomes.labels("replayed")._value.get() == 2 and outcomes.labels("conflict")._value.get() >= 2


async def test_apply_drains_while_frozen(db_target):
    async with running(db_target, drain=0.4) as env:
        await make_world(env, "dr")
        await env.call("PUT", "/worlds/dr/activation", json={"strategy_id": "s-1", "side": "long", "active": True})
        loop = asyncio.get_running_loop()
        started = loop.time()
        task = asyncio.create_task(env.client.post("/worlds/dr/apply", json={"run_id": "d1", "plan": {"activate": ["s-2"]}}))
        await asyncio.sleep(0.15)
        # draining: orders are gated off before anything is switched
        r = await env.call("GET", "/worlds/dr/activation", params={"strategy_id": "s-1", "side": "long"})
        assert r.json()["active"] is False and r.headers["x-qmtl-gated"] == "apply"
        r2 = await env.call("GET", "/worlds/dr/activation", params={"strategy_id": "s-2", "side": "long"})
        assert r2.json()["active"] is False
        resp = await asyncio.wait_for(task, 10)
        assert resp.status_code == 200 and loop.time() - started >= 0.4
        r = await env.call("GET", "/worlds/dr/activation", params={"strategy_id": "s-1", "side": "long"})
        assert r.json()["active"] is True and "x-qmtl-gated" not in r.headers


@pytest.mark.parametrize("failing_phase", ["frozen", "switched"])
async def test_apply_rolls_back_on_failure(db_target, failing_phase):
    async with running(db_target) as env:
        await make_world(env, "rw")
        await env.call("POST", "/worlds/rw/apply", json={"run_id": "base", "plan": {"activate": ["keep", "flip"]}})
        await env.events()
        before = (await env.call("GET", "/worlds/rw/activations")).json()

        def hook(phase, world_id, run_id):
            if phase == failing_phase and run_id == "boom":
                raise RuntimeError("injected failure")

        env.service.applies.hook = hook
        plan = {"activate": ["new", {"strategy_id": "keep", "side": "long", "weight": 0.1}], "deactivate": ["flip"]}
        r = await env.call("POST", "/worlds/rw/apply", 503, json={"run_id": "boom", "plan": plan})
        problem = r.json()
        assert "rolled back" in problem["detail"] and "injected failure" in problem["detail"] and problem["run_id"] == "boom"
        assert r.headers["retry-after"]
        # the previous snapshot is back exactly (same etags), the world is unfrozen, nothing was published
        assert (await env.call("GET", "/worlds/rw/activations")).json() == before
        assert (await env.call("GET", "/worlds/rw")).json()["apply_run_id"] is None
        assert await env.events() == []
        rec = (await env.call("GET", "/worlds/rw/audit", params={"limit": 1})).json()["records"][0]
        assert rec["event"] == "apply.rolled_back" and rec["request"]["run_id"] == "boom" and "injected failure" in rec["result"]["error"]
        # the same run_id may be retried once the fault is gone
        env.service.applies.hook = None
        result = (await env.call("POST", "/worlds/rw/apply", json={"run_id": "boom", "plan": plan})).json()
        assert result["ok"] and len(result["activated"]) == 3 and len(result["deactivated"]) == 2
        assert len(await env.events(TOPIC_ACTIVATION, "rw")) == 5


# --------------------------------------------------------------------------- RBAC


async def test_rbac_enforced(db_target):
    async with running(db_target, rbac="enforce") as env:
        # no trusted identity: 401, also when identity headers are forged without the token
        await env.call("GET", "/worlds", 401)
        r = await env.call("POST", "/worlds", 401, json={"world_id": "rb", "name": "x"}, headers=ident("mallory", {"*": ["owner"]}, token=None))
        assert "service token" in r.json()["detail"]
        await env.call("POST", "/worlds", 401, json={"world_id": "rb", "name": "x"}, headers=ident("mallory", {"*": ["owner"]}, token="guess"))
        await env.call("GET", "/worlds", 401, headers={"X-QMTL-Service-Token": TOKEN, "X-QMTL-Subject": "a", "X-QMTL-Claims": "not-base64-json"})
        # creating a world needs owner on that id or on "*"
        await env.call("POST", "/worlds", 403, json={"world_id": "rb", "name": "x"}, headers=ident("olga", {"other": ["owner"]}))
        await env.call("POST", "/worlds", 201, json={"world_id": "rb", "name": "x"}, headers=ident("olga", {"rb": ["owner"]}))
        await env.call("POST", "/worlds", 201, json={"world_id": "rb2", "name": "y"}, headers=OWNER_ALL)
        olga = ident("olga", {"rb": ["owner"]})
        await env.call("POST", "/worlds/rb/policies", 201, json={"yaml": POLICY, "set_default": True}, headers=olga)

        reader = ident("rita", {"rb": ["reader"]})
        operator = ident("otto", {"rb": ["operator"]})
        for path in ("/worlds/rb", "/worlds/rb/decide", "/worlds/rb/activations", "/worlds/rb/audit", "/worlds/rb/policies"):
            await env.call("GET", path, 200, headers=reader)
        await env.call("GET", "/worlds/rb/activation", 200, params={"strategy_id": "s", "side": "long"}, headers=reader)
        await env.call("POST", "/worlds/rb/evaluate", 200, json={"strategies": []}, headers=reader)
        await env.call("GET", "/worlds/rb2", 403, headers=reader)
        assert [w["world_id"] for w in (await env.call("GET", "/worlds", headers=reader)).json()["worlds"]] == ["rb"]
        assert [w["world_id"] for w in (await env.call("GET", "/worlds", headers=OWNER_ALL)).json()["worlds"]] == ["rb", "rb2"]
        r = await env.call("POST", "/worlds/rb/apply", 403, json={"run_id": "r", "plan": {"activate": ["s"]}}, headers=reader)
        assert r.json()["required_role"] == "operator"
        await env.call("PUT", "/worlds/rb/activation", 403, json={"strategy_id": "s", "side": "long", "active": True}, headers=reader)
        await env.call("PUT", "/worlds/rb/observations", 403, json=observation(), headers=reader)
        # operator: apply, override, observations — but not policies or world changes
        await env.call("POST", "/worlds/rb/apply", 200, json={"run_id": "r", "plan": {"activate": ["s"]}}, headers=operator)
        await env.call("PUT", "/worlds/rb/activation", 200, json={"strategy_id": "s", "side": "long", "active": False}, headers=operator)
        await env.call("PUT", "/worlds/rb/observations", 200, json=observation(), headers=operator)
        await env.call("POST", "/worlds/rb/policies", 403, json={"yaml": "{}"}, headers=operator)
        await env.call("POST", "/worlds/rb/set-default", 403, params={"v": 1}, headers=operator)
        await env.call("PUT", "/worlds/rb", 403, json={"name": "z"}, headers=operator)
        await env.call("DELETE", "/worlds/rb", 403, headers=operator)
        # nothing denied reached the data: only the operator's apply changed activation
        records = (await env.call("GET", "/worlds/rb/audit", headers=reader)).json()["records"]
        assert [(x["event"], x["actor"]) for x in records] == [
            ("observation.recorded", "otto"), ("activation.override", "otto"), ("apply.succeeded", "otto"),
            ("plan.evaluated", "rita"), ("policy.created", "olga"), ("world.created", "olga")]
        # the health endpoint says the mode
        assert (await env.call("GET", "/health")).json()["rbac"] == "enforce"


async def test_dev_mode_ignores_forged_identity(db_target):
    async with running(db_target, rbac="dev") as env:
        # identity headers without the token are ignored: the caller is the dev subject
        await env.call("POST", "/worlds", 201, json={"world_id": "dv", "name": "x"}, headers=ident("mallory", {}, token=None))
        # with the token the forwarded identity counts, with its roles only
        await env.call("POST", "/worlds/dv/apply", 403, json={"run_id": "r", "plan": {"activate": ["s"]}}, headers=ident("rita", {"dv": ["reader"]}))
        records = (await env.call("GET", "/worlds/dv/audit")).json()["records"]
        assert [(x["event"], x["actor"]) for x in records] == [("world.created", "dev-user")]


# --------------------------------------------------------------------------- audit


async def test_audit_contents_and_pagination(db_target):
    async with running(db_target, rbac="enforce") as env:
        owner = ident("alice", {"au": ["owner"]})
        cids = []
        steps = [
            ("POST", "/worlds", {"world_id": "au", "name": "Audit"}, 201),
            ("POST", "/worlds/au/policies", {"yaml": POLICY, "set_default": True}, 201),
            ("PUT", "/worlds/au/observations", observation(), 200),
            ("POST", "/worlds/au/apply", {"run_id": "ra", "plan": {"activate": ["s-1"]}}, 200),
            ("PUT", "/worlds/au/activation", {"strategy_id": "s-1", "side": "short", "active": False, "reason": "review"}, 200),
            ("PUT", "/worlds/au", {"description": "audited"}, 200),
        ]
        for i, (method, path, body, status) in enumerate(steps):
            cid = f"cid-{i}-{uuid.uuid4().hex[:8]}"
            cids.append(cid)
            r = await env.call(method, path, status, json=body, headers={**owner, "X-Correlation-ID": cid})
            assert r.headers["x-correlation-id"] == cid
        full = (await env.call("GET", "/worlds/au/audit", params={"limit": 500}, headers=owner)).json()
        records = full["records"]
        assert full["next_cursor"] is None
        assert [r["event"] for r in records] == [
            "world.updated", "activation.override", "apply.succeeded", "observation.recorded", "policy.created", "world.created"]
        assert [r["correlation_id"] for r in records] == cids[::-1]
        assert all(r["actor"] == "alice" and r["world_id"] == "au" for r in records)
        assert records[-1]["request"] == {"world_id": "au", "name": "Audit"} and records[-1]["result"]["state"] == "ACTIVE"
        assert records[2]["request"] == {"run_id": "ra", "plan": {"activate": ["s-1"]}} and records[2]["result"]["activated"] == 2
        assert records[1]["request"]["reason"] == "review" and records[1]["result"]["changed"] is True
        assert records[3]["result"]["passed"] is True
        assert records[0]["result"]["changed"] == ["description"]
        created = [r["created_at"] for r in records]
        assert created == sorted(created, reverse=True)

        # pagination: pages of 4, newest first, no gaps, no overlaps
        got, cursor = [], None
        while True:
            params = {"limit": 4} | ({"cursor": cursor} if cursor else {})
            page = (await env.call("GET", "/worlds/au/audit", params=params, headers=owner)).json()
            assert len(page["records"]) <= 4
            got += page["records"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert got == records
        await env.call("GET", "/worlds/au/audit", 400, params={"cursor": "%%%"}, headers=owner)
        await env.call("GET", "/worlds/au/audit", 400, params={"limit": 0}, headers=owner)
        await env.call("GET", "/worlds/zz/audit", 404, headers=ident("z", {"*": ["reader"]}))


# --------------------------------------------------------------------------- events


async def test_events_validated_in_order_per_world_with_correlation_ids(db_target):
    async with running(db_target) as env:
        await make_world(env, "e1")
        await make_world(env, "e2")
        steps = [
            ("e1", "POST", "/worlds/e1/apply", {"run_id": "a", "plan": {"activate": ["x"]}}),
            ("e2", "POST", "/worlds/e2/apply", {"run_id": "a", "plan": {"activate": ["y"]}}),
            ("e1", "PUT", "/worlds/e1/activation", {"strategy_id": "x", "side": "long", "active": False}),
            ("e2", "POST", "/worlds/e2/policies", {"yaml": "{}", "set_default": True}),
            ("e1", "POST", "/worlds/e1/apply", {"run_id": "b", "plan": {"activate": [{"strategy_id": "x", "side": "long", "weight": 0.7}],
                                                                "deactivate": ["z"]}}),
            ("e2", "PUT", "/worlds/e2", {"circuit_breaker": True}),
            ("e1", "DELETE", "/worlds/e1", None),
        ]
        for i, (_w, method, path, body) in enumerate(steps):
            await env.call(method, path, (200, 201, 204), json=body, headers={"X-Correlation-ID": f"step-{i}"})
        msgs = await env.events()
        for m in msgs:
            assert m.key == m.value["world_id"]
            assert m.topic == (TOPIC_ACTIVATION if m.value["type"] == "ActivationUpdated" else TOPIC_POLICY)
        e1 = [(m.headers.get("correlation_id"), m.value["strategy_id"], m.value["side"], m.value["active"], m.value["weight"])
              for m in msgs if m.key == "e1" and m.topic == TOPIC_ACTIVATION]
        assert e1 == [
            ("step-0", "x", "long", True, 1.0), ("step-0", "x", "short", True, 1.0),
            ("step-2", "x", "long", False, 0.0),
            ("step-4", "x", "long", True, 0.7),
            ("step-6", "x", "long", False, 0.0), ("step-6", "x", "short", False, 0.0),
        ]
        e2 = [(m.headers.get("correlation_id"), m.value["type"], m.value.get("status"), m.value.get("active"))
              for m in msgs if m.key == "e2"]
        assert [x for x in e2 if x[1] == "ActivationUpdated"] == [
            ("step-1", "ActivationUpdated", None, True), ("step-1", "ActivationUpdated", None, True),
            ("step-5", "ActivationUpdated", None, False), ("step-5", "ActivationUpdated", None, False)]
        assert [x for x in e2 if x[1] == "PolicyUpdated"][-2:] == [
            ("step-3", "PolicyUpdated", "DEPRECATED", None), ("step-3", "PolicyUpdated", "ACTIVE", None)]
        # each event's ts never goes back per entry, and etags never repeat per entry
        per_entry: dict = {}
        for m in msgs:
            if m.topic == TOPIC_ACTIVATION:
                per_entry.setdefault((m.key, m.value["strategy_id"], m.value["side"]), []).append(m.value)
        for evs in per_entry.values():
            assert [e["ts"] for e in evs] == sorted(e["ts"] for e in evs)
            assert len({e["etag"] for e in evs}) == len(evs)
        assert env.bus.invalid_events == 0


class FlakyBus(InProcessBus):
    """A bus that refuses every publish while ``down``."""

    down = True

    async def publish(self, topic, value, *, key, headers=None):
        if self.down:
            raise ConnectionError("bus down")
        await super().publish(topic, value, key=key, headers=headers)


# --------------------------------------------------------------------------- restart


async def test_state_survives_a_restart_and_unpublished_events_follow(db_target):
    async with running(db_target) as env:
        await make_world(env, "sw")
        first = (await env.call("POST", "/worlds/sw/apply", json={"run_id": "r1", "plan": {"activate": ["s-1"]}})).json()
        await env.call("PUT", "/worlds/sw/observations", json=observation())
        act = (await env.call("GET", "/worlds/sw/activation", params={"strategy_id": "s-1", "side": "long"})).json()
        decision = (await env.call("GET", "/worlds/sw/decide", params={"as_of": "2099-01-01T00:30:00Z"})).json()
        full = (await env.call("GET", "/worlds/sw/activations")).json()
    # a new process on the same database
    async with running(db_target) as env:
        r = await env.call("GET", "/worlds/sw/activation", params={"strategy_id": "s-1", "side": "long"})
        assert r.json() == act
        await env.call("GET", "/worlds/sw/activation", 304, params={"strategy_id": "s-1", "side": "long"}, headers={"If-None-Match": r.headers["etag"]})
        assert (await env.call("GET", "/worlds/sw/activations")).json() == full
        assert (await env.call("GET", "/worlds/sw/decide", params={"as_of": "2099-01-01T00:30:00Z"})).json() == decision
        # idempotency by run_id survives the restart too
        r = await env.call("POST", "/worlds/sw/apply", json={"run_id": "r1", "plan": {"activate": ["s-1"]}})
        assert r.json() == first and r.headers["idempotent-replayed"] == "true"
        assert await env.events() == []

    # events committed while the bus was down are published, in order, after the next start
    flaky = FlakyBus(validator=event_validators())
    await flaky.start()
    async with running(db_target, bus=flaky) as env:
        await env.call("POST", "/worlds/sw/apply", json={"run_id": "r2", "plan": {"deactivate": ["s-1"]}})
        # the write answered; its events wait in the outbox while the bus refuses them
        assert (await env.call("GET", "/health")).json()["outbox_pending"] == 2
        await wait_until(lambda: env.service.metrics.publish_failures._value.get() >= 1, what="a failed publish attempt")
    bus = InProcessBus(validator=event_validators())
    await bus.start()
    sub = await bus.subscribe([TOPIC_ACTIVATION], consumer_id="late")
    async with running(db_target, bus=bus) as env:
        late = [await asyncio.wait_for(sub.__anext__(), 20) for _ in range(2)]  # liveness bound
        await env.service.outbox.flush()  # the publisher's batch (and its delete) is done
        assert (await env.call("GET", "/health")).json()["outbox_pending"] == 0
        assert [(m.value["side"], m.value["active"], m.value["run_id"]) for m in late] == [("long", False, "r2"), ("short", False, "r2")]
    await sub.close()


async def test_an_apply_interrupted_by_a_crash_is_rolled_back_at_startup(db_target):
    async with running(db_target) as env:
        await make_world(env, "cw")
        await env.call("POST", "/worlds/cw/apply", json={"run_id": "r1", "plan": {"activate": ["s-1"]}})
        before = (await env.call("GET", "/worlds/cw/activations")).json()
    # simulate a process that died after switching: frozen world, in-flight run, activation half-changed
    url, schema = db_target
    db = Database(url, schema=schema)
    try:
        async with db.begin() as conn:
            snapshot = [
                {"strategy_id": a["strategy_id"], "side": a["side"], "active": a["active"], "weight": a["weight"],
                 "etag": a["etag"], "run_id": a.get("run_id"), "ts": a["ts"]}
                for a in before["activations"]
            ]
            from datetime import datetime
            now = datetime.now(UTC)
            await conn.execute(store.apply_runs.insert().values(
                world_id="cw", run_id="crashed", status="in_flight", plan_checksum="x", plan={}, snapshot=snapshot,
                result=None, error=None, actor="someone", correlation_id=None, started_at=now, finished_at=None))
            await conn.execute(store.worlds.update().where(store.worlds.c.world_id == "cw").values(apply_run_id="crashed", apply_started_at=now))
            await conn.execute(store.activations.update().where(store.activations.c.world_id == "cw").values(active=False, weight=0.0, etag="half"))
    finally:
        await db.close()
    async with running(db_target) as env:
        assert (await env.call("GET", "/worlds/cw")).json()["apply_run_id"] is None
        assert (await env.call("GET", "/worlds/cw/activations")).json() == before
        rec = (await env.call("GET", "/worlds/cw/audit", params={"limit": 1})).json()["records"][0]
        assert rec["event"] == "apply.rolled_back" and rec["actor"] == "worldservice" and rec["request"] == {"run_id": "crashed"}
        # and the world takes applies again
        await env.call("POST", "/worlds/cw/apply", json={"run_id": "r2", "plan": {"deactivate": ["s-1"]}})
        db2 = env.service.db
        async with db2.connect() as conn:
            status = (await conn.execute(sa.select(store.apply_runs.c.status).where(store.apply_runs.c.run_id == "crashed"))).scalar_one()
        assert status == "rolled_back"
