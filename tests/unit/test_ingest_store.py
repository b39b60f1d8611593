"""The database side of ingest (qmtl.gateway.ingest.store) on SQLite: group commit, the
unique content hash, the append-only mirror and what is read back from it."""

from __future__ import annotations

import asyncio

import pytest

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
