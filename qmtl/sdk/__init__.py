"""QMTL client SDK: everything a strategy or tool needs to talk to the Gateway.

* :class:`GatewayClient` — typed async client of the Gateway's HTTP API (strategies,
  queues, every worlds route, subscribe), with timeouts, safe retries, correlation ids
  and problem+json errors as exceptions (:mod:`qmtl.sdk.errors`).
* :class:`Node`, :class:`TagQueryNode`, :class:`Dag` — build a DAG whose NodeIDs and CRC32
  the Gateway verifies (the same functions it uses).
* :class:`EventStream` — the descriptor event stream: snapshot, ordered de-duplicated
  deltas, state-hash checks, token refresh, reconnect/resume/fallback, HTTP reconcile;
  tuned with one :class:`StreamOptions` (package :mod:`qmtl.sdk.stream`).
* :class:`TagQueryManager` — resolves TagQueryNodes and follows their queue sets.
* :class:`ActivationGate` — ``is_active(world, strategy, side)``: false unless known fresh.
* :class:`WebSocketClient` — the legacy ``/ws`` client (``qmtl.sdk.ws_client``).
"""

from .activation import ActivationGate
from .client import DEFAULT_URL, ApiResponse, GatewayClient
from .dag import Dag, Node, TagQueryNode
from .errors import (
    BadRequest,
    Conflict,
    Forbidden,
    LiveGuardRefused,
    NotFound,
    NotImplementedByGateway,
    PreconditionFailed,
    ProblemError,
    QmtlError,
    ResponseValidationError,
    StreamError,
    TransportError,
    Unauthorized,
    Unavailable,
    Unprocessable,
    UnsupportedMediaType,
)
from .state import StreamState
from .stream import EventStream, StreamEvent, StreamOptions, StreamStats
from .tagquery import TagQueryManager
from .ws_client import WebSocketClient

__all__ = [
    "DEFAULT_URL",
    "ActivationGate",
    "ApiResponse",
    "BadRequest",
    "Conflict",
    "Dag",
    "EventStream",
    "Forbidden",
    "GatewayClient",
    "LiveGuardRefused",
    "Node",
    "NotFound",
    "NotImplementedByGateway",
    "PreconditionFailed",
    "ProblemError",
    "QmtlError",
    "ResponseValidationError",
    "StreamError",
    "StreamEvent",
    "StreamOptions",
    "StreamState",
    "StreamStats",
    "TagQueryManager",
    "TagQueryNode",
    "TransportError",
    "Unauthorized",
    "Unavailable",
    "Unprocessable",
    "UnsupportedMediaType",
    "WebSocketClient",
]
