"""Contract constants derived from the specs, never restated in Python.

Everything here is read from the loaded specs (:mod:`qmtl.contracts.loader`) when this
module is first imported; edit the spec and these follow (``tests/contract/test_spec_drift.py``
proves it on an edited copy of ``specs/``):

* **Enums** of the JSON Schemas as :class:`enum.StrEnum` classes (members compare equal to
  their strings, so they go to JSON, Redis and metrics labels as they are), generated into
  :mod:`qmtl.contracts.enums` by ``scripts/gen_sdk_types.py`` so mypy sees their members.
  Member names are the values upper-cased (``dry-run`` → ``DRY_RUN``); code that names a
  member a spec no longer has fails mypy, and the drift test lists every member code uses.
  :data:`Mode` is ordered as the schema lists it (``backtest`` < ``dryrun`` < ``live``:
  promotion order).
* **Control topics**: the Kafka topic of each ControlBus channel of ``specs/asyncapi.yaml``
  (its ``bindings.kafka.topic``, else its ``address``).
* **Operations** (:func:`operation`): an operation's method, path template (and a matcher
  for it), response statuses, content types and the schema files of its request and
  responses — what the fast paths in front of the contract stack serve by.
* **Proxy rules** (:func:`proxy_rules`): the ``x-qmtl-proxy`` extension of the Gateway's
  proxied operations (``specs/extensions/x-qmtl-proxy.schema.json``).

:func:`derive` computes all of it for any specs directory (the drift test uses a copy).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Any

from qmtl.contracts.enums import (
    MatchMode,
    Mode,
    PolicyStatus,
    RunType,
    Side,
    StrategyState,
    StreamTopic,
    SubscribeTopic,
    WorldState,
)
from qmtl.contracts.loader import SPECS_DIR, SpecError, load_asyncapi, load_openapi, load_schema_files

__all__ = [
    "CONTROL_TOPICS", "Contract", "DEFAULT_MATCH_MODE", "ENUMS", "MATCH_MODES", "MODES", "MatchMode", "Mode", "Operation", "RunType", "SIDES",
    "STRATEGY_STATES", "STREAM_TOPICS", "Side", "StrategyState", "StreamTopic", "SubscribeTopic",
    "PolicyStatus", "WorldState", "TOPIC_ACTIVATION", "TOPIC_POLICY",
    "TOPIC_QUEUES", "derive", "operation", "proxy_rules", "schema_enum", "upstream_path",
]

# Where each enum lives in the specs: (schema file, JSON pointer to the schema that has the enum).
# The same enum is repeated in other schemas of the spec; test_spec_drift checks every copy
# equals the one read here.
ENUM_SOURCES: dict[str, tuple[str, str]] = {
    "Mode": ("decision_envelope.schema.json", "/properties/effective_mode"),
    "Side": ("activation_envelope.schema.json", "/properties/side"),
    "StrategyState": ("strategy_status.schema.json", "/properties/status"),
    "MatchMode": ("tag_query_node.schema.json", "/properties/match_mode"),
    "StreamTopic": ("stream_descriptor.schema.json", "/properties/topics/items"),
    "SubscribeTopic": ("subscribe_request.schema.json", "/properties/topics/items"),
    "RunType": ("strategy_submission.schema.json", "/properties/run_type"),
    "WorldState": ("world.schema.json", "/properties/state"),
    "PolicyStatus": ("policy_summary.schema.json", "/properties/status"),
}

# The ControlBus channels of asyncapi.yaml (by channel id) whose topics the services use.
CONTROL_CHANNELS = {"activation": "controlActivation", "policy": "controlPolicy", "queues": "controlQueues"}


def _pointer(doc: Any, pointer: str, where: str) -> Any:
    node = doc
    for part in [p for p in pointer.split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise SpecError(f"{where}: nothing at {pointer!r}") from None
    return node


def schema_enum(file_name: str, pointer: str, specs_dir: Path = SPECS_DIR) -> tuple[str, ...]:
    """The ``enum`` of the schema at ``pointer`` in ``specs/schemas/<file_name>`` (following
    a ``$ref`` to another schema file when that is what sits there)."""
    schemas = load_schema_files(specs_dir / "schemas")
    if file_name not in schemas:
        raise SpecError(f"{specs_dir / 'schemas'}: no schema file {file_name!r}")
    node = _pointer(schemas[file_name], pointer, file_name)
    seen = 0
    while isinstance(node, dict) and "enum" not in node and isinstance(node.get("$ref"), str) and seen < 8:
        ref_file, _, frag = node["$ref"].partition("#")
        file_name = Path(ref_file).name if ref_file else file_name
        node = _pointer(schemas[file_name], frag, file_name)
        seen += 1
    values = node.get("enum") if isinstance(node, dict) else None
    if not values or not all(isinstance(v, str) for v in values):
        raise SpecError(f"{file_name}: no enum of strings at {pointer!r}")
    return tuple(values)


def schema_default(file_name: str, pointer: str, specs_dir: Path = SPECS_DIR) -> Any:
    """The ``default`` of the schema at ``pointer`` in ``specs/schemas/<file_name>``."""
    node = _pointer(load_schema_files(specs_dir / "schemas").get(file_name), pointer, file_name)
    if not isinstance(node, dict) or "default" not in node:
        raise SpecError(f"{file_name}: no default at {pointer!r}")
    return node["default"]


def member_name(value: str) -> str:
    name = re.sub(r"\W", "_", value).upper()
    return name if name.isidentifier() else f"_{name}"


def spec_enum(name: str, values: tuple[str, ...]) -> type[StrEnum]:
    return StrEnum(name, [(member_name(v), v) for v in values], module=__name__)  # type: ignore[return-value]


def control_topics(specs_dir: Path = SPECS_DIR) -> dict[str, str]:
    """``activation``/``policy``/``queues`` → the Kafka topic of that ControlBus channel."""
    doc = load_asyncapi(specs_dir)
    out: dict[str, str] = {}
    for short, channel_id in CONTROL_CHANNELS.items():
        channel = doc["channels"].get(channel_id)
        if not isinstance(channel, dict):
            raise SpecError(f"{specs_dir / 'asyncapi.yaml'}: no channel {channel_id!r}")
        kafka = (channel.get("bindings") or {}).get("kafka") or {}
        topic = kafka.get("topic") or channel.get("address")
        if not isinstance(topic, str) or not topic:
            raise SpecError(f"{specs_dir / 'asyncapi.yaml'}: channel {channel_id!r} has no address")
        out[short] = topic
    return out


# --------------------------------------------------------------------------- operations


@dataclass(frozen=True)
class Operation:
    """One operation of a loaded OpenAPI document, as a fast path needs it."""

    service: str
    operation_id: str
    method: str  # upper case
    path: str  # the template, e.g. /worlds/{world_id}/decide
    statuses: tuple[str, ...]  # the documented response codes ("200", "304", "default", ...)
    request_schema: str | None  # schema file of the application/json request body
    request_content_types: tuple[str, ...]
    response_schemas: Mapping[str, str] = field(default_factory=dict)  # status → schema file
    response_content_types: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    path_params: tuple[str, ...] = ()
    query_params: tuple[str, ...] = ()
    extensions: Mapping[str, Any] = field(default_factory=dict)  # the operation's x-* members

    @property
    def pattern(self) -> re.Pattern[str]:
        return _template_regex(self.path)

    def match(self, path: str) -> dict[str, str] | None:
        """Path parameters when ``path`` is an instance of the template (one segment each)."""
        m = self.pattern.match(path)
        return m.groupdict() if m else None

    def status(self, code: int) -> int:
        """``code`` itself, after checking the spec documents it for this operation."""
        if str(code) not in self.statuses:
            raise SpecError(f"{self.service}: {self.method} {self.path} does not document status {code}")
        return code

    def content_type(self, code: int) -> str:
        """The first content type the spec lists for response ``code``."""
        types = self.response_content_types.get(str(code)) or ()
        if not types:
            raise SpecError(f"{self.service}: {self.method} {self.path} {code} has no content")
        return types[0]


@cache
def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}/]+\})", template)
    return re.compile("^" + "".join(f"(?P<{p[1:-1]}>[^/]+)" if p.startswith("{") else re.escape(p) for p in parts) + "$")


def _schema_file(node: Any, raw: dict, where: str) -> str | None:
    """The ``schemas/<file>`` a raw (unbundled) schema node refers to, following local refs."""
    for _ in range(8):
        if not isinstance(node, dict) or "$ref" not in node:
            return None
        ref = node["$ref"]
        if ref.startswith("#/"):
            node = _pointer(raw, ref[1:], where)
            continue
        return Path(ref.partition("#")[0]).name
    return None


def _local(node: Any, raw: dict, where: str) -> Any:
    for _ in range(8):
        if isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/"):
            node = _pointer(raw, node["$ref"][1:], where)
        else:
            return node
    return node


def operations(service: str, specs_dir: Path = SPECS_DIR) -> dict[str, Operation]:
    """Every operation of ``service``'s OpenAPI document, by operationId."""
    return _operations(service, specs_dir)


@cache
def _operations(service: str, specs_dir: Path) -> dict[str, Operation]:
    spec = load_openapi(service, specs_dir)
    raw, where = spec.raw, str(spec.path)
    out: dict[str, Operation] = {}
    for route, item in (raw.get("paths") or {}).items():
        shared = [_local(p, raw, where) for p in item.get("parameters") or []]
        for method, op in item.items():
            if method not in {"get", "put", "post", "delete", "patch"} or not isinstance(op, dict):
                continue
            params = shared + [_local(p, raw, where) for p in op.get("parameters") or []]
            body = _local(op.get("requestBody") or {}, raw, where)
            content = body.get("content") or {}
            responses: dict[str, str] = {}
            ctypes: dict[str, tuple[str, ...]] = {}
            for code, resp in (op.get("responses") or {}).items():
                resp = _local(resp, raw, where)
                rcontent = resp.get("content") or {}
                ctypes[str(code)] = tuple(rcontent)
                for media in rcontent.values():
                    name = _schema_file((media or {}).get("schema"), raw, where)
                    if name:
                        responses[str(code)] = name
                        break
            out[op["operationId"]] = Operation(
                service=service,
                operation_id=op["operationId"],
                method=method.upper(),
                path=route,
                statuses=tuple(str(c) for c in op.get("responses") or {}),
                request_schema=_schema_file((content.get("application/json") or {}).get("schema"), raw, where),
                request_content_types=tuple(content),
                response_schemas=responses,
                response_content_types=ctypes,
                path_params=tuple(p["name"] for p in params if p.get("in") == "path"),
                query_params=tuple(p["name"] for p in params if p.get("in") == "query"),
                extensions={k: v for k, v in op.items() if k.startswith("x-")},
            )
    return out


def operation(service: str, operation_id: str, specs_dir: Path = SPECS_DIR) -> Operation:
    try:
        return operations(service, specs_dir)[operation_id]
    except KeyError:
        raise SpecError(f"{service}: no operation {operation_id!r}") from None


PROXY_EXTENSION = "x-qmtl-proxy"


@dataclass(frozen=True)
class ProxyRule:
    """``x-qmtl-proxy`` of one Gateway operation (schema: specs/extensions/x-qmtl-proxy.schema.json)."""

    operation_id: str  # the Gateway's operationId
    upstream: str  # the WorldService operationId it forwards to (same method and path)
    method: str
    path: str
    idempotent: bool  # a retry on WorldService's budget is safe
    live_guard: str  # the live-guard rule (qmtl.gateway.worlds.WorldsProxy.live_guard)
    changes_decisions: bool  # a success forgets this Gateway's cached decisions of the world


def proxy_rules(service: str = "gateway", specs_dir: Path = SPECS_DIR) -> dict[str, ProxyRule]:
    """The proxied operations of ``service`` (those carrying ``x-qmtl-proxy``), by operationId."""
    out: dict[str, ProxyRule] = {}
    for op_id, op in operations(service, specs_dir).items():
        ext = op.extensions.get(PROXY_EXTENSION)
        if ext is None:
            continue
        out[op_id] = ProxyRule(op_id, ext["operation"], op.method, op.path, bool(ext["idempotent"]),
                               ext.get("live_guard", "never"), bool(ext.get("changes_decisions", False)))
    return out


def upstream_path(operation_id: str, service: str = "gateway", upstream: str = "worldservice", **params: Any) -> str:
    """The ``upstream`` path that ``service``'s proxied operation ``operation_id`` forwards to,
    filled with ``params`` (its ``x-qmtl-proxy`` names the upstream operation)."""
    rule = proxy_rules(service)[operation_id]
    return operation(upstream, rule.upstream).path.format(**params)


# --------------------------------------------------------------------------- everything


@dataclass(frozen=True)
class Contract:
    """The constants of one specs directory."""

    enums: Mapping[str, type[StrEnum]]
    topics: Mapping[str, str]  # activation/policy/queues → Kafka topic

    def __getattr__(self, name: str) -> Any:
        try:
            return self.enums[name]
        except KeyError:
            raise AttributeError(name) from None


def derive(specs_dir: Path = SPECS_DIR) -> Contract:
    enums = {name: spec_enum(name, schema_enum(f, p, specs_dir)) for name, (f, p) in ENUM_SOURCES.items()}
    return Contract(enums, control_topics(specs_dir))


# The enums come from the module generated from the same ENUM_SOURCES (so a type checker sees
# their members); derive() above is what tests/contract/test_spec_drift.py compares it with.
ENUMS: Mapping[str, type[StrEnum]] = {
    "Mode": Mode, "Side": Side, "StrategyState": StrategyState, "MatchMode": MatchMode, "StreamTopic": StreamTopic,
    "SubscribeTopic": SubscribeTopic, "RunType": RunType, "WorldState": WorldState, "PolicyStatus": PolicyStatus,
}
_TOPICS = control_topics()

MODES: tuple[str, ...] = tuple(m.value for m in Mode)  # promotion order
SIDES: tuple[str, ...] = tuple(m.value for m in Side)
STRATEGY_STATES: tuple[str, ...] = tuple(m.value for m in StrategyState)
MATCH_MODES: tuple[str, ...] = tuple(m.value for m in MatchMode)
STREAM_TOPICS: tuple[str, ...] = tuple(m.value for m in StreamTopic)
DEFAULT_MATCH_MODE = MatchMode(schema_default("subscribe_request.schema.json", "/properties/queue_keys/items/properties/match_mode"))

TOPIC_ACTIVATION = _TOPICS["activation"]
TOPIC_POLICY = _TOPICS["policy"]
TOPIC_QUEUES = _TOPICS["queues"]
CONTROL_TOPICS: tuple[str, ...] = (TOPIC_ACTIVATION, TOPIC_POLICY, TOPIC_QUEUES)
