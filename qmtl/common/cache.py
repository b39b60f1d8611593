"""In-memory caching helpers shared by the services: a bounded LRU map and single flight."""

from __future__ import annotations

import asyncio
import functools
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

__all__ = ["LRU", "SingleFlight"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """A bounded mapping that forgets the least recently used entry first."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max(1, int(max_entries))
        self._data: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def pop(self, key: K) -> V | None:
        return self._data.pop(key, None)

    def keys(self) -> list[K]:
        return list(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)


class SingleFlight(Generic[K]):
    """Coalesce concurrent identical calls: the first caller's ``fn()`` runs as a task of its
    own and every caller with the same key awaits its result (or its exception). A caller that
    is cancelled stops waiting; the call itself goes on for the others. Once it is done the key
    is free again: the next caller starts a new call."""

    def __init__(self) -> None:
        self._inflight: dict[K, asyncio.Future[Any]] = {}  # each call has its own result type

    async def do(self, key: K, fn: Callable[[], Awaitable[V]]) -> V:
        fut = self._inflight.get(key)
        if fut is None:
            fut = asyncio.ensure_future(fn())
            self._inflight[key] = fut
            fut.add_done_callback(functools.partial(self._done, key))
        return await asyncio.shield(fut)

    def _done(self, key: K, fut: asyncio.Future[Any]) -> None:
        if self._inflight.get(key) is fut:
            del self._inflight[key]
        if not fut.cancelled():
            fut.exception()  # retrieved: the callers may all have gone

    def __contains__(self, key: object) -> bool:
        return key in self._inflight
