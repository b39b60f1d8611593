import hashlib

import pytest

from qmtl.common.nodeid import (
    NODE_ID_FIELDS,
    compute_node_id,
    missing_fields,
    node_id_bytes,
    sha3_node_id,
    sha256_node_id,
    verify_node_ids,
)

FIELDS = ("Compute", "abc", "def", "123")
SHA256 = "b450dbfe8dd41fd8645f46c82ec21b387c4602cab2972dfdd2deaad9d75fabb8"
SHA3 = "a7f0970c1ddd44625d7ebdd97818a7ac1c486ea188492430d3b2d78e04df8655"


def node(node_type="Compute", code_hash="abc", config_hash="def", schema_hash="123", **extra):
    n = {"node_type": node_type, "code_hash": code_hash, "config_hash": config_hash, "schema_hash": schema_hash}
    n["node_id"] = sha256_node_id(node_type, code_hash, config_hash, schema_hash)
    n.update(extra)
    return n


def test_fields_and_bytes():
    assert NODE_ID_FIELDS == ("node_type", "code_hash", "config_hash", "schema_hash")
    assert node_id_bytes(*FIELDS) == b"Compute:abc:def:123"
    assert node_id_bytes("N", "ü", "c", "s") == "N:ü:c:s".encode()


def test_digests_are_pinned_lowercase_hex():
    assert sha256_node_id(*FIELDS) == SHA256
    assert sha3_node_id(*FIELDS) == SHA3
    assert sha3_node_id(*FIELDS) == hashlib.sha3_256(b"Compute:abc:def:123").hexdigest()


def test_each_field_changes_the_id():
    ids = {sha256_node_id(*FIELDS)}
    for i in range(4):
        changed = list(FIELDS)
        changed[i] += "x"
        ids.add(sha256_node_id(*changed))
    assert len(ids) == 5


def test_compute_without_lookup_is_sha256():
    assert compute_node_id(*FIELDS) == SHA256


def test_compute_lookup_same_node_or_unknown_keeps_sha256():
    seen = []

    def lookup(node_id):
        seen.append(node_id)
        return FIELDS

    assert compute_node_id(*FIELDS, lookup=lookup) == SHA256
    assert seen == [SHA256]
    assert compute_node_id(*FIELDS, lookup=lambda _id: None) == SHA256
    # a list with the same values is the same node too
    assert compute_node_id(*FIELDS, lookup=lambda _id: list(FIELDS)) == SHA256


def test_compute_collision_with_different_node_uses_sha3():
    other = ("Compute", "abc", "OTHER", "123")
    assert compute_node_id(*FIELDS, lookup=lambda _id: other) == SHA3


@pytest.mark.parametrize(
    "n, expected",
    [
        ({"node_type": "A", "code_hash": "b", "config_hash": "c", "schema_hash": "d"}, []),
        ({"node_type": "A", "code_hash": "b", "schema_hash": "d"}, ["config_hash"]),
        ({"node_type": "A", "code_hash": "", "config_hash": None, "schema_hash": 5}, ["code_hash", "config_hash", "schema_hash"]),
        ({}, list(NODE_ID_FIELDS)),
    ],
)
def test_missing_fields(n, expected):
    assert missing_fields(n) == expected


def test_verify_all_good():
    assert verify_node_ids([node(), node(node_type="Other"), node(code_hash="zzz")]) == []
    assert verify_node_ids([]) == []


def test_verify_reports_every_offender_with_index():
    good = node()
    wrong = node(code_hash="x")
    wrong["node_id"] = "0" * 64
    seed_era = node(config_hash="y")
    del seed_era["config_hash"]  # seed-era SDK: hashed config_hash but did not send it
    no_id = node(schema_hash="q")
    del no_id["node_id"]

    problems = verify_node_ids([good, wrong, seed_era, no_id])

    assert problems == [
        {"index": 1, "node_id": "0" * 64, "expected": sha256_node_id("Compute", "x", "def", "123")},
        {"index": 2, "node_id": seed_era["node_id"], "missing_fields": ["config_hash"]},
        {"index": 3, "node_id": None, "expected": sha256_node_id("Compute", "abc", "def", "q")},
    ]


def test_missing_node_id_and_fields():
    assert verify_node_ids([{"node_type": "A"}]) == [
        {"index": 0, "node_id": None, "missing_fields": ["code_hash", "config_hash", "schema_hash"]}
    ]


def test_version_sentinel_is_not_exempt():
    sentinel = node(node_type="VersionSentinel")
    sentinel["node_id"] = "sentinel-1"
    assert verify_node_ids([sentinel]) == [
        {"index": 0, "node_id": "sentinel-1", "expected": sha256_node_id("VersionSentinel", "abc", "def", "123")}
    ]
    bare = {"node_type": "VersionSentinel", "node_id": "s"}
    assert verify_node_ids([bare])[0]["missing_fields"] == ["code_hash", "config_hash", "schema_hash"]


def test_verify_uses_lookup_for_collisions():
    n = node()
    collide = lambda _id: ("Compute", "abc", "OTHER", "123")  # noqa: E731
    assert verify_node_ids([n], lookup=collide) == [{"index": 0, "node_id": SHA256, "expected": SHA3}]
    n["node_id"] = SHA3
    assert verify_node_ids([n], lookup=collide) == []
