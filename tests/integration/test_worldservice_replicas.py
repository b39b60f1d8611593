"""Several WorldService processes on one PostgreSQL schema (issue 11): separate OS
processes (``qmtl worldservice``), the machine's PostgreSQL, librdkafka's mock Kafka
cluster as the ControlBus.

* apply single flight across replicas (a lease on the world, not process memory);
* a replica killed (SIGKILL) in the middle of an apply: another one rolls it back once the
  lease expired — never half-done — and the run_id can be applied again;
* the outbox of two replicas publishes every event once, in order per world.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from qmtl.bus.base import TOPIC_ACTIVATION
from tests.helpers.bus import wait_until
from tests.helpers.replicas import Recorder, client, metric_sum, poll, processes, service_env

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


def hook(tmp_path, phase: str) -> tuple[dict, object]:
    pause = tmp_path / f"pause-{phase}"
    return {"WSHOOK_PAUSE_AT": phase, "WSHOOK_PAUSE_FILE": str(pause)}, pause


async def test_one_apply_per_world_across_replicas(kafka_bootstrap, pg_schema, tmp_path):
    env = service_env("worldservice", pg_schema, kafka_bootstrap)
    extra, pause = hook(tmp_path, "frozen")
    with processes(tmp_path, "worldservice", 2, env, hooked={0: extra}) as [p0, p1]:
        async with client(p0) as c0, client(p1) as c1:
            assert (await c0.post("/worlds", json={"world_id": "sf", "name": "sf"})).status_code == 201
            pause.write_text("")
            first = asyncio.create_task(c0.post("/worlds/sf/apply", json={"run_id": "r-a", "plan": {"activate": ["a"]}}))
            reached = pause.with_name(pause.name + ".reached")
            await wait_until(reached.exists, timeout=30, what="the apply on replica 0 to freeze the world")

            # while replica 0 holds the world, replica 1 refuses another run and the same run
            r = await c1.post("/worlds/sf/apply", json={"run_id": "r-b", "plan": {"activate": ["b"]}})
            assert r.status_code == 409 and r.json()["run_id_in_flight"] == "r-a" and r.headers["retry-after"]
            r = await c1.post("/worlds/sf/apply", json={"run_id": "r-a", "plan": {"activate": ["a"]}})
            assert r.status_code == 409 and r.json()["run_id_in_flight"] == "r-a"
            r = await c1.put("/worlds/sf/activation", json={"strategy_id": "x", "side": "long", "active": True})
            assert r.status_code == 409
            assert (await c1.get("/worlds/sf/activations")).json()["frozen"] is True

            pause.unlink()
            done = await first
            assert done.status_code == 200 and done.headers["idempotent-replayed"] == "false"
            # the same run through the other replica: the stored result, nothing applied twice
            again = await c1.post("/worlds/sf/apply", json={"run_id": "r-a", "plan": {"activate": ["a"]}})
            assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
            assert again.json() == done.json()
            r = await c1.post("/worlds/sf/apply", json={"run_id": "r-b", "plan": {"activate": ["b"], "deactivate": ["a"]}})
            assert r.status_code == 200
            audit = (await c1.get("/worlds/sf/audit", params={"limit": 100})).json()["records"]
            assert [a["request"]["run_id"] for a in audit if a["event"] == "apply.succeeded"] == ["r-b", "r-a"]


async def test_a_replica_killed_mid_apply_is_rolled_back_by_another(kafka_bootstrap, pg_schema, tmp_path):
    env = service_env("worldservice", pg_schema, kafka_bootstrap, apply_lease_seconds=4)
    extra, pause = hook(tmp_path, "switched")
    with processes(tmp_path, "worldservice", 2, env, hooked={0: extra}) as [p0, p1]:
        async with client(p0) as c0, client(p1) as c1:
            assert (await c1.post("/worlds", json={"world_id": "cw", "name": "cw"})).status_code == 201
            base = await c1.post("/worlds/cw/apply", json={"run_id": "base", "plan": {"activate": ["keep"]}})
            assert base.status_code == 200
            before = (await c1.get("/worlds/cw/activations")).json()

            pause.write_text("")
            plan = {"run_id": "r-x", "plan": {"deactivate": ["keep"], "activate": ["new"]}}
            doomed = asyncio.create_task(c0.post("/worlds/cw/apply", json=plan))
            reached = pause.with_name(pause.name + ".reached")
            await wait_until(reached.exists, timeout=30, what="replica 0 to switch the activation set")
            # switched, not unfrozen: the world is frozen with the new set written
            assert (await c1.get("/worlds/cw")).json()["apply_run_id"] == "r-x"
            # the lease (4 s) is renewed while replica 0 lives: still held after more than its length
            for _ in range(5):
                r = await c1.post("/worlds/cw/apply", json={"run_id": "r-y", "plan": {"activate": ["y"]}})
                assert r.status_code == 409 and r.json()["run_id_in_flight"] == "r-x"
                await asyncio.sleep(1.2)

            p0.stop()  # SIGKILL in the middle of the apply
            with contextlib.suppress(Exception):
                await doomed

            async def unfrozen() -> bool:
                return (await c1.get("/worlds/cw")).json()["apply_run_id"] is None

            await poll(unfrozen, what="replica 1 to roll back the apply whose lease expired")
            after = (await c1.get("/worlds/cw/activations")).json()
            assert after == before  # the previous activation set, exactly: nothing half-done
            audit = (await c1.get("/worlds/cw/audit", params={"limit": 100})).json()["records"]
            assert any(a["event"] == "apply.rolled_back" and a["request"]["run_id"] == "r-x" for a in audit)

            # the rolled-back run may be applied again (here through the surviving replica)
            r = await c1.post("/worlds/cw/apply", json=plan)
            assert r.status_code == 200 and r.headers["idempotent-replayed"] == "false"
            final = {(e["strategy_id"], e["side"]): e["active"] for e in (await c1.get("/worlds/cw/activations")).json()["activations"]}
            assert final == {("keep", "long"): False, ("keep", "short"): False, ("new", "long"): True, ("new", "short"): True}


async def test_two_replicas_publish_every_event_once_in_order_per_world(kafka_bootstrap, pg_schema, tmp_path, event_validator):
    env = service_env("worldservice", pg_schema, kafka_bootstrap)
    worlds = [f"ew{i}" for i in range(4)]
    chain = 8
    with processes(tmp_path, "worldservice", 2, env) as procs:
        async with client(procs[0]) as c0, client(procs[1]) as c1, Recorder(kafka_bootstrap, event_validator, [TOPIC_ACTIVATION]) as rec:
            clients = [c0, c1]
            for w in worlds:
                assert (await c0.post("/worlds", json={"world_id": w, "name": w})).status_code == 201

            async def writes(w: str) -> None:
                for i in range(chain):  # alternating replicas: both publishers hold rows of every world
                    body = {"strategy_id": "s", "side": "long", "active": True, "weight": (i + 1) / 100}
                    r = await clients[i % 2].put(f"/worlds/{w}/activation", json=body)
                    assert r.status_code == 200, r.text

            await asyncio.gather(*(writes(w) for w in worlds))
            await wait_until(lambda: all(len(rec.of(TOPIC_ACTIVATION, w)) >= chain for w in worlds), timeout=60,
                             what="every event")

            async def drained() -> bool:
                return all([(await c.get("/health")).json()["outbox_pending"] == 0 for c in clients])

            await poll(drained, what="both outboxes to be empty")
            await asyncio.sleep(0.5)  # a duplicate would arrive right behind its original
            for w in worlds:
                weights = [m.value["weight"] for m in rec.of(TOPIC_ACTIVATION, w)]
                assert weights == [(i + 1) / 100 for i in range(chain)]  # once each, in commit order
            published = await metric_sum(procs, "world_events_published_total", topic=TOPIC_ACTIVATION)
            assert published == chain * len(worlds)


async def test_a_burst_of_applies_through_both_replicas_runs_them_one_at_a_time(kafka_bootstrap, pg_schema, tmp_path):
    env = service_env("worldservice", pg_schema, kafka_bootstrap, apply_drain_seconds=0.2)
    runs = 12
    with processes(tmp_path, "worldservice", 2, env) as procs:
        async with client(procs[0]) as c0, client(procs[1]) as c1:
            assert (await c0.post("/worlds", json={"world_id": "bw", "name": "bw"})).status_code == 201
            everyone = [f"s{i}" for i in range(runs)]

            async def apply(i: int):
                plan = {"activate": [f"s{i}"], "deactivate": [s for s in everyone if s != f"s{i}"]}
                return await (c0, c1)[i % 2].post("/worlds/bw/apply", json={"run_id": f"r{i}", "plan": plan})

            answers = await asyncio.gather(*(apply(i) for i in range(runs)))
            codes = [a.status_code for a in answers]
            assert set(codes) <= {200, 409} and 200 in codes, [a.text for a in answers]
            winners = [i for i, a in enumerate(answers) if a.status_code == 200]
            audit = (await c1.get("/worlds/bw/audit", params={"limit": 200})).json()["records"]
            succeeded = [a["request"]["run_id"] for a in audit if a["event"] == "apply.succeeded"]
            assert sorted(succeeded) == sorted(f"r{i}" for i in winners)  # each 200 is one whole apply
            # the activation set is exactly the plan of the last apply that ran: never a mix
            active = {e["strategy_id"] for e in (await c0.get("/worlds/bw/activations")).json()["activations"] if e["active"]}
            assert active == {f"s{succeeded[0][1:]}"}
            assert (await c0.get("/worlds/bw")).json()["apply_run_id"] is None
