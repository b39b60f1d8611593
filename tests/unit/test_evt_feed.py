"""QueueFeed (qmtl/gateway/events/feed.py): what /queues/watch reads from the event relay."""

from __future__ import annotations

import asyncio
import time

from qmtl.gateway.events import state as st
from qmtl.gateway.events.feed import QueueFeed


def _feed():
    store = st.StateStore()
    feed: QueueFeed

    def apply(key, queues, *, etag, ts):
        outcome, _h = store.apply_queues(key, queues, etag=etag, ts=ts)
        if outcome == st.APPLIED:
            feed.applied(key)
        return outcome

    feed = QueueFeed(store, apply, time.time)
    return store, feed


async def test_followers_get_every_applied_set_in_order():
    _store, feed = _feed()
    key = feed.key(["b", "a", "a"], 60, None)
    assert key == (("a", "b"), 60, "any")
    f = feed.follow(key)
    other = feed.follow(feed.key(["z"], 60, "any"))
    assert await f.wait(0.01) == []  # nothing yet
    assert feed.offer(key, ["q1"], etag=None, asked_at=time.time()) == st.APPLIED
    assert feed.offer(key, ["q1", "q2"], etag=None, asked_at=time.time()) == st.APPLIED
    # both changes, in order, even the one the next replaced at once (as /ws relays both)
    assert await f.wait(0.01) == [{"queues": ["q1"]}, {"queues": ["q1", "q2"]}]
    assert await f.wait(0.01) == []
    assert feed.current(key) == {"queues": ["q1", "q2"]}
    assert await other.wait(0.01) == []  # another key is not woken
    assert feed.offer(key, ["q2", "q1"], etag=None, asked_at=time.time()) == st.DUPLICATE
    assert await f.wait(0.01) == []
    for i in range(f.backlog + 10):  # a reader far behind keeps the latest sets, never blocks the relay
        feed.offer(key, [f"x{i}"], etag=None, asked_at=time.time())
    got = await f.wait(0)
    assert len(got) == f.backlog and got[-1] == {"queues": [f"x{f.backlog + 9}"]}
    f.close()
    other.close()
    assert feed.followers() == 0 and feed.current(feed.key(["z"], 60, "any")) is None


async def test_a_reconcile_answer_never_undoes_a_newer_event():
    store, feed = _feed()
    key = feed.key(["a"], 60, "all")
    asked = feed.now()  # the reconcile asks the DAG Manager ...
    await asyncio.sleep(0.01)
    outcome, _ = store.apply_queues(key, ["new"], etag="e2", ts=None)  # ... an event lands meanwhile (receive time)
    assert outcome == st.APPLIED
    assert feed.offer(key, ["old"], etag="e1", asked_at=asked) == st.STALE  # the answer is older than the event
    assert feed.current(key) == {"queues": ["new"], "etag": "e2"}
    assert feed.offer(key, ["newer"], etag="e3", asked_at=feed.now() + 1) == st.APPLIED  # asked later: it wins
    assert feed.current(key)["queues"] == ["newer"]
