"""The pieces of the request bounds on their own: the JSON depth scan (strings, escapes,
malformed text), the bound on quoted values, the operation table (literal routes first,
per-operation body limits from the spec) and the limits config checks."""

from __future__ import annotations

import json

import pytest

from qmtl.common.config import ConfigError, LimitsConfig, load_config
from qmtl.contracts.connexion31 import schema_errors
from qmtl.contracts.limits import OperationTable, RequestLimits, json_depth_exceeds, short_repr
from qmtl.contracts.loader import load_openapi


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("depth,limit,too_deep", [(1, 64, False), (64, 64, False), (65, 64, True), (100_000, 64, True), (3, 2, True)])
def test_depth_of_well_formed_documents(depth, limit, too_deep):
    assert json_depth_exceeds(nested(depth), limit) is too_deep


def test_depth_counts_objects_and_arrays_alike_and_only_the_deepest_path():
    doc = {"a": [{"b": [{"c": 1}]}], "wide": [[1]] * 10_000}  # depth 5, with 20,000 shallow brackets
    raw = json.dumps(doc).encode()
    assert json_depth_exceeds(raw, 5) is False
    assert json_depth_exceeds(raw, 4) is True


def test_brackets_inside_strings_do_not_count_and_escapes_are_understood():
    assert json_depth_exceeds(json.dumps(["[[[[[[[[[[{{{{{{"] * 100).encode(), 2) is False
    assert json_depth_exceeds(json.dumps(['\\"[[[[[[', '"]]]]]]]']).encode(), 1) is False
    tricky = json.dumps(["a\\", [[[1]]]]).encode()  # a string ending in a backslash, then depth 4
    assert json_depth_exceeds(tricky, 4) is False and json_depth_exceeds(tricky, 3) is True


def test_malformed_deep_text_counts_as_deep():
    assert json_depth_exceeds(b"[" * 100_000, 64) is True
    assert json_depth_exceeds(b"[{" * 40 + b"]" * 80, 64) is True


def test_a_quoted_value_is_cut_and_says_how_much_was_left_out():
    text = short_repr("x" * 10_000)
    assert len(text) < 140 and "9922 more characters" in text
    assert short_repr("short") == "'short'"


def test_schema_errors_quote_a_huge_value_briefly():
    from jsonschema import Draft202012Validator

    errors = schema_errors(Draft202012Validator({"type": "object", "properties": {"n": {"type": "integer"}}}), {"n": "y" * 5_000_000})
    assert errors[0]["pointer"] == "/n" and len(errors[0]["message"]) < 300
    assert "is not of type 'integer'" in errors[0]["message"] and "more characters" in errors[0]["message"]


def test_operation_table_prefers_literal_routes_and_reads_the_body_limits_from_the_spec():
    doc = load_openapi("gateway").bundled
    table = OperationTable(doc)
    assert table.find("GET", "/worlds/w1/decide")[0] == "/worlds/{world_id}/decide"
    assert table.find("GET", "/queues/by_tag")[0] == "/queues/by_tag"
    assert table.find("GET", "/nowhere") is None
    limits = RequestLimits(lambda *a: None, doc, LimitsConfig(max_body_bytes=1234))
    assert limits.limit_for("POST", "/strategies") == 16 * 1024 * 1024  # x-qmtl-max-body-bytes
    assert limits.limit_for("POST", "/worlds") == 1234  # the service default
    dm = RequestLimits(lambda *a: None, load_openapi("dagmanager").bundled, LimitsConfig())
    assert dm.limit_for("POST", "/diff") == 16 * 1024 * 1024


def test_limits_config_is_checked_and_overridable_per_service():
    cfg = load_config(environ={"QMTL__WORLDSERVICE__LIMITS__MAX_JSON_DEPTH": "10"})
    assert cfg.worldservice.limits.max_json_depth == 10 and cfg.gateway.limits.max_json_depth == 64
    with pytest.raises(ConfigError, match=r"dagmanager\.limits\.body_timeout"):
        load_config(environ={"QMTL__DAGMANAGER__LIMITS__BODY_TIMEOUT": "0"})
    with pytest.raises(ConfigError, match=r"gateway\.limits\.max_connections"):
        load_config(environ={"QMTL__GATEWAY__LIMITS__MAX_CONNECTIONS": "0"})
