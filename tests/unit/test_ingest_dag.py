"""The checks POST /strategies runs on a DAG (qmtl.gateway.ingest.dag)."""

from __future__ import annotations

import base64
import json

import pytest

from qmtl.common.crc import crc32_of_node_ids
from qmtl.common.errors import BadRequest, Unprocessable
from qmtl.common.nodeid import compute_node_id, sha3_node_id, sha256_node_id
from qmtl.gateway.ingest import dag as d


def node(node_type="Compute", code="c0de", cfg="cf", sch="5c", **extra):
    n = {"node_type": node_type, "code_hash": code, "config_hash": cfg, "schema_hash": sch,
         "interval": 60, "period": 1, "tags": ["btc"], "inputs": []}
    n["node_id"] = compute_node_id(node_type, code, cfg, sch)
    n.update(extra)
    return n


DAG = {"nodes": [node(code="a"), node(code="b")], "name": "x"}
TEXT = json.dumps(DAG)


@pytest.mark.parametrize("encoded", [
    base64.b64encode(TEXT.encode()).decode(),
    base64.urlsafe_b64encode(TEXT.encode()).decode().rstrip("="),
    TEXT,
    "  " + TEXT + "\n",
])
def test_decode_base64_first_then_raw_json(encoded):
    assert d.decode_dag_json(encoded) == DAG


def test_decode_urlsafe_alphabet_is_needed_sometimes():
    # bytes that encode to '+'/'/' in the standard alphabet
    text = json.dumps({"nodes": [], "k": "\u00ff\u00fe>>>???"})
    std = base64.b64encode(text.encode()).decode()
    url = base64.urlsafe_b64encode(text.encode()).decode()
    assert std != url
    assert d.decode_dag_json(url) == d.decode_dag_json(std) == json.loads(text)


@pytest.mark.parametrize("bad", ["not json at all", "{\"nodes\": [", base64.b64encode(b"\xff\xfe").decode() + "!"])
def test_decode_neither_is_400(bad):
    with pytest.raises(BadRequest) as exc:
        d.decode_dag_json(bad)
    assert "neither base64" in exc.value.detail
    assert exc.value.ext["errors"][0]["pointer"] == "/dag_json"


def test_unpadded_base64_decodes():
    assert d.decode_dag_json("e30") == {}  # base64 of "{}" without padding


def test_crc_guard_names_expected_and_received():
    ids = [n["node_id"] for n in DAG["nodes"]]
    d.check_crc(DAG, crc32_of_node_ids(ids))
    with pytest.raises(BadRequest) as exc:
        d.check_crc(DAG, 7)
    assert exc.value.ext["expected"] == crc32_of_node_ids(ids)
    assert exc.value.ext["received"] == 7
    # order matters
    with pytest.raises(BadRequest):
        d.check_crc(DAG, crc32_of_node_ids(reversed(ids)))


@pytest.mark.parametrize("shape", [[], "x", {"nodes": "x"}, {"nodes": [1]}, {"nodes": [{"node_id": 5}]}])
def test_crc_guard_leaves_unreadable_shapes_to_the_schema(shape):
    d.check_crc(shape, 123)  # no error here …
    with pytest.raises(Unprocessable):
        d.validate_dag(shape)  # … the schema check reports it


def test_schema_errors_point_into_the_dag():
    bad = {"nodes": [node(), dict(node(code="z"), interval=-1, tags=[1])]}
    with pytest.raises(Unprocessable) as exc:
        d.validate_dag(bad)
    pointers = {e["pointer"] for e in exc.value.ext["errors"]}
    assert {"/dag_json/nodes/1/interval", "/dag_json/nodes/1/tags/0"} <= pointers
    with pytest.raises(Unprocessable) as exc:
        d.validate_dag({"nodes": []})
    assert exc.value.ext["errors"][0]["pointer"] == "/dag_json/nodes"


def test_tag_query_node_needs_its_fields():
    q = node("TagQueryNode", code="q", match_mode="sometimes")
    with pytest.raises(Unprocessable) as exc:
        d.validate_dag({"nodes": [q]})
    assert exc.value.ext["errors"][0]["pointer"] == "/dag_json/nodes/0/match_mode"


def test_missing_nodeid_fields_are_left_to_the_nodeid_check():
    n = node(code="seed")
    del n["config_hash"]
    d.validate_dag({"nodes": [n]})  # not a 422 …
    with pytest.raises(BadRequest) as exc:
        d.verify_ids([n])  # … but a 400 naming the field
    assert exc.value.ext["nodes"] == [{"index": 0, "node_id": n["node_id"], "missing_fields": ["config_hash"]}]
    # a missing non-id field is still a schema error
    m = node(code="m")
    del m["period"]
    with pytest.raises(Unprocessable):
        d.validate_dag({"nodes": [m]})


def test_duplicate_node_ids_are_422():
    n = node()
    with pytest.raises(Unprocessable) as exc:
        d.validate_dag({"nodes": [n, node(code="other"), n]})
    assert exc.value.ext["errors"] == [{"pointer": "/dag_json/nodes/2/node_id", "message": "node id already used by node 0"}]


def test_verify_lists_every_offending_node():
    good = node(code="g")
    wrong = dict(node(code="w"), node_id="f" * 64)
    empty = dict(node(code="e"), schema_hash="")
    sentinel = {"node_id": "s-sentinel", "node_type": "VersionSentinel"}
    with pytest.raises(BadRequest) as exc:
        d.verify_ids([good, wrong, empty, sentinel])
    assert exc.value.ext["nodes"] == [
        {"index": 1, "node_id": "f" * 64, "expected": node(code="w")["node_id"]},
        {"index": 2, "node_id": empty["node_id"], "missing_fields": ["schema_hash"]},
        {"index": 3, "node_id": "s-sentinel", "missing_fields": ["code_hash", "config_hash", "schema_hash"]},
    ]
    assert len(exc.value.ext["errors"]) == 3
    d.verify_ids([good])


def test_sha3_is_accepted_only_for_a_real_collision():
    fields = ("Compute", "c", "cf", "sc")
    sha3 = dict(node(*fields[:1], code="c", cfg="cf", sch="sc"), node_id=sha3_node_id(*fields))
    assert d.collision_claims([sha3]) == [sha256_node_id(*fields)]
    with pytest.raises(BadRequest) as exc:  # nobody else has the SHA-256 id: the claim is false
        d.verify_ids([sha3])
    assert exc.value.ext["nodes"][0]["expected"] == sha256_node_id(*fields)
    # the graph knows a different node under the SHA-256 id: SHA3-256 is the right id
    d.verify_ids([sha3], {sha256_node_id(*fields): ("Compute", "other", "x", "y")})
    # the graph knows this very node under it: SHA-256 is right, SHA3 is not
    with pytest.raises(BadRequest):
        d.verify_ids([sha3], {sha256_node_id(*fields): fields})


def test_content_hash_is_canonical():
    a = {"nodes": [{"b": 1, "a": [1, 2]}], "name": "n"}
    b = json.loads('{"name": "n", "nodes": [{"a": [1, 2], "b": 1}]}')
    assert d.content_hash(a) == d.content_hash(b)
    assert d.content_hash(a) != d.content_hash({**a, "name": "m"})
    assert len(d.content_hash(a)) == 64


def test_insert_sentinel_appends_a_wired_node_without_touching_the_input():
    dag = {"nodes": [node(code="a"), node(code="b")], "name": "x"}
    before = json.dumps(dag)
    out, sid = d.insert_sentinel(dag, "s-1", "v2")
    assert json.dumps(dag) == before
    assert sid == "s-1-sentinel"
    assert out["name"] == "x"
    assert out["nodes"][-1] == {"node_id": "s-1-sentinel", "node_type": "VersionSentinel", "version": "v2",
                                "inputs": [n["node_id"] for n in dag["nodes"]]}
    d.validate_dag(out)  # the stored DAG still conforms to the DAG Manager's schema
    out, _ = d.insert_sentinel(dag, "s-1")
    assert "version" not in out["nodes"][-1]


def test_tag_queries():
    q = node("TagQueryNode", code="q", tags=["a", "b"], interval=300, match_mode="all")
    assert d.tag_queries({"nodes": [node(), q]}) == {q["node_id"]: (("a", "b"), 300, "all")}
