"""Schemathesis over the DAG Manager ASGI app: positive and negative cases, against a graph
that holds a strategy (so node, sentinel and strategy paths reach past 404s). No server
error and no response that breaks the spec.

The schema is the bundled spec (what ``/openapi.json`` serves); requests go through
Schemathesis's ASGI client, which runs the app's lifespan (tables, notifier, callback
sender) in its own event-loop thread and sends every request through that loop.
"""

from __future__ import annotations

import asyncio
import hashlib
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
from qmtl.common.nodeid import compute_node_id
from qmtl.contracts.events import event_validators
from qmtl.contracts.loader import load_openapi
from qmtl.dagmanager.app import create_app
from qmtl.dagmanager.topics import EmbeddedTopicAdmin
from qmtl.store.sql import Database, sqlite_url

BASE_URL = f"http://{asgi.HOST}"
STRATEGY = "contract-s1"
SENTINEL = f"{STRATEGY}-sentinel"
SERVICE_TOKEN = "contract-service-token"

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


def _node(key: str, node_type: str = "Compute", **extra) -> dict:
    code = hashlib.sha256(key.encode()).hexdigest()
    n = {"node_type": node_type, "code_hash": code, "config_hash": "c", "schema_hash": "s",
         "interval": 60, "period": 1, "tags": ["price", key], "inputs": []}
    n["node_id"] = compute_node_id(node_type, code, "c", "s")
    n.update(extra)
    return n


NODE = _node("contract-a")
DAG = {"nodes": [NODE, _node("contract-b"), _node("contract-tq", "TagQueryNode", match_mode="any")]}


@pytest.fixture(scope="module")
def dm_app(tmp_path_factory):
    bus = InProcessBus(validator=event_validators())
    asyncio.run(bus.start())
    db = Database(sqlite_url(tmp_path_factory.mktemp("dm") / "dagmanager.db"))
    cfg = Config()
    cfg.dagmanager.service_token = SERVICE_TOKEN  # writes need it (serviceToken scheme); Schemathesis sends it
    app = create_app(cfg, bus=bus, db=db, topic_admin=EmbeddedTopicAdmin(), gc_interval=0)
    yield app
    asgi.shutdown_lifespans()


@pytest.fixture(scope="module")
def client(dm_app):
    with asgi.get_client(dm_app) as c:  # starts the lifespan
        c.headers["X-QMTL-Service-Token"] = SERVICE_TOKEN
        r = c.post("/diff", json={"strategy_id": STRATEGY, "dag": DAG})
        assert r.status_code == 200, r.text
        yield c


CONFIG = SchemathesisConfig.from_dict(
    {
        "generation": {"mode": "all", "max-examples": 15, "deterministic": True},
        "parameters": {"node_id": NODE["node_id"], "sentinel_id": SENTINEL, "strategy_id": STRATEGY},
        "suppress-health-check": ["all"],
    }
)
schema = schemathesis.openapi.from_dict(load_openapi("dagmanager").bundled, config=CONFIG)


@schema.parametrize()
def test_dagmanager_conforms_to_its_spec(case, client):
    if case.method.upper() == "DELETE" and (case.path_parameters or {}).get("strategy_id") == STRATEGY:
        # Releasing the shared strategy would 404 everything after it: release a fresh one.
        fresh = f"del-{uuid.uuid4().hex[:12]}"
        assert client.post("/diff", json={"strategy_id": fresh, "dag": DAG}).status_code == 200
        case.path_parameters["strategy_id"] = fresh
    case.call_and_validate(base_url=BASE_URL, session=client, checks=CHECKS)
