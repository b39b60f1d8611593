"""Schema-driven defaults (qmtl/contracts/defaults.py): the values come from the schemas."""

from __future__ import annotations

import pytest

from qmtl.common.errors import Unprocessable
from qmtl.common.nodeid import compute_node_id
from qmtl.contracts.constants import schema_default
from qmtl.contracts.defaults import defaults_filler
from qmtl.contracts.loader import load_schema_files
from qmtl.gateway.ingest import dag as d


def _node(node_type: str, code: str, **extra):
    n = {"node_type": node_type, "code_hash": code, "config_hash": "cf", "schema_hash": "5c", "interval": 60, "period": 1,
         "tags": ["price"], "inputs": []}
    n["node_id"] = compute_node_id(node_type, code, "cf", "5c")
    n.update(extra)
    return n


def test_the_tag_query_default_is_declared_in_the_schema():
    schema = load_schema_files()["tag_query_node.schema.json"]
    assert "match_mode" not in schema["required"]
    assert schema_default("tag_query_node.schema.json", "/properties/match_mode") == "any"


def test_a_tag_query_node_without_match_mode_gets_the_schema_default_and_keeps_its_id():
    q = _node("TagQueryNode", "q")
    plain = _node("Compute", "c")
    sentinel = {"node_id": "s-1-sentinel", "node_type": "VersionSentinel"}
    explicit = _node("TagQueryNode", "q2", match_mode="all")
    dag = {"nodes": [plain, q, explicit, sentinel]}
    before_ids = [n["node_id"] for n in dag["nodes"]]
    d.validate_dag(dag)  # accepted although match_mode is absent
    d.apply_defaults(dag)
    assert q["match_mode"] == "any"
    assert explicit["match_mode"] == "all"  # a given value is kept
    assert "match_mode" not in plain and "match_mode" not in sentinel  # only TagQueryNodes get it
    assert [n["node_id"] for n in dag["nodes"]] == before_ids
    d.verify_ids(dag["nodes"][:3])  # ids still verify: match_mode is not a NodeID field
    assert d.tag_queries(dag)[q["node_id"]] == (("price",), 60, "any")


def test_defaults_do_not_excuse_an_invalid_match_mode():
    dag = {"nodes": [_node("TagQueryNode", "q", match_mode="some")]}
    with pytest.raises(Unprocessable) as exc:
        d.validate_dag(dag)
    assert exc.value.ext["errors"][0]["pointer"] == "/dag_json/nodes/0/match_mode"


def test_the_filler_follows_the_schema_not_a_literal(monkeypatch):
    """Change the default in (a copy of) the schema: the filler applies the new value."""
    from qmtl.contracts import defaults as mod

    schemas = {k: dict(v) for k, v in load_schema_files().items()}
    tq = dict(schemas["tag_query_node.schema.json"])
    props = dict(tq["properties"])
    props["match_mode"] = {**props["match_mode"], "default": "all"}
    tq["properties"] = props
    schemas["tag_query_node.schema.json"] = tq
    fill = mod._Compiler(schemas).compile_ref("dag.schema.json", "dag.schema.json")
    dag = {"nodes": [_node("TagQueryNode", "q")]}
    fill(dag)
    assert dag["nodes"][0]["match_mode"] == "all"
    assert defaults_filler("dag.schema.json") is defaults_filler("dag.schema.json")  # compiled once
