"""Build a strategy DAG the Gateway accepts (SPEC §2).

A :class:`Node` is made from what defines it — ``node_type``, ``code``, ``config``,
``schema`` — plus how it runs (``interval``, ``period``, ``tags``, ``inputs``). Its hashes
are SHA-256 hex digests: of the code's text (a callable's source), of the canonical JSON of
the config and of the schema. Its id is :func:`qmtl.common.nodeid.compute_node_id` — the
very function the Gateway uses to recompute it — over
``node_type:code_hash:config_hash:schema_hash`` (SHA3-256 when that digest is already
taken by a different node of the DAG). Every node carries all four fields, so the Gateway
can verify every id.

A :class:`TagQueryNode` consumes every queue whose tags match (``any`` | ``all``) at its
interval; its query is part of its config, so two different queries never share an id.
:class:`Dag` orders nodes topologically (inputs first), drops exact duplicates (a node
shared by two branches is sent once), computes the ``node_ids_crc32`` guard
(:func:`qmtl.common.crc.crc32_of_node_ids`) and the ``POST /strategies`` body::

    price = Node("StreamInput", code="price feed v1", interval=60, period=30, tags=["btc", "price"])
    sma = Node("Compute", code=compute_sma, config={"window": 20}, interval=60, period=20, inputs=[price])
    peers = TagQueryNode(["price"], interval=60, match_mode="any")
    dag = Dag([sma, peers], name="momentum")
    body = dag.submission(run_type="dry-run", world_id="crypto-mom")
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import textwrap
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from qmtl.common.crc import crc32_of_node_ids
from qmtl.common.nodeid import NODE_ID_FIELDS, Lookup, compute_node_id, sha256_node_id
from qmtl.common.statehash import canonical_json
from qmtl.common.tasks import detach

from .types import MATCH_MODE_VALUES, RUN_TYPE_VALUES

__all__ = [
    "Dag",
    "Node",
    "TagQueryNode",
    "code_hash_of",
    "json_hash_of",
]

TAG_QUERY_TYPE = "TagQueryNode"
_TAG_QUERY_CODE = "qmtl.sdk.TagQueryNode/1"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def code_hash_of(code: Any) -> str:
    """SHA-256 hex of a node's code: a string's UTF-8 bytes, bytes as they are, a callable's
    dedented source (its qualified name and bytecode when the source is not available),
    ``None`` as empty text."""
    if code is None:
        return _sha256(b"")
    if isinstance(code, str):
        return _sha256(code.encode())
    if isinstance(code, (bytes, bytearray, memoryview)):
        return _sha256(bytes(code))
    if callable(code):
        try:
            return _sha256(textwrap.dedent(inspect.getsource(code)).encode())
        except (OSError, TypeError):
            fn = getattr(code, "__func__", code)
            co = getattr(fn, "__code__", None)
            name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
            return _sha256(name.encode() + (co.co_code if co is not None else b""))
    raise TypeError(f"cannot hash code of type {type(code).__name__}: pass text, bytes or a callable")


def json_hash_of(value: Any) -> str:
    """SHA-256 hex of the canonical JSON of ``value`` (sorted keys, compact, UTF-8); None → ``{}``."""
    return _sha256(canonical_json({} if value is None else value))


class Node:
    """One compute node. Hashes and the id are computed from the defining fields; pass
    ``code_hash``/``config_hash``/``schema_hash`` to use precomputed ones instead."""

    def __init__(
        self,
        node_type: str,
        *,
        code: Any = None,
        config: Mapping[str, Any] | None = None,
        schema: Mapping[str, Any] | None = None,
        interval: int = 0,
        period: int = 0,
        tags: Iterable[str] = (),
        inputs: Iterable[Node | str] = (),
        name: str | None = None,
        pre_warmup: bool | None = None,
        asset: str | None = None,
        code_hash: str | None = None,
        config_hash: str | None = None,
        schema_hash: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(node_type, str) or not node_type:
            raise ValueError("node_type must be a non-empty string")
        if isinstance(tags, str):
            raise TypeError("tags must be a list of strings, not a string")
        if int(interval) < 0 or int(period) < 0:
            raise ValueError("interval and period must be >= 0")
        self.node_type = node_type
        self.code = code
        self.config = dict(config) if config is not None else None
        self.schema = dict(schema) if schema is not None else None
        self.interval = int(interval)
        self.period = int(period)
        self.tags: list[str] = list(tags)
        self.inputs: list[Node | str] = list(inputs)
        self.name = name
        self.pre_warmup = pre_warmup
        self.asset = asset
        self.extra = dict(extra or {})
        self.code_hash = code_hash or code_hash_of(code)
        self.config_hash = config_hash or json_hash_of(self._config_for_hash())
        self.schema_hash = schema_hash or json_hash_of(self.schema)
        self._node_id: str | None = None  # set by a Dag when the SHA3 fallback applies

    def _config_for_hash(self) -> Any:
        return self.config

    @property
    def fields(self) -> tuple[str, str, str, str]:
        """The four fields the id is computed from."""
        return (self.node_type, self.code_hash, self.config_hash, self.schema_hash)

    @property
    def node_id(self) -> str:
        """The node's id (SHA-256; SHA3-256 when a :class:`Dag` found the digest taken)."""
        return self._node_id or sha256_node_id(*self.fields)

    def to_dict(self, input_ids: Sequence[str] | None = None) -> dict[str, Any]:
        """The node as the DAG schema has it (``dag_node.schema.json``)."""
        ids = input_ids if input_ids is not None else [i if isinstance(i, str) else i.node_id for i in self.inputs]
        out: dict[str, Any] = dict(self.extra)
        out.update({
            "node_id": self.node_id,
            "node_type": self.node_type,
            "code_hash": self.code_hash,
            "config_hash": self.config_hash,
            "schema_hash": self.schema_hash,
            "interval": self.interval,
            "period": self.period,
            "tags": list(self.tags),
            "inputs": list(ids),
        })
        if self.name is not None:
            out["name"] = self.name
        if self.pre_warmup is not None:
            out["pre_warmup"] = bool(self.pre_warmup)
        if self.asset is not None:
            out["asset"] = self.asset
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.node_type!r}, id={self.node_id[:12]}…)"


Listener = Callable[[list[str]], Any]


class TagQueryNode(Node):
    """Consumes every queue carrying the tags (``any``: at least one, ``all``: every one)
    at ``interval`` seconds. ``queues`` holds the matching queues once resolved (by the
    Gateway's ack, :class:`qmtl.sdk.TagQueryManager` or by hand with
    :meth:`update_queues`); listeners added with :meth:`on_update` hear every change."""

    def __init__(
        self,
        tags: Iterable[str],
        *,
        interval: int,
        match_mode: str = "any",
        period: int = 1,
        config: Mapping[str, Any] | None = None,
        schema: Mapping[str, Any] | None = None,
        name: str | None = None,
        code: Any = _TAG_QUERY_CODE,
        **kw: Any,
    ) -> None:
        if isinstance(tags, str):
            raise TypeError("tags must be a list of strings, not a string")
        tag_list = list(tags)
        if not tag_list or not all(isinstance(t, str) and t.strip() for t in tag_list):
            raise ValueError("a TagQueryNode needs at least one non-blank tag")
        if int(interval) < 1:
            raise ValueError("a TagQueryNode's interval must be >= 1 second")
        if match_mode not in MATCH_MODE_VALUES:
            raise ValueError(f"match_mode must be one of {', '.join(map(repr, MATCH_MODE_VALUES))}, not {match_mode!r}")
        self.match_mode = match_mode
        self.queues: list[str] = []
        self._listeners: list[Listener] = []
        super().__init__(TAG_QUERY_TYPE, code=code, config=config, schema=schema, interval=interval, period=period,
                         tags=tag_list, name=name, **kw)

    def _config_for_hash(self) -> Any:
        query = {"tags": sorted({t.strip() for t in self.tags}), "interval": self.interval, "match_mode": self.match_mode}
        return {"query": query, "config": self.config or {}}

    @property
    def query_key(self) -> tuple[tuple[str, ...], int, str]:
        """``(sorted unique tags, interval, match_mode)``: the queue key the Gateway follows."""
        return (tuple(sorted({t.strip() for t in self.tags})), self.interval, self.match_mode)

    def to_dict(self, input_ids: Sequence[str] | None = None) -> dict[str, Any]:
        out = super().to_dict(input_ids)
        out["match_mode"] = self.match_mode
        return out

    def on_update(self, listener: Listener) -> Listener:
        """Call ``listener(queues)`` whenever the matching queues change (sync or async)."""
        self._listeners.append(listener)
        return listener

    def update_queues(self, queues: Iterable[str]) -> bool:
        """Set the matching queues; returns True (and tells the listeners) when they changed."""
        new = sorted(set(queues))
        if new == self.queues:
            return False
        self.queues = new
        for listener in list(self._listeners):
            result = listener(list(new))
            if inspect.isawaitable(result):
                detach(result)
        return True


class Dag:
    """An ordered set of nodes: inputs before the nodes that read them, each node once."""

    def __init__(self, nodes: Iterable[Node] = (), *, name: str | None = None, meta: Mapping[str, Any] | None = None,
                 lookup: Lookup | None = None) -> None:
        self.name = name
        self.meta = dict(meta or {})
        self._lookup = lookup
        self._nodes: list[Node] = []
        self._seen: dict[int, Node] = {}  # id() → node (holding it keeps id() unique)
        self._by_id: dict[str, Node] = {}
        self._sha256_owner: dict[str, tuple[str, str, str, str]] = {}
        self.add(*nodes)

    # -- building ---------------------------------------------------------------------
    def add(self, *nodes: Node) -> Dag:
        """Add nodes (and, first, the nodes they read). Returns the DAG."""
        for node in nodes:
            self._visit(node, set())
        return self

    def _visit(self, node: Node, path: set[int]) -> None:
        if not isinstance(node, Node):
            raise TypeError(f"expected a Node, got {type(node).__name__}")
        if id(node) in path:
            raise ValueError(f"cycle through {node!r}: a DAG has none")
        if id(node) in self._seen:
            return
        path = path | {id(node)}
        for upstream in node.inputs:
            if isinstance(upstream, Node):
                self._visit(upstream, path)
            elif not isinstance(upstream, str) or not upstream:
                raise TypeError("inputs are Nodes or node ids (non-empty strings)")
        self._assign_id(node)
        existing = self._by_id.get(node.node_id)
        if existing is not None:
            if self._describe(existing) != self._describe(node):
                raise ValueError(
                    f"two different nodes share node_id {node.node_id}: their node_type, code, config and schema "
                    "are equal but other members differ; give them different config"
                )
            self._seen[id(node)] = node
            return  # the same node again: shared, sent once
        self._nodes.append(node)
        self._seen[id(node)] = node
        self._by_id[node.node_id] = node

    def _assign_id(self, node: Node) -> None:
        fields = node.fields
        digest = sha256_node_id(*fields)

        def lookup(d: str) -> tuple[str, str, str, str] | None:
            own = self._sha256_owner.get(d)
            if own is not None:
                return own
            return self._lookup(d) if self._lookup is not None else None

        node_id = compute_node_id(*fields, lookup=lookup)
        node._node_id = node_id if node_id != digest else None
        self._sha256_owner.setdefault(digest, fields)

    def _describe(self, node: Node) -> dict[str, Any]:
        return node.to_dict(self._input_ids(node))

    @staticmethod
    def _input_ids(node: Node) -> list[str]:
        return [i if isinstance(i, str) else i.node_id for i in node.inputs]

    # -- reading ----------------------------------------------------------------------
    @property
    def nodes(self) -> list[Node]:
        return list(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(list(self._nodes))

    def node(self, node_id: str) -> Node:
        return self._by_id[node_id]

    def node_ids(self) -> list[str]:
        """Node ids in DAG order."""
        return [n.node_id for n in self._nodes]

    def tag_query_nodes(self) -> list[TagQueryNode]:
        return [n for n in self._nodes if isinstance(n, TagQueryNode)]

    def crc32(self) -> int:
        """The ``node_ids_crc32`` guard: CRC32 chained over the ids in DAG order."""
        return crc32_of_node_ids(self.node_ids())

    def to_dict(self) -> dict[str, Any]:
        """The DAG as ``dag.schema.json`` has it."""
        if not self._nodes:
            raise ValueError("a DAG needs at least one node")
        out: dict[str, Any] = {"nodes": [n.to_dict(self._input_ids(n)) for n in self._nodes]}
        if self.name is not None:
            out["name"] = self.name
        if self.meta:
            out["meta"] = dict(self.meta)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def submission(self, *, run_type: str = "dry-run", world_id: str | None = None,
                   meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The body of ``POST /strategies``: base64 ``dag_json``, ``meta``, ``run_type``,
        ``node_ids_crc32`` and ``world_id`` when given."""
        if run_type not in RUN_TYPE_VALUES:
            raise ValueError(f"run_type must be one of {', '.join(map(repr, RUN_TYPE_VALUES))}, not {run_type!r}")
        body: dict[str, Any] = {
            "dag_json": base64.b64encode(self.to_json().encode()).decode("ascii"),
            "meta": dict(meta) if meta is not None else ({"name": self.name} if self.name else None),
            "run_type": run_type,
            "node_ids_crc32": self.crc32(),
        }
        if world_id is not None:
            body["world_id"] = world_id
        return body


def verify_dag_dict(dag: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The problems the Gateway would report for these nodes' ids (empty when all good)."""
    from qmtl.common.nodeid import verify_node_ids

    return verify_node_ids(list(dag.get("nodes") or []))


NODE_FIELDS = NODE_ID_FIELDS
