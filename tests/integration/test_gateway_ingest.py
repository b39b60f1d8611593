"""POST /strategies and GET /strategies/{id}/status end to end over HTTP, with real Redis,
real PostgreSQL and a real DAG Manager (SPEC §2)."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from tests.helpers.ingest_stack import ingest_stack, node, submission, tag_query

pytestmark = [pytest.mark.redis, pytest.mark.postgres]


async def test_accepted_submission_runs_the_fsm_to_completed(redis_kv, pg_schema):
    async with ingest_stack(redis_kv, pg_schema) as s:
        a = node("Compute", "aa11")
        b = node("Compute", "bb22", inputs=[a["node_id"]], tags=["btc", "sma"])
        r = await s.submit([a, b], world_id="crypto-mom")
        assert r.status_code == 202, r.text
        ack = r.json()
        sid = ack["strategy_id"]
        assert r.headers["location"] == f"/strategies/{sid}/status"
        assert ack["sentinel_id"] == f"{sid}-sentinel"
        assert ack["queue_map"] == {}  # no TagQueryNode

        st = await s.wait_status(sid)
        assert st["status"] == "completed"
        assert set(st["queue_map"]) == {a["node_id"], b["node_id"]}  # the sentinel has no queue
        assert st["queue_map"][a["node_id"]].startswith("qmtl_Compute_aa11")
        assert st["sentinel_id"] == ack["sentinel_id"]
        assert st["world_id"] == "crypto-mom" and st["run_type"] == "live"
        # the mirror: append-only, every transition in order
        assert await s.history(sid) == ["queued", "processing", "diffed", "completed"]
        # the stored DAG carries the sentinel, wired to every node
        record = await s.ingest.store.record(sid)
        sentinel = record.dag["nodes"][-1]
        assert sentinel == {"node_id": f"{sid}-sentinel", "node_type": "VersionSentinel", "inputs": [a["node_id"], b["node_id"]]}
        # the DAG Manager knows the sentinel and its edges
        r = await s.dm_get(f"/sentinels/{sid}-sentinel")
        assert r.status_code == 200 and r.json()["strategy_id"] == sid
        # progress and queue_map frames were relayed, keyed by strategy id
        frames = [(t, d) for t, d, key, _w in s.relay.frames if key == sid]
        assert [d["status"] for t, d in frames if t == "progress"] == ["queued", "processing", "diffed", "completed"]
        qm = [d for t, d in frames if t == "queue_map"]
        assert len(qm) == 1 and qm[0]["queue_map"] == st["queue_map"]
        assert all(w == "crypto-mom" for _t, _d, key, w in s.relay.frames if key == sid)
        # metrics
        text = (await s.client.get("/metrics")).text
        assert "lost_requests_total 0.0" in text
        assert "gateway_e2e_latency_ms_count 1.0" in text
        assert 'gateway_ingest_fsm_total{state="completed"} 1.0' in text
        assert "gateway_ingest_relay_errors_total 0.0" in text  # the event stream took every frame


async def test_raw_json_dag_is_accepted_and_sentinel_can_be_turned_off(redis_kv, pg_schema):
    async with ingest_stack(redis_kv, pg_schema, insert_sentinel=False) as s:
        a = node("Compute", "raw1")
        r = await s.submit([a], raw=True)
        assert r.status_code == 202, r.text
        ack = r.json()
        assert "sentinel_id" not in ack
        st = await s.wait_status(ack["strategy_id"])
        assert st["status"] == "completed"
        record = await s.ingest.store.record(ack["strategy_id"])
        assert [n["node_type"] for n in record.dag["nodes"]] == ["Compute"]


async def test_rejections_in_order_and_nothing_reaches_the_diff(redis_kv, pg_schema):
    async with ingest_stack(redis_kv, pg_schema) as s:
        good = node("Compute", "g00d")

        # body schema → 422 (Connexion, pointer into the body)
        body = submission([good])
        del body["run_type"]
        r = await s.client.post("/strategies", json=body)
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
        assert any("run_type" in e["message"] for e in r.json()["errors"])

        # neither base64 nor JSON → 400
        r = await s.client.post("/strategies", json={**submission([good]), "dag_json": "%%% not a dag %%%"})
        assert r.status_code == 400
        assert "neither base64" in r.json()["detail"]

        # CRC guard → 400 naming expected and received
        r = await s.submit([good], crc=12345)
        assert r.status_code == 400
        p = r.json()
        assert p["received"] == 12345 and p["expected"] != 12345 and str(p["expected"]) in p["detail"]

        # DAG schema → 422 with pointers into the decoded DAG, under /dag_json
        bad = dict(good, interval=-5, tags="btc")
        r = await s.submit([bad])
        assert r.status_code == 422
        pointers = {e["pointer"] for e in r.json()["errors"]}
        assert {"/dag_json/nodes/0/interval", "/dag_json/nodes/0/tags"} <= pointers

        # NodeID: every offending node listed (wrong id, missing field), in one 400
        wrong = dict(node("Compute", "w1"), node_id="0" * 64)
        seed_era = node("Compute", "s1")
        del seed_era["config_hash"]
        fine = node("Compute", "f1")
        r = await s.submit([fine, wrong, seed_era])
        assert r.status_code == 400, r.text
        p = r.json()
        assert p["nodes"] == [
            {"index": 1, "node_id": "0" * 64, "expected": node("Compute", "w1")["node_id"]},
            {"index": 2, "node_id": seed_era["node_id"], "missing_fields": ["config_hash"]},
        ]
        assert [e["pointer"] for e in p["errors"]] == ["/dag_json/nodes/1/node_id", "/dag_json/nodes/2"]
        assert "config_hash" in p["errors"][1]["message"]

        # a node id used twice → 422
        r = await s.submit([good, good])
        assert r.status_code == 422 and r.json()["errors"][0]["pointer"] == "/dag_json/nodes/1/node_id"

        # none of the rejected submissions reached the DAG Manager, nor got stored
        assert s.tap.count("/diff") == 0
        assert await s.ingest.store.counts() == {}

        # and a good one does
        r = await s.submit([good])
        assert r.status_code == 202
        await s.wait_status(r.json()["strategy_id"])
        assert s.tap.count("/diff") == 1


async def test_duplicate_dag_is_409_with_the_first_strategy_id(redis_kv, pg_schema):
    async with ingest_stack(redis_kv, pg_schema) as s:
        nodes = [node("Compute", "dup1")]
        first = await s.submit(nodes)
        assert first.status_code == 202
        sid = first.json()["strategy_id"]
        # same content, sent raw this time and with another run type: still the same DAG
        again = await s.submit(nodes, raw=True, run_type="backtest")
        assert again.status_code == 409
        assert again.headers["content-type"] == "application/problem+json"
        body = again.json()
        assert body["strategy_id"] == sid and body["status"] == 409
        assert again.headers["location"] == f"/strategies/{sid}/status"
        # key order inside the DAG does not make it a different DAG
        reordered = {k: nodes[0][k] for k in sorted(nodes[0], reverse=True)}
        r = await s.client.post("/strategies", json={**submission(nodes), "dag_json": json.dumps({"nodes": [reordered]})})
        assert r.status_code == 409 and r.json()["strategy_id"] == sid
        # concurrent duplicates: exactly one is accepted
        other = [node("Compute", "dup2")]
        rs = await asyncio.gather(*(s.submit(other) for _ in range(8)))
        codes = sorted(r.status_code for r in rs)
        assert codes == [202] + [409] * 7
        winner = next(r.json()["strategy_id"] for r in rs if r.status_code == 202)
        assert {r.json()["strategy_id"] for r in rs} == {winner}


async def test_unknown_strategy_status_is_404(redis_kv, pg_schema):
    async with ingest_stack(redis_kv, pg_schema) as s:
        r = await s.client.get("/strategies/s-doesnotexist/status")
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"


async def test_tag_query_node_gets_its_queue_map(redis_kv, pg_schema):
    async with ingest_stack(redis_kv, pg_schema) as s:
        price = node("Compute", "pr1ce", tags=["btc", "price"])
        vol = node("Compute", "v0l", tags=["eth", "volume"])
        r1 = await s.submit([price, vol])
        st1 = await s.wait_status(r1.json()["strategy_id"])
        btc_topic = st1["queue_map"][price["node_id"]]

        q_any = tag_query("q1", ["price", "volume"], match_mode="any")
        q_all = tag_query("q2", ["btc", "price"], match_mode="all")
        q_none = tag_query("q3", ["btc", "volume"], match_mode="all")
        r2 = await s.submit([q_any, q_all, q_none])
        assert r2.status_code == 202, r2.text
        qm = r2.json()["queue_map"]
        assert sorted(qm[q_any["node_id"]]) == sorted([btc_topic, st1["queue_map"][vol["node_id"]]])
        assert qm[q_all["node_id"]] == [btc_topic]
        assert qm[q_none["node_id"]] == []
        st2 = await s.wait_status(r2.json()["strategy_id"])
        assert st2["status"] == "completed"
        assert st2["tag_queries"][q_all["node_id"]] == [btc_topic]
        assert st2["queue_map"] == {}  # TagQueryNodes have no queue of their own


async def test_same_node_in_two_strategies_shares_one_queue(redis_kv, pg_schema):
    async with ingest_stack(redis_kv, pg_schema) as s:
        shared = node("Compute", "5hared", tags=["btc"])
        r1 = await s.submit([shared, node("Compute", "only1", inputs=[shared["node_id"]])])
        r2 = await s.submit([shared, node("Compute", "only2", inputs=[shared["node_id"]])])
        sts = await s.wait_all([r1.json()["strategy_id"], r2.json()["strategy_id"]])
        topics = {st["queue_map"][shared["node_id"]] for st in sts.values()}
        assert len(topics) == 1
        r = await s.dm_get("/nodes/" + shared["node_id"])
        body = r.json()
        assert len([q for q in body["queues"] if not q["sim"]]) == 1
        assert sorted(body["strategies"]) == sorted(sts)


async def test_twenty_concurrent_submissions_sharing_nodes_create_no_duplicate_queue(redis_kv, pg_schema):
    async with ingest_stack(redis_kv, pg_schema, workers=6) as s:
        shared = [node("Compute", f"sh{i}", tags=["btc", f"f{i}"]) for i in range(5)]
        dags = [[*shared, node("Compute", f"u{i}", inputs=[n["node_id"] for n in shared])] for i in range(20)]
        rs = await asyncio.gather(*(s.submit(d) for d in dags))
        assert [r.status_code for r in rs] == [202] * 20
        sts = await s.wait_all([r.json()["strategy_id"] for r in rs])
        for n in shared:
            assert len({st["queue_map"][n["node_id"]] for st in sts.values()}) == 1
        r = await s.dm_get("/queues", limit=1000)
        queues = r.json()["queues"]
        by_node: dict[str, list[str]] = {}
        for q in queues:
            by_node.setdefault(q["node_id"], []).append(q["topic"])
        assert len(queues) == 25  # 5 shared + 20 unique, one queue each
        assert all(len(v) == 1 for v in by_node.values()), by_node
        assert len({q["topic"] for q in queues}) == 25


async def test_nodeid_collision_claim_is_checked_against_the_graph(redis_kv, pg_schema):
    from qmtl.common.nodeid import sha3_node_id

    async with ingest_stack(redis_kv, pg_schema) as s:
        # a node sent with its SHA3-256 id claims its SHA-256 id is taken by another node;
        # the DAG Manager does not know that id, so the claim is false: 400 with the SHA-256 id
        n = node("Compute", "c1a1m")
        claimed = dict(n, node_id=sha3_node_id("Compute", "c1a1m", "cf", "5c"))
        r = await s.submit([claimed])
        assert r.status_code == 400
        assert r.json()["nodes"] == [{"index": 0, "node_id": claimed["node_id"], "expected": n["node_id"]}]
        assert s.tap.count("/nodes/" + n["node_id"]) == 1  # asked the graph (read-only) …
        assert s.tap.count("/diff") == 0  # … and never diffed


async def test_base64_variants_decode(redis_kv, pg_schema):
    async with ingest_stack(redis_kv, pg_schema) as s:
        n = node("Compute", "b64", tags=["x" * 7])
        text = json.dumps({"nodes": [n]}).encode()
        urlsafe = base64.urlsafe_b64encode(text).decode().rstrip("=")
        r = await s.client.post("/strategies", json={**submission([n]), "dag_json": urlsafe})
        assert r.status_code == 202, r.text


async def test_fast_path_answers_exactly_as_the_contract_stack(redis_kv, pg_schema):
    """Valid POST /strategies skip Connexion (SubmitFastPath); what they answer must be what the
    contract stack answers for the same request, and everything else must reach the stack."""
    import httpx

    from qmtl.contracts.events import schema_validator
    from qmtl.gateway.ingest.fastpath import SubmitFastPath

    async with ingest_stack(redis_kv, pg_schema) as s:
        fast = s.gw.http_app
        assert isinstance(fast, SubmitFastPath)
        stack = httpx.AsyncClient(transport=httpx.ASGITransport(app=fast.app), base_url="http://gw")  # Connexion only

        def comparable(r):
            body = r.json()
            body.pop("correlation_id", None)
            if "strategy_id" in body and r.status_code == 202:
                body["strategy_id"] = body["sentinel_id"] = "X"
            return r.status_code, r.headers["content-type"], r.headers.get("retry-after"), body

        good = node("Compute", "fa57")
        bad_id = dict(node("Compute", "fa58"), node_id="1" * 64)
        cases = [
            submission([good], crc=1),  # CRC guard
            submission([bad_id]),  # NodeID
            submission([dict(good, interval=-1)]),  # DAG schema
            {**submission([good]), "dag_json": "!!"},  # neither base64 nor JSON
        ]
        served = fast.served
        for body in cases:
            via_fast = await s.client.post("/strategies", json=body)
            via_stack = await stack.post("/strategies", json=body)
            assert comparable(via_fast) == comparable(via_stack), body
            assert via_fast.headers["x-correlation-id"] == via_fast.json()["correlation_id"]
        assert fast.served == served + len(cases)
        for auth in ("Basic dXNlcjpwdw==", "Bearer not.a.jwt"):  # authentication is the handler's, on both paths
            via_fast = await s.client.post("/strategies", json=submission([good]), headers={"Authorization": auth})
            via_stack = await stack.post("/strategies", json=submission([good]), headers={"Authorization": auth})
            assert via_fast.status_code == 401
            assert comparable(via_fast) == comparable(via_stack)
            assert via_fast.headers.get("www-authenticate") == via_stack.headers.get("www-authenticate")

        # accepted: same shape, same headers; then the duplicate answers agree too
        a = await s.client.post("/strategies", json=submission([node("Compute", "fa59")]))
        b = await stack.post("/strategies", json=submission([node("Compute", "fa60")]))
        assert comparable(a) == comparable(b)
        assert schema_validator("strategy_ack.schema.json").is_valid(a.json())
        assert a.headers["location"] == f"/strategies/{a.json()['strategy_id']}/status"
        dup_fast = await s.client.post("/strategies", json=submission([node("Compute", "fa60")]))
        dup_stack = await stack.post("/strategies", json=submission([node("Compute", "fa60")]))
        assert comparable(dup_fast) == comparable(dup_stack)
        assert dup_fast.status_code == 409 and dup_fast.headers["location"] == dup_stack.headers["location"]

        # what the stack must judge is declined and answered by it
        declined = fast.declined
        r = await s.client.post("/strategies", json={"dag_json": "x"})  # body schema → 422 from Connexion
        assert r.status_code == 422 and any(e["pointer"] == "" or "required" in e["message"] for e in r.json()["errors"])
        r = await s.client.post("/strategies", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400
        r = await s.client.post("/strategies", content=b"x", headers={"content-type": "text/plain"})
        assert r.status_code == 415
        assert fast.declined == declined + 2  # the text/plain one never looked like ours
        await stack.aclose()
