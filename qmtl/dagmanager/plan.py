"""The plan of a diff: the request checked and indexed before any SQL — nodes by id, queue
nodes and tag queries in DAG order, the namespace (``sim``), asset, version and sentinel."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qmtl.common.errors import Unprocessable
from qmtl.contracts.constants import RunType

from . import naming, store
from .tagindex import TagKey, normalise_tags

TAG_QUERY_NODE = "TagQueryNode"
VERSION_SENTINEL = "VersionSentinel"
SIM_RUN_TYPES = frozenset({"dry-run", "dryrun", "dry_run", "paper"})
DEFAULT_RUN_TYPE = RunType["LIVE"]


@functools.lru_cache(maxsize=1024)
def _tags_json(tags: tuple[str, ...]) -> str:
    """The stored form of a node's tags (few distinct sets: cached)."""
    return store.dumps(list(tags))


class PlanNode:
    """One node of a diffed DAG. What only new nodes need (tags, names, rows) is derived
    on first use: a diff of known nodes reads little more than their ids."""

    __slots__ = ("node_id", "node_type", "raw", "asset", "version", "sim", "_tags", "_tags_json")

    def __init__(self, node_id: str, raw: dict, asset: str, version: str, sim: bool) -> None:
        self.node_id = node_id
        self.node_type: str = raw["node_type"]
        self.raw = raw
        node_asset = raw.get("asset")
        self.asset = node_asset if type(node_asset) is str and node_asset else asset
        self.version = version
        self.sim = sim
        self._tags: tuple[str, ...] | None = None
        self._tags_json: str | None = None

    @property
    def tags(self) -> tuple[str, ...]:
        if self._tags is None:
            self._tags = normalise_tags(self.raw.get("tags") or ())
        return self._tags

    @property
    def tags_json(self) -> str:
        if self._tags_json is None:
            self._tags_json = _tags_json(self.tags)
        return self._tags_json

    @property
    def code_hash(self) -> str:
        return self.raw.get("code_hash") or ""

    def int_field(self, key: str) -> int | None:
        value = self.raw.get(key)
        return value if type(value) is int else None

    @property
    def queue_interval(self) -> int:
        return int(self.int_field("interval") or 0)

    @property
    def first_name(self) -> str:
        return next(naming.candidates(self.asset, self.node_type, self.code_hash, self.version, node_id=self.node_id, sim=self.sim))

    def candidates(self, limit: int | None = None) -> list[str]:
        """The node's queue names, shortest first (the first ``limit`` of them)."""
        names = naming.candidates(self.asset, self.node_type, self.code_hash, self.version, node_id=self.node_id, sim=self.sim)
        return list(itertools.islice(names, limit))


@dataclass
class Plan:
    strategy_id: str
    run_type: str
    sim: bool
    asset: str
    version: str
    sentinel_id: str
    nodes: dict[str, PlanNode]  # node_id → node (queue nodes and tag queries)
    queue_nodes: list[str]  # in DAG order
    graph_nodes: list[str]  # queue nodes + tag queries, DAG order
    tag_queries: dict[str, TagKey]


def node_values(batch: Sequence[PlanNode], now: float) -> dict[str, Any]:
    """The ``dm_nodes`` rows of ``batch``, column by column (see ``SqlHelpers.insert_ignore``)."""
    return {
        "node_id": [n.node_id for n in batch],
        "node_type": [n.node_type for n in batch],
        "code_hash": [n.code_hash for n in batch],
        "config_hash": [n.raw.get("config_hash") or "" for n in batch],
        "schema_hash": [n.raw.get("schema_hash") or "" for n in batch],
        "interval": [n.int_field("interval") for n in batch],
        "period": [n.int_field("period") for n in batch],
        "tags": [n.tags_json for n in batch],
        "created_at": now,
    }


def make_plan(strategy_id: str, dag: Mapping[str, Any], *, run_type: str | None, asset: str | None, version: str | None) -> Plan:
    nodes = dag.get("nodes") if isinstance(dag, dict) else None
    if not isinstance(nodes, list) or not nodes:
        raise Unprocessable("the DAG has no nodes", ext={"errors": [{"pointer": "/dag/nodes", "message": "at least one node is required"}]})
    errors: list[dict] = []
    seen: dict[str, int] = {}
    raw: dict[str, dict] = {}
    queue_nodes: list[str] = []
    graph_nodes: list[str] = []
    tag_queries: dict[str, TagKey] = {}
    sentinel: Mapping[str, Any] | None = None
    for i, node in enumerate(nodes):
        if type(node) is not dict or type(node.get("node_id")) is not str or type(node.get("node_type")) is not str:
            errors.append({"pointer": f"/dag/nodes/{i}", "message": "a node needs string node_id and node_type"})
            continue
        nid, ntype = node["node_id"], node["node_type"]
        if nid in seen:
            errors.append({"pointer": f"/dag/nodes/{i}/node_id", "message": f"node_id {nid} also at /dag/nodes/{seen[nid]}"})
            continue
        seen[nid] = i
        if ntype == VERSION_SENTINEL:
            if sentinel is not None:
                errors.append({"pointer": f"/dag/nodes/{i}", "message": "a DAG has at most one VersionSentinel"})
            sentinel = node
            continue
        if ntype == TAG_QUERY_NODE:
            try:
                key = TagKey.of(node.get("tags") or (), node.get("interval") or 0, node.get("match_mode"))
            except (TypeError, ValueError) as exc:
                errors.append({"pointer": f"/dag/nodes/{i}", "message": str(exc)})
                continue
            if not key.tags or key.interval < 1:
                errors.append({"pointer": f"/dag/nodes/{i}", "message": "a TagQueryNode needs tags and an interval >= 1"})
                continue
            tag_queries[nid] = key
        else:
            queue_nodes.append(nid)
        raw[nid] = node
        graph_nodes.append(nid)
    if errors:
        raise Unprocessable(f"the DAG is not valid: {errors[0]['message']} at {errors[0]['pointer']}", ext={"errors": errors[:50]})
    run_type = run_type or DEFAULT_RUN_TYPE
    sim = run_type in SIM_RUN_TYPES
    sentinel_version = sentinel.get("version") if sentinel is not None else None
    version = version or (sentinel_version if isinstance(sentinel_version, str) and sentinel_version else None) or naming.DEFAULT_VERSION
    asset = asset or naming.DEFAULT_ASSET
    by_id = {nid: PlanNode(nid, node, asset, version, sim) for nid, node in raw.items()}
    return Plan(
        strategy_id=strategy_id,
        run_type=run_type,
        sim=sim,
        asset=asset,
        version=version,
        sentinel_id=sentinel["node_id"] if sentinel is not None else f"{strategy_id}-sentinel",
        nodes=by_id,
        queue_nodes=queue_nodes,
        graph_nodes=graph_nodes,
        tag_queries=tag_queries,
    )



__all__ = ["DEFAULT_RUN_TYPE", "SIM_RUN_TYPES", "TAG_QUERY_NODE", "VERSION_SENTINEL", "Plan", "PlanNode", "make_plan", "node_values"]
