"""Exceptions of the client SDK.

Every error the Gateway answers is RFC 9457 ``application/problem+json``; the client turns
it into a :class:`ProblemError` (or the subclass for its status) that carries the problem's
members — ``status``, ``title``, ``detail``, ``errors`` (each with a JSON ``pointer`` or a
``parameter`` and a ``message``), ``correlation_id`` — plus the whole body and the response
headers, so nothing the server said is lost::

    QmtlError
    ├── ProblemError              any problem+json answer (or a non-2xx without one)
    │   ├── BadRequest            400
    │   ├── Unauthorized          401
    │   ├── Forbidden             403
    │   │   └── LiveGuardRefused  403 from the live guard (``live_guard: true``)
    │   ├── NotFound              404
    │   ├── Conflict              409 (``strategy_id`` of the first submission for a duplicate DAG)
    │   ├── PreconditionFailed    412
    │   ├── UnsupportedMediaType  415
    │   ├── Unprocessable         422 (schema violations, one ``errors`` entry each)
    │   ├── NotImplementedByGateway 501 (this Gateway build does not serve the route)
    │   └── Unavailable           503 (``retry_after`` seconds from ``Retry-After``)
    ├── TransportError            no HTTP answer: connection refused/reset, timeout
    ├── ResponseValidationError   debug mode: a 2xx body that breaks its schema
    └── StreamError               the event stream was refused for good (e.g. out of scope)
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC
from typing import Any

__all__ = [
    "BadRequest",
    "Conflict",
    "Forbidden",
    "LiveGuardRefused",
    "NotFound",
    "NotImplementedByGateway",
    "PreconditionFailed",
    "ProblemError",
    "QmtlError",
    "ResponseValidationError",
    "StreamError",
    "TransportError",
    "Unauthorized",
    "Unavailable",
    "Unprocessable",
    "UnsupportedMediaType",
    "problem_from_response",
]


class QmtlError(Exception):
    """Base of every error the SDK raises."""


class ProblemError(QmtlError):
    """The Gateway answered with an error status (``application/problem+json``)."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        correlation_id: str | None = None,
        *,
        type: str = "about:blank",
        instance: str | None = None,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        method: str | None = None,
        url: str | None = None,
    ) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = list(errors or [])
        self.correlation_id = correlation_id
        self.type = type
        self.instance = instance
        self.body: dict[str, Any] = dict(body or {})
        self.headers: dict[str, str] = dict(headers or {})
        self.method = method
        self.url = url
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"{self.method} {self.url}: " if self.method and self.url else ""
        text = f"{where}{self.status} {self.title}"
        if self.detail:
            text += f": {self.detail}"
        if self.errors:
            shown = "; ".join(_describe_error(e) for e in self.errors[:5])
            more = f" (+{len(self.errors) - 5} more)" if len(self.errors) > 5 else ""
            text += f" [{shown}{more}]"
        if self.correlation_id:
            text += f" (correlation id {self.correlation_id})"
        return text

    def get(self, member: str, default: Any = None) -> Any:
        """An extension member of the problem body (e.g. ``expected`` of a CRC error)."""
        return self.body.get(member, default)


def _describe_error(e: Mapping[str, Any]) -> str:
    where = e.get("pointer")
    if where is None:
        where = e.get("parameter")
    msg = e.get("message", "")
    return f"{where}: {msg}" if where not in (None, "") else str(msg)


class BadRequest(ProblemError):
    pass


class Unauthorized(ProblemError):
    pass


class Forbidden(ProblemError):
    pass


class LiveGuardRefused(Forbidden):
    """The live guard refused a call that can switch a world to live: send it again with
    ``allow_live=True`` (header ``X-Allow-Live: true``) if that is what you mean. The
    Gateway did not call WorldService."""

    @property
    def required_header(self) -> str:
        return str(self.body.get("required_header") or "X-Allow-Live")


class NotFound(ProblemError):
    pass


class Conflict(ProblemError):
    """409. For ``POST /strategies`` a duplicate DAG: ``strategy_id`` is the first submission's."""

    @property
    def strategy_id(self) -> str | None:
        sid = self.body.get("strategy_id")
        return sid if isinstance(sid, str) else None


class PreconditionFailed(ProblemError):
    pass


class UnsupportedMediaType(ProblemError):
    pass


class Unprocessable(ProblemError):
    pass


class NotImplementedByGateway(ProblemError):
    pass


class Unavailable(ProblemError):
    """503: a backend is unavailable and there is no safe answer; retry after ``retry_after`` s."""

    @property
    def retry_after(self) -> float | None:
        return parse_retry_after(self.headers.get("retry-after"))


class TransportError(QmtlError):
    """No HTTP answer (connection refused or reset, timeout) after the retries allowed."""

    def __init__(self, message: str, *, method: str | None = None, url: str | None = None,
                 correlation_id: str | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.method = method
        self.url = url
        self.correlation_id = correlation_id
        self.attempts = attempts


class ResponseValidationError(QmtlError):
    """Debug mode only: a successful answer whose body does not conform to its schema."""

    def __init__(self, message: str, *, errors: list[dict[str, Any]] | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.errors = list(errors or [])
        self.body = body


class StreamError(QmtlError):
    """The event stream cannot continue (refused for good, or stopped by the caller)."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


_BY_STATUS: dict[int, type[ProblemError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    412: PreconditionFailed,
    415: UnsupportedMediaType,
    422: Unprocessable,
    501: NotImplementedByGateway,
    503: Unavailable,
}


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds form; an HTTP date is read as "soon")."""
    if value is None:
        return None
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        from datetime import datetime
        from email.utils import parsedate_to_datetime

        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0.0, (when - datetime.now(UTC)).total_seconds())


def problem_from_response(status: int, headers: Mapping[str, str], body: Any, *, method: str | None = None,
                          url: str | None = None, correlation_id: str | None = None) -> ProblemError:
    """The exception for an error answer; ``body`` is the decoded JSON (or text, or None)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    doc: dict[str, Any] = body if isinstance(body, dict) else {}
    title = t if isinstance(t := doc.get("title"), str) else _reason(status)
    detail = d if isinstance(d := doc.get("detail"), str) else None
    if detail is None and isinstance(body, str) and body.strip():
        detail = body.strip()[:500]
    errors: list[Any] = e if isinstance(e := doc.get("errors"), list) else []
    cid = doc.get("correlation_id") if isinstance(doc.get("correlation_id"), str) else None
    cid = cid or lowered.get("x-correlation-id") or correlation_id
    cls = _BY_STATUS.get(status, ProblemError)
    if status == 403 and doc.get("live_guard") is True:
        cls = LiveGuardRefused
    return cls(
        status, title, detail, [e for e in errors if isinstance(e, dict)], cid,
        type=ty if isinstance(ty := doc.get("type"), str) else "about:blank",
        instance=doc.get("instance") if isinstance(doc.get("instance"), str) else None,
        body=doc, headers=lowered, method=method, url=url,
    )


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"
