"""The local fallback queue: accepted strategy ids that cannot go to the Redis FIFO now.

An id lands here when the DAG Manager is unreachable (submissions accepted meanwhile, and
ids a worker could not diff) or when Redis refused the push. It holds ids only; the
submission itself is already durable in the database, so a Gateway that dies with ids
here loses nothing: the startup sweep re-enqueues every strategy the mirror says is not
finished. Bounded: when full, new submissions are refused with 503 (MINIMAL behaviour)
instead of growing without limit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator


class FallbackQueue:
    def __init__(self, capacity: int, on_change: Callable[[int], None] | None = None) -> None:
        if capacity < 1:
            raise ValueError("fallback_queue_size must be >= 1")
        self.capacity = capacity
        self._items: dict[str, None] = {}  # insertion-ordered set
        self._on_change = on_change

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, sid: object) -> bool:
        return sid in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._items))

    def full(self) -> bool:
        return len(self._items) >= self.capacity

    def put(self, sid: str) -> bool:
        """Add ``sid`` (idempotent); False when the queue is full and ``sid`` is not in it."""
        if sid in self._items:
            return True
        if self.full():
            return False
        self._items[sid] = None
        self._changed()
        return True

    def peek(self, n: int) -> list[str]:
        out: list[str] = []
        for sid in self._items:
            if len(out) >= n:
                break
            out.append(sid)
        return out

    def remove(self, sids: Iterable[str]) -> None:
        for sid in sids:
            self._items.pop(sid, None)
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(len(self._items))
