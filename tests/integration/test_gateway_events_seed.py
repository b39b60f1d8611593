"""A Gateway whose ControlBus holds nothing for a world (a restarted embedded deployment, or
a compacted activation topic) seeds the world from WorldService before its first snapshot,
so the snapshot is complete and its state_hash equals WorldService's probe."""

from __future__ import annotations

import contextlib

import httpx
import pytest

from qmtl.bus import InProcessBus
from qmtl.common.config import load_config
from qmtl.contracts.events import event_validators
from qmtl.worldservice.app import create_app as ws_app
from tests.helpers import gateway_events
from tests.helpers.gateway_events import Gateway, connect, recv_n
from tests.helpers.server import free_port, serve

POLICY = "hysteresis: {promote_after: 1, max_mode: dryrun}\n"


@pytest.fixture(autouse=True)
def events_and_worlds(monkeypatch):
    monkeypatch.setattr(gateway_events, "PARTS", ("auth", "worlds", "events"))


async def test_snapshot_of_a_world_the_bus_lost_is_seeded_from_worldservice(tmp_path):
    ws_port = free_port()
    token = "seed-token"
    ws_cfg = load_config(environ={}, overrides={"data_dir": str(tmp_path / "ws"), "worldservice": {"service_token": token}})
    ws_bus = InProcessBus(validator=event_validators())  # WorldService's bus; the Gateway never sees it
    async with contextlib.AsyncExitStack() as stack:
        ws_url = await stack.enter_async_context(serve(ws_app(ws_cfg, bus=ws_bus), port=ws_port))
        async with httpx.AsyncClient(base_url=ws_url, timeout=10) as c:
            assert (await c.post("/worlds", json={"world_id": "seeded", "name": "Seeded"})).status_code == 201
            assert (await c.post("/worlds/seeded/policies", json={"yaml": POLICY, "set_default": True})).status_code == 201
            plan = {"activate": ["alpha", {"strategy_id": "beta", "side": "short", "weight": 0.25}]}
            assert (await c.post("/worlds/seeded/apply", json={"run_id": "r1", "plan": plan})).status_code == 200
            act_probe = (await c.get("/worlds/seeded/activation/state_hash")).json()["state_hash"]
            pol_probe = (await c.get("/worlds/seeded/policy/state_hash")).json()["state_hash"]

        gw_bus = InProcessBus(validator=event_validators())  # empty: as after a restart
        gw = Gateway(gw_bus, str(tmp_path / "gw"), gateway={"worldservice_url": ws_url, "service_token": token})
        await stack.enter_async_context(gw)
        desc = await gw.descriptor({"world_id": "seeded", "topics": ["activation", "policy"]})
        ws = await connect(desc["stream_url"], desc["token"])
        try:
            snapshots = {f["data"]["topic"]: f["data"] for f in await recv_n(ws, 2)}
        finally:
            await ws.close()
        activation = snapshots["activation"]
        assert {(i["strategy_id"], i["side"], i["active"]) for i in activation["items"]} == {
            ("alpha", "long", True), ("alpha", "short", True), ("beta", "short", True)}
        assert activation["state_hash"] == act_probe
        assert [p["policy_version"] for p in snapshots["policy"]["items"] if p["status"] == "ACTIVE"] == [1]
        assert snapshots["policy"]["state_hash"] == pol_probe
        await ws_bus.close()
