"""A client generated from the Gateway's served spec (``GET /openapi.json`` of a live
``qmtl up``) by a maintained generator from PyPI (openapi-python-client) works against it:
submit, decide, subscribe, and typed problem models for 404/409/422.

Generation must be clean: any warning the generator prints (a dropped operation, response
or model) fails the test, every operation of the spec has its module, every documented
status its branch in that module, and every object schema of ``components/schemas`` its
model class. ``tests/sdk/openapi-python-client.yaml`` tells the generator to read the one
streaming response (``GET /queues/watch``, ``application/x-ndjson``) as text.
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

import httpx
import pytest
from websockets.asyncio.client import connect

from qmtl.contracts.loader import load_openapi
from qmtl.sdk import Dag, Node

PACKAGE = "qmtl_gateway_generated"
CONFIG = Path(__file__).with_name("openapi-python-client.yaml")
_NOISE = re.compile(r"warning|unable to|cannot|could not|error|will be omitted|removal", re.IGNORECASE)


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


@pytest.fixture(scope="module")
def served_spec(live, tmp_path_factory) -> tuple[Path, dict]:
    r = httpx.get(live.url + "/openapi.json", timeout=10)
    assert r.status_code == 200, r.text
    path = tmp_path_factory.mktemp("served") / "gateway-openapi.json"
    path.write_bytes(r.content)
    return path, r.json()


@pytest.fixture(scope="module")
def generated(served_spec, tmp_path_factory):
    spec_path, doc = served_spec
    root = tmp_path_factory.mktemp("generated")
    out = root / PACKAGE
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}  # its ruff post-hook
    proc = subprocess.run(
        [str(bindir / "openapi-python-client"), "generate", "--path", str(spec_path), "--output-path", str(out),
         "--meta", "none", "--overwrite", "--config", str(CONFIG)],
        check=False, capture_output=True, text=True, timeout=180, env=env,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"openapi-python-client failed on the served spec:\n{log}"
    noise = [line for line in log.splitlines() if _NOISE.search(line)]
    assert not noise, "openapi-python-client warned (something was dropped from the client):\n" + log
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module(PACKAGE), out, doc
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def test_served_spec_is_the_bundled_one(served_spec):
    _path, doc = served_spec
    bundled = load_openapi("gateway").bundled
    assert {k: v for k, v in doc.items() if k != "servers"} == {k: v for k, v in bundled.items() if k != "servers"}
    assert doc["servers"][0]["url"] == "/" and doc["servers"][1:] == bundled.get("servers", [])
    text = json.dumps(doc)
    refs = re.findall(r'"\$ref": "([^"]*)"', text)
    # shared schemas are referenced, not inlined: each body appears once, under components/schemas
    for name in ("Problem", "World", "StrategySubmission"):
        assert text.count(json.dumps(doc["components"]["schemas"][name]["properties"])) == 1, name
        assert f"#/components/schemas/{name}" in refs
    assert all(ref.startswith("#/components/") for ref in refs), sorted({r for r in refs if not r.startswith("#/")})


def test_every_operation_response_and_model_is_generated(generated):
    _pkg, out, doc = generated
    missing = []
    for route, item in doc["paths"].items():
        for method, op in item.items():
            if method not in ("get", "put", "post", "delete", "patch"):
                continue
            module = out / "api" / op["tags"][0] / f"{_snake(op['operationId'])}.py"
            if not module.exists():
                missing.append(f"{method.upper()} {route}: no {module.relative_to(out)}")
                continue
            code = module.read_text()
            for status in op["responses"]:
                if status != "default" and f"response.status_code == {status}" not in code:
                    missing.append(f"{method.upper()} {route}: response {status} is not parsed")
    for name, schema in doc["components"]["schemas"].items():
        # a plain object schema is a model class (one with a top-level anyOf/oneOf is a union alias)
        plain = "properties" in schema and not {"anyOf", "oneOf"} & schema.keys()
        if plain and not (out / "models" / f"{_snake(name)}.py").exists():
            missing.append(f"components/schemas/{name}: no model")
    assert not missing, "\n".join(missing)


async def test_generated_client_gets_typed_problems(generated, live):
    pkg, _out, _doc = generated
    models = importlib.import_module(f"{PACKAGE}.models")
    create_world = importlib.import_module(f"{PACKAGE}.api.worlds.create_world")
    get_world = importlib.import_module(f"{PACKAGE}.api.worlds.get_world")
    get_status = importlib.import_module(f"{PACKAGE}.api.strategies.get_strategy_status")
    world_id = live.world_id("typed")
    async with pkg.Client(base_url=live.url) as client:
        missing = await get_world.asyncio_detailed(world_id, client=client)
        assert missing.status_code == 404 and isinstance(missing.parsed, models.Problem), missing.content
        assert missing.parsed.status == 404 and missing.parsed.correlation_id == missing.headers["x-correlation-id"]
        unknown = await get_status.asyncio_detailed("s-" + "0" * 16, client=client)
        assert unknown.status_code == 404 and isinstance(unknown.parsed, models.Problem), unknown.content

        body = models.WorldCreate.from_dict({"world_id": world_id, "name": "typed problems"})
        assert (await create_world.asyncio_detailed(client=client, body=body)).status_code == 201
        again = await create_world.asyncio_detailed(client=client, body=body)
        assert again.status_code == 409 and isinstance(again.parsed, models.Problem), again.content
        assert again.parsed.status == 409 and world_id in again.parsed.detail

        # the generated model accepts what the schema's pattern refuses: the server answers 422
        bad = await create_world.asyncio_detailed(client=client, body=models.WorldCreate.from_dict(
            {"world_id": "not a valid id!", "name": "x"}))
        assert bad.status_code == 422 and isinstance(bad.parsed, models.Problem), bad.content
        assert bad.parsed.errors and all(isinstance(e, models.ProblemErrorsItem) for e in bad.parsed.errors)
        assert [e.pointer for e in bad.parsed.errors] == ["/world_id"], bad.content


async def test_generated_client_submits_decides_and_subscribes(generated, live):
    generated = generated[0]

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
        assert dup.status_code == 409 and isinstance(dup.parsed, models.StrategyDuplicate)
        assert dup.parsed.strategy_id == ack.parsed.strategy_id
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
