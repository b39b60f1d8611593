"""The production topology (SPEC §1, issue 11): 2 Gateways + 2 WorldServices + 2 DAG Managers
as separate OS processes on the machine's Redis and PostgreSQL and the Kafka mock cluster,
under a steady light load of submissions, decides and one ``/ws/evt`` subscriber per Gateway.

* a policy change through one Gateway is answered by every Gateway's decide once the
  PolicyUpdated has been consumed (polled; no timing is asserted);
* ``kill -9`` of one replica of each service in turn, then its restart: every accepted
  submission (202, or 409 naming an earlier acceptance) reaches ``completed``; every
  subscriber ends with exactly WorldService's activation state (it reconnects to the other
  Gateway with the same token — the signing keys are shared — and resumes); the restarted
  replica is ready again and serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import Callable

import httpx
import pytest

from qmtl.common.config import WorldServiceConfig
from qmtl.sdk import Dag, EventStream, GatewayClient, Node, StreamOptions
from qmtl.sdk.errors import Conflict, ProblemError, QmtlError
from tests.conftest import REDIS_URL
from tests.sdk.live import wait_until
from tests.sdk.test_production_stack import fresh_database  # noqa: F401 - fixture
from tests.topology.cluster import Topology

POLICY = "hysteresis: {promote_after: 1, max_mode: dryrun}\n"


@pytest.fixture
async def redis_prefix():
    import redis.asyncio as aioredis

    prefix = f"topo:{uuid.uuid4().hex[:10]}:"
    yield prefix
    kv = aioredis.Redis.from_url(REDIS_URL)
    keys = [k async for k in kv.scan_iter(match=prefix + "*")]
    if keys:
        await kv.delete(*keys)
    await kv.aclose()


@pytest.fixture
def topology(tmp_path, fresh_kafka_cluster, fresh_database, redis_prefix):
    topo = Topology(tmp_path, replicas=2, bootstrap=fresh_kafka_cluster.bootstrap_servers, database_url=fresh_database,
                    redis_url=REDIS_URL, kv_prefix=redis_prefix)
    try:
        topo.start()
        yield topo
    finally:
        topo.stop()


# WorldService replicas recover an apply whose process died by a lease on the world
# (worldservice.apply_lease_seconds): a short one here, long enough for a loaded machine's
# stalls not to expire a live replica's lease (renewed every third of it).
LEASE_ENV = {"QMTL__WORLDSERVICE__APPLY_LEASE_SECONDS": "4"} if hasattr(WorldServiceConfig(), "apply_lease_seconds") else {}


class Load:
    """Submissions alternating between the Gateways, decides on every Gateway."""

    def __init__(self, urls: list[str], world_id: str) -> None:
        self.clients = [GatewayClient(u, timeout=5, retries=2) for u in urls]
        self.http = [httpx.AsyncClient(base_url=u, timeout=5) for u in urls]
        self.world_id = world_id
        self.accepted: dict[str, int] = {}  # strategy_id -> Gateway index that acknowledged it
        self.refused = 0  # submissions no Gateway acknowledged (none is counted as accepted)
        self.decides = dict.fromkeys(range(len(urls)), 0)
        self._n = itertools.count()
        self._tasks: list[asyncio.Task] = []

    async def _submit_one(self) -> None:
        n = next(self._n)
        dag = Dag([Node("StreamInput", code=f"topology feed {self.world_id} {n}", interval=60, period=2, tags=[f"topo-{n % 5}"])])
        for attempt in range(len(self.clients) * 2):
            i = (n + attempt) % len(self.clients)
            try:
                ack = await self.clients[i].submit_strategy(dag, run_type="backtest", world_id=self.world_id)
            except Conflict as exc:  # accepted before (the answer to an earlier attempt was lost)
                self.accepted[exc.strategy_id] = i
                return
            except QmtlError:
                await asyncio.sleep(0.2)
                continue
            self.accepted[ack["strategy_id"]] = i
            return
        self.refused += 1

    async def _submitter(self) -> None:
        while True:
            await self._submit_one()
            await asyncio.sleep(0.25)

    async def _decider(self, i: int) -> None:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                r = await self.http[i].get(f"/worlds/{self.world_id}/decide")
                if r.status_code == 200:
                    self.decides[i] += 1
            await asyncio.sleep(0.1)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._submitter())]
        self._tasks += [asyncio.create_task(self._decider(i)) for i in range(len(self.http))]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def aclose(self) -> None:
        await self.stop()
        for c in (*self.clients, *self.http):
            await c.aclose()


async def retry(fn: Callable, what: str, timeout: float = 30.0):
    """A write through the Gateways while a replica may be down: retried until it answers."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await fn()
        except (QmtlError, ProblemError) as exc:
            if isinstance(exc, ProblemError) and exc.status < 500:
                raise
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{what}: no success within {timeout}s ({exc!r})") from exc
            await asyncio.sleep(0.3)


async def policy_versions(http: list[httpx.AsyncClient], world_id: str, *, cached: bool = False) -> list[int | None]:
    """Each Gateway's decided policy version (None: no answer, a safe default, or not a cache hit when ``cached``)."""
    out: list[int | None] = []
    for c in http:
        try:
            r = await c.get(f"/worlds/{world_id}/decide")
        except httpx.HTTPError:
            out.append(None)
            continue
        how = r.headers.get("x-qmtl-cache")
        usable = r.status_code == 200 and how != "safe-default" and (how == "hit" or not cached)
        out.append(r.json().get("policy_version") if usable else None)
    return out


async def test_two_of_every_service_no_stale_decide_nothing_lost_through_kill_9(topology):
    g1, g2 = topology.gateways()
    w = "topo-" + uuid.uuid4().hex[:8]
    load = Load([g1.url, g2.url], w)
    admin = load.clients
    streams: list[EventStream] = []
    try:
        await admin[0].create_world(w, "topology")
        await admin[0].create_policy(w, POLICY, set_default=True)
        # Both Gateways answer policy v1 from their cache.
        await wait_until(lambda: settled(load.http, w, 1, cached=True), 30, what="policy v1 cached on both Gateways")

        for client in admin:  # one /ws/evt subscriber per Gateway, falling back to the other one
            stream = EventStream(client, world_id=w, topics=["activation", "policy"],
                                 options=StreamOptions(reconnect_max=0.5, fallback_after=1))
            await stream.__aenter__()
            streams.append(stream)
        for s in streams:
            await s.wait_synced(30)
        load.start()

        # A policy change through g1 reaches g2's decide once g2 consumed the PolicyUpdated
        # (g2's cache would otherwise answer v1 for its 300 s ttl).
        await admin[0].create_policy(w, POLICY + "# v2\n", set_default=True)
        await wait_until(lambda: settled(load.http, w, 2), 30, what="policy v2 on every Gateway")

        activated: list[str] = []
        for victim in ("ws1", "dm1", "g1"):
            topology.kill(victim)
            # Work goes on meanwhile: an apply (one more strategy active) and submissions.
            sid = f"strat-{victim}-{uuid.uuid4().hex[:6]}"
            live = admin[1]  # g2 is up in every round
            await retry(lambda live=live, sid=sid: live.apply(w, {"activate": [sid]}, consent_live=True), f"apply while {victim} is down")
            activated.append(sid)
            await _more_submissions(load, 3)
            topology.start(victim)  # rejoins: ready (consumer caught up, dependencies answer)
            proc = topology.procs[victim]
            assert proc.starts == 2 and proc.ready()

        await _more_submissions(load, 3)
        await load.stop()
        # 0 accepted submissions lost: every acknowledged strategy completes (read through either Gateway).
        assert load.accepted, "no submission was accepted"
        pending = dict(load.accepted)

        async def all_completed() -> bool:
            for sid in list(pending):
                with contextlib.suppress(QmtlError, ProblemError):
                    if (await admin[hash(sid) % 2].strategy_status(sid))["status"] == "completed":
                        del pending[sid]
            return not pending

        await wait_until(all_completed, 90, interval=0.5, what=f"every accepted submission completed ({len(pending)} left)")

        # 0 events missing: each subscriber holds exactly WorldService's activation set.
        truth = await admin[1].list_activations(w)
        assert {(a["strategy_id"], a["side"]) for a in truth["activations"] if a["active"]} == {
            (s, side) for s in activated for side in ("long", "short")}
        for s in streams:
            await wait_until(lambda s=s: s.state.activation_hash(w) == truth["state_hash"], 30,
                             what="the subscriber's activation state to match WorldService")
            assert s.stats.hash_mismatches == 0
            for sid in activated:
                assert (s.state.activation_entry(w, sid, "long") or {}).get("active") is True
        # The subscriber of g1 lived through g1's kill -9 on g2 (with g1's token: shared keys).
        assert streams[0].stats.fallback_connects >= 1 and streams[0].stats.connects >= 2
        # Every replica answers the latest policy, the restarted g1 included.
        assert await settled(load.http, w, 2)
        assert all(n > 0 for n in load.decides.values())
        print(f"\ntopology: {len(load.accepted)} submissions accepted and completed ({load.refused} refused), decides per "
              f"Gateway {load.decides}, subscribers {[vars(s.stats) for s in streams]}")
    finally:
        for s in streams:
            with contextlib.suppress(Exception):
                await s.__aexit__(None, None, None)
        await load.aclose()


async def _more_submissions(load: Load, n: int) -> None:
    target = len(load.accepted) + load.refused + n
    await wait_until(lambda: len(load.accepted) + load.refused >= target, 60, what=f"{n} more submissions")


async def settled(http: list[httpx.AsyncClient], world_id: str, version: int, *, cached: bool = False) -> bool:
    return all(v == version for v in await policy_versions(http, world_id, cached=cached))


async def test_an_apply_cut_by_kill_9_is_not_left_half_done(tmp_path, fresh_kafka_cluster, fresh_database):
    """Two WorldServices on one database: the one running an apply is killed while the world
    is frozen; the other one, while the first stays down, leaves the world unfrozen with the
    activation set either before or after the plan (never a mix), and the same run_id applied
    again through the load balancer completes."""
    topo = Topology(tmp_path, replicas=2, bootstrap=fresh_kafka_cluster.bootstrap_servers, database_url=fresh_database,
                    redis_url=REDIS_URL, kv_prefix="unused:",
                    extra={"worldservice": {"QMTL__WORLDSERVICE__APPLY_DRAIN_SECONDS": "3", **LEASE_ENV}})
    try:
        topo.start("ws1", "ws2")
        ws1, ws2 = topo.procs["ws1"], topo.procs["ws2"]
        w = "apply-" + uuid.uuid4().hex[:8]
        async with httpx.AsyncClient(base_url=topo.ws_lb.url, timeout=30) as lb, \
                httpx.AsyncClient(base_url=ws1.url, timeout=30) as c1, httpx.AsyncClient(base_url=ws2.url, timeout=30) as c2:
            assert (await lb.post("/worlds", json={"world_id": w, "name": w})).status_code == 201
            r = await lb.post(f"/worlds/{w}/apply", json={"run_id": "r0", "plan": {"activate": ["s0"]}})
            assert r.status_code == 200, r.text
            before = {("s0", "long"), ("s0", "short")}
            after = {("s1", "long"), ("s1", "short")}
            plan = {"run_id": "r1", "plan": {"activate": ["s1"], "deactivate": ["s0"]}}
            cut = asyncio.create_task(c1.post(f"/worlds/{w}/apply", json=plan))

            async def frozen() -> bool:
                return (await c2.get(f"/worlds/{w}/activations")).json()["frozen"]

            await wait_until(frozen, 10, what="the apply on ws1 to freeze the world")
            topo.kill("ws1")
            with contextlib.suppress(httpx.HTTPError):
                await cut

            async def settled() -> set | None:
                body = (await c2.get(f"/worlds/{w}/activations")).json()
                active = {(a["strategy_id"], a["side"]) for a in body["activations"] if a["active"]}
                return None if body["frozen"] else active

            state = await wait_until(settled, 30, interval=0.5,
                                     what="ws2 to unfreeze the world left frozen by the killed ws1 (needs WorldService leases)")
            assert state in (before, after), f"apply left half-done: {state}"
            r = await lb.post(f"/worlds/{w}/apply", json=plan)  # the same run again: completes (or was complete)
            assert r.status_code == 200, r.text
            assert await settled() == after
            topo.start("ws1")  # rejoins
            assert (await c1.get(f"/worlds/{w}/activations")).json()["frozen"] is False
    finally:
        topo.stop()
