"""Strategy ingest as the Aug-2025 SDK spoke it (issue 12 item 1 and the refused cases).

Against ``qmtl up`` on real sockets, bodies as literal bytes (tests/compat/aug2025.py).
"""

from __future__ import annotations

import hashlib
import json
import zlib

import httpx
import pytest

from tests.compat.aug2025 import (
    CRC_ALL,
    CRC_PRICE_SIGNAL,
    DAG_TEXT,
    DAG_WITHOUT_CONFIG_HASH,
    JSON,
    PRICE_ID,
    SIGNAL_ID,
    TAGQ_ID,
    submission_bytes,
    up,  # noqa: F401 - the module's qmtl up
    wait_status,
)
from tests.helpers.ingest_stack import ingest_stack

pytestmark = pytest.mark.asyncio


async def test_a_tag_query_node_without_match_mode_is_accepted_as_any(up):
    async with httpx.AsyncClient(base_url=up.url, timeout=15) as c:
        r = await c.post("/strategies", content=submission_bytes(DAG_TEXT, CRC_ALL), headers=JSON)
        assert r.status_code == 202, r.text  # was 422 "'match_mode' is a required property at /dag_json/nodes/1"
        ack = r.json()
        assert TAGQ_ID in ack["queue_map"]  # the TagQueryNode, under the id the SDK computed
        st = await wait_status(c, ack["strategy_id"])
        assert st["status"] == "completed", st
        # `any`: the price queue carries one of the two tags ("aug25-absent" is on no queue);
        # under `all` the node would match nothing.
        matched = st["tag_queries"][TAGQ_ID]
        by_any = (await c.get("/queues/by_tag", params={"tags": "aug25-price,aug25-absent", "interval": 60})).json()["queues"]
        by_all = (await c.get("/queues/by_tag", params={"tags": "aug25-price,aug25-absent", "interval": 60,
                                                        "match_mode": "all"})).json()["queues"]
        assert len(by_any) == 1 and by_all == []
        assert matched == by_any == [st["queue_map"][PRICE_ID]]  # the price queue
        # the ids the SDK computed are the ids the Gateway recomputed and the DAG Manager stored
        assert sorted(st["queue_map"]) == sorted([PRICE_ID, SIGNAL_ID])

        # The same DAG with match_mode written out as "any" is the same content: a duplicate.
        explicit = DAG_TEXT.replace('"tags": ["aug25-price", "aug25-absent"], "inputs": [], "name": "peers"',
                                    '"tags": ["aug25-price", "aug25-absent"], "inputs": [], "name": "peers", "match_mode": "any"')
        assert explicit != DAG_TEXT
        r = await c.post("/strategies", content=submission_bytes(explicit, CRC_ALL), headers=JSON)
        assert r.status_code == 409 and r.json()["strategy_id"] == ack["strategy_id"], r.text


async def test_a_node_without_config_hash_stays_refused_with_a_400_naming_it(up):
    async with httpx.AsyncClient(base_url=up.url, timeout=15) as c:
        for raw in (False, True):
            r = await c.post("/strategies", content=submission_bytes(DAG_WITHOUT_CONFIG_HASH, CRC_PRICE_SIGNAL, raw=raw),
                             headers=JSON)
            assert r.status_code == 400, r.text
            assert r.headers["content-type"] == "application/problem+json"
            problem = r.json()
            assert problem["nodes"] == [{"index": 0, "node_id": PRICE_ID, "missing_fields": ["config_hash"]}]
            assert problem["errors"][0]["pointer"] == "/dag_json/nodes/0"
            assert "missing config_hash" in problem["errors"][0]["message"] and "config_hash" in problem["detail"]


@pytest.mark.redis
@pytest.mark.postgres
async def test_the_fast_path_and_the_contract_path_both_apply_the_default(redis_kv, pg_schema):
    """Valid submissions skip the contract stack (SubmitFastPath); the stack serves the rest.
    Both end in the same ingest: the default is applied on either."""
    second = DAG_TEXT.replace("aug25-price-code", "aug25-price-code2")  # another strategy: its price node's id changes
    new_price = hashlib.sha256(b"StreamInput:aug25-price-code2:aug25-price-cfg:aug25-price-schema").hexdigest()
    second = second.replace(PRICE_ID, new_price)
    crc2 = zlib.crc32(new_price.encode())
    for nid in (TAGQ_ID, SIGNAL_ID):
        crc2 = zlib.crc32(nid.encode(), crc2)
    async with ingest_stack(redis_kv, pg_schema, record_relay=False) as s:
        app = s.gw
        fast = app.http_app
        r = await s.client.post("/strategies", content=submission_bytes(DAG_TEXT, CRC_ALL), headers=JSON)
        assert r.status_code == 202 and fast.served == 1, r.text
        assert (await s.wait_status(r.json()["strategy_id"]))["status"] == "completed"  # its queue exists before the next diff
        app.http_app = fast.app  # the contract stack alone
        try:
            r2 = await s.client.post("/strategies", content=submission_bytes(second, crc2 & 0xFFFFFFFF), headers=JSON)
        finally:
            app.http_app = fast
        assert r2.status_code == 202 and fast.served == 1, r2.text
        for sid in (r.json()["strategy_id"], r2.json()["strategy_id"]):
            st = await s.wait_status(sid)
            assert st["status"] == "completed", st
            record = await s.ingest.store.record(sid)  # the DAG as stored and diffed
            tq = next(n for n in json.loads(record.dag_json)["nodes"] if n["node_type"] == "TagQueryNode")
            assert tq["match_mode"] == "any" and tq["node_id"] == TAGQ_ID
        first, other = (await s.status(r.json()["strategy_id"])), (await s.status(r2.json()["strategy_id"]))
        assert first["tag_queries"][TAGQ_ID] == [first["queue_map"][PRICE_ID]]
        # `any`: the second strategy's TagQueryNode matches both price queues by now
        assert sorted(other["tag_queries"][TAGQ_ID]) == sorted([first["queue_map"][PRICE_ID], other["queue_map"][new_price]])
