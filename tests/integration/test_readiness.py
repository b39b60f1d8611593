"""GET /ready on every service (readiness, separate from the liveness of /health), and the
loud misconfiguration of a service started alone on the in-process ControlBus."""

from __future__ import annotations

import subprocess
import time

import httpx
from jsonschema import Draft202012Validator

from qmtl.bus.inproc import InProcessBus
from qmtl.common.config import load_config
from qmtl.contracts.events import event_validators
from qmtl.contracts.loader import load_schema_files, schema_registry
from qmtl.dagmanager.app import create_app as dm_app
from qmtl.gateway.app import create_app as gw_app
from qmtl.worldservice.app import create_app as ws_app
from tests.helpers.server import free_port, serve
from tests.helpers.wsproc import QMTL, ROOT, SERVICE_TOKEN, WorldServiceProcess, gateway_config

READY = Draft202012Validator(load_schema_files()["readiness.schema.json"], registry=schema_registry())
STATUS = Draft202012Validator(load_schema_files()["gateway_status.schema.json"], registry=schema_registry(),
                              format_checker=Draft202012Validator.FORMAT_CHECKER)


def not_ready(r: httpx.Response) -> dict:
    assert r.status_code == 503, r.text
    assert r.headers["content-type"].startswith("application/problem+json") and r.headers["retry-after"] == "1"
    body = r.json()
    READY.validate(body)
    assert body["ready"] is False and body["title"] == "Not Ready" and body["reasons"]
    return body


def config(tmp_path, ws_url="http://127.0.0.1:9", dm_url="http://127.0.0.1:9"):
    return load_config(environ={}, overrides={
        "data_dir": str(tmp_path), "gateway": {"worldservice_url": ws_url, "dagmanager_url": dm_url, "service_token": SERVICE_TOKEN}})


async def test_three_services_sharing_one_in_process_bus_are_ready(tmp_path):
    bus = InProcessBus(validator=event_validators())
    bus.local_services = frozenset({"gateway", "worldservice", "dagmanager"})  # what `qmtl up` sets
    cfg = config(tmp_path)
    async with serve(ws_app(cfg, bus=bus)) as ws_url, serve(dm_app(cfg, bus=bus)) as dm_url:
        cfg.gateway.worldservice_url, cfg.gateway.dagmanager_url = ws_url, dm_url
        async with serve(gw_app(cfg, bus=bus)) as gw_url, httpx.AsyncClient(timeout=10) as c:
            for url, service in ((gw_url, "gateway"), (ws_url, "worldservice"), (dm_url, "dagmanager")):
                r = await c.get(url + "/ready")
                assert r.status_code == 200, r.text
                body = r.json()
                READY.validate(body)
                assert body["ready"] is True and body["service"] == service and "reasons" not in body
                assert body["checks"]["controlbus"]["ok"] is True
            gw = (await c.get(gw_url + "/ready")).json()["checks"]
            assert {"controlbus", "redis", "database", "worldservice", "dagmanager", "signing_keys"} <= set(gw)
            assert "caught up" in gw["controlbus"]["detail"]
            status = (await c.get(gw_url + "/status")).json()
            STATUS.validate(status)
            assert status["status"] == "ok" and status["controlbus"]["caught_up"] is True and "problem" not in status["controlbus"]
            assert status["signing_keys"]["source"] == "database" and status["signing_keys"]["signer"]


async def test_a_service_alone_on_the_in_process_bus_is_not_ready_and_says_why(tmp_path):
    for service, make in (("gateway", gw_app), ("worldservice", ws_app), ("dagmanager", dm_app)):
        bus = InProcessBus(validator=event_validators())
        bus.local_services = frozenset({service})  # `qmtl gw` (or worldservice, dagmanager) on controlbus.kind inproc
        async with serve(make(config(tmp_path / service), bus=bus)) as url, httpx.AsyncClient(timeout=10) as c:
            assert (await c.get(url + "/health")).status_code == 200  # alive, but ...
            body = not_ready(await c.get(url + "/ready"))
            assert any(r.startswith("controlbus: controlbus.kind is 'inproc' but this process runs only") for r in body["reasons"])
            assert "controlbus.kind: kafka" in body["detail"]
            if service == "gateway":
                status = (await c.get(url + "/status")).json()
                STATUS.validate(status)
                assert status["status"] == "degraded" and "reaches this Gateway" in status["controlbus"]["problem"]


async def test_the_gateway_is_ready_once_worldservice_answered_and_stays_ready_through_its_outage(tmp_path):
    ws = WorldServiceProcess(tmp_path / "ws", service_token=SERVICE_TOKEN)
    bus = InProcessBus(validator=event_validators())
    async with serve(dm_app(config(tmp_path / "dm"), bus=bus)) as dm_url:
        app = gw_app(gateway_config(tmp_path, ws.url, dagmanager_url=dm_url, status_cache_ttl=0.0), bus=bus)
        async with serve(app) as gw_url, httpx.AsyncClient(base_url=gw_url, timeout=10) as c:
            body = not_ready(await c.get("/ready"))  # WorldService has never answered
            assert [r for r in body["reasons"] if r.startswith("worldservice:")] and body["checks"]["worldservice"]["required"]
            ws.start()
            try:
                r = await c.get("/ready")
                assert r.status_code == 200, r.text
            finally:
                ws.stop()  # SIGKILL
            r = await c.get("/ready")
            assert r.status_code == 200, r.text  # degraded, not out of the pool
            check = r.json()["checks"]["worldservice"]
            assert check["ok"] is False and check["required"] is False
            status = (await c.get("/status")).json()
            assert status["degradation"] == "PARTIAL" and status["status"] == "degraded"


def test_qmtl_gw_alone_on_the_in_process_bus_logs_why_at_start(tmp_path):
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "gw.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([QMTL, "gw", "--port", str(port), "--data-dir", str(tmp_path / "d")], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise AssertionError("qmtl gw did not answer:\n" + log.read_text())
        assert r.status_code == 503 and "controlbus.kind is 'inproc'" in r.json()["detail"]
        text = log.read_text()
        assert "ERROR qmtl" in text and "gateway: controlbus.kind is 'inproc' but this process runs only gateway" in text
    finally:
        proc.kill()
        proc.wait(10)
