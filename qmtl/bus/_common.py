"""Pieces shared by the in-process and the Kafka bus (private)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from .base import EventValidator, InvalidEvent

log = logging.getLogger("qmtl.bus")

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_event(value: Mapping) -> str:
    """Compact JSON text of ``value``; :class:`InvalidEvent` if it is not JSON."""
    try:
        return _encoder.encode(value)
    except (TypeError, ValueError) as exc:
        raise InvalidEvent(f"event is not JSON-serialisable: {exc}") from exc


def check_event(validator: EventValidator | None, topic: str, value: Any) -> None:
    """Raise :class:`InvalidEvent` unless ``value`` is an object valid for ``topic``.

    The validator may raise ``InvalidEvent`` or any ``ValueError``; both become
    ``InvalidEvent``. Other exceptions from the validator are bugs and propagate.
    """
    if not isinstance(value, Mapping):
        raise InvalidEvent(f"event on {topic!r} must be a JSON object, not {type(value).__name__}")
    if validator is None:
        return
    try:
        validator(topic, value)
    except InvalidEvent:
        raise
    except ValueError as exc:
        raise InvalidEvent(str(exc)) from exc


def normalise_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    if not headers:
        return {}
    return {str(k): str(v) for k, v in headers.items()}


class PartitionProgress:
    """Per (consumer, topic, partition) bookkeeping that makes skipped events committable.

    ``committed`` is the next offset recorded as committed (Kafka convention), or
    ``None``. An invalid event is skipped by the subscription, never seen by the
    application, so the application can never commit it. To keep it from being
    re-read (and re-counted) forever, its offset is committed on the application's
    behalf, but only when that cannot commit past a message the application was
    given and has not committed yet (at-least-once):

    * skipped with nothing outstanding (every yielded message committed) → commit it
      now (``on_skip`` returns the offset to commit);
    * otherwise remember it: when the application commits the last message it was
      given on this partition, the commit extends over the skipped ones after it.
    """

    __slots__ = ("committed", "last_yielded", "skip_end")

    def __init__(self, committed: int | None = None) -> None:
        self.committed = committed
        self.last_yielded: int | None = None
        self.skip_end: int | None = None

    def on_yield(self, offset: int) -> None:
        self.last_yielded = offset
        self.skip_end = None

    def on_skip(self, offset: int) -> int | None:
        self.skip_end = offset
        last = self.last_yielded
        if last is None or (self.committed is not None and self.committed > last):
            target = offset + 1
            if self.committed is None or target > self.committed:
                self.committed = target
                return target
        return None

    def on_commit(self, offset: int) -> int | None:
        """The next offset to commit when the application commits ``offset``."""
        target = offset + 1
        if offset == self.last_yielded and self.skip_end is not None:
            target = self.skip_end + 1
        if self.committed is not None and target <= self.committed:
            return None
        self.committed = target
        return target


