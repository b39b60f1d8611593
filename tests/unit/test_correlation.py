import asyncio
import io
import logging
import re

import pytest

from qmtl.common import correlation
from qmtl.common.correlation import HEADER, CorrelationIdFilter, from_header, get, new_correlation_id, valid


def test_header_name():
    assert HEADER == "X-Correlation-ID"


def test_new_ids_are_unique_hex_and_valid():
    ids = {new_correlation_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) and valid(i) for i in ids)


@pytest.mark.parametrize("value", ["a", "A-b_c.d:e", "x" * 128, "0123"])
def test_valid(value):
    assert valid(value)


@pytest.mark.parametrize("value", ["", "x" * 129, "a b", "a\n", "abc\n", "é", "a/b", "<script>", None, 5])
def test_invalid(value):
    assert not valid(value)


def test_from_header_keeps_valid_and_replaces_invalid():
    assert from_header("req-1") == "req-1"
    for bad in (None, "", "bad value", "x" * 200):
        fresh = from_header(bad)
        assert fresh != bad and valid(fresh)


async def test_context_var_is_per_task():
    assert get() is None

    async def handle(cid):
        correlation.correlation_id.set(cid)
        await asyncio.sleep(0)
        return get()

    assert await asyncio.gather(handle("one"), handle("two")) == ["one", "two"]
    assert get() is None


def _logger():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(correlation_id)s %(message)s"))
    handler.addFilter(CorrelationIdFilter())
    logger = logging.getLogger(f"test.correlation.{id(stream)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger, stream


def test_filter_sets_correlation_id_or_dash():
    logger, stream = _logger()
    logger.info("outside")
    token = correlation.correlation_id.set("cid-42")
    try:
        logger.info("inside")
        logger.info("explicit", extra={"correlation_id": "given"})
    finally:
        correlation.correlation_id.reset(token)
    assert stream.getvalue().splitlines() == ["- outside", "cid-42 inside", "given explicit"]
