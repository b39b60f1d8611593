"""``POST /strategies`` in front of the contract stack (same idea as the worlds proxy's
``DecideFastPath``).

Why: at 1,000 submissions/s the contract stack (Connexion routing over every route, security,
parameter decoding, request and response validation) costs about as much CPU as the ingest
itself, and one Gateway process has one core; G-02 (p95 ≤ 150 ms from POST to ack) needs
that CPU.

What it keeps: every rule of the route. Its method, path, request content type, request
schema and success status are those of the ``submit_strategy`` operation in
specs/openapi.yaml (read at start, never restated). The body is parsed and validated against
the very schema the spec names (``strategy_submission.schema.json``, with jsonschema-rs); anything the
contract stack must judge — not ``application/json``, not JSON, a schema violation, not
UTF-8 — is **declined**: the request, body replayed, goes to the stack, which answers exactly
as it would have. Authentication is the handler's (the Gateway's ``auth``). Errors the ingest raises
are rendered by the same ``problem_response`` the stack's error handler uses; the correlation
id is set and echoed by the outer middleware as for every request. The 202 body is what the
handler returns (it conforms to ``strategy_ack.schema.json``; the tests check it), with
``Location``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from qmtl.common.errors import ServiceError
from qmtl.contracts.app import problem_response
from qmtl.contracts.constants import Operation, operation
from qmtl.contracts.events import schema_validator
from qmtl.contracts.limits import DEFAULT_MAX_DEPTH, json_depth_exceeds, replay_body
from qmtl.contracts.loader import SpecError

if TYPE_CHECKING:
    from qmtl.gateway.auth import Authenticates

log = logging.getLogger(__name__)

OPERATION = "submit_strategy"  # the Gateway operation it serves (specs/openapi.yaml)


class Submits(Protocol):
    async def submit(self, body: Mapping[str, Any], *, subject: str | None = None) -> tuple[dict, dict]: ...


class SubmitFastPath:
    def __init__(self, app: Any, auth: Authenticates, ingest: Submits, op: Operation | None = None) -> None:
        self.app = app
        self.auth = auth
        self.ingest = ingest
        self.op = op or operation("gateway", OPERATION)
        if self.op.path_params or not self.op.request_schema or not self.op.request_content_types:
            raise SpecError(f"{self.op.method} {self.op.path}: the submit fast path serves an operation without path "
                            "parameters whose request body has a schema")
        self.content_type = self.op.request_content_types[0].encode("latin-1")
        self.validator = schema_validator(self.op.request_schema)
        self.status = self.op.status(202)  # what the handler answers for an accepted submission
        self.ack_type = self.op.content_type(self.status).encode("latin-1")
        self.served = 0
        self.declined = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope["method"] != self.op.method or scope["path"] != self.op.path
                or not _is_type(scope, self.content_type)):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        try:  # authentication first: an anonymous body is never read in JWT mode
            identity = await self.auth.authenticate(headers)
        except Exception:
            self.declined += 1
            await self.app(scope, receive, send)  # the full stack answers the 401/503 problem
            return
        raw, more = await _read_body(receive)
        body = _parse(raw) if not more else None
        if body is None or not self.validator.is_valid(body):
            self.declined += 1
            await self.app(scope, replay_body(raw, receive, disconnected=more), send)
            return
        self.served += 1
        try:
            ack, extra = await self.ingest.submit(body, subject=identity.subject)
        except ServiceError as exc:
            if exc.status >= 500:
                log.warning("%s: %s", exc.title, exc.detail)
            await _send_connexion(send, problem_response(exc.status, exc.title, exc.detail, ext=exc.ext, headers=exc.headers))
            return
        except Exception as exc:  # the stack's last-resort handler does the same
            log.exception("unhandled error: %r", exc)
            await _send_connexion(send, problem_response(
                500, "Internal Server Error", "An unexpected error occurred; the correlation id identifies it in the logs."))
            return
        payload = json.dumps(ack, separators=(",", ":")).encode()
        out = [(b"content-type", self.ack_type), (b"content-length", str(len(payload)).encode())]
        out += [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": self.status, "headers": out})
        await send({"type": "http.response.body", "body": payload})


def _is_type(scope: Any, content_type: bytes) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == content_type
    return False


def _headers(scope: Any) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}


async def _read_body(receive: Any) -> tuple[bytes, bool]:
    """The body; ``more`` is True when the client went away before sending all of it."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), True
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), False


def _parse(raw: bytes) -> Any:
    if json_depth_exceeds(raw, DEFAULT_MAX_DEPTH):
        return None  # too deep: the stack authenticates, then refuses it (400)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None  # the stack says what is wrong with it




async def _send_connexion(send: Any, resp: Any) -> None:
    body = resp.body if isinstance(resp.body, bytes) else str(resp.body).encode()
    headers = {str(k).lower(): str(v) for k, v in (resp.headers or {}).items()}
    headers.setdefault("content-type", resp.content_type or "application/problem+json")
    headers["content-length"] = str(len(body))
    await send({"type": "http.response.start", "status": resp.status_code,
                "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]})
    await send({"type": "http.response.body", "body": body})
