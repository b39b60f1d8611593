"""The worlds caches: :class:`WorldLRU` (an LRU indexed by world, so one world's entries drop
at the cost of that world's), the entries (:class:`DecisionEntry`, :class:`ActivationEntry`)
and :func:`parse_ttl` (an envelope's ``ttl`` in seconds). Times in entries are readings of
the proxy's injected monotonic clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qmtl.common.cache import LRU
from qmtl.common.durations import parse_duration


def parse_ttl(value: Any, default: float) -> float:
    """Seconds of an envelope ``ttl`` (``"300s"``, ``"500ms"``, ``"5m"``, a number, or bare
    seconds ``"45"``); ``default`` when absent; ValueError when unreadable."""
    if value is None or value == "":
        return float(default)
    return parse_duration(value, bare_seconds=True)


class WorldLRU(LRU):
    """An :class:`LRU` whose keys are tuples starting with a world id, with an index by world,
    so that dropping one world's entries (on each consumed ControlBus event) costs the size
    of that world's entries, not of the whole cache."""

    def __init__(self, max_entries: int) -> None:
        super().__init__(max_entries)
        self._by_world: dict[str, set[Any]] = {}

    def put(self, key: Any, value: Any) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        self._by_world.setdefault(key[0], set()).add(key)
        while len(self._data) > self.max_entries:
            old, _ = self._data.popitem(last=False)
            self._unindex(old)

    def pop(self, key: Any) -> Any:
        value = self._data.pop(key, None)
        if value is not None:
            self._unindex(key)
        return value

    def _unindex(self, key: Any) -> None:
        keys = self._by_world.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_world[key[0]]

    def drop_world(self, world_id: str) -> int:
        """Forget every entry of ``world_id``; returns how many there were."""
        keys = self._by_world.pop(world_id, None) or ()
        for key in keys:
            self._data.pop(key, None)
        return len(keys)


@dataclass
class DecisionEntry:
    envelope: dict[str, Any]
    body: bytes
    etag: str  # client-facing entity tag (quoted)
    upstream_etag: str  # what to send WorldService in If-None-Match (quoted)
    ttl: float
    fetched_at: float
    expires_at: float


@dataclass
class ActivationEntry:
    envelope: dict[str, Any]
    body: bytes
    etag: str  # quoted
    upstream_etag: str  # quoted
    headers: dict[str, str] = field(default_factory=dict)  # WorldService's headers worth passing on (X-QMTL-Gated)
