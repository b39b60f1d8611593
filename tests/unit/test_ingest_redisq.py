"""The Redis side of ingest (qmtl.gateway.ingest.redisq) on the in-memory substitute: the
reliable FIFO, per-strategy locks, FSM hashes, the epoch marker. (Lua compare-and-delete on
real Redis is exercised by the integration tests.)"""

from __future__ import annotations

import asyncio

import pytest

from qmtl.gateway.ingest.redisq import RedisIngest
from qmtl.store import make_kv


@pytest.fixture
async def rq():
    kv = make_kv("memory://")
    yield RedisIngest(kv, "p:", terminal_ttl=100)
    await kv.aclose()


async def test_fifo_order_and_reliable_pop(rq):
    await rq.push("a")
    await rq.push("b", "c")
    assert await rq.pop(0.1) == "a"
    assert await rq.processing_ids() == ["a"]
    assert await rq.pop(0.1) == "b"
    await rq.push_front("z")
    assert await rq.pop(0.1) == "z"
    assert await rq.depth() == (1, 3)
    await rq.done("a")
    assert set(await rq.processing_ids()) == {"b", "z"}
    assert await rq.queued_ids() == {"b", "c", "z"}
    assert await rq.pop(0.1) == "c"
    assert await rq.pop(0.05) is None


async def test_lock_is_exclusive_and_released_only_by_its_owner(rq):
    t1 = await rq.lock("s", ttl_ms=60_000)
    assert t1 and await rq.lock("s") is None
    assert await rq.kv.pttl("p:lock:s") > 59_000
    assert not await rq.unlock("s", "not-mine")
    assert await rq.locked("s")
    assert await rq.unlock("s", t1)
    assert not await rq.locked("s")
    assert await rq.lock("s") is not None


async def test_fsm_state_terminal_expires(rq):
    await rq.enqueue_new("s", {"sentinel_id": "s-sentinel", "world_id": None})
    assert await rq.get_status("s") == "queued"
    assert await rq.queued_ids() == {"s"}
    await rq.set_state("s", "diffed", {"queue_map": {"n": "t"}})
    st = await rq.get_state("s")
    assert st["queue_map"] == {"n": "t"} and st["sentinel_id"] == "s-sentinel" and "world_id" not in st
    assert await rq.kv.ttl("p:fsm:s") == -1
    await rq.set_state("s", "completed")
    assert 0 < await rq.kv.ttl("p:fsm:s") <= 100
    assert await rq.get_state("nope") is None


async def test_janitor_requeue_only_moves_what_is_still_there(rq):
    await rq.push("a")
    await rq.pop(0.1)
    assert await rq.requeue_from_processing("a")
    assert await rq.processing_ids() == [] and await rq.queued_ids() == {"a"}
    assert not await rq.requeue_from_processing("ghost")
    assert await rq.queued_ids() == {"a"}


async def test_epoch_and_rebuild_claim(rq):
    assert await rq.epoch() is None
    await rq.mark_epoch()
    assert await rq.epoch()
    token = await rq.claim_rebuild()
    assert token and await rq.claim_rebuild() is None
    await rq.release_rebuild(token)
    assert await rq.claim_rebuild() is not None


async def test_lock_and_status_and_consecutive_states_in_one_round_trip(rq):
    await rq.enqueue_new("s", {})
    token, status = await rq.lock_and_status("s")
    assert token and status == "queued"
    assert await rq.lock_and_status("s") == (None, "queued")
    await rq.set_states("s", [("diffed", {"queue_map": {"n": "t"}}), ("completed", None)])
    st = await rq.get_state("s")
    assert st["status"] == "completed" and st["queue_map"] == {"n": "t"}
    assert await rq.kv.ttl("p:fsm:s") > 0


async def test_unlock_is_a_lua_compare_and_delete_on_real_redis(redis_kv):
    kv, prefix = redis_kv
    rq = RedisIngest(kv, prefix)
    token = await rq.lock("s")
    assert not await rq.unlock("s", "someone-else")
    assert await rq.locked("s") and rq._scripting is True
    assert await rq.unlock("s", token)
    assert not await rq.locked("s")


async def test_submissions_enqueued_together_share_one_round_trip_in_fifo_order(rq, monkeypatch):
    trips = []
    real = rq.kv.pipeline

    def counting(*args, **kwargs):
        trips.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(rq.kv, "pipeline", counting)
    await asyncio.gather(*(rq.enqueue_new(sid, {"world_id": "w"}) for sid in ("a", "b", "c")))
    assert len(trips) == 1  # one HSET each and one LPUSH, in one round trip
    assert [await rq.get_status(s) for s in "abc"] == ["queued"] * 3
    assert (await rq.get_state("b"))["world_id"] == "w"
    assert [await rq.pop(0.1) for _ in range(3)] == ["a", "b", "c"]  # FIFO: in call order
    await rq.enqueue_new("d", {})  # a later call gets a round trip of its own
    assert len(trips) == 2 and await rq.pop(0.1) == "d"


async def test_a_failed_shared_enqueue_fails_every_caller_and_the_next_one_works(rq, monkeypatch):
    real = rq.kv.pipeline

    def broken(*args, **kwargs):
        raise ConnectionError("redis went away")

    monkeypatch.setattr(rq.kv, "pipeline", broken)
    results = await asyncio.gather(rq.enqueue_new("a", {}), rq.enqueue_new("b", {}), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)  # each caller falls back on its own
    monkeypatch.setattr(rq.kv, "pipeline", real)
    await rq.enqueue_new("c", {})
    assert await rq.queued_ids() == {"c"}


async def test_more_ids_are_asked_for_only_as_many_as_wait(rq):
    await rq.push("a", "b")
    assert await rq.pop(0.1) == "a"
    assert await rq.pop_more(31) == ["b"]
    assert await rq.pop_more(31) == []
    assert await rq.processing_ids() == ["b", "a"]


async def test_consecutive_states_are_one_hset_that_ends_as_they_would_in_turn(rq):
    await rq.set_states_many([("s", [("diffed", {"queue_map": {"n": "t"}, "error": None}), ("completed", None)]),
                              ("f", [("failed", {"error": "boom"})])])
    s, f = await rq.get_state("s"), await rq.get_state("f")
    assert s["status"] == "completed" and s["queue_map"] == {"n": "t"} and s["updated_at"]
    assert f == {"status": "failed", "error": "boom", "updated_at": f["updated_at"]}
    assert await rq.kv.ttl("p:fsm:s") > 0 and await rq.kv.ttl("p:fsm:f") > 0


async def test_an_id_kept_for_the_fallback_queue_gets_its_state_but_is_not_pushed(rq):
    await asyncio.gather(rq.enqueue_new("a", {}), rq.enqueue_new("b", {}, push=False))
    assert await rq.get_status("b") == "queued"
    assert await rq.queued_ids() == {"a"}
