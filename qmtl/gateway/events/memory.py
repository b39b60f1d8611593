"""Give the memory of closed WebSocket connections back to the operating system.

A connection's Python objects are all freed when it closes (tests/integration/
test_gateway_ws_memory.py), yet the process's RSS stays near its peak: freed memory stays
with the allocators. Measured on ``qmtl up`` (bench/bench_ws_memory.py, 1,000 clients opened
then closed): Python's own allocator (pymalloc) went from 64 to 89 arenas of 1 MiB with the
same bytes in use (an arena is returned only when every object in it is freed; a few objects
allocated during the burst that live on pin it), and glibc's heap kept ~7 MB of free pages.

:class:`MemoryTrimmer` does what can be done from inside the process, once after a burst of
closes: the first close after a trim schedules one pass ``delay`` seconds later, so 1,000
closes cost one pass, not 1,000 (and a slow pass spaces the next ones out: at most
:data:`MAX_DUTY` of the time). A pass runs a full garbage collection (a closed connection's
tasks and futures sit in reference cycles, and an idle process would not collect them; it
also empties the interpreter's free lists) and glibc's ``malloc_trim(0)`` (releases the free
pages inside the heap). Pinned pymalloc arenas stay; a process started with
``PYTHONMALLOC=malloc`` has none, and then the trim returns nearly everything (figures in
bench/bench_ws_memory.py). Where the C library has no ``malloc_trim`` (musl, macOS) only the
collection runs.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

TRIM_DELAY = 1.0  # seconds after the first close of a burst
# A pass may take at most this share of the time between passes: where a full collection is
# slow (a large heap not frozen at start), passes under steady churn space out accordingly.
MAX_DUTY = 0.01


def libc_malloc_trim() -> Callable[[], int] | None:
    """glibc's ``malloc_trim(0)`` as a callable, or None where there is none."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return lambda: int(fn(0))


LIBC_MALLOC_TRIM = libc_malloc_trim()


def _call_later(delay: float, callback: Callable[[], None]) -> Any:
    return asyncio.get_running_loop().call_later(delay, callback)


class MemoryTrimmer:
    """``closed()`` after each connection closes; one pass (collect + trim) per burst."""

    def __init__(
        self,
        *,
        delay: float = TRIM_DELAY,
        trim: Callable[[], int] | None = LIBC_MALLOC_TRIM,
        collect: Callable[[], int] = gc.collect,
        schedule: Callable[[float, Callable[[], None]], Any] = _call_later,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.delay = delay
        self._trim = trim
        self._collect = collect
        self._schedule = schedule
        self._monotonic = monotonic
        self.pending = False
        self.passes = 0
        self.last_seconds = 0.0

    def closed(self) -> None:
        if self.pending:
            return
        try:
            self._schedule(max(self.delay, self.last_seconds / MAX_DUTY), self.run)
        except RuntimeError:  # no running loop: nothing to batch with
            return
        self.pending = True

    def run(self) -> None:
        self.pending = False
        started = self._monotonic()
        try:
            self._collect()
            if self._trim is not None:
                self._trim()
        except Exception:  # never let a trim break the relay
            log.exception("returning memory after WebSocket closes failed")
            return
        self.passes += 1
        self.last_seconds = self._monotonic() - started
        log.debug("memory returned after WebSocket closes in %.1f ms", self.last_seconds * 1000)
