"""Issue 15 item 2: the DAG Manager authenticates every write by the service token.
``qmtl dagmanager`` runs in its own process on PostgreSQL (a fresh database) with
``dagmanager.service_token`` set; the attacker reaches its port directly."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import POSTGRES_URL
from tests.helpers.server import free_port
from tests.sdk.live import QMTL, ROOT
from tests.security.secauth_stack import _database

NODE = {"node_id": "b450dbfe8dd41fd8645f46c82ec21b387c4602cab2972dfdd2deaad9d75fabb8", "node_type": "Compute",
        "code_hash": "abc", "config_hash": "def", "schema_hash": "123", "interval": 60, "period": 20,
        "tags": ["btc", "price"], "inputs": []}


@dataclass
class DagManager:
    url: str
    token: str
    log: Path


def _start(tmp: Path, env_extra: dict[str, str]) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMTL")}
    env.update(PYTHONUNBUFFERED="1", **env_extra)
    log = tmp / f"dagmanager-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([QMTL, "dagmanager", "--port", str(port), "--data-dir", str(tmp / "data")], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"qmtl dagmanager exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(url + "/health", timeout=0.5).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"qmtl dagmanager did not answer:\n{log.read_text(errors='replace')}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture(scope="module")
def dm(tmp_path_factory) -> Iterator[DagManager]:
    tmp = tmp_path_factory.mktemp("dm-auth")
    name = "qmtl_dmauth_" + uuid.uuid4().hex[:12]
    asyncio.run(_database("create", name))
    token = "svc-" + secrets.token_urlsafe(24)
    proc, url, log = _start(tmp, {"QMTL__DAGMANAGER__SERVICE_TOKEN": token,
                                  "QMTL__DAGMANAGER__DATABASE_URL": POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"})
    try:
        yield DagManager(url, token, log)
    finally:
        _stop(proc)
        asyncio.run(_database("drop", name))


WRITES = [
    ("POST", "/diff", {"strategy_id": "s-auth", "run_type": "backtest", "asset": "btc", "dag": {"nodes": [NODE]}}),
    ("POST", "/callbacks/sentinel-traffic", {"sentinel_id": "s-auth-sentinel", "weight": 0.25}),
    ("POST", "/gc", None),
    ("DELETE", "/strategies/s-auth", None),
]


def _problem(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/problem+json")
    return r.json()


async def test_every_write_needs_the_service_token(dm):
    async with httpx.AsyncClient(base_url=dm.url, timeout=10) as c:
        for method, path, body in WRITES:
            kw = {"json": body} if body is not None else {}
            detail = _problem(await c.request(method, path, **kw), 401)["detail"]
            assert "X-QMTL-Service-Token" in detail, detail
            _problem(await c.request(method, path, headers={"X-QMTL-Service-Token": "guess"}, **kw), 401)
            _problem(await c.request(method, path, headers={"X-QMTL-Service-Token": dm.token[:-1]}, **kw), 401)
            # a caller's bearer token is not a credential here
            _problem(await c.request(method, path, headers={"Authorization": "Bearer eyJhbGciOiJFUzI1NiJ9.e30.x"}, **kw), 403)
            # refused before the body is read: an invalid body without the token is still 401, not 422/400
            _problem(await c.request(method, path, content=b"{not json", headers={"content-type": "application/json"}), 401)
        # nothing was changed by the refused calls
        r = await c.get("/sentinels/s-auth-sentinel")
        assert r.status_code == 404
        assert (await c.get("/queues", params={"tag": "btc"})).json()["queues"] == []


async def test_with_the_service_token_every_write_works(dm):
    auth = {"X-QMTL-Service-Token": dm.token}
    async with httpx.AsyncClient(base_url=dm.url, timeout=10, headers=auth) as c:
        diff = await c.post("/diff", json=WRITES[0][2])
        assert diff.status_code == 200, diff.text
        assert diff.json()["sentinel_id"] == "s-auth-sentinel"
        r = await c.post("/callbacks/sentinel-traffic", json={"sentinel_id": "s-auth-sentinel", "weight": 0.25})
        assert r.status_code == 202 and r.json()["weight"] == 0.25
        assert (await c.post("/gc")).status_code == 200
        r = await c.delete("/strategies/s-auth")
        assert r.status_code == 200 and r.json()["sentinels"] == ["s-auth-sentinel"]


async def test_reads_stay_open(dm):
    async with httpx.AsyncClient(base_url=dm.url, timeout=10) as c:
        for path in ("/health", "/metrics", "/queues", "/queues/by_tag?tags=btc&interval=60"):
            assert (await c.get(path)).status_code == 200, path
        assert (await c.get("/nodes/" + NODE["node_id"])).status_code not in (401, 403)


def test_without_a_token_writes_are_open_and_it_says_so(tmp_path):
    proc, url, log = _start(tmp_path, {})
    try:
        r = httpx.post(url + "/gc", timeout=10)
        assert r.status_code == 200, r.text
    finally:
        _stop(proc)
    assert "DAG Manager writes are UNAUTHENTICATED" in log.read_text(errors="replace")
