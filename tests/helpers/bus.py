"""Bounded waits on a ControlBus subscription, shared by the bus contract and Kafka tests."""

from __future__ import annotations

import asyncio
import time

import pytest

WAIT = 15.0  # upper bound for any wait on messages (s); normal runs take milliseconds


async def take(sub, n: int, timeout: float = WAIT) -> list:
    """The next ``n`` messages of ``sub``; the test fails when they do not come within ``timeout``."""
    out: list = []
    try:
        async with asyncio.timeout(timeout):
            async for msg in sub:
                out.append(msg)
                if len(out) >= n:
                    break
    except TimeoutError:
        pytest.fail(f"received {len(out)} of {n} messages within {timeout}s")
    return out


async def wait_until(predicate, timeout: float = WAIT, what: str = "condition", interval: float = 0.01) -> None:
    """Poll ``predicate`` until it holds; the test fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(interval)
