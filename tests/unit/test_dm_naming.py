"""Queue naming (SPEC §7): {asset}_{node_type}_{short_hash}_{version}[_sim], short hash
lengthened by 2 on a clash."""

from __future__ import annotations

import hashlib
import itertools

import pytest

from qmtl.dagmanager.naming import (
    MAX_TOPIC_LEN,
    assign_name,
    candidates,
    hash_source,
    safe_part,
    topic_name,
)

CODE = hashlib.sha256(b"sma").hexdigest()  # 'a7c...' style: 64 hex characters
NODE = hashlib.sha256(b"node").hexdigest()


def name(taken=(), *, sim=False, code=CODE, node=NODE, asset="btc", node_type="SMA", version="v1"):
    return assign_name(asset, node_type, code, version, node_id=node, sim=sim, taken=lambda c: c in set(taken))


def test_name_is_asset_type_first_six_hex_of_code_hash_and_version():
    assert name() == f"btc_SMA_{CODE[:6]}_v1"


def test_dry_run_names_end_with_sim():
    assert name(sim=True) == f"btc_SMA_{CODE[:6]}_v1_sim"
    # the live name being taken does not matter to the dry-run one
    assert name([f"btc_SMA_{CODE[:6]}_v1"], sim=True) == f"btc_SMA_{CODE[:6]}_v1_sim"


def test_a_clash_lengthens_the_hash_by_two_each_time():
    first = f"btc_SMA_{CODE[:6]}_v1"
    assert name([first]) == f"btc_SMA_{CODE[:8]}_v1"
    assert name([first, f"btc_SMA_{CODE[:8]}_v1"]) == f"btc_SMA_{CODE[:10]}_v1"
    # only the names actually taken count: 8 taken but not 6 → 6
    assert name([f"btc_SMA_{CODE[:8]}_v1"]) == first


def test_candidates_step_by_two_through_the_code_hash_then_the_node_id():
    names = list(candidates("a", "T", CODE, "v1", node_id=NODE))
    hashes = [n.split("_")[2] for n in names]
    assert [len(h) for h in hashes[:4]] == [6, 8, 10, 12]
    assert all(b.startswith(a) for a, b in itertools.pairwise(hashes))
    assert hashes[-1] == (CODE + NODE + hashlib.sha256(NODE.encode()).hexdigest())[: len(hashes[-1])]
    assert len(hashes[-1]) > len(CODE + NODE)  # every character can be used before giving up
    assert len(set(names)) == len(names)


def test_nodes_sharing_their_code_hash_still_get_distinct_names():
    # same code, different config: same code hash, different node ids. Each one past
    # the first lengthens the name; past the code hash's end the node id decides.
    taken: set[str] = set()
    names = []
    for i in range(40):
        node = hashlib.sha256(f"node-{i}".encode()).hexdigest()
        n = assign_name("btc", "SMA", CODE, "v1", node_id=node, taken=taken.__contains__)
        taken.add(n)
        names.append(n)
    assert len(set(names)) == 40
    assert names[0] == f"btc_SMA_{CODE[:6]}_v1" and names[1] == f"btc_SMA_{CODE[:8]}_v1"
    assert names[-1].startswith(f"btc_SMA_{CODE}")  # the whole code hash, then node id characters


def test_hash_source_drops_an_algorithm_prefix_and_non_hex():
    assert hash_source("sha256:ABCDEF0123", "").startswith("abcdef0123")
    assert hash_source("xyz-12-ab", "ff").startswith("12abff")


def test_nodes_without_any_hex_in_code_or_id_still_get_distinct_names():
    taken: set[str] = set()
    for node_id in ("node-one", "node-two", "node-three", "x"):
        n = assign_name("a", "T", "xyz", "v1", node_id=node_id, taken=taken.__contains__)
        assert n not in taken
        taken.add(n)


def test_unsafe_parts_are_made_kafka_safe_and_defaults_apply():
    assert safe_part("BTC/USD spot", default="x") == "BTC-USD-spot"
    assert safe_part("", default="qmtl") == "qmtl"
    n = assign_name("", "My Node!", CODE, "", node_id=NODE, taken=lambda c: False)
    assert n == f"qmtl_My-Node_{CODE[:6]}_v1"
    assert all(ch.isalnum() or ch in "._-" for ch in n)


def test_short_code_hash_is_padded_from_the_node_id():
    assert name(code="ab") == f"btc_SMA_ab{NODE[:4]}_v1"


def test_every_candidate_taken_is_an_error():
    with pytest.raises(ValueError, match="no free topic name"):
        assign_name("a", "T", "abc", "v1", node_id="n", taken=lambda c: True)


def test_names_never_exceed_kafkas_limit():
    with pytest.raises(ValueError):
        topic_name("a" * 200, "b" * 40, "c" * 10, "v1")
    for n in candidates("a" * 64, "t" * 128, CODE, "v" * 32, node_id=NODE, sim=True):
        assert len(n) <= MAX_TOPIC_LEN
