"""Database errors mapped to HTTP problems: 503 for an unreachable database, 422 for a
string the database cannot store, anything else a 500 (a bug)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from qmtl.common.errors import ServiceUnavailable, Unprocessable

log = logging.getLogger(__name__)

RETRY_SQLSTATES = frozenset({"40P01", "40001"})  # deadlock detected, serialization failure
UNAVAILABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "08000", "08001", "08003", "08004", "08006", "53300"})


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a driver error (asyncpg or psycopg), if any."""
    orig = getattr(exc, "orig", None)
    for obj in (orig, getattr(orig, "__cause__", None)):
        code = getattr(obj, "pgcode", None) or getattr(obj, "sqlstate", None)
        if code:
            return str(code)
    return None


def unencodable(exc: BaseException) -> bool:
    """A string that cannot be UTF-8 encoded (a lone surrogate from a ``\\udc00`` JSON
    escape) reached the driver: SQLite raises UnicodeEncodeError, asyncpg wraps it."""
    seen = 0
    node: BaseException | None = exc
    while node is not None and seen < 6:
        if isinstance(node, UnicodeEncodeError) or "can't encode character" in str(node):
            return True
        node = getattr(node, "orig", None) or node.__cause__ or node.__context__
        seen += 1
    return False


def bad_strings(value: Any, pointer: str = "", out: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
    """Pointers to every string (or key) of ``value`` that is not valid Unicode."""
    out = [] if out is None else out
    if len(out) >= 20:
        return out
    if isinstance(value, str):
        if not _utf8(value):
            out.append({"pointer": pointer, "message": "not valid Unicode (lone surrogate)"})
    elif isinstance(value, dict):
        for k, v in value.items():
            child = f"{pointer}/{str(k).replace('~', '~0').replace('/', '~1')}"
            if isinstance(k, str) and not _utf8(k):
                out.append({"pointer": child, "message": "member name not valid Unicode (lone surrogate)"})
            bad_strings(v, child, out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            bad_strings(v, f"{pointer}/{i}", out)
    return out


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@contextlib.contextmanager
def database_errors(request: Any = None) -> Iterator[None]:
    """A database that cannot be reached is a 503 (with Retry-After), not a 500; a string
    the database cannot store is the caller's 422 (with pointers into ``request`` when
    given); any other SQL error is a bug and surfaces as a 500 with its log."""
    try:
        yield
    except (TimeoutError, UnicodeEncodeError, DBAPIError, OperationalError, InterfaceError, OSError, ConnectionError) as exc:
        if unencodable(exc):
            errors = bad_strings(request) if request is not None else []
            raise Unprocessable(
                "the request holds a string that is not valid Unicode (a lone surrogate escape such as \\udc00)",
                ext={"errors": errors or [{"pointer": "", "message": "not valid Unicode (lone surrogate)"}]},
            ) from exc
        if isinstance(exc, DBAPIError) and not isinstance(exc, (OperationalError, InterfaceError)) \
                and not exc.connection_invalidated and sqlstate(exc) not in UNAVAILABLE_SQLSTATES:
            raise
        if isinstance(exc, UnicodeEncodeError):
            raise
        log.warning("database unavailable: %s", exc)
        raise ServiceUnavailable("the DAG Manager's database is unavailable", retry_after=2) from exc


__all__ = ["RETRY_SQLSTATES", "UNAVAILABLE_SQLSTATES", "bad_strings", "database_errors", "sqlstate", "unencodable"]
