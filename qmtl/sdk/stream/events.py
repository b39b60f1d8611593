"""What the stream hands its consumer: :class:`StreamEvent`, the :class:`StreamStats`
counters, and :class:`Delivery` (listeners called in order, else a bounded buffer for
``async for``)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qmtl.sdk.errors import StreamError

__all__ = ["Delivery", "Listener", "StreamEvent", "StreamStats"]

log = logging.getLogger("qmtl.sdk.stream")


@dataclass(frozen=True)
class StreamEvent:
    """One change (or snapshot) delivered to the consumer."""

    type: str
    data: Any
    source: str = "stream"  # stream | snapshot | reconcile
    id: str | None = None
    seq: int | None = None
    world_id: str | None = None
    frame: Mapping[str, Any] | None = None

    @property
    def traceparent(self) -> str | None:
        """The W3C trace context of the request that caused this event (the frame's CloudEvents
        distributed-tracing extension), when the Gateway relayed one: join it to your own traces."""
        value = (self.frame or {}).get("traceparent")
        return value if isinstance(value, str) else None


@dataclass
class StreamStats:
    descriptors: int = 0
    token_refreshes: int = 0
    connects: int = 0
    fallback_connects: int = 0
    connect_failures: int = 0
    resumes: int = 0
    snapshots: int = 0
    frames: int = 0
    duplicates: int = 0
    hash_mismatches: int = 0
    verifications: int = 0
    corrections: int = 0
    reconciles: int = 0
    refusals: dict[int, int] = field(default_factory=dict)


Listener = Callable[[StreamEvent], Any]


class Delivery:
    """Events to the listeners (sync or async; one failing does not stop the others) or,
    without any listener given at construction, into a buffer of ``max_buffer`` events
    (the oldest dropped) read by ``async for`` / :meth:`next_event`. ``None`` in the buffer
    marks the end."""

    def __init__(self, on_event: Listener | None, *, max_buffer: int) -> None:
        self.listeners: list[Listener] = [on_event] if on_event is not None else []
        self.buffer: asyncio.Queue[StreamEvent | None] | None = asyncio.Queue() if on_event is None else None
        self.max_buffer = max_buffer
        self.error: BaseException | None = None

    async def emit(self, event: StreamEvent) -> None:
        for listener in list(self.listeners):
            try:
                result = listener(event)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("event stream: a listener failed on %s", event.type)
        if self.buffer is not None:
            if self.buffer.qsize() >= self.max_buffer:
                with contextlib.suppress(asyncio.QueueEmpty):
                    self.buffer.get_nowait()
            self.buffer.put_nowait(event)

    def close(self, error: BaseException | None = None) -> None:
        """No more events: iteration ends (raising ``error`` when there is one)."""
        if error is not None:
            self.error = error
        if self.buffer is not None:
            self.buffer.put_nowait(None)

    async def iterate(self) -> AsyncIterator[StreamEvent]:
        if self.buffer is None:
            raise RuntimeError("this stream delivers to on_event; iterate a stream made without it")
        while True:
            item = await self.buffer.get()
            if item is None:
                if self.error is not None:
                    raise self.error
                return
            yield item

    async def next_event(self, timeout: float) -> StreamEvent:
        if self.buffer is None:
            raise RuntimeError("this stream delivers to on_event")
        item = await asyncio.wait_for(self.buffer.get(), timeout)
        if item is None:
            self.buffer.put_nowait(None)
            raise self.error or StreamError("the stream has stopped")
        return item
