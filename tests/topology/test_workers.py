"""``qmtl gw --workers N``: one Gateway served by N worker processes on one port, each a
replica (its own ControlBus consumer identity) sharing Redis, the database and the signing
keys, so a descriptor token issued by any worker is accepted by every other."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx

from tests.conftest import REDIS_URL
from tests.helpers.gateway_events import connect, recv
from tests.helpers.server import free_port
from tests.sdk.live import QMTL, ROOT
from tests.sdk.test_production_stack import fresh_database  # noqa: F401 - fixture
from tests.topology.test_topology import redis_prefix  # noqa: F401 - fixture


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMTL")}
    env.update({"PYTHONUNBUFFERED": "1", **extra})
    return env


def test_workers_are_refused_where_the_design_does_not_allow_them(tmp_path):
    r = subprocess.run([QMTL, "gw", "--workers", "2", "--port", str(free_port()), "--data-dir", str(tmp_path)], cwd=ROOT,
                       env=_env({}), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "cannot serve the Gateway with --workers 2" in r.stderr
    assert "the in-process ControlBus cannot span worker processes" in r.stderr
    assert "the in-memory Redis substitute is per process" in r.stderr


def _status(url: str) -> dict | None:
    try:  # a fresh connection each time: the kernel hands it to either worker
        with httpx.Client(timeout=3) as c:
            r = c.get(url + "/status", headers={"Connection": "close"})
        return r.json() if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


async def test_a_token_issued_by_one_worker_is_accepted_by_every_other(tmp_path, kafka_bootstrap, fresh_database, redis_prefix):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "gw.log"
    env = _env({
        "QMTL__CONTROLBUS__KIND": "kafka", "QMTL__CONTROLBUS__BOOTSTRAP_SERVERS": kafka_bootstrap,
        "QMTL__CONTROLBUS__FETCH_MAX_WAIT_MS": "5", "QMTL__GATEWAY__KV_URL": REDIS_URL,
        "QMTL__GATEWAY__KV_PREFIX": f'"{redis_prefix}"', "QMTL__GATEWAY__DATABASE_URL": fresh_database,
    })
    with open(log, "wb") as out:  # noqa: ASYNC230 - test setup before any request is in flight
        # the server under test, started before any request is in flight
        proc = subprocess.Popen([QMTL, "gw", "--workers", "2", "--port", str(port), "--data-dir", str(tmp_path / "d")],  # noqa: ASYNC220
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        consumers: dict[str, dict] = {}
        deadline = time.monotonic() + 60
        while len(consumers) < 2:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"saw workers {sorted(consumers)} only:\n{log.read_text()[-3000:]}"
            s = _status(url)
            if s is not None and "consumer_id" in s["controlbus"]:
                consumers[s["controlbus"]["consumer_id"]] = s
            time.sleep(0.05)  # noqa: ASYNC251 - polling a server in other processes; nothing else runs on this loop
        # Two replicas: distinct consumer identities, one key ring from the shared database.
        rings = {s["signing_keys"]["signer"] for s in consumers.values()}
        assert len(rings) == 1 and all(s["signing_keys"]["source"] == "database" and s["signing_keys"]["shared"]
                                       for s in consumers.values())
        verified_by: set[str] = set()
        for _ in range(16):
            async with httpx.AsyncClient(base_url=url, timeout=5, headers={"Connection": "close"}) as c:
                d = (await c.post("/events/subscribe", json={"topics": ["queues"]})).json()
            ws = await connect(d["stream_url"], d["token"])  # another connection: either worker
            frame = await recv(ws)
            assert frame["type"] == "snapshot", "a worker refused a sibling's token"
            verified_by.add(frame["source"])  # qmtl.gateway/<instance id> of the worker that verified it
            await ws.close()
        assert len(verified_by) == 2, f"every stream landed on one worker: {verified_by}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
