"""The relay's queue sets as a feed per key: what ``GET /queues/watch`` follows.

``/ws`` and ``/ws/evt`` relay a ``queue_update`` the moment a QueueUpdated is applied to the
events state (from the ControlBus, ``/callbacks/dag-event`` or a DAG Manager lookup). The
legacy watch stream reads the same state through this feed, so both show the same event at
the same time (SPEC §5: "/queues/watch is fed by the same relay (plus reconcile)").

* ``follow(key)`` → a :class:`Follower` whose ``wait(timeout)`` returns the sets applied for
  the key since the last call, in order — every change ``/ws`` relays, also one that a newer
  set replaced a moment later. A reader that falls more than ``Follower.backlog`` sets
  behind loses the oldest (it still ends on the current set); it never slows the relay;
* ``current(key)`` → ``{"queues": [...], "etag"?}`` as the relay holds it, or None;
* ``offer(key, queues, etag=..., asked_at=...)`` → the reconcile: a DAG Manager answer that
  was asked for at ``asked_at`` (epoch seconds) enters the relay like any other queue set —
  relayed on ``/ws`` too when it changes the set, and never overwriting a newer event.

The events component owns one feed and calls :meth:`QueueFeed.applied` whenever a queue set
is applied; the Gateway's composition root hands the feed to the ingest's queue lookup
(``qmtl.gateway.ingest.queues.QueueLookup.feed``), which declares what it needs as a Protocol.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from . import state as st

__all__ = ["Follower", "QueueFeed"]

QueueKey = tuple  # (sorted unique tags, interval, match_mode)


class Follower:
    """One reader of one key; ``close()`` (or ``with``) when done."""

    backlog = 256  # sets kept for a reader that has not caught up (the oldest go first)

    __slots__ = ("_changed", "_feed", "_pending", "key")

    def __init__(self, feed: QueueFeed, key: QueueKey) -> None:
        self._feed = feed
        self.key = key
        self._pending: deque[dict] = deque(maxlen=self.backlog)
        self._changed = asyncio.Event()

    def _notify(self, item: dict) -> None:
        self._pending.append(item)
        self._changed.set()

    async def wait(self, timeout: float | None) -> list[dict]:
        """The sets (``{"queues", "etag"?}``) applied since the last call, oldest first;
        ``[]`` when none was applied within ``timeout`` seconds."""
        if not self._pending:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                return []
        out = list(self._pending)
        self._pending.clear()
        return out

    def close(self) -> None:
        self._feed._drop(self)

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class QueueFeed:
    def __init__(self, store: st.StateStore, apply: Callable[..., Any], clock: Callable[[], float]) -> None:
        """``apply(key, queues, etag=, ts=)`` applies a queue set to the relay (and relays it)."""
        self._store = store
        self._apply = apply
        self._clock = clock
        self._followers: dict[QueueKey, set[Follower]] = {}

    @staticmethod
    def key(tags: Iterable[str], interval: Any, match_mode: Any) -> QueueKey:
        return st.normalise_queue_key(tags, interval, match_mode)

    def now(self) -> float:
        """The relay's clock (epoch seconds): stamp a reconcile's ``asked_at`` with it."""
        return self._clock()

    def follow(self, key: QueueKey) -> Follower:
        f = Follower(self, key)
        self._followers.setdefault(key, set()).add(f)
        return f

    def _drop(self, f: Follower) -> None:
        group = self._followers.get(f.key)
        if group is not None:
            group.discard(f)
            if not group:
                del self._followers[f.key]

    def followers(self, key: QueueKey | None = None) -> int:
        if key is not None:
            return len(self._followers.get(key, ()))
        return sum(len(g) for g in self._followers.values())

    def applied(self, key: QueueKey) -> None:
        """Called by the events component after it applied a new set for ``key``."""
        group = self._followers.get(key)
        if group:
            item = self.current(key)
            if item is not None:
                for f in group:
                    f._notify(item)

    def current(self, key: QueueKey) -> dict | None:
        entry = self._store.queues.get(key)
        if entry is None:
            return None
        out: dict[str, Any] = {"queues": list(entry.queues)}
        if entry.etag:
            out["etag"] = entry.etag
        return out

    def offer(self, key: QueueKey, queues: Iterable[str], *, etag: str | None, asked_at: float) -> str:
        """The reconcile's answer, stamped with the time it was asked for: an event applied
        after that moment is newer and stays. Returns the state's outcome."""
        from datetime import UTC, datetime

        ts = datetime.fromtimestamp(asked_at, UTC).isoformat()
        return self._apply(key, list(queues), etag=etag, ts=ts)
