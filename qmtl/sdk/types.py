"""Typed shapes of the Gateway's answers, mirroring ``specs/schemas/*.schema.json``.

These are ``TypedDict``\\ s: the values the client returns are the decoded JSON itself
(plain dicts, so members the server adds later are kept), typed for editors and type
checkers. Validation is the server's job; ``GatewayClient(validate_responses=True)``
re-checks answers against the schemas in a debug run.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

__all__ = [
    "ActivationEnvelope",
    "ActivationSet",
    "ApplyPlan",
    "ApplyResult",
    "AuditPage",
    "AuditRecord",
    "DecisionEnvelope",
    "DecisionState",
    "EvaluationResult",
    "GatewayStatus",
    "MatchMode",
    "Policy",
    "PolicyList",
    "PolicySummary",
    "QueueKeySpec",
    "QueueList",
    "RunType",
    "Side",
    "StateHash",
    "StrategyAck",
    "StrategyStatus",
    "StreamDescriptor",
    "Topic",
    "World",
    "WorldList",
    "WsFrame",
]

Side = Literal["long", "short"]
MatchMode = Literal["any", "all"]
RunType = Literal["backtest", "dry-run", "live"]
Topic = Literal["activation", "policy", "queues"]
Mode = Literal["backtest", "dryrun", "live"]


class StrategyAck(TypedDict):
    """202 of ``POST /strategies`` (strategy_ack.schema.json)."""

    strategy_id: str
    queue_map: dict[str, list[str]]
    sentinel_id: NotRequired[str]


class StrategyStatus(TypedDict):
    """``GET /strategies/{id}/status`` (strategy_status.schema.json)."""

    strategy_id: str
    status: Literal["queued", "processing", "diffed", "completed", "failed"]
    queue_map: NotRequired[dict[str, Any]]
    sentinel_id: NotRequired[str]
    error: NotRequired[str]
    updated_at: NotRequired[str]


class QueueList(TypedDict):
    """``GET /queues/by_tag`` (queue_list.schema.json)."""

    queues: list[str]
    etag: NotRequired[str]


class QueueKeySpec(TypedDict):
    """One ``queue_keys`` entry of a subscription."""

    tags: list[str]
    interval: int
    match_mode: NotRequired[MatchMode]


class StreamDescriptor(TypedDict):
    """``POST /events/subscribe`` (stream_descriptor.schema.json)."""

    stream_url: str
    token: str
    topics: list[Topic]
    expires_at: str
    fallback_url: str


class StateHash(TypedDict):
    """State-hash probes (state_hash.schema.json)."""

    state_hash: str
    world_id: NotRequired[str]
    topic: NotRequired[Topic]


class World(TypedDict):
    """world.schema.json"""

    world_id: str
    name: str
    description: str
    owner: str
    labels: dict[str, str]
    state: Literal["ACTIVE", "SUSPENDED", "DELETED"]
    default_policy_version: int
    allow_live: bool
    circuit_breaker: bool
    apply_run_id: str | None
    created_at: str
    updated_at: str


class WorldList(TypedDict):
    worlds: list[World]
    next_cursor: str | None


class PolicySummary(TypedDict):
    world_id: str
    version: int
    checksum: str
    status: Literal["DRAFT", "ACTIVE", "DEPRECATED"]
    created_by: str
    created_at: str


class Policy(PolicySummary):
    yaml: str
    document: dict[str, Any]


class PolicyList(TypedDict):
    world_id: str
    default_version: int
    policies: list[PolicySummary]


class DecisionEnvelope(TypedDict):
    """decision_envelope.schema.json"""

    world_id: str
    policy_version: int
    effective_mode: Mode
    as_of: str
    ttl: str
    etag: str
    reason: NotRequired[str]


class ActivationEnvelope(TypedDict):
    """activation_envelope.schema.json: unknown or unavailable → ``active: false, weight: 0``."""

    world_id: str
    strategy_id: str
    side: Side
    active: bool
    weight: float
    etag: str
    ts: str
    run_id: NotRequired[str]
    state_hash: NotRequired[str]
    reason: NotRequired[str]


class ActivationSet(TypedDict):
    world_id: str
    state_hash: str
    frozen: bool
    activations: list[ActivationEnvelope]


class ApplyPlan(TypedDict, total=False):
    """``{"activate": [...], "deactivate": [...]}``: strategy ids or ``{strategy_id, side, weight}``."""

    activate: list[str | dict[str, Any]]
    deactivate: list[str | dict[str, Any]]


class ApplyResult(TypedDict):
    ok: bool
    run_id: str
    world_id: str
    activated: list[ActivationEnvelope]
    deactivated: list[ActivationEnvelope]
    unchanged: int
    state_hash: str
    applied_at: str


class EvaluationResult(TypedDict):
    world_id: str
    policy_version: int
    as_of: str
    activate: list[str | dict[str, Any]]
    deactivate: list[str | dict[str, Any]]
    reasons: dict[str, str]
    scores: dict[str, float]


class DecisionState(TypedDict):
    world_id: str
    policy_version: int
    mode: Mode
    mode_since: str
    consecutive_passes: int
    consecutive_fails: int
    passed: bool
    score: float
    reasons: list[str]
    observation: dict[str, Any]
    recorded_at: str


class AuditRecord(TypedDict, total=False):
    world_id: str
    actor: str
    event: str
    request: Any
    result: Any
    created_at: str
    correlation_id: str


class AuditPage(TypedDict):
    world_id: str
    records: list[AuditRecord]
    next_cursor: str | None


class GatewayStatus(TypedDict):
    status: Literal["ok", "degraded"]
    degradation: Literal["NORMAL", "PARTIAL", "MINIMAL", "STATIC"]
    dependencies: dict[str, dict[str, Any]]
    breakers: dict[str, dict[str, Any]]
    fallback_queue: NotRequired[int]
    cached: NotRequired[bool]


class WsFrame(TypedDict):
    """A frame of ``/ws/evt`` or ``/ws``: a CloudEvents 1.0 event (ws_frame.schema.json)."""

    specversion: str
    id: str
    source: str
    type: str
    time: str
    datacontenttype: str
    data: Any
    subject: NotRequired[str]
    seq: NotRequired[int]
    statehash: NotRequired[str]
    correlationid: NotRequired[str]
