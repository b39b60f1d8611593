"""Domain errors that become RFC 9457 problem+json responses at the HTTP boundary.

Services raise these; the app builder (``qmtl.contracts.app``) maps every one of them
to ``application/problem+json`` with its status, a title, a detail that says what was
wrong, and extension members (``errors`` with JSON pointers, ``correlation_id``, ...).
Services never import the web framework.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ServiceError(Exception):
    status = 500
    title = "Internal Server Error"
    type = "about:blank"

    def __init__(
        self,
        detail: str,
        *,
        ext: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        title: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.ext = dict(ext or {})
        self.headers = dict(headers or {})
        if title:
            self.title = title


class BadRequest(ServiceError):
    status = 400
    title = "Bad Request"


class Unauthorized(ServiceError):
    status = 401
    title = "Unauthorized"


class Forbidden(ServiceError):
    status = 403
    title = "Forbidden"


class NotFound(ServiceError):
    status = 404
    title = "Not Found"


class Conflict(ServiceError):
    status = 409
    title = "Conflict"


class PreconditionFailed(ServiceError):
    status = 412
    title = "Precondition Failed"


class Unprocessable(ServiceError):
    status = 422
    title = "Unprocessable Content"


class ServiceUnavailable(ServiceError):
    status = 503
    title = "Service Unavailable"

    def __init__(self, detail: str, *, retry_after: int = 1, **kw: Any) -> None:
        headers = dict(kw.pop("headers", None) or {})
        headers.setdefault("Retry-After", str(max(1, int(retry_after))))
        super().__init__(detail, headers=headers, **kw)


class BadGateway(ServiceError):
    status = 502
    title = "Bad Gateway"


class GatewayTimeout(ServiceError):
    status = 504
    title = "Gateway Timeout"
