"""The one implementation of each shared helper (qmtl.common): ETags per RFC 9110,
durations, the LRU map and single flight."""

from __future__ import annotations

import asyncio

import pytest

from qmtl.common.cache import LRU, SingleFlight
from qmtl.common.durations import format_duration, parse_duration
from qmtl.common.http import if_match, if_none_match, quote_etag

# --------------------------------------------------------------------------- ETags


def test_quote_etag():
    assert quote_etag("abc") == '"abc"' and quote_etag('"abc"') == '"abc"' and quote_etag('W/"abc"') == 'W/"abc"'


@pytest.mark.parametrize("header,etag,expected", [
    ('"abc"', "abc", True), ('"abc"', '"abc"', True), ('W/"abc"', "abc", True), ('W/"abc"', 'W/"abc"', True),
    ('"x", "abc"', "abc", True), ('"x" ,W/"abc"', "abc", True), ("*", "anything", True), ("abc", "abc", True),
    ('"abcd"', "abc", False), (None, "abc", False), ("", "abc", False), ('"ab"', "abc", False),
])
def test_if_none_match_uses_the_weak_comparison(header, etag, expected):
    assert if_none_match(header, etag) is expected


@pytest.mark.parametrize("header,etag,expected", [
    ('"abc"', "abc", True), ('"x", "abc"', "abc", True), ("*", "abc", True),
    ('W/"abc"', "abc", False),  # RFC 9110 §13.1.1: a weak tag never matches If-Match
    ('"abc"', 'W/"abc"', False), ('"abd"', "abc", False), ("", "abc", False),
])
def test_if_match_uses_the_strong_comparison(header, etag, expected):
    assert if_match(header, etag) is expected


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize("value,seconds", [
    (0, 0.0), (90, 90.0), (1.5, 1.5), ("0s", 0.0), ("500ms", 0.5), ("30s", 30.0), ("15m", 900.0), ("2h", 7200.0),
    ("1d", 86400.0), ("1.5h", 5400.0), (" 300s ", 300.0),
])
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "15", "15 minutes", "-5s", "1w", "soon", True, -1, float("nan"), float("inf"), None])
def test_parse_duration_rejects(value):
    with pytest.raises(ValueError):
        parse_duration(value)


def test_bare_seconds_only_when_asked():
    assert parse_duration("45", bare_seconds=True) == 45.0
    with pytest.raises(ValueError):
        parse_duration("45")


def test_format_duration():
    assert format_duration(90) == "1m30s" and format_duration(3600) == "1h" and format_duration(0) == "0s"
    assert format_duration(0.25) == "250ms" and format_duration(-90) == "-1m30s" and format_duration(90061) == "1d1h1m1s"


# --------------------------------------------------------------------------- caches


def test_lru_is_bounded_and_forgets_the_least_recently_used():
    lru: LRU[str, str] = LRU(3)
    for k in "abc":
        lru.put(k, k.upper())
    assert lru.get("a") == "A"  # a is now the most recent
    lru.put("d", "D")
    assert len(lru) == 3 and lru.get("b") is None and lru.get("a") == "A" and lru.get("d") == "D"
    assert "a" in lru and lru.pop("a") == "A" and "a" not in lru and lru.keys() == ["c", "d"]


async def test_single_flight_coalesces_concurrent_calls_and_shares_failures():
    sf: SingleFlight[str] = SingleFlight()
    calls = 0

    async def slow():
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return calls

    assert await asyncio.gather(*(sf.do("k", slow) for _ in range(10))) == [1] * 10
    assert calls == 1

    async def boom():
        await asyncio.sleep(0.01)
        raise RuntimeError("upstream")

    results = await asyncio.gather(*(sf.do("k", boom) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert await sf.do("k", slow) == 2  # nothing left in flight


async def test_single_flight_a_cancelled_caller_does_not_cancel_the_call_for_the_others():
    sf: SingleFlight[str] = SingleFlight()
    release = asyncio.Event()

    async def call():
        await release.wait()
        return "done"

    first = asyncio.create_task(sf.do("k", call))
    second = asyncio.create_task(sf.do("k", call))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    release.set()
    assert await second == "done"
    with pytest.raises(asyncio.CancelledError):
        await first
    assert "k" not in sf
