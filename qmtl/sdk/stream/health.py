"""StreamHealth: is the copy current? The connection's status and route, when it went down,
when the Gateway was last heard from, and when the copy was last in sync (a full snapshot,
a frame after one, or an HTTP reconcile) — read by :meth:`EventStream.fresh` and the gate."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["StreamHealth"]


class StreamHealth:
    def __init__(self, monotonic: Callable[[], float], *, idle_timeout: float) -> None:
        self._monotonic = monotonic
        self.idle_timeout = idle_timeout
        self.status = "idle"  # idle | connecting | live | down | stopped | failed
        self.route: str | None = None  # stream | fallback while live
        self.down_since: float | None = monotonic()
        self.last_contact: float | None = None
        self.synced_at: float | None = None
        self.synced = asyncio.Event()

    def connecting(self) -> None:
        self.status = "connecting"
        self.down_since = self._monotonic()  # "down" until the first connection opens

    def came_up(self, route: str) -> None:
        self.status = "live"
        self.route = route
        self.down_since = None
        self.last_contact = self._monotonic()

    def went_down(self) -> None:
        if self.status in ("stopped", "failed"):
            return
        self.status = "down"
        self.route = None
        if self.down_since is None:
            self.down_since = self._monotonic()
            if self.last_contact is not None:
                self.synced_at = self.last_contact

    def down_for(self) -> float | None:
        """Seconds the stream has been down (None while it is live)."""
        if self.status == "live" or self.down_since is None:
            return None
        return self._monotonic() - self.down_since

    def heard(self) -> None:
        """A frame arrived: contact, and still in sync when it was."""
        now = self._monotonic()
        self.last_contact = now
        if self.synced.is_set():
            self.synced_at = now

    def mark_synced(self) -> None:
        self.synced_at = self._monotonic()
        self.synced.set()

    def fresh(self, max_age: float) -> bool:
        now = self._monotonic()
        if self.status == "live" and self.last_contact is not None and now - self.last_contact <= self.idle_timeout:
            return self.synced.is_set()
        return self.synced_at is not None and now - self.synced_at <= max_age
