"""Deterministic NodeIDs (SPEC §2).

A node's id is the hex SHA-256 of ``f"{node_type}:{code_hash}:{config_hash}:{schema_hash}"``.
If that digest is already known for a *different* node (same id, different four fields),
the SHA3-256 digest of the same bytes is used instead.

The SDK computes ids; the Gateway recomputes every one with :func:`verify_node_ids`
before asking the DAG Manager for a diff. Nothing here is exempt from verification,
``VersionSentinel`` nodes included: the Gateway inserts its own sentinel afterwards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "NODE_ID_FIELDS",
    "Lookup",
    "compute_node_id",
    "missing_fields",
    "node_id_bytes",
    "sha256_node_id",
    "sha3_node_id",
    "verify_node_ids",
]

NODE_ID_FIELDS: tuple[str, str, str, str] = ("node_type", "code_hash", "config_hash", "schema_hash")

#: Maps a SHA-256 node id to the four fields of the node already known under it, or None.
Lookup = Callable[[str], tuple[str, str, str, str] | None]


def node_id_bytes(node_type: str, code_hash: str, config_hash: str, schema_hash: str) -> bytes:
    """The canonical bytes that both digests are taken over."""
    return f"{node_type}:{code_hash}:{config_hash}:{schema_hash}".encode()


def sha256_node_id(node_type: str, code_hash: str, config_hash: str, schema_hash: str) -> str:
    """Lowercase hex SHA-256 of :func:`node_id_bytes`."""
    return hashlib.sha256(node_id_bytes(node_type, code_hash, config_hash, schema_hash)).hexdigest()


def sha3_node_id(node_type: str, code_hash: str, config_hash: str, schema_hash: str) -> str:
    """Lowercase hex SHA3-256 of :func:`node_id_bytes` (the collision fallback)."""
    return hashlib.sha3_256(node_id_bytes(node_type, code_hash, config_hash, schema_hash)).hexdigest()


def compute_node_id(
    node_type: str,
    code_hash: str,
    config_hash: str,
    schema_hash: str,
    *,
    lookup: Lookup | None = None,
) -> str:
    """The node's id: SHA-256, or SHA3-256 when ``lookup`` reports a different node under it."""
    fields = (node_type, code_hash, config_hash, schema_hash)
    digest = sha256_node_id(*fields)
    if lookup is not None:
        known = lookup(digest)
        if known is not None and tuple(known) != fields:
            return sha3_node_id(*fields)
    return digest


def missing_fields(node: Mapping[str, Any]) -> list[str]:
    """The NODE_ID_FIELDS that are absent from ``node`` or not non-empty strings, in order."""
    return [f for f in NODE_ID_FIELDS if not (isinstance(node.get(f), str) and node.get(f))]


def verify_node_ids(nodes: Sequence[Mapping[str, Any]], *, lookup: Lookup | None = None) -> list[dict[str, Any]]:
    """Recompute every node's id; return one problem dict per offending node (empty if all good).

    * fields missing: ``{"index", "node_id" (sent, or None), "missing_fields"}``
    * id mismatch:    ``{"index", "node_id" (sent), "expected"}``
    """
    problems: list[dict[str, Any]] = []
    for index, node in enumerate(nodes):
        sent = node.get("node_id")
        missing = missing_fields(node)
        if missing:
            problems.append({"index": index, "node_id": sent, "missing_fields": missing})
            continue
        expected = compute_node_id(*(node[f] for f in NODE_ID_FIELDS), lookup=lookup)
        if sent != expected:
            problems.append({"index": index, "node_id": sent, "expected": expected})
    return problems
