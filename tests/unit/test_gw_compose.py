"""The Gateway's composition (issue 13): one factory builds every part explicitly, handlers get a
typed :class:`Gateway`, and a part left out of a focused build answers the documented 501."""

from __future__ import annotations

import ast
import inspect

import httpx
import pytest

import qmtl.gateway.app as gateway_app
from qmtl.bus.inproc import InProcessBus
from qmtl.common.config import load_config
from qmtl.gateway.auth import Authenticator
from qmtl.gateway.events import EventsComponent
from qmtl.gateway.ingest import IngestService
from qmtl.gateway.service import ALL_PARTS, Gateway
from qmtl.gateway.status import StatusMonitor
from qmtl.gateway.worlds import WorldsProxy
from qmtl.store import Database, make_kv, sqlite_url
from tests.helpers.server import serve


def config(tmp_path):
    return load_config(environ={}, overrides={"data_dir": str(tmp_path), "gateway": {"workers": 0}})


async def test_create_service_builds_every_part_typed_and_wires_them_explicitly(tmp_path):
    db, kv = Database(sqlite_url(tmp_path / "gw.db")), make_kv("memory://")
    gw = gateway_app.create_service(config(tmp_path), bus=InProcessBus(), kv=kv, db=db)
    try:
        assert isinstance(gw, Gateway) and set(gw.parts()) == set(ALL_PARTS)
        assert isinstance(gw.auth, Authenticator) and isinstance(gw.worlds, WorldsProxy)
        assert isinstance(gw.events, EventsComponent) and isinstance(gw.ingest, IngestService)
        assert isinstance(gw.status, StatusMonitor)
        # the collaborators each part was given, not looked up sideways
        assert gw.ingest.fsm.relay is gw.events and gw.ingest.admission.degradation == gw.status.level
        assert gw.status.fallback is gw.ingest.fallback and gw.status.events is gw.events
        assert gw.ingest.queues.feed is gw.events.queue_feed and gw.events.auth is gw.auth
        assert gw.ingest.dagmanager is gw.dagmanager and gw.status.worldservice is gw.worldservice
    finally:
        await gw.stop()


def test_the_app_module_is_two_factories_without_a_locator():
    source = inspect.getsource(gateway_app)
    tree = ast.parse(source)
    public = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")]
    assert public == ["create_service", "create_app"]
    assert "importlib" not in source and "__getattr__" not in inspect.getsource(Gateway)


def test_unknown_or_incomplete_part_selections_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        gateway_app.create_service(config(tmp_path), bus=InProcessBus(), kv=make_kv("memory://"), parts=("ingest", "nope"))
    with pytest.raises(ValueError, match="auth"):
        gateway_app.create_service(config(tmp_path), bus=InProcessBus(), kv=make_kv("memory://"), parts=("events",))


async def test_a_part_left_out_answers_501_problem_json(tmp_path):
    app = gateway_app.create_app(config(tmp_path), bus=InProcessBus(), kv=make_kv("memory://"),
                                 db=Database(sqlite_url(tmp_path / "gw.db")), parts=("auth", "status"))
    assert set(app.service.parts()) == {"auth", "status"}
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as c:
        r = await c.get("/strategies/s-1/status")
        assert r.status_code == 501 and r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["status"] == 501 and "ingest" in r.json()["detail"]
        assert (await c.get("/status")).status_code == 200  # the parts that are built still answer
