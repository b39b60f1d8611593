"""The DAG builder: ids and CRC exactly as the Gateway recomputes them (pure functions)."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from qmtl.common.crc import crc32_of_node_ids
from qmtl.common.nodeid import (
    compute_node_id,
    sha3_node_id,
    sha256_node_id,
    verify_node_ids,
)
from qmtl.common.statehash import canonical_json
from qmtl.sdk import Dag, Node, TagQueryNode
from qmtl.sdk.dag import code_hash_of, json_hash_of


def sma(values, window=20):
    return sum(values[-window:]) / window


def test_node_hashes_and_id_follow_spec_section_2():
    n = Node("Compute", code="return x", config={"window": 20, "a": [1, 2]}, schema={"type": "number"},
             interval=60, period=20, tags=["btc"])
    assert n.code_hash == hashlib.sha256(b"return x").hexdigest()
    assert n.config_hash == hashlib.sha256(canonical_json({"a": [1, 2], "window": 20})).hexdigest()
    assert n.schema_hash == hashlib.sha256(canonical_json({"type": "number"})).hexdigest()
    expected = hashlib.sha256(f"Compute:{n.code_hash}:{n.config_hash}:{n.schema_hash}".encode()).hexdigest()
    assert n.node_id == expected == compute_node_id("Compute", n.code_hash, n.config_hash, n.schema_hash)
    d = n.to_dict()
    # all four NodeID fields are sent, so the Gateway can verify the id (SPEC §2)
    assert {k: d[k] for k in ("node_type", "code_hash", "config_hash", "schema_hash")} == dict(
        zip(("node_type", "code_hash", "config_hash", "schema_hash"), n.fields))
    assert (d["interval"], d["period"], d["tags"], d["inputs"]) == (60, 20, ["btc"], [])


def test_config_key_order_does_not_change_the_id_but_values_do():
    a = Node("Compute", code="c", config={"x": 1, "y": 2})
    b = Node("Compute", code="c", config={"y": 2, "x": 1})
    c = Node("Compute", code="c", config={"x": 1, "y": 3})
    assert a.node_id == b.node_id != c.node_id


def test_callable_code_is_hashed_by_its_source():
    n = Node("Compute", code=sma)
    assert n.code_hash == code_hash_of(sma)
    assert n.code_hash != code_hash_of(lambda v: v)
    assert code_hash_of(None) == hashlib.sha256(b"").hexdigest()
    with pytest.raises(TypeError):
        code_hash_of(42)


def test_dag_orders_inputs_first_shares_nodes_and_the_gateway_accepts_every_id():
    price = Node("StreamInput", code="feed", interval=60, period=30, tags=["btc", "price"])
    fast = Node("Compute", code="sma", config={"window": 5}, interval=60, period=5, inputs=[price])
    slow = Node("Compute", code="sma", config={"window": 20}, interval=60, period=20, inputs=[price])
    signal = Node("Compute", code="cross", interval=60, period=1, inputs=[fast, slow])
    dag = Dag([signal], name="momentum")
    ids = dag.node_ids()
    assert ids[0] == price.node_id and ids[-1] == signal.node_id and len(ids) == 4  # price sent once
    d = dag.to_dict()
    assert verify_node_ids(d["nodes"]) == []  # the Gateway's own check finds nothing
    assert d["nodes"][-1]["inputs"] == [fast.node_id, slow.node_id]
    assert dag.crc32() == crc32_of_node_ids(ids)
    # the same node object or an identical node again changes nothing
    dag.add(price, Node("StreamInput", code="feed", interval=60, period=30, tags=["btc", "price"]))
    assert dag.node_ids() == ids


def test_submission_body_is_what_post_strategies_expects():
    tq = TagQueryNode(["price", "btc"], interval=60, match_mode="all")
    dag = Dag([tq], name="q")
    body = dag.submission(run_type="backtest", world_id="w-1")
    assert set(body) == {"dag_json", "meta", "run_type", "node_ids_crc32", "world_id"}
    decoded = json.loads(base64.b64decode(body["dag_json"]))
    assert decoded["nodes"][0]["node_type"] == "TagQueryNode"
    assert decoded["nodes"][0]["match_mode"] == "all"
    assert body["node_ids_crc32"] == crc32_of_node_ids([tq.node_id])
    with pytest.raises(ValueError):
        dag.submission(run_type="paper")


def test_tag_query_nodes_with_different_queries_never_share_an_id():
    a = TagQueryNode(["price"], interval=60)
    b = TagQueryNode(["price"], interval=300)
    c = TagQueryNode(["price"], interval=60, match_mode="all")
    d = TagQueryNode(["price", "price "], interval=60)  # same query after normalising
    assert len({a.node_id, b.node_id, c.node_id}) == 3
    assert d.node_id == a.node_id and d.query_key == (("price",), 60, "any")
    with pytest.raises(ValueError):
        TagQueryNode([], interval=60)
    with pytest.raises(ValueError):
        TagQueryNode(["x"], interval=0)


def test_tag_query_node_update_queues_notifies_only_on_change():
    tq = TagQueryNode(["price"], interval=60)
    seen = []
    tq.on_update(seen.append)
    assert tq.update_queues(["b", "a"]) is True
    assert tq.update_queues(["a", "b", "a"]) is False
    assert seen == [["a", "b"]] and tq.queues == ["a", "b"]


def test_nodes_equal_in_id_but_different_elsewhere_are_refused():
    a = Node("Compute", code="c", interval=60)
    b = Node("Compute", code="c", interval=300)
    with pytest.raises(ValueError, match="share node_id"):
        Dag([a, b])


def test_collision_falls_back_to_sha3_as_the_gateway_does():
    a = Node("Compute", code="c")
    b = Node("Compute", code="d")
    taken = sha256_node_id(*b.fields)
    owner = ("Other", "x", "y", "z")  # a different node already known under b's SHA-256 id

    def lookup(digest):
        return owner if digest == taken else None

    dag = Dag([a, b], lookup=lookup)
    assert dag.node_ids() == [a.node_id, sha3_node_id(*b.fields)]
    assert verify_node_ids(dag.to_dict()["nodes"], lookup=lookup) == []


def test_cycles_are_refused():
    a = Node("Compute", code="a")
    b = Node("Compute", code="b", inputs=[a])
    a.inputs.append(b)
    with pytest.raises(ValueError, match="cycle"):
        Dag([b])


def test_json_hash_of_none_is_the_empty_object():
    assert json_hash_of(None) == json_hash_of({})
