"""CloudEvents 1.0 in the structured JSON format: the frames of ``/ws`` and ``/ws/evt`` (SPEC §5).

Build an event once with :func:`make_event`, serialise it once with :func:`encode`, and send
the same bytes to every subscriber.
"""

from __future__ import annotations

import json
import re
import time as _time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

__all__ = ["SPECVERSION", "encode", "encode_text", "is_cloudevent", "make_event"]

SPECVERSION = "1.0"

_EXTENSION_NAME = re.compile(r"[a-z0-9]{1,20}")
# Context attributes defined by the CloudEvents spec; an extension may not reuse them.
_RESERVED = frozenset(
    {"specversion", "id", "source", "type", "time", "datacontenttype", "dataschema", "subject", "data", "data_base64"}
)
# Stateless, built once: json.dumps(**kwargs) would build a new encoder per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _now_rfc3339() -> str:
    """``_rfc3339(datetime.now(UTC))`` without building a datetime per frame: the part up to
    the second is formatted once per second."""
    sec, ns = divmod(_time.time_ns(), 1_000_000_000)
    global _second, _second_text
    if sec != _second:
        _second, _second_text = sec, _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(sec))
    return f"{_second_text}.{ns // 1000:06d}Z"


_second = -1
_second_text = ""
# Extension names already checked (they come from code: a handful per process).
_CHECKED_NAMES: set[str] = set()


def _rfc3339(moment: datetime) -> str:
    """UTC RFC 3339 timestamp with a 'Z' suffix; naive datetimes are taken to be UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def make_event(
    type: str,  # the CloudEvents attribute name
    data: Any,
    *,
    source: str,
    id: str | None = None,
    time: datetime | None = None,
    subject: str | None = None,
    extensions: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A CloudEvents 1.0 event as a dict, ready for :func:`encode`.

    Extension attribute names must match ``^[a-z0-9]{1,20}$`` and not shadow a spec
    attribute; values must be str, int or bool (CloudEvents has no null/object extension type).
    Raises ValueError otherwise, or when ``type``/``source``/``id`` is empty.
    """
    if not type or not isinstance(type, str):
        raise ValueError("event type must be a non-empty string")
    if not source or not isinstance(source, str):
        raise ValueError("event source must be a non-empty string")
    if id is not None and (not id or not isinstance(id, str)):
        raise ValueError("event id must be a non-empty string")
    event: dict[str, Any] = {
        "specversion": SPECVERSION,
        "id": id if id is not None else uuid.uuid4().hex,
        "source": source,
        "type": type,
        "time": _rfc3339(time) if time is not None else _now_rfc3339(),
        "datacontenttype": "application/json",
    }
    if subject is not None:
        event["subject"] = subject
    if extensions:
        for name, value in extensions.items():
            if name not in _CHECKED_NAMES:
                if not isinstance(name, str) or not _EXTENSION_NAME.fullmatch(name) or name in _RESERVED:
                    raise ValueError(f"invalid CloudEvents extension attribute name: {name!r}")
                if len(_CHECKED_NAMES) < 256:
                    _CHECKED_NAMES.add(name)
            if not isinstance(value, (str, int)):  # bool is an int
                raise ValueError(f"extension {name!r} must be a str, int or bool, not {value.__class__.__name__}")
            event[name] = value
    event["data"] = data
    return event


def encode(event: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON of ``event`` (no whitespace, non-ASCII kept as is)."""
    return _ENCODER.encode(event).encode()


def encode_text(event: Mapping[str, Any]) -> str:
    """:func:`encode` as text (a WebSocket text frame takes ``str``)."""
    return _ENCODER.encode(event)


def is_cloudevent(obj: Any) -> bool:
    """True for a mapping with ``specversion == "1.0"`` and non-empty string id, source and type."""
    if not isinstance(obj, Mapping) or obj.get("specversion") != SPECVERSION:
        return False
    return all(isinstance(obj.get(k), str) and obj[k] for k in ("id", "source", "type"))
