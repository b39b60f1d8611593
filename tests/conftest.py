"""Shared fixtures. Services that a test needs are reached for real; when one is missing
the test FAILS with a clear message (never skips): CI must not pass by not testing."""

from __future__ import annotations

import os
import uuid

import pytest

REDIS_URL = os.environ.get("QMTL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("QMTL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
async def pg_schema():
    """A fresh PostgreSQL schema for one test: yields (url, schema); dropped afterwards."""
    import asyncpg

    from qmtl.store import drop_schema

    try:
        conn = await asyncpg.connect(POSTGRES_URL.replace("postgresql://", "postgres://"), timeout=5)
        await conn.close()
    except Exception as exc:  # pragma: no cover - environment failure
        pytest.fail(f"PostgreSQL is required at {POSTGRES_URL} and is not reachable: {exc!r}")
    schema = "t_" + uuid.uuid4().hex[:16]
    yield POSTGRES_URL, schema
    await drop_schema(POSTGRES_URL, schema)


@pytest.fixture
async def redis_kv():
    """A real Redis connection and a fresh key prefix; the prefix's keys are deleted afterwards."""
    from qmtl.store import make_kv

    kv = make_kv(REDIS_URL)
    try:
        await kv.ping()
    except Exception as exc:  # pragma: no cover - environment failure
        await kv.aclose()
        pytest.fail(f"Redis is required at {REDIS_URL} and is not reachable: {exc!r}")
    prefix = f"t:{uuid.uuid4().hex[:12]}:"
    yield kv, prefix
    keys = [k async for k in kv.scan_iter(match=prefix + "*")]
    if keys:
        await kv.delete(*keys)
    await kv.aclose()
