"""Request plumbing shared by the WorldService handlers (not an operation module)."""

from __future__ import annotations

from connexion import request

from qmtl.common.http import if_none_match
from qmtl.worldservice.rbac import Identity
from qmtl.worldservice.service import WorldService


def caller(ctx: WorldService) -> Identity:
    """The caller's identity from the request headers (see qmtl.worldservice.rbac)."""
    return ctx.auth.identify(request.headers)


def header(name: str) -> str | None:
    return request.headers.get(name)


def not_modified(etag: str) -> bool:
    """Whether the request's If-None-Match matches ``etag``."""
    value = request.headers.get("If-None-Match")
    return value is not None and if_none_match(value, etag)


def quoted(etag: str) -> str:
    return f'"{etag}"'
