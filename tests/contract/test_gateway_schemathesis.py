"""Schemathesis over the Gateway's ASGI app (every component built), positive and negative
cases: no server error and no response that breaks the spec. The Gateway proxies to a real
WorldService and a real DAG Manager (subprocesses), so the generated requests reach past
the proxy; a world, a policy, an activation and a submitted strategy exist beforehand.

The app is served by uvicorn on a loopback port from a thread of this process (its own
event loop), not through Schemathesis's in-process ASGI client: that client ends the
app's lifespan after every test and starts it again, which a Gateway (background
workers, a ControlBus consumer, open connections) is not built to do mid-process.

Excluded: ``GET /queues/watch`` (an endless stream; its headers and first line are tested
in the ingest tests)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import requests
import schemathesis
import uvicorn
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from qmtl.bus.inproc import InProcessBus
from qmtl.cli import quiet_server
from qmtl.common.config import load_config
from qmtl.common.crc import crc32_of_node_ids
from qmtl.common.nodeid import compute_node_id
from qmtl.contracts.events import event_validators
from qmtl.contracts.loader import load_openapi
from qmtl.gateway.app import create_app
from tests.helpers.server import free_port
from tests.helpers.wsproc import WorldServiceProcess

QMTL = str(Path(sys.executable).parent / "qmtl")
WORLD = "gw-contract"
TOKEN = "contract-token"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


def _node(node_type, code, tags, interval=60, **extra):
    fields = {"node_type": node_type, "code_hash": code, "config_hash": "cfg", "schema_hash": "sch"}
    return {"node_id": compute_node_id(**fields), **fields, "interval": interval, "period": 10, "tags": tags, "inputs": [], **extra}


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    root = tmp_path_factory.mktemp("gw-contract")
    ws = WorldServiceProcess(root / "ws", service_token=TOKEN)
    ws.start()
    dm_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMTL")}
    log = open(root / "dagmanager.log", "ab")  # noqa: SIM115 - the child process writes to it
    dm = subprocess.Popen([QMTL, "dagmanager", "--port", str(dm_port), "--data-dir", str(root / "dm")],
                          env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    dm_url = f"http://127.0.0.1:{dm_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(dm_url + "/health", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert dm.poll() is None and time.monotonic() < deadline, "DAG Manager did not start"
            time.sleep(0.05)
        yield ws.url, dm_url, root
    finally:
        dm.kill()
        dm.wait(10)
        ws.stop()


@pytest.fixture(scope="module")
def client(backends):
    ws_url, dm_url, root = backends
    cfg = load_config(environ={}, overrides={
        "data_dir": str(root / "gw"),
        "gateway": {"worldservice_url": ws_url, "dagmanager_url": dm_url, "service_token": TOKEN,
                    "worldservice_budget": {"timeout": 3.0, "retries": 1}, "dagmanager_budget": {"timeout": 3.0, "retries": 1},
                    "events": {"heartbeat_interval": 0.0}},
    })
    port = free_port()
    server = _ServerThread(cfg, port)
    server.start()
    with requests.Session() as c:
        c.base_url = f"http://127.0.0.1:{port}"

        def ok(resp, *codes):
            assert resp.status_code in codes, resp.text
            return resp

        url = c.base_url
        ok(c.post(url + "/worlds", json={"world_id": WORLD, "name": "Contract world"}), 201)
        ok(c.post(url + f"/worlds/{WORLD}/policies", json={"yaml": "hysteresis: {promote_after: 1}\n", "set_default": True}), 201)
        ok(c.post(url + f"/worlds/{WORLD}/apply", json={"run_id": "seed", "plan": {"activate": ["s-1"]}}, headers={"X-Allow-Live": "true"}), 200)
        nodes = [_node("Price", "c0de01", ["btc", "price"]), _node("TagQueryNode", "c0de02", ["price"], match_mode="any")]
        dag = {"nodes": nodes}
        body = {"dag_json": base64.b64encode(json.dumps(dag).encode()).decode(), "meta": {"name": "contract"},
                "run_type": "backtest", "node_ids_crc32": crc32_of_node_ids(n["node_id"] for n in nodes), "world_id": WORLD}
        c.strategy_id = ok(c.post(url + "/strategies", json=body), 202).json()["strategy_id"]
        try:
            yield c
        finally:
            server.stop()


class _ServerThread(threading.Thread):
    """The Gateway app under uvicorn, in a thread with its own event loop."""

    def __init__(self, cfg, port):
        super().__init__(daemon=True)
        self.cfg, self.port = cfg, port
        self.server = None
        self.ready = threading.Event()

    def run(self):
        async def main():
            bus = InProcessBus(validator=event_validators())
            app = create_app(self.cfg, bus=bus)
            config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
            self.server = quiet_server(config)
            task = asyncio.create_task(self.server.serve())
            while not self.server.started and not task.done():
                await asyncio.sleep(0.01)
            self.ready.set()
            await task
            await bus.close()

        asyncio.run(main())

    def start(self):
        super().start()
        assert self.ready.wait(30), "Gateway did not start"
        assert self.server is not None and self.server.started, "Gateway failed to start"

    def stop(self):
        self.server.should_exit = True
        self.join(30)


def _config():
    return SchemathesisConfig.from_dict({
        "generation": {"mode": "all", "max-examples": 10, "deterministic": True},
        "parameters": {"world_id": WORLD, "version": 1, "v": 1, "tags": "btc,price", "interval": 60},
        "suppress-health-check": ["all"],
    })


schema = schemathesis.openapi.from_dict(load_openapi("gateway").bundled, config=_config()).exclude(operation_id="watch_queues")


@schema.parametrize()
def test_gateway_conforms_to_its_spec(case, client):
    client.put(client.base_url + f"/worlds/{WORLD}", json={"state": "ACTIVE", "circuit_breaker": False})
    params = case.path_parameters or {}
    if params.get("strategy_id") == "{strategy_id}" or case.operation.path.startswith("/strategies/"):
        params.setdefault("strategy_id", client.strategy_id)
    if case.method.upper() == "DELETE" and params.get("world_id") == WORLD:
        fresh = f"del-{time.monotonic_ns()}"
        client.post(client.base_url + "/worlds", json={"world_id": fresh, "name": "to delete"})
        params["world_id"] = fresh
    case.call_and_validate(base_url=client.base_url, session=client, checks=CHECKS)
