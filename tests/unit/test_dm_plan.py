"""The diff's request checks and the tag-index keys, before any SQL."""

from __future__ import annotations

import pytest

from qmtl.common.errors import Unprocessable
from qmtl.common.nodeid import compute_node_id
from qmtl.dagmanager.plan import make_plan
from qmtl.dagmanager.tagindex import TagKey, etag_of, normalise_tags


def node(i, node_type="Compute", **extra):
    fields = (node_type, f"{i:064x}", "cfg", "sch")
    n = {"node_id": compute_node_id(*fields), "node_type": node_type, "code_hash": fields[1], "config_hash": "cfg",
         "schema_hash": "sch", "interval": 60, "period": 1, "tags": ["b", "a"], "inputs": []}
    n.update(extra)
    return n


def test_plan_splits_queue_nodes_tag_queries_and_the_sentinel():
    tq = node(2, "TagQueryNode", tags=["price", " btc "], match_mode="all")
    sentinel = {"node_id": "s-9-sentinel", "node_type": "VersionSentinel", "version": "v7"}
    plan = make_plan("s-9", {"nodes": [node(1), tq, sentinel]}, run_type=None, asset=None, version=None)
    assert plan.queue_nodes == [node(1)["node_id"]]
    assert plan.graph_nodes == [node(1)["node_id"], tq["node_id"]]
    assert plan.tag_queries == {tq["node_id"]: TagKey(("btc", "price"), 60, "all")}
    assert plan.sentinel_id == "s-9-sentinel" and plan.version == "v7"  # the sentinel's version is the default
    assert plan.sim is False and plan.run_type == "live" and plan.asset == "qmtl"
    assert plan.nodes[node(1)["node_id"]].tags == ("a", "b")


def test_without_a_sentinel_node_the_sentinel_is_named_after_the_strategy():
    plan = make_plan("s-1", {"nodes": [node(1)]}, run_type="dry-run", asset="eth", version="v3")
    assert plan.sentinel_id == "s-1-sentinel"
    assert plan.sim is True and plan.version == "v3" and plan.nodes[node(1)["node_id"]].asset == "eth"
    # a node's own asset wins over the request's
    plan = make_plan("s-1", {"nodes": [node(1, asset="sol")]}, run_type="paper", asset="eth", version=None)
    assert plan.nodes[node(1)["node_id"]].asset == "sol" and plan.sim is True and plan.version == "v1"


def test_duplicate_node_ids_are_refused_with_pointers():
    with pytest.raises(Unprocessable) as err:
        make_plan("s", {"nodes": [node(1), node(2), node(1)]}, run_type=None, asset=None, version=None)
    assert err.value.ext["errors"][0]["pointer"] == "/dag/nodes/2/node_id"
    assert "/dag/nodes/0" in err.value.ext["errors"][0]["message"]


def test_two_sentinels_and_an_empty_dag_are_refused():
    s1 = {"node_id": "x", "node_type": "VersionSentinel"}
    s2 = {"node_id": "y", "node_type": "VersionSentinel"}
    with pytest.raises(Unprocessable) as err:
        make_plan("s", {"nodes": [node(1), s1, s2]}, run_type=None, asset=None, version=None)
    assert err.value.ext["errors"][0]["pointer"] == "/dag/nodes/2"
    with pytest.raises(Unprocessable):
        make_plan("s", {"nodes": []}, run_type=None, asset=None, version=None)


def test_tag_key_matching_any_and_all():
    any_key = TagKey.of(["price", "btc"], 60, "any")
    all_key = TagKey.of(["price", "btc"], 60, "all")
    assert any_key.matches(("btc",), 60) and not all_key.matches(("btc",), 60)
    assert all_key.matches(("btc", "eth", "price"), 60)
    assert not any_key.matches(("btc",), 30)  # interval must be equal
    assert not any_key.matches(("eth",), 60)
    with pytest.raises(ValueError):
        TagKey.of(["a"], 60, "some")


def test_etag_is_order_independent_and_changes_with_the_set_and_the_key():
    key = TagKey.of(["b", "a", "a"], 60, "any")
    assert key.tags == ("a", "b") and normalise_tags([" x", "", "x "]) == ("x",)
    assert etag_of(key, ["q2", "q1"]) == etag_of(key, ["q1", "q2"])
    assert etag_of(key, ["q1"]) != etag_of(key, ["q1", "q2"])
    assert etag_of(key, ["q1"]) != etag_of(TagKey.of(["a", "b"], 60, "all"), ["q1"])
    assert key.watch_key != TagKey.of(["a", "b"], 60, "all").watch_key
    assert key.bus_key == TagKey.of(["a", "b"], 60, "all").bus_key  # one ControlBus key per (tags, interval)
