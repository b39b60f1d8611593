"""What the worlds proxy takes and answers: :class:`Incoming` (the caller's request),
:class:`Route` (one proxied operation's rules), :class:`Reply`, the ``X-QMTL-Cache`` values,
the two outcomes of an upstream read that are not an envelope (:class:`Unanswered`,
:class:`Passthrough`), and the schema checks of WorldService's envelopes."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qmtl.common.errors import ServiceError, ServiceUnavailable
from qmtl.common.http import if_none_match
from qmtl.contracts.constants import operation, proxy_rules
from qmtl.gateway.backends import BackendUnavailable

CACHE_HEADER = "X-QMTL-Cache"
HIT, MISS, REVALIDATED, SAFE = "hit", "miss", "revalidated", "safe-default"


@dataclass
class Reply:
    """What a worlds handler answers: status, raw body, content type and headers."""

    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, data: Any, headers: Mapping[str, str] | None = None) -> Reply:
        return cls(status, json.dumps(data, separators=(",", ":")).encode(), "application/json", dict(headers or {}))

    def data(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class Incoming:
    """The parts of a caller's request the proxy needs (header names lower-case)."""

    headers: Mapping[str, str]
    query: str = ""  # the raw query string, forwarded as is
    identity: Any = None  # verified by the security middleware (scope["qmtl.identity"]), if it ran

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass(frozen=True)
class Route:
    """One proxied WorldService operation."""

    method: str
    idempotent: bool
    live_guard: str = "never"  # see WorldsProxy.live_guard
    changes_decisions: bool = False  # a success forgets this Gateway's cached decisions of the world


def conditional(reply: Reply, req: Incoming) -> Reply:
    """``reply`` as 304 (same headers, no body) when the caller's ``If-None-Match`` matches its ETag."""
    etag = reply.headers.get("ETag")
    if reply.status == 200 and etag and if_none_match(req.header("if-none-match"), etag):
        return Reply(304, b"", None, dict(reply.headers))
    return reply


def unavailable(exc: BackendUnavailable) -> ServiceError:
    """WorldService cannot answer a call without a safe answer: 503 with ``Retry-After``."""
    retry = max(1, math.ceil(exc.retry_after or 1))
    return ServiceUnavailable(f"WorldService is unavailable ({exc.reason}); retry with backoff", retry_after=retry,
                              ext={"backend": "worldservice"})


class Unanswered(Exception):
    """WorldService could not give a usable answer; the caller gets the safe default."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Passthrough(Exception):
    """WorldService answered something other than the envelope (404, 403, ...): pass it on."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


def upstream_template(operation_id: str) -> str:
    """The WorldService path (``str.format`` template) the Gateway's proxied ``operation_id``
    forwards to, as :func:`qmtl.contracts.constants.upstream_path` fills it; resolved once at
    start, since that reads the spec's proxy rules on every call."""
    return operation("worldservice", proxy_rules("gateway")[operation_id].upstream).path


def response_schema(operation_id: str, status: int = 200) -> str:
    """The schema file the Gateway's spec names for ``operation_id``'s ``status`` answer."""
    return operation("gateway", operation_id).response_schemas[str(status)]


def schema_check(file_name: str) -> Callable[[Any], None]:
    """A fast validator (jsonschema-rs) of one schema file: raises ValueError naming the first violation."""
    import jsonschema_rs

    from qmtl.contracts.loader import load_schema_files

    validator = jsonschema_rs.validator_for(load_schema_files()[file_name])

    def check(instance: Any) -> None:
        for error in validator.iter_errors(instance):
            where = "/" + "/".join(str(p) for p in error.instance_path)
            raise ValueError(f"{error.message} at {where}")

    return check
