"""DAG Manager end to end over real HTTP (uvicorn), with a real in-process ControlBus
and a real HTTP receiver standing in for the Gateway's callback, on SQLite and on the
real PostgreSQL: diff, queue sharing, concurrency, tag index and QueueUpdated,
sentinel traffic, GC, and the errors."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from qmtl.bus.base import TOPIC_QUEUES, BusMessage
from qmtl.bus.inproc import InProcessBus
from qmtl.bus.keys import queue_key
from qmtl.common.clock import ManualClock
from qmtl.common.config import Config
from qmtl.common.nodeid import compute_node_id
from qmtl.contracts.events import event_validators
from qmtl.dagmanager import store
from qmtl.dagmanager.app import create_app, create_service
from qmtl.dagmanager.service import DagManagerService
from qmtl.dagmanager.topics import EmbeddedTopicAdmin
from qmtl.store.sql import Database, sqlite_url
from tests.helpers.server import serve

TTL = 100


@pytest.fixture(params=["sqlite", "postgres"])
def db_target(request, tmp_path):
    """(url, schema): a fresh SQLite file or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "dagmanager.db"), None
    return request.getfixturevalue("pg_schema")


class Receiver:
    """A tiny real HTTP server standing in for the Gateway's /callbacks/dag-event."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.paths: list[str] = []
        self.arrived = asyncio.Event()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        self.paths.append(scope["path"])
        self.bodies.append(json.loads(body))
        self.arrived.set()
        await send({"type": "http.response.start", "status": 202, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})

    def of(self, event: str) -> list[dict]:
        return [b["data"] for b in self.bodies if b.get("event") == event]


@dataclass
class Env:
    client: httpx.AsyncClient
    service: DagManagerService
    bus: InProcessBus
    sub: Any
    clock: ManualClock
    receiver: Receiver
    admin: EmbeddedTopicAdmin
    db: Database
    seen: list[BusMessage] = field(default_factory=list)

    async def diff(self, strategy_id: str, nodes: list[dict], **extra) -> dict:
        r = await self.client.post("/diff", json={"strategy_id": strategy_id, "dag": {"nodes": nodes}, **extra})
        assert r.status_code == 200, r.text
        return r.json()

    async def events(self) -> list[BusMessage]:
        """Every QueueUpdated published so far and not yet returned (after the notifier drained)."""
        await self.service.drain()
        out = []
        while True:
            try:
                msg = await asyncio.wait_for(self.sub.__anext__(), 0.05)
            except TimeoutError:
                return out
            out.append(msg)

    async def count(self, sql: str) -> int:
        async with self.db.connect() as conn:
            return int((await conn.execute(sa.text(sql))).scalar_one())


@pytest.fixture
async def env(db_target):
    url, schema = db_target
    db = Database(url, schema=schema)
    receiver = Receiver()
    bus = InProcessBus(validator=event_validators())
    admin = EmbeddedTopicAdmin()
    clock = ManualClock(1_000_000.0)
    async with serve(receiver) as gateway_url:
        cfg = Config()
        cfg.dagmanager.gateway_callback_url = gateway_url
        cfg.dagmanager.queue_ttl_seconds = TTL
        service = create_service(cfg, bus=bus, db=db, topic_admin=admin, clock=clock)
        async with serve(create_app(cfg, bus=bus, service=service, gc_interval=0)) as base:
            sub = await bus.subscribe([TOPIC_QUEUES], consumer_id="test", from_beginning=True)
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                yield Env(client, service, bus, sub, clock, receiver, admin, db)
            await sub.close()
    await db.close()


def node(key: str, *, tags=("price",), interval=60, node_type="Compute", code: str | None = None, **extra) -> dict:
    code_hash = code or hashlib.sha256(f"code:{key}".encode()).hexdigest()
    config_hash = hashlib.sha256(f"cfg:{key}".encode()).hexdigest()
    n = {
        "node_id": compute_node_id(node_type, code_hash, config_hash, "s1"),
        "node_type": node_type, "code_hash": code_hash, "config_hash": config_hash, "schema_hash": "s1",
        "interval": interval, "period": 10, "tags": list(tags), "inputs": [],
    }
    n.update(extra)
    return n


def tag_query(key: str, tags, interval=60, match_mode="any") -> dict:
    return node(key, tags=tags, interval=interval, node_type="TagQueryNode", match_mode=match_mode)


# -- diff ----------------------------------------------------------------------------------


async def test_diff_creates_then_reuses_queues_named_by_the_rule(env: Env):
    a, b = node("a"), node("b", tags=("btc", "price"))
    first = await env.diff("s1", [a, b], asset="btc")
    assert set(first["queue_map"]) == {a["node_id"], b["node_id"]}
    assert first["queue_map"][a["node_id"]] == f"btc_Compute_{a['code_hash'][:6]}_v1"
    assert sorted(first["new_queues"]) == sorted(first["queue_map"].values()) and first["reused_queues"] == []
    assert first["sentinel_id"] == "s1-sentinel" and first["sim"] is False
    assert set(env.admin.topics) == set(first["queue_map"].values())  # topics created through the admin

    again = await env.diff("s2", [a, b], asset="eth")  # a known node keeps its queue, whatever the asset
    assert again["queue_map"] == first["queue_map"]
    assert again["new_queues"] == [] and sorted(again["reused_queues"]) == sorted(first["new_queues"])

    r = await env.client.get("/queues")
    assert r.status_code == 200
    catalog = r.json()
    assert catalog["total"] == 2
    assert {q["topic"]: q["references"] for q in catalog["queues"]} == dict.fromkeys(first["new_queues"], 2)
    q_b = next(q for q in catalog["queues"] if q["node_id"] == b["node_id"])
    assert q_b["tags"] == ["btc", "price"] and q_b["interval"] == 60 and q_b["ttl_seconds"] == TTL

    r = await env.client.get(f"/nodes/{a['node_id']}")
    assert r.status_code == 200
    body = r.json()
    assert (body["code_hash"], body["config_hash"], body["schema_hash"]) == (a["code_hash"], a["config_hash"], "s1")
    assert body["strategies"] == ["s1", "s2"] and body["sentinels"] == ["s1-sentinel", "s2-sentinel"]
    assert [q["topic"] for q in body["queues"]] == [first["queue_map"][a["node_id"]]]
    assert (await env.client.get("/nodes/" + "0" * 64)).status_code == 404


async def test_same_node_in_two_strategies_shares_one_queue_and_dry_run_has_its_own(env: Env):
    a, b, c = node("a"), node("b"), node("c")
    r1 = await env.diff("s1", [a, b])
    r2 = await env.diff("s2", [b, c])
    assert r1["queue_map"][b["node_id"]] == r2["queue_map"][b["node_id"]]
    assert r2["reused_queues"] == [r1["queue_map"][b["node_id"]]]
    assert await env.count("SELECT count(*) FROM dm_queues") == 3

    sim = await env.diff("s3", [b], run_type="dry-run")
    topic = sim["queue_map"][b["node_id"]]
    assert topic == r1["queue_map"][b["node_id"]] + "_sim" and sim["new_queues"] == [topic] and sim["sim"] is True
    assert (await env.diff("s4", [b], run_type="dry-run"))["reused_queues"] == [topic]
    assert await env.count("SELECT count(*) FROM dm_queues") == 4


async def test_a_name_clash_lengthens_the_short_hash(env: Env):
    shared = hashlib.sha256(b"same-prefix").hexdigest()
    a = node("a", code=shared)
    b = node("b", code=shared[:6] + "ff" + shared[8:])  # same first 6 hex, different code
    ra = await env.diff("s1", [a])
    rb = await env.diff("s2", [b])
    assert ra["queue_map"][a["node_id"]] == f"qmtl_Compute_{shared[:6]}_v1"
    assert rb["queue_map"][b["node_id"]] == f"qmtl_Compute_{shared[:6]}ff_v1"


@pytest.mark.parametrize("returning_rows", [1000, 1])
async def test_a_dag_of_clashing_names_gets_the_same_queues_whether_inserts_return_rows_or_are_read_back(
        env: Env, monkeypatch, returning_rows: int):
    """SQLite binds up to ``SQLITE_RETURNING_ROWS`` rows into an INSERT … RETURNING and reads
    back beyond that; both ways name, create and reuse queues alike (PostgreSQL: one way)."""
    monkeypatch.setattr(store, "SQLITE_RETURNING_ROWS", returning_rows)
    shared = hashlib.sha256(b"clash").hexdigest()
    nodes = [node("c0", code=shared), node("c1", code=shared[:6] + "ff" + shared[8:]), node("c2"), node("c3")]
    first = await env.diff("s-rb1", nodes)
    assert sorted(first["new_queues"]) == sorted(first["queue_map"].values()) and len(set(first["new_queues"])) == 4
    short = f"qmtl_Compute_{shared[:6]}_v1"
    names = sorted((first["queue_map"][n["node_id"]] for n in nodes[:2]), key=len)
    assert names[0] == short and names[1].startswith(f"qmtl_Compute_{shared[:6]}") and len(names[1]) == len(short) + 2
    again = await env.diff("s-rb2", nodes)
    assert again["new_queues"] == [] and again["queue_map"] == first["queue_map"]
    assert await env.count("SELECT count(*) FROM dm_queue_tags") == 4


async def test_twenty_concurrent_diffs_of_overlapping_dags_create_no_duplicate_queue(env: Env):
    pool = [node(f"n{i}", tags=("price", f"t{i % 3}")) for i in range(60)]
    # each DAG: a common core of 20 nodes plus a window of 20 sliding by 2 (heavy overlap)
    dags = [pool[:20] + pool[20 + 2 * i : 40 + 2 * i] for i in range(20)]
    results = await asyncio.gather(*(env.diff(f"c{i}", dag) for i, dag in enumerate(dags)))

    used = {n["node_id"] for dag in dags for n in dag}
    assert await env.count("SELECT count(*) FROM dm_queues") == len(used)
    assert await env.count("SELECT count(DISTINCT topic) FROM dm_queues") == len(used)
    assert await env.count("SELECT count(*) FROM dm_nodes") == len(used)
    topic_of: dict[str, str] = {}
    for result in results:
        for node_id, topic in result["queue_map"].items():
            assert topic_of.setdefault(node_id, topic) == topic  # every diff sees the same queue
    created = [t for r in results for t in r["new_queues"]]
    assert sorted(created) == sorted(set(topic_of.values()))  # each queue reported new exactly once
    assert set(env.admin.topics) == set(topic_of.values())
    assert all(set(r["queue_map"].values()) == set(r["new_queues"]) | set(r["reused_queues"]) for r in results)


async def test_rediff_replaces_references_and_a_sentinel_node_names_the_sentinel(env: Env):
    a, b = node("a"), node("b")
    sentinel = {"node_id": "s1-v2", "node_type": "VersionSentinel", "version": "v2"}
    r = await env.diff("s1", [a, b, sentinel])
    assert r["sentinel_id"] == "s1-v2" and r["version"] == "v2"
    assert r["queue_map"][a["node_id"]].endswith("_v2") and sentinel["node_id"] not in r["queue_map"]
    r = await env.diff("s1", [a, sentinel])
    s = (await env.client.get("/sentinels/s1-v2")).json()
    assert s["nodes"] == 1 and s["strategy_id"] == "s1"
    assert (await env.client.get(f"/nodes/{b['node_id']}")).json()["strategies"] == []
    # another strategy may not take over this sentinel
    r = await env.client.post("/diff", json={"strategy_id": "s2", "dag": {"nodes": [a, sentinel]}})
    assert r.status_code == 409 and r.headers["content-type"].startswith("application/problem+json")


# -- tag index and QueueUpdated --------------------------------------------------------------------


async def test_queues_by_tag_any_all_alias_and_precedence(env: Env):
    q1, q2, q3 = node("q1", tags=("a",)), node("q2", tags=("a", "b")), node("q3", tags=("b",))
    q4 = node("q4", tags=("a", "b"), interval=30)
    r = await env.diff("s1", [q1, q2, q3, q4])
    t = r["queue_map"]

    async def by_tag(**params) -> list[str]:
        resp = await env.client.get("/queues/by_tag", params=params)
        assert resp.status_code == 200, resp.text
        return resp.json()["queues"]

    any_set = sorted([t[q1["node_id"]], t[q2["node_id"]], t[q3["node_id"]]])
    assert await by_tag(tags="a,b", interval=60) == any_set  # default any
    assert await by_tag(tags="a,b", interval=60, match_mode="any") == any_set
    assert await by_tag(tags="a,b", interval=60, match_mode="all") == [t[q2["node_id"]]]
    assert await by_tag(tags="b, a", interval=60, match="all") == [t[q2["node_id"]]]  # deprecated alias
    assert await by_tag(tags="a,b", interval=60, match_mode="any", match="all") == any_set  # match_mode wins
    assert await by_tag(tags="a,b", interval=60, match_mode="all", match="any") == [t[q2["node_id"]]]
    assert await by_tag(tags="a,b", interval=30, match_mode="all") == [t[q4["node_id"]]]
    assert await by_tag(tags="zzz", interval=60) == []
    body = (await env.client.get("/queues/by_tag", params={"tags": "a", "interval": 60})).json()
    assert body["match_mode"] == "any" and body["etag"].startswith("q-")
    bad = await env.client.get("/queues/by_tag", params={"tags": "a", "interval": 60, "match_mode": "some"})
    assert bad.status_code == 400 and bad.headers["content-type"].startswith("application/problem+json")
    assert (await env.client.get("/queues/by_tag", params={"interval": 60})).status_code == 400
    assert (await env.client.get("/queues/by_tag", params={"tags": " , ", "interval": 60})).status_code == 400
    # a TagQueryNode gets its matching queues in the diff
    r = await env.diff("s2", [tag_query("tq", ("a", "b"), match_mode="all")])
    assert list(r["tag_queries"].values()) == [[t[q2["node_id"]]]] and r["queue_map"] == {}


async def test_queue_updated_is_published_when_a_watched_set_changes_and_not_otherwise(env: Env):
    base = node("base", tags=("a",))
    await env.diff("s0", [base])
    for params in ({"tags": "a", "interval": 60}, {"tags": "a,b", "interval": 60, "match_mode": "all"}):
        assert (await env.client.get("/queues/by_tag", params=params)).status_code == 200
    assert await env.events() == []  # asking registers a watch; it announces nothing

    await env.diff("s1", [node("other", tags=("zzz",)), base])  # no watched set changes
    await env.client.get("/queues/by_tag", params={"tags": "a", "interval": 60})  # asked again: still nothing
    assert await env.events() == []

    r = await env.diff("s2", [node("new-a", tags=("a",))])  # (a, 60, any) grows; (a+b, all) does not
    new_topic = r["new_queues"][0]
    events = await env.events()
    assert len(events) == 1
    ev = events[0]
    assert ev.topic == TOPIC_QUEUES and ev.key == queue_key(["a"], 60)
    assert ev.value["type"] == "QueueUpdated" and ev.value["version"] == 1
    assert ev.value["tags"] == ["a"] and ev.value["interval"] == 60
    assert sorted(ev.value["queues"]) == sorted([new_topic, (await env.diff("s0", [base]))["queue_map"][base["node_id"]]])
    listed = (await env.client.get("/queues/by_tag", params={"tags": "a", "interval": 60})).json()
    assert listed["etag"] == ev.value["etag"] and listed["queues"] == ev.value["queues"]
    # the legacy callback carries the same set
    data = env.receiver.of("queue_update")
    assert data == [{"tags": ["a"], "interval": 60, "queues": ev.value["queues"], "match_mode": "any", "etag": ev.value["etag"]}]
    assert env.receiver.paths == ["/callbacks/dag-event"]

    await env.diff("s3", [node("new-a", tags=("a",))])  # reusing a queue changes no set
    assert await env.events() == []

    # a TagQueryNode's key is watched too
    await env.diff("s4", [tag_query("tq", ("c",), interval=60)])
    assert await env.events() == []
    await env.diff("s5", [node("new-c", tags=("c",))])
    (ev,) = await env.events()
    assert ev.value["tags"] == ["c"] and len(ev.value["queues"]) == 1
    assert env.bus.invalid_events == 0


# -- sentinel traffic ---------------------------------------------------------------------------------


async def test_sentinel_traffic_is_stored_and_relayed_to_the_gateway(env: Env):
    await env.diff("s1", [node("a")], version="v1")
    await env.diff("s2", [node("b")], version="v1")
    r = await env.client.post("/callbacks/sentinel-traffic", json={"sentinel_id": "s1-sentinel", "weight": 0.25})
    assert r.status_code == 202, r.text
    stored = r.json()
    assert stored["sentinel_id"] == "s1-sentinel" and stored["weight"] == 0.25 and stored["relayed"] is True
    s = (await env.client.get("/sentinels/s1-sentinel")).json()
    assert s["weight"] == 0.25 and s["weight_updated_at"] == stored["ts"] and s["version"] == "v1"

    await env.service.drain()
    assert env.receiver.of("sentinel_weight") == [{"sentinel_id": "s1-sentinel", "weight": 0.25, "ts": stored["ts"]}]

    r = await env.client.post("/callbacks/sentinel-traffic", json={"sentinel_id": "s1-sentinel", "weight": 0.75})
    assert r.json()["previous_weight"] == 0.25
    # by version (legacy): ambiguous when two strategies share it; by id when it is one
    r = await env.client.post("/callbacks/sentinel-traffic", json={"version": "v1", "weight": 1})
    assert r.status_code == 409 and sorted(r.json()["sentinels"]) == ["s1-sentinel", "s2-sentinel"]
    r = await env.client.post("/callbacks/sentinel-traffic", json={"version": "s2-sentinel", "weight": 1})
    assert r.status_code == 202 and r.json()["sentinel_id"] == "s2-sentinel"
    r = await env.client.post("/callbacks/sentinel-traffic", json={"sentinel_id": "nope", "weight": 0.5})
    assert r.status_code == 404
    r = await env.client.post("/callbacks/sentinel-traffic", json={"sentinel_id": "s1-sentinel", "weight": 1.5})
    assert r.status_code == 422 and r.json()["errors"][0]["pointer"] == "/weight"
    r = await env.client.post("/callbacks/sentinel-traffic", json={"weight": 0.5})
    assert r.status_code == 422
    await env.service.drain()
    assert [d["weight"] for d in env.receiver.of("sentinel_weight")] == [0.25, 0.75, 1.0]


# -- GC ---------------------------------------------------------------------------------------------------


async def test_gc_collects_only_queues_unreferenced_past_their_ttl(env: Env):
    a, b, c = node("a", tags=("a",)), node("b", tags=("a",)), node("c", tags=("a",))
    r1 = await env.diff("s1", [a, b])
    r2 = await env.diff("s2", [b, c])
    topic = {**r1["queue_map"], **r2["queue_map"]}
    await env.client.get("/queues/by_tag", params={"tags": "a", "interval": 60})  # watch (a, 60, any)

    env.clock.advance(10 * TTL)  # everything is old, but everything is referenced
    assert (await env.client.post("/gc")).json()["collected"] == []

    released = await env.client.delete("/strategies/s1")
    assert released.status_code == 200
    assert released.json()["released_queues"] == [topic[a["node_id"]]]  # b is still held by s2
    assert (await env.client.delete("/strategies/s1")).status_code == 404

    env.clock.advance(TTL / 2)
    assert (await env.client.post("/gc")).json()["collected"] == []  # a released, TTL not over
    env.clock.advance(TTL / 2 + 1)
    report = (await env.client.post("/gc")).json()
    assert [c_["topic"] for c_ in report["collected"]] == [topic[a["node_id"]]]
    assert report["collected"][0]["node_id"] == a["node_id"]

    left = {q["topic"] for q in (await env.client.get("/queues")).json()["queues"]}
    assert left == {topic[b["node_id"]], topic[c["node_id"]]}
    assert (await env.client.get(f"/nodes/{a['node_id']}")).status_code == 404
    assert topic[a["node_id"]] not in env.admin.topics  # the topic was deleted too
    (ev,) = await env.events()  # the watched set lost a queue
    assert sorted(ev.value["queues"]) == sorted([topic[b["node_id"]], topic[c["node_id"]]])

    # re-diffing s2 without c releases c (now); it goes one TTL later, b never does
    await env.diff("s2", [b])
    env.clock.advance(TTL + 1)
    assert [x["topic"] for x in (await env.client.post("/gc")).json()["collected"]] == [topic[c["node_id"]]]
    env.clock.advance(10 * TTL)
    assert (await env.client.post("/gc")).json()["collected"] == []
    # a collected node comes back as new
    again = await env.diff("s9", [a])
    assert again["new_queues"] == [topic[a["node_id"]]]


# -- errors, ops -------------------------------------------------------------------------------------------


async def test_a_bad_dag_gets_422_with_error_paths(env: Env):
    missing = node("x")
    del missing["code_hash"]
    r = await env.client.post("/diff", json={"strategy_id": "s1", "dag": {"nodes": [node("ok"), missing]}})
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert {"pointer": "/dag/nodes/1", "message": "'code_hash' is a required property"} in problem["errors"]
    assert problem["correlation_id"] == r.headers["x-correlation-id"]

    tq = tag_query("tq", ("a",))
    tq["match_mode"] = "some"
    r = await env.client.post("/diff", json={"strategy_id": "s1", "dag": {"nodes": [tq]}})
    assert r.status_code == 422 and any(e["pointer"] == "/dag/nodes/0/match_mode" for e in r.json()["errors"]), r.text

    r = await env.client.post("/diff", json={"strategy_id": "s1", "dag": {"nodes": [node("x", interval="60")]}})
    assert r.status_code == 422 and r.json()["errors"][0]["pointer"] == "/dag/nodes/0/interval"

    dup = node("d")
    r = await env.client.post("/diff", json={"strategy_id": "s1", "dag": {"nodes": [dup, node("e"), dup]}})
    assert r.status_code == 422 and r.json()["errors"][0]["pointer"] == "/dag/nodes/2/node_id"

    r = await env.client.post("/diff", json={"strategy_id": "s1", "dag": {"nodes": []}})
    assert r.status_code == 422 and r.json()["errors"][0]["pointer"] == "/dag/nodes"
    r = await env.client.post("/diff", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = await env.client.post("/diff", content=b"x", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    assert await env.count("SELECT count(*) FROM dm_queues") == 0  # nothing was half-written


async def test_a_tag_query_node_without_match_mode_is_any(env: Env):
    """The Aug-2025 SDK never sent match_mode: the schema's default (`any`) applies (issue 12)."""
    await env.diff("s0", [node("p", tags=("a",))])
    tq = tag_query("tq", ("a", "b"))
    del tq["match_mode"]
    r = await env.client.post("/diff", json={"strategy_id": "s1", "dag": {"nodes": [tq]}})
    assert r.status_code == 200, r.text
    assert len(r.json()["tag_queries"][tq["node_id"]]) == 1  # `any`: the queue tagged only "a" matches


async def test_health_and_metrics(env: Env):
    await env.diff("s1", [node("a")])
    r = await env.client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "database": "ok", "topic_admin": "embedded", "queues": 1,
                                                "outbox_pending": 0, "outbox_oldest_age_seconds": 0.0}
    r = await env.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "diff_duration_ms_count 1.0" in r.text and "dm_queues_created_total 1.0" in r.text


async def test_an_unreachable_database_answers_503_with_retry_after(pg_schema):
    from tests.helpers.server import free_port

    url, schema = pg_schema
    db = Database(url, schema=schema)
    app = create_app(Config(), bus=InProcessBus(validator=event_validators()), db=db,
                     topic_admin=EmbeddedTopicAdmin(), gc_interval=0)
    up = db.engine
    gone = Database(f"postgresql://postgres@127.0.0.1:{free_port()}/test", schema=schema)  # nothing listens
    try:
        async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=30) as client:
            db.engine = gone.engine  # the database goes away after start (every part of the service shares db)
            r = await client.get("/health")
            assert r.status_code == 503 and r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["database"] == "down"
            r = await client.post("/diff", json={"strategy_id": "s1", "dag": {"nodes": [node("a")]}})
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
            r = await client.get("/queues/by_tag", params={"tags": "a", "interval": 60})
            assert r.status_code == 503
            assert (await client.post("/gc")).status_code == 503
            db.engine = up
            assert (await client.get("/health")).status_code == 200
    finally:
        await gone.close()
        await db.close()
