"""Fire-and-forget tasks that stay alive until they finish.

The event loop keeps only a weak reference to a task: a task nobody holds can be garbage
collected before it ran to the end (Python docs, ``asyncio.create_task``). :func:`detach`
schedules an awaitable and holds it in a module-level set until it is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")

_pending: set[asyncio.Future[Any]] = set()


def detach(aw: Awaitable[T]) -> asyncio.Future[T]:
    """Schedule ``aw`` on the running loop and keep a strong reference until it completes."""
    fut = asyncio.ensure_future(aw)
    _pending.add(fut)
    fut.add_done_callback(_pending.discard)
    return fut
