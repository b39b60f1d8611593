"""A client generated from the Gateway's spec by a maintained generator from PyPI
(openapi-python-client) works against a live ``qmtl up``: submit, decide, subscribe.

A spec change that breaks generation — or makes the generator drop one of the operations
exercised here, or the models they return — fails this test.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from qmtl.contracts.loader import load_openapi
from qmtl.sdk import Dag, Node

PACKAGE = "qmtl_gateway_generated"
EXERCISED = {
    ("POST", "/strategies"): ("strategies", "submit_strategy"),
    ("POST", "/worlds"): ("worlds", "create_world"),
    ("GET", "/worlds/{world_id}/decide"): ("worlds", "decide"),
    ("POST", "/events/subscribe"): ("events", "subscribe"),
    ("GET", "/strategies/{strategy_id}/status"): ("strategies", "get_strategy_status"),
}
_WARNING = re.compile(r"WARNING parsing (GET|PUT|POST|DELETE|PATCH) (\S+) within")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("generated")
    spec = root / "gateway-openapi.json"
    spec.write_text(json.dumps(load_openapi("gateway").bundled), encoding="utf-8")
    out = root / PACKAGE
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        [str(bindir / "openapi-python-client"), "generate", "--path", str(spec), "--output-path", str(out),
         "--meta", "none", "--overwrite"],
        check=False, capture_output=True, text=True, timeout=120, env=env,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"openapi-python-client failed on specs/openapi.yaml:\n{log}"
    dropped = {(m, p) for m, p in _WARNING.findall(log)}
    lost = dropped & set(EXERCISED)
    assert not lost, f"the generator dropped operations the SDK tests exercise: {sorted(lost)}\n{log}"
    for tag, module in EXERCISED.values():
        assert (out / "api" / tag / f"{module}.py").exists(), f"no generated module for {tag}.{module}:\n{log}"
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
            del sys.modules[name]


async def test_generated_client_submits_decides_and_subscribes(generated, live):
    def mod(name: str):
        return importlib.import_module(f"{PACKAGE}.{name}")

    models = mod("models")
    submit_strategy = mod("api.strategies.submit_strategy")
    get_status = mod("api.strategies.get_strategy_status")
    create_world = mod("api.worlds.create_world")
    decide = mod("api.worlds.decide")
    subscribe = mod("api.events.subscribe")
    Client = generated.Client

    world_id = live.world_id("gen")
    dag = Dag([Node("Compute", code=f"generated {world_id}", interval=60, period=1, tags=["gen"])])
    body = dag.submission(run_type="backtest", world_id=world_id)

    async with Client(base_url=live.url, raise_on_unexpected_status=True) as client:
        created = await create_world.asyncio_detailed(
            client=client, body=models.WorldCreate.from_dict({"world_id": world_id, "name": "generated"}))
        assert created.status_code == 201 and isinstance(created.parsed, models.World)
        assert created.parsed.world_id == world_id

        ack = await submit_strategy.asyncio_detailed(client=client, body=models.StrategySubmission.from_dict(body))
        assert ack.status_code == 202, ack.content
        assert isinstance(ack.parsed, models.StrategyAck) and ack.parsed.strategy_id.startswith("s-")
        dup = await submit_strategy.asyncio_detailed(client=client, body=models.StrategySubmission.from_dict(body))
        assert dup.status_code == 409 and dup.parsed.strategy_id == ack.parsed.strategy_id
        status = await get_status.asyncio(ack.parsed.strategy_id, client=client)
        assert status.strategy_id == ack.parsed.strategy_id

        decision = await decide.asyncio_detailed(world_id, client=client)
        assert decision.status_code == 200 and isinstance(decision.parsed, models.DecisionEnvelope)
        assert decision.parsed.world_id == world_id and str(decision.parsed.effective_mode) in ("backtest", "dryrun", "live")

        request = models.SubscribeRequest.from_dict({"world_id": world_id, "topics": ["activation"]})
        desc = await subscribe.asyncio_detailed(client=client, body=request)
        assert desc.status_code == 200 and isinstance(desc.parsed, models.StreamDescriptor)
        assert desc.parsed.stream_url.endswith("/ws/evt") and desc.parsed.token.count(".") == 2

    # the descriptor it got works: the stream sends the activation snapshot first
    async with connect(desc.parsed.stream_url, additional_headers={"Authorization": f"Bearer {desc.parsed.token}"},
                       proxy=None) as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert first["type"] == "snapshot" and first["data"]["topic"] == "activation"
    assert json.loads(base64.b64decode(body["dag_json"]))["nodes"][0]["node_id"] == dag.node_ids()[0]
