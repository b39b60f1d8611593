"""Errors raised by ControlBus implementations.

:class:`~qmtl.bus.base.InvalidEvent` (a ``ValueError``) lives in :mod:`qmtl.bus.base`
and is re-exported here so that every bus error can be imported from one place.
"""

from __future__ import annotations

from .base import InvalidEvent

__all__ = ["BusError", "BusUnavailable", "BusClosed", "InvalidEvent"]


class BusError(Exception):
    """A ControlBus transport error (never raised for an invalid event)."""


class BusUnavailable(BusError, ConnectionError):
    """The bus could not do what was asked within its time bound (broker away).

    For ``publish`` it means the event was not *confirmed*: with Kafka it may still
    be delivered later (the producer keeps it queued), so a caller that retries may
    produce a duplicate. Consumers are idempotent (SPEC §5), so that is harmless.
    """


class BusClosed(BusUnavailable):
    """The bus (or subscription) was closed."""
