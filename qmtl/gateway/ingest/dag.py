"""The checks ``POST /strategies`` runs on a submitted DAG, in order, before anything is
sent to the DAG Manager (SPEC §2):

1. :func:`decode_dag_json` – ``dag_json`` is base64 of the DAG's JSON (standard or URL-safe
   alphabet, padding optional) or the raw JSON text; neither → 400.
2. :func:`check_crc` – ``node_ids_crc32`` against the CRC32 of the node ids in DAG order →
   400 naming ``expected`` and ``received``. When the ids cannot be read at all (no
   ``nodes`` list of objects with string ids) there is nothing to checksum and step 3
   reports the DAG's shape instead.
3. :func:`validate_dag` – the DAG against the DAG Manager's ``dag.schema.json`` → 422 whose
   ``errors[].pointer`` are JSON pointers into the decoded DAG, prefixed with ``/dag_json``.
   A node id that appears twice is a 422 as well (the DAG Manager refuses it). A node that
   only lacks NodeID fields (which the schema requires) is left to step 4, whose 400 names
   the missing fields as SPEC §2 asks.
4. :func:`verify_ids` – every node's id recomputed from ``node_type``, ``code_hash``,
   ``config_hash``, ``schema_hash`` (SHA-256; SHA3-256 where the SHA-256 digest is known
   for a different node) → 400 listing every offending node.

Then :func:`apply_defaults` fills in what the schema declares as ``default`` (a TagQueryNode
without ``match_mode`` is ``any``: ``tag_query_node.schema.json``), before the content hash,
the stored DAG and the diff see it. No NodeID field has a default, so ids are unaffected.

Pure functions: no I/O here except what the caller passes in (the collision lookups).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from jsonschema import Draft202012Validator

from qmtl.common.crc import crc32_of_node_ids
from qmtl.common.errors import BadRequest, Unprocessable
from qmtl.common.nodeid import NODE_ID_FIELDS, missing_fields, sha3_node_id, sha256_node_id, verify_node_ids
from qmtl.contracts.connexion31 import pointer
from qmtl.contracts.defaults import defaults_filler
from qmtl.contracts.events import schema_validator
from qmtl.contracts.loader import load_schema_files, schema_registry

DAG_SCHEMA_FILE = "dag.schema.json"  # owned by the DAG Manager's contract (specs/schemas/)
SENTINEL_TYPE = "VersionSentinel"
TAG_QUERY_TYPE = "TagQueryNode"
DAG_POINTER = "/dag_json"
_MAX_ERRORS = 50

__all__ = [
    "DAG_POINTER",
    "SENTINEL_TYPE",
    "apply_defaults",
    "TAG_QUERY_TYPE",
    "canonical_json",
    "check_crc",
    "collision_claims",
    "precheck_ids",
    "content_hash",
    "decode_dag_json",
    "insert_sentinel",
    "sentinel_id_for",
    "tag_queries",
    "validate_dag",
    "verify_ids",
]


# -- 1. decode -------------------------------------------------------------------------------
def _b64decode(text: str) -> bytes | None:
    s = "".join(text.split())
    if not s:
        return None
    s += "=" * (-len(s) % 4)
    for altchars in (None, b"-_"):
        try:
            return base64.b64decode(s, altchars=altchars, validate=True)
        except (binascii.Error, ValueError):
            continue
    return None


def decode_dag_json(dag_json: str) -> Any:
    """The decoded DAG (any JSON value; its shape is checked by :func:`validate_dag`).

    base64 is tried first; a string that is not base64 of UTF-8 JSON is parsed as JSON
    text. Raw JSON objects never decode as base64 (``{`` is outside both alphabets).
    """
    raw = _b64decode(dag_json)
    if raw is not None:
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            pass
    try:
        return json.loads(dag_json)
    except ValueError as exc:
        raise BadRequest(
            "dag_json is neither base64-encoded JSON nor JSON text "
            f"(as JSON text: {getattr(exc, 'msg', exc)} at position {getattr(exc, 'pos', '?')})",
            ext={"errors": [{"pointer": DAG_POINTER, "message": "not base64 of JSON and not JSON text"}]},
        ) from None


# -- 2. CRC guard ----------------------------------------------------------------------------
def readable_node_ids(dag: Any) -> list[str] | None:
    """The node ids in DAG order, or None when the DAG's shape does not let them be read."""
    if not isinstance(dag, Mapping):
        return None
    nodes = dag.get("nodes")
    if not isinstance(nodes, list):
        return None
    ids: list[str] = []
    for node in nodes:
        if not isinstance(node, Mapping) or not isinstance(node.get("node_id"), str):
            return None
        ids.append(node["node_id"])
    return ids


def check_crc(dag: Any, received: int) -> None:
    ids = readable_node_ids(dag)
    if ids is None:
        return  # the schema check says what is wrong with the shape
    expected = crc32_of_node_ids(ids)
    if expected != received:
        raise BadRequest(
            f"node_ids_crc32 is {received} but the CRC32 of the {len(ids)} node ids in DAG order is {expected}",
            ext={
                "expected": expected,
                "received": received,
                "errors": [{"pointer": "/node_ids_crc32", "message": f"expected {expected}, received {received}"}],
            },
        )


# -- 3. DAG schema ---------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _precise_dag_validator() -> Draft202012Validator:
    return Draft202012Validator(load_schema_files()[DAG_SCHEMA_FILE], registry=schema_registry(),
                                format_checker=Draft202012Validator.FORMAT_CHECKER)


def _is_missing_id_field(error: Any) -> bool:
    """A ``required`` error for one of the four NodeID fields of a node.

    ``dag.schema.json`` requires them, but SPEC §2 answers a node that lacks one with the
    NodeID 400 naming the missing field (the seed-era SDK left ``config_hash`` out), so
    these errors are left to :func:`verify_ids`.
    """
    path = list(error.absolute_path)
    if error.validator != "required" or len(path) != 2 or path[0] != "nodes":
        return False
    m = _REQUIRED_RE.match(error.message)
    return m is not None and m.group(1) in NODE_ID_FIELDS


_REQUIRED_RE = re.compile(r"^'([^']+)' is a required property$")


def validate_dag(dag: Any) -> None:
    """422 unless ``dag`` conforms to ``dag.schema.json`` and names each node id once.

    A node that only lacks NodeID fields passes here and fails :func:`verify_ids` (400).
    """
    if not schema_validator(DAG_SCHEMA_FILE).is_valid(dag):
        all_errors = sorted(_precise_dag_validator().iter_errors(dag), key=lambda e: list(map(str, e.absolute_path)))
        errors = [
            {"pointer": DAG_POINTER + pointer(e.absolute_path), "message": e.message}
            for e in all_errors if not _is_missing_id_field(e)
        ]
        if errors or not all_errors:
            errors = errors[:_MAX_ERRORS] or [{"pointer": DAG_POINTER, "message": f"does not conform to {DAG_SCHEMA_FILE}"}]
            raise Unprocessable(
                f"The DAG in dag_json does not conform to {DAG_SCHEMA_FILE}: {errors[0]['message']} at {errors[0]['pointer']} "
                "(pointers under /dag_json point into the decoded DAG)",
                ext={"errors": errors},
            )
    seen: dict[str, int] = {}
    dups: list[dict] = []
    for index, node in enumerate(dag["nodes"]):
        first = seen.setdefault(node["node_id"], index)
        if first != index:
            dups.append({"pointer": f"{DAG_POINTER}/nodes/{index}/node_id", "message": f"node id already used by node {first}"})
    if dups:
        raise Unprocessable(
            f"The DAG in dag_json names {len(dups)} node id(s) more than once: {dups[0]['message']} at {dups[0]['pointer']}",
            ext={"errors": dups[:_MAX_ERRORS]},
        )


def apply_defaults(dag: Any) -> Any:
    """Fill the schema's ``default`` values into a DAG that passed :func:`validate_dag` (in place)."""
    defaults_filler(DAG_SCHEMA_FILE)(dag)
    return dag


# -- 4. NodeIDs ------------------------------------------------------------------------------
Fields = tuple[str, str, str, str]


def _fields(node: Mapping[str, Any]) -> Fields:
    return tuple(node[f] for f in NODE_ID_FIELDS)


def precheck_ids(nodes: Sequence[Mapping[str, Any]]) -> tuple[bool, list[str]]:
    """One pass, one SHA-256 per node: ``(every id is the SHA-256 of its fields, claims)``.

    ``claims`` are the SHA-256 ids the DAG says are taken: nodes sent with the SHA3-256 id of
    their fields. Only those need the DAG Manager's global graph (``GET /nodes/{id}``) to be
    verified; every other node is verified here.
    """
    ok = True
    claims: list[str] = []
    for node in nodes:
        if missing_fields(node):
            ok = False
            continue
        f = _fields(node)
        digest = sha256_node_id(*f)
        sent = node.get("node_id")
        if sent == digest:
            continue
        ok = False
        if sent == sha3_node_id(*f) and digest not in claims:
            claims.append(digest)
    return ok, claims


def collision_claims(nodes: Sequence[Mapping[str, Any]]) -> list[str]:
    return precheck_ids(nodes)[1]


def verify_ids(nodes: Sequence[Mapping[str, Any]], known: Mapping[str, Fields] | None = None) -> None:
    """400 listing every node whose id is not the recomputed one (or cannot be computed).

    ``known`` maps SHA-256 ids to the fields of the node the global graph has under that id
    (the answers to :func:`collision_claims`). Within the DAG, the first node with a given
    SHA-256 digest owns it; a later node with the same digest and different fields gets the
    SHA3-256 id.
    """
    ok, claims = precheck_ids(nodes)
    if ok:
        return
    lookup = None
    if claims:  # rare: somebody claims a SHA-256 collision; resolve it against the graph and the DAG
        in_dag: dict[str, Fields] = {}
        for node in nodes:
            if not missing_fields(node):
                f = _fields(node)
                in_dag.setdefault(sha256_node_id(*f), f)
        known = dict(known or {})

        def lookup(digest: str) -> Fields | None:
            return known.get(digest) or in_dag.get(digest)

    problems = verify_node_ids(nodes, lookup=lookup)
    if not problems:
        return
    errors = []
    for p in problems:
        where = f"{DAG_POINTER}/nodes/{p['index']}"
        if "missing_fields" in p:
            errors.append({"pointer": where, "message": f"cannot verify the node id: missing {', '.join(p['missing_fields'])}"})
        else:
            errors.append({"pointer": where + "/node_id", "message": f"node id {p['node_id']!r} is not the recomputed {p['expected']!r}"})
    errors = errors[:_MAX_ERRORS]
    raise BadRequest(
        f"{len(problems)} node(s) failed NodeID verification (node_id = SHA-256 of "
        "'node_type:code_hash:config_hash:schema_hash'; every node must carry all four fields): "
        f"{errors[0]['message']} at {errors[0]['pointer']}",
        ext={"nodes": problems, "errors": errors},
    )


# -- identity of the content, sentinel, tag queries --------------------------------------------
def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(dag: Any) -> str:
    """SHA-256 of the DAG's canonical JSON: the same DAG content has the same hash."""
    return hashlib.sha256(canonical_json(dag).encode("utf-8")).hexdigest()


def sentinel_id_for(strategy_id: str) -> str:
    return f"{strategy_id}-sentinel"


def insert_sentinel(dag: Mapping[str, Any], strategy_id: str, version: str | None = None) -> tuple[dict, str]:
    """A copy of ``dag`` with a ``VersionSentinel`` node appended whose inputs are every
    node of the DAG; returns ``(dag, sentinel_id)``."""
    sid = sentinel_id_for(strategy_id)
    sentinel: dict[str, Any] = {
        "node_id": sid,
        "node_type": SENTINEL_TYPE,
        "inputs": [n["node_id"] for n in dag["nodes"]],
    }
    if version:
        sentinel["version"] = version
    out = dict(dag)
    out["nodes"] = [*dag["nodes"], sentinel]
    return out, sid


def tag_queries(dag: Mapping[str, Any]) -> dict[str, tuple[tuple[str, ...], int, str]]:
    """TagQueryNode id → (tags, interval, match_mode) of a DAG after :func:`apply_defaults`."""
    out: dict[str, tuple[tuple[str, ...], int, str]] = {}
    for node in dag["nodes"]:
        if node.get("node_type") == TAG_QUERY_TYPE:
            out[node["node_id"]] = (tuple(node["tags"]), int(node["interval"]), node["match_mode"])
    return out


def meta_str(meta: Any, key: str, pattern: re.Pattern) -> str | None:
    """``meta[key]`` when it is a string matching ``pattern`` (the sentinel's version, the diff's asset)."""
    if isinstance(meta, Mapping):
        v = meta.get(key)
        if isinstance(v, str) and pattern.match(v):
            return v
    return None
