"""Schemathesis over the WorldService ASGI app: positive and negative cases, against a
world that exists (with a default policy, an observation and active strategies), so the
generated requests reach past 404s. No server error and no response that breaks the spec.

The schema is the bundled spec (what ``/openapi.json`` serves); requests go through
Schemathesis's ASGI client, which runs the app's lifespan (tables, outbox) in its own
event-loop thread and sends every request through that loop. (``from_fixture`` would be
the natural loader, but its lazy schema breaks on pytest 9: ``Function._nodeid``.)
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from qmtl.bus.inproc import InProcessBus
from qmtl.common.config import Config
from qmtl.contracts.events import event_validators
from qmtl.contracts.loader import load_openapi
from qmtl.store.sql import Database, sqlite_url
from qmtl.worldservice.app import create_app

BASE_URL = f"http://{asgi.HOST}"

WORLD = "ws-contract"
POLICY = """
data_currency: {max_lag: 1d}
samples: {min_samples: 10}
gates: {any: [{metric: sharpe, op: ">=", value: 1.0}, {metric: win_rate, op: ">", value: 0.55}]}
score: {weights: {sharpe: 1.0}}
constraints: {max_active: 3, max_weight: 0.5}
hysteresis: {promote_after: 1, demote_after: 1}
"""

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def ws_app(tmp_path_factory):
    cfg = Config()
    bus = InProcessBus(validator=event_validators())
    asyncio.run(bus.start())
    db = Database(sqlite_url(tmp_path_factory.mktemp("ws") / "worldservice.db"))
    app = create_app(cfg, bus=bus, db=db)
    yield app
    asgi.shutdown_lifespans()


@pytest.fixture(scope="module")
def client(ws_app):
    with asgi.get_client(ws_app) as c:  # starts the lifespan
        def ok(resp, *codes):
            assert resp.status_code in codes, resp.text
            return resp

        ok(c.post("/worlds", json={"world_id": WORLD, "name": "Contract world"}), 201)
        ok(c.post(f"/worlds/{WORLD}/policies", json={"yaml": POLICY, "set_default": True}), 201)
        ok(c.put(f"/worlds/{WORLD}/observations", json={"data_end": "2030-01-01T00:00:00Z", "samples": 50, "metrics": {"sharpe": 2}}), 200)
        ok(c.post(f"/worlds/{WORLD}/apply", json={"run_id": "seed-1",
                                                  "plan": {"activate": ["s-1", {"strategy_id": "s-2", "side": "long", "weight": 0.5}]}}), 200)
        yield c


CONFIG = SchemathesisConfig.from_dict(
    {
        "generation": {"mode": "all", "max-examples": 12, "deterministic": True},
        "parameters": {"world_id": WORLD, "version": 1, "v": 1},
        "suppress-health-check": ["all"],
    }
)
schema = schemathesis.openapi.from_dict(load_openapi("worldservice").bundled, config=CONFIG)


@schema.parametrize()
def test_worldservice_conforms_to_its_spec(case, client):
    # Keep the shared world usable: undo what an earlier case did to it.
    client.put(f"/worlds/{WORLD}", json={"state": "ACTIVE", "circuit_breaker": False})
    if case.method.upper() == "DELETE" and (case.path_parameters or {}).get("world_id") == WORLD:
        # Deleting the shared world would 404 everything after it: delete a fresh one.
        fresh = f"del-{uuid.uuid4().hex[:12]}"
        client.post("/worlds", json={"world_id": fresh, "name": "to delete"})
        case.path_parameters["world_id"] = fresh
    case.call_and_validate(base_url=BASE_URL, session=client, checks=CHECKS)
