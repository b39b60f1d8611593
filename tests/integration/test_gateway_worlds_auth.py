"""Authentication at the Gateway and identity propagation to WorldService (SPEC §4, §6),
over HTTP against a real WorldService process (``rbac: enforce``)."""

from __future__ import annotations

import logging
import time
import uuid

import jwt
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from qmtl.bus.inproc import InProcessBus
from qmtl.common.clock import ManualClock
from qmtl.gateway.app import create_app
from tests.helpers.clocked import clocked_gateway
from tests.helpers.server import serve
from tests.helpers.wsproc import (
    SERVICE_TOKEN,
    WORLDS_PARTS,
    JwtIssuer,
    WorldServiceProcess,
    client,
    gateway_config,
)
from tests.integration.test_gateway_worlds import audit, is_problem

OWNER_ALL = {"*": ["owner"]}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    proc = WorldServiceProcess(tmp_path_factory.mktemp("ws"), service_token=SERVICE_TOKEN, env={"QMTL__WORLDSERVICE__RBAC": "enforce"})
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def idp(tmp_path):
    return JwtIssuer(tmp_path)


@pytest.fixture
async def gw(ws, tmp_path, idp):
    ws.start()
    cfg = gateway_config(tmp_path, ws.url, auth={"mode": "jwt", "public_keys": [str(idp.pem_path)], "issuer": idp.issuer,
                                                  "audience": idp.audience})
    async with serve(create_app(cfg, bus=InProcessBus(), parts=WORLDS_PARTS)) as url, client(url) as c:
        yield c


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def wid() -> str:
    return f"a-{uuid.uuid4().hex[:10]}"


async def test_without_a_valid_token_every_worlds_call_is_401_and_worldservice_is_not_called(gw, ws, idp, tmp_path):
    w = wid()
    good = bearer(idp.token("alice", world_roles=OWNER_ALL))
    assert (await gw.post("/worlds", json={"world_id": w, "name": w}, headers=good)).status_code == 201
    # prime both caches with a valid caller
    assert (await gw.get(f"/worlds/{w}/decide", headers=good)).status_code == 200
    assert (await gw.get(f"/worlds/{w}/decide", headers=good)).headers["x-qmtl-cache"] == "hit"
    assert (await gw.get(f"/worlds/{w}/activation", params={"strategy_id": "s", "side": "long"}, headers=good)).status_code == 200

    (tmp_path / "other").mkdir()
    other = JwtIssuer(tmp_path / "other")  # same issuer, audience and kid: another key
    bad_headers = {
        "no token": {},
        "not bearer": {"Authorization": "Basic YWxpY2U6cHc="},
        "empty bearer": {"Authorization": "Bearer"},
        "garbage": bearer("not.a.jwt"),
        "expired": bearer(idp.token("alice", world_roles=OWNER_ALL, ttl=-60)),
        "wrong issuer": bearer(idp.token("alice", world_roles=OWNER_ALL, iss="https://evil.test")),
        "wrong audience": bearer(idp.token("alice", world_roles=OWNER_ALL, aud="someone-else")),
        "unknown key": bearer(idp.token("alice", world_roles=OWNER_ALL, key=other.key)),
        "no subject": bearer(idp.token(None, world_roles=OWNER_ALL)),  # type: ignore[arg-type]
    }
    calls = [("GET", f"/worlds/{w}/decide", {}), ("GET", f"/worlds/{w}/activation?strategy_id=s&side=long", {}),
             ("GET", "/worlds", {}), ("POST", "/worlds", {"json": {"world_id": wid(), "name": "x"}}),
             ("POST", f"/worlds/{w}/apply", {"json": {"run_id": "r", "plan": {}}, "headers": {"X-Allow-Live": "true"}})]
    for label, headers in bad_headers.items():
        for method, path, kw in calls:
            kw = dict(kw)
            kw["headers"] = {**kw.get("headers", {}), **headers}
            r = await gw.request(method, path, **kw)
            body = is_problem(r, 401)
            assert r.headers.get("www-authenticate", "").startswith("Bearer"), (label, path)
            assert body["title"] == "Unauthorized", (label, path)
    # nothing but the valid caller's calls reached WorldService
    assert [rec["actor"] for rec in await audit(ws, w)] == ["alice"]


async def test_verified_subject_and_claims_reach_worldservice_and_its_audit_log(gw, ws, idp):
    w = wid()
    alice = bearer(idp.token("alice", world_roles=OWNER_ALL))
    r = await gw.post("/worlds", json={"world_id": w, "name": w}, headers={**alice, "X-Correlation-ID": "corr-alice-1"})
    assert r.status_code == 201 and r.json()["owner"] == "alice"
    # bob may only read this world: WorldService refuses his apply on the forwarded roles
    bob_reader = bearer(idp.token("bob", world_roles={w: ["reader"]}))
    body = is_problem(await gw.post(f"/worlds/{w}/apply", json={"run_id": "r-1", "plan": {"activate": ["s-1"]}},
                                    headers={**bob_reader, "X-Allow-Live": "true"}), 403)
    assert body["required_role"] == "operator" and "'bob'" in body["detail"]
    assert (await gw.get(f"/worlds/{w}", headers=bob_reader)).status_code == 200
    # carol is an operator of this world only
    carol = bearer(idp.token("carol", world_roles={w: ["operator"]}, email="carol@example.test"))
    r = await gw.post(f"/worlds/{w}/apply", json={"run_id": "r-2", "plan": {"activate": ["s-1"]}},
                      headers={**carol, "X-Allow-Live": "true", "X-Correlation-ID": "corr-carol-apply"})
    assert r.status_code == 200, r.text
    is_problem(await gw.get(f"/worlds/{wid()}", headers=carol), 403)  # roles are per world (or 404: unknown)
    records = {rec["event"]: rec for rec in await audit(ws, w)}
    assert records["world.created"]["actor"] == "alice" and records["world.created"]["correlation_id"] == "corr-alice-1"
    assert records["apply.succeeded"]["actor"] == "carol" and records["apply.succeeded"]["correlation_id"] == "corr-carol-apply"
    # the Gateway's own role check on cached reads uses the same claims
    assert (await gw.get(f"/worlds/{w}/decide", headers=alice)).status_code == 200
    stranger = bearer(idp.token("dave", world_roles={"another-world": ["owner"]}))
    is_problem(await gw.get(f"/worlds/{w}/decide", headers=stranger), 403)


async def test_keys_from_a_jwks_url(ws, tmp_path, idp):
    served = {"n": 0}

    async def jwks(_request):
        served["n"] += 1
        return JSONResponse(idp.jwks)

    async with serve(Starlette(routes=[Route("/.well-known/jwks.json", jwks)])) as idp_url:
        cfg = gateway_config(tmp_path, ws.url, auth={"mode": "jwt", "jwks_url": idp_url + "/.well-known/jwks.json",
                                                      "issuer": idp.issuer, "audience": idp.audience})
        async with serve(create_app(cfg, bus=InProcessBus(), parts=WORLDS_PARTS)) as url, client(url) as c:
            w = wid()
            r = await c.post("/worlds", json={"world_id": w, "name": w}, headers=bearer(idp.token("erin", world_roles=OWNER_ALL)))
            assert r.status_code == 201 and r.json()["owner"] == "erin"
            assert served["n"] >= 1
            is_problem(await c.get("/worlds"), 401)
            (tmp_path / "x").mkdir()
            stranger = JwtIssuer(tmp_path / "x", kid="k-unknown")
            is_problem(await c.get("/worlds", headers=bearer(stranger.token("mallory", world_roles=OWNER_ALL))), 401)


async def test_development_mode_allows_anonymous_callers_and_says_so(ws, tmp_path, caplog, idp):
    caplog.set_level(logging.WARNING)
    cfg = gateway_config(tmp_path, ws.url)
    assert cfg.gateway.auth.mode == "dev"  # the embedded default
    async with serve(create_app(cfg, bus=InProcessBus(), parts=WORLDS_PARTS)) as url, client(url) as c:
        assert any("DEVELOPMENT mode" in rec.getMessage() for rec in caplog.records)
        w = wid()
        r = await c.post("/worlds", json={"world_id": w, "name": w})
        assert r.status_code == 201 and r.json()["owner"] == cfg.gateway.auth.dev_subject
        # a token it cannot verify is refused, never trusted silently
        is_problem(await c.get("/worlds", headers=bearer(idp.token("alice", world_roles=OWNER_ALL))), 401)


def test_jwt_mode_without_keys_refuses_to_start(tmp_path):
    cfg = gateway_config(tmp_path, "http://127.0.0.1:9", auth={"mode": "jwt", "issuer": "x"})
    with pytest.raises(ValueError, match=r"public_keys nor auth\.jwks_url"):
        create_app(cfg, bus=InProcessBus(), parts=WORLDS_PARTS)


def test_auth_flags_on_gw_and_up_and_the_config_file(tmp_path):
    from qmtl.cli import build_parser, overrides_from_args
    from qmtl.common.config import load_config

    for cmd in ("gw", "up"):
        args = build_parser().parse_args([cmd, "--auth-jwks-url", "https://idp.test/jwks.json", "--auth-issuer", "https://idp.test",
                                          "--auth-audience", "qmtl-gateway"])
        auth = load_config(environ={}, overrides=overrides_from_args(args)).gateway.auth
        assert (auth.mode, auth.jwks_url, auth.issuer, auth.audience) == ("jwt", "https://idp.test/jwks.json", "https://idp.test", "qmtl-gateway")
    path = tmp_path / "qmtl.yaml"
    path.write_text("gateway:\n  auth:\n    mode: jwt\n    jwks_url: https://idp.test/jwks.json\n    issuer: https://idp.test\n"
                    "    audience: qmtl-gateway\n  allow_live: true\n  worldservice_budget: {timeout: 0.3, retries: 2}\n"
                    "  breaker: {failure_threshold: 3, reset_timeout: 5}\n")
    g = load_config(path, environ={}).gateway
    assert (g.auth.mode, g.auth.audience, g.allow_live, g.breaker.failure_threshold) == ("jwt", "qmtl-gateway", True, 3)
    env = load_config(environ={"QMTL__GATEWAY__AUTH__ISSUER": "https://env.test", "QMTL__GATEWAY__AUTH__MODE": "jwt",
                               "QMTL__GATEWAY__AUTH__JWKS_URL": "https://env.test/jwks"}).gateway.auth
    assert (env.mode, env.issuer) == ("jwt", "https://env.test")


@pytest.fixture
async def clocked_gw(ws, tmp_path, idp):
    """``gw`` on a ManualClock that starts at the issuer's real time (its tokens' ``exp`` is real)."""
    ws.start()
    cfg = gateway_config(tmp_path, ws.url, auth={"mode": "jwt", "public_keys": [str(idp.pem_path)], "issuer": idp.issuer,
                                                  "audience": idp.audience})
    clock = ManualClock(time.time())
    async with serve(clocked_gateway(cfg, clock, bus=InProcessBus(), parts=WORLDS_PARTS)) as url, client(url) as c:
        yield c, clock


async def test_tokens_are_checked_on_the_cache_hit_fast_path(clocked_gw, idp):
    gw, clock = clocked_gw
    w = wid()
    alice = bearer(idp.token("alice", world_roles=OWNER_ALL))
    assert (await gw.post("/worlds", json={"world_id": w, "name": w}, headers=alice)).status_code == 201
    assert (await gw.get(f"/worlds/{w}/decide", headers=alice)).headers["x-qmtl-cache"] == "miss"
    assert (await gw.get(f"/worlds/{w}/decide", headers=alice)).headers["x-qmtl-cache"] == "hit"
    expired = bearer(idp.token("alice", world_roles=OWNER_ALL, ttl=-60))
    is_problem(await gw.get(f"/worlds/{w}/decide", headers=expired), 401)
    is_problem(await gw.get(f"/worlds/{w}/decide"), 401)
    short = idp.token("alice", world_roles=OWNER_ALL, ttl=2)
    assert (await gw.get(f"/worlds/{w}/decide", headers=bearer(short))).headers["x-qmtl-cache"] == "hit"
    # past exp and the 5 s leeway: the same token is refused, cache hit or not. The token's
    # exp is the issuer's real time, however long the setup took since the clock was made.
    exp = jwt.decode(short, options={"verify_signature": False})["exp"]
    clock.advance(max(0.0, exp + 5 + 0.1 - clock.time()))
    is_problem(await gw.get(f"/worlds/{w}/decide", headers=bearer(short)), 401)
