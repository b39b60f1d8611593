"""The database side of ingest (qmtl.gateway.ingest.store) on SQLite: group commit, the
unique content hash, the append-only mirror and what is read back from it."""

from __future__ import annotations

import asyncio
import time

import pytest
import sqlalchemy.exc

from qmtl.gateway.ingest.store import IngestStore, StrategyRecord
from qmtl.store import Database, sqlite_url


def rec(sid: str, chash: str) -> StrategyRecord:
    return StrategyRecord(strategy_id=sid, content_hash=chash, dag_json='{"nodes":[{"node_id":"n"}]}', meta={"name": sid},
                          run_type="live", world_id=None, sentinel_id=f"{sid}-sentinel")


@pytest.fixture
async def store(tmp_path):
    s = IngestStore(Database(sqlite_url(tmp_path / "gw.db")))
    await s.start()
    yield s
    await s.stop()
    await s.db.close()


async def test_accept_then_duplicate_returns_the_first_owner(store):
    assert await store.accept(rec("s-1", "h1")) == "s-1"
    assert await store.accept(rec("s-2", "h1")) == "s-1"
    assert await store.record("s-2") is None
    r = await store.record("s-1")
    assert r.dag == {"nodes": [{"node_id": "n"}]} and r.meta == {"name": "s-1"} and r.sentinel_id == "s-1-sentinel"
    assert await store.owner_of("h1") == "s-1"
    assert [s for s, _at, _d in await store.history("s-1")] == ["queued"]


async def test_concurrent_accepts_share_commits_and_one_owner_per_hash(store):
    records = [rec(f"s-{i}", f"h{i % 10}") for i in range(200)]
    owners = await asyncio.gather(*(store.accept(r) for r in records))
    assert store.commits < 50  # group commit: far fewer commits than writes
    winners = {}
    for r, owner in zip(records, owners):
        winners.setdefault(r.content_hash, owner)
        assert owner == winners[r.content_hash]
    assert len(set(owners)) == 10
    assert await store.counts() == {"queued": 10}


async def test_mirror_is_append_only_and_reads_the_latest_state(store):
    await store.accept(rec("s-1", "h1"))
    await store.accept(rec("s-2", "h2"))
    await store.append("s-1", "processing")
    await store.append("s-1", "diffed", {"queue_map": {"n": "t1"}, "tag_queries": {}})
    await store.append("s-1", "completed")
    await store.append("s-2", "processing")
    st = await store.state("s-1")
    assert st.status == "completed" and st.diff == {"queue_map": {"n": "t1"}, "tag_queries": {}}
    assert [s for s, _at, _d in await store.history("s-1")] == ["queued", "processing", "diffed", "completed"]
    assert await store.pending() == [("s-2", "processing")]
    assert await store.counts() == {"completed": 1, "processing": 1}
    assert await store.state("nope") is None


async def test_a_failed_write_fails_only_its_caller(store, monkeypatch):
    await store.accept(rec("s-1", "h1"))
    original = store._commit
    calls = {"n": 0}

    async def flaky(batch):
        calls["n"] += 1
        if any(op.kind == "event" and op.payload[0]["status"] == "boom" for op in batch):
            raise RuntimeError("disk on fire")
        return await original(batch)

    monkeypatch.setattr(store, "_commit", flaky)
    results = await asyncio.gather(store.append("s-1", "boom"), store.append("s-1", "processing"), return_exceptions=True)
    assert isinstance(results[0], RuntimeError) and results[1] is None
    assert [s for s, _at, _d in await store.history("s-1")] == ["queued", "processing"]


async def test_on_a_sqlite_file_commits_go_through_the_writer_thread(store):
    """The group commit runs on the SqliteWriter's own connection (one thread hand-off per
    commit); what it commits is read back through the async engine as before."""
    assert store._sync is not None
    calls = {"n": 0}
    original = store._sync.transaction

    async def counting(fn):
        calls["n"] += 1
        return await original(fn)

    store._sync.transaction = counting
    owners = await asyncio.gather(store.accept(rec("s-1", "h1")), store.accept(rec("s-2", "h1")), store.accept(rec("s-3", "h3")))
    assert owners == ["s-1", "s-1", "s-3"] and calls["n"] == 1  # one commit, the duplicate found in it
    await store.append_batch([("s-1", "processing", None), ("s-3", "failed", {"error": "x"})])
    assert calls["n"] == 2
    r = await store.record("s-1")
    assert r.meta == {"name": "s-1"} and r.created_at is not None
    assert [s for s, _at, _d in await store.history("s-3")] == ["queued", "failed"]
    assert (await store.state("s-3")).detail == {"error": "x"}


async def test_the_writer_rolls_back_a_failed_transaction(tmp_path):
    db = Database(sqlite_url(tmp_path / "w.db"))
    writer = db.sqlite_writer()
    assert writer is not None
    try:
        await writer.transaction(lambda conn: conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY)"))

        def insert_twice(conn):
            conn.execute("INSERT INTO t VALUES ('a')")
            conn.execute("INSERT INTO t VALUES ('a')")  # violates the key: the first insert goes too

        with pytest.raises(sqlalchemy.exc.IntegrityError, match="UNIQUE"):  # as the async engine raises it
            await writer.transaction(insert_twice)
        await writer.transaction(lambda conn: conn.execute("INSERT INTO t VALUES ('b')"))

        def slow_insert(conn):
            time.sleep(0.2)
            conn.execute("INSERT INTO t VALUES ('c')")

        task = asyncio.ensure_future(writer.transaction(slow_insert))
        await asyncio.sleep(0.05)
        task.cancel()  # the caller gives up; the transaction on the thread still commits
        await writer.transaction(lambda conn: None)  # runs after it (one thread, in order)
        assert task.cancelled()
        async with db.connect() as conn:  # the async engine sees what the writer committed
            assert [r[0] for r in (await conn.exec_driver_sql("SELECT k FROM t ORDER BY k")).all()] == ["b", "c"]
    finally:
        writer.close()
        await db.close()


def test_no_writer_thread_for_postgresql_or_an_in_memory_sqlite():
    assert Database("sqlite+aiosqlite:///:memory:").sqlite_writer() is None
    assert Database("postgresql://u:p@127.0.0.1:5432/test").sqlite_writer() is None


async def test_the_writer_stores_the_same_rows_as_the_async_engine(tmp_path):
    """The writer thread's statements (built from the tables, values bound by SQLAlchemy's
    SQLite types) leave the same rows as the SQLAlchemy Core path PostgreSQL uses."""
    from datetime import UTC, datetime

    at = datetime(2026, 12, 5, 12, 0, 0, 123456, tzinfo=UTC)
    rows = {}
    for name, use_writer in (("thread", True), ("engine", False)):
        s = IngestStore(Database(sqlite_url(tmp_path / f"{name}.db")))
        await s.start()
        try:
            if not use_writer:
                await asyncio.to_thread(s._sync.close)
                s._sync = None
            r = rec("s-1", "h1")
            r.created_at = at
            assert await s.accept(r) == "s-1"
            assert await s.accept(rec("s-2", "h1")) == "s-1"
            await s.append("s-1", "diffed", {"queue_map": {"n": "q"}, "tag_queries": {}}, at=at)
            async with s.db.connect() as conn:
                strat = (await conn.exec_driver_sql("SELECT * FROM gw_strategies")).all()
                events = (await conn.exec_driver_sql("SELECT strategy_id, status, at, detail FROM gw_strategy_events ORDER BY id")).all()
            rows[name] = (strat, events)
        finally:
            await s.stop()
            await s.db.close()
    assert rows["thread"] == rows["engine"]
    assert len(rows["thread"][0]) == 1 and [e[1] for e in rows["thread"][1]] == ["queued", "diffed"]
