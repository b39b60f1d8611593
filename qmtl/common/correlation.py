"""Correlation ids: one per request, carried in ``X-Correlation-ID`` and in every log line (SPEC §4, §8).

The id of the request being handled lives in the :data:`correlation_id` context variable,
so it follows the request across ``await`` and into tasks it spawns. A client-supplied id
is kept only if :func:`valid`; otherwise a fresh one replaces it (see :func:`from_header`).
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar

__all__ = [
    "HEADER",
    "CorrelationIdFilter",
    "correlation_id",
    "from_header",
    "get",
    "new_correlation_id",
    "valid",
]

HEADER = "X-Correlation-ID"

#: The current request's correlation id (None outside a request).
correlation_id: ContextVar[str | None] = ContextVar("correlation_id", default=None)

_VALID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def new_correlation_id() -> str:
    """A fresh id: 32 lowercase hex characters (uuid4)."""
    return uuid.uuid4().hex


def get() -> str | None:
    """The current correlation id, or None."""
    return correlation_id.get()


def valid(value: object) -> bool:
    """True for 1–128 characters of ``[A-Za-z0-9._:-]`` (safe to echo in headers and logs)."""
    return isinstance(value, str) and _VALID.fullmatch(value) is not None


def from_header(value: str | None) -> str:
    """The id to use for a request: the client's ``value`` if valid, else a fresh one."""
    return value if value is not None and valid(value) else new_correlation_id()


class CorrelationIdFilter(logging.Filter):
    """Sets ``record.correlation_id`` to the current id (or ``"-"``) for use in log formats.

    An id passed explicitly with ``extra={"correlation_id": ...}`` is left as is.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "correlation_id", None) is None:
            record.correlation_id = correlation_id.get() or "-"
        return True
