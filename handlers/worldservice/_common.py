"""Request plumbing shared by the WorldService handlers (not an operation module).

Headers are read straight from the request's ASGI scope (Connexion's ``context.scope``):
``connexion.request`` builds a new ``ConnexionRequest`` and ``Headers`` on every access,
which was ~12 % of a direct ``GET /worlds/{id}/decide`` (py-spy, issue 16).
"""

from __future__ import annotations

from connexion import context

from qmtl.common.http import if_none_match
from qmtl.worldservice.rbac import Identity
from qmtl.worldservice.service import WorldService


def _raw_headers() -> list[tuple[bytes, bytes]]:
    return context.scope["headers"]  # ASGI: names are lower-case bytes


def caller(ctx: WorldService) -> Identity:
    """The caller's identity from the request headers (see qmtl.worldservice.rbac); a header
    sent twice counts with its last value, as a mapping of the headers' items gives it."""
    return ctx.auth.identify({k.decode("latin-1"): v.decode("latin-1") for k, v in _raw_headers()})


def header(name: str) -> str | None:
    """The first value of header ``name`` (any letter case), or None."""
    wanted = name.lower().encode("latin-1")
    for k, v in _raw_headers():
        if k == wanted:
            return v.decode("latin-1")
    return None


def not_modified(etag: str) -> bool:
    """Whether the request's If-None-Match matches ``etag``."""
    value = header("If-None-Match")
    return value is not None and if_none_match(value, etag)


def quoted(etag: str) -> str:
    return f'"{etag}"'
