"""The client's state copy hashes exactly as the Gateway does (so a statehash check means
convergence), and applies duplicates and stale entries the way the Gateway does."""

from __future__ import annotations

from qmtl.common.statehash import activation_state_hash, policy_state_hash
from qmtl.gateway.events import state as gw
from qmtl.sdk.state import (
    StreamState,
    normalise_queue_key,
    queue_set_hash,
    queue_snapshot_hash,
)
from tests.helpers.events import activation_updated, policy_updated


def _act(sid, side, active, weight, etag, ts):
    return activation_updated("w", sid, side=side, active=active, weight=weight, etag=etag, ts=ts)


def test_queue_hashes_equal_the_gateways():
    key = normalise_queue_key(["price", "btc", "btc"], 60, None)
    assert key == gw.normalise_queue_key(["btc", "price"], 60, "any")
    assert queue_set_hash(key, ["q2", "q1", "q1"]) == gw.queue_state_hash(key, ["q1", "q2"])
    server = gw.StateStore()
    server.apply_queues(key, ["q1", "q2"], etag="e1")
    other = normalise_queue_key(["eth"], 300, "all")
    server.apply_queues(other, [], etag="e2")
    items, combined = server.queue_items([key, other])
    mine = StreamState()
    for item in items:
        mine.apply_queues(normalise_queue_key(item["tags"], item["interval"], item["match_mode"]), item["queues"])
    assert mine.queues_hash() == combined == queue_snapshot_hash(i["state_hash"] for i in items)


def test_activation_and_policy_hashes_equal_the_gateways_and_worldservices():
    server = gw.StateStore()
    mine = StreamState()
    events = [_act("s1", "long", True, 0.5, "e1", "2026-01-01T00:00:00Z"),
              _act("s1", "short", False, 0.0, "e2", "2026-01-01T00:00:00Z"),
              _act("s2", "long", True, 1.0, "e3", "2026-01-01T00:00:01Z")]
    for e in events:
        server.apply_activation(e)
        assert mine.apply_activation(e)
        assert mine.activation_hash("w") == server.activation_hash("w")
    assert mine.activation_hash("w") == activation_state_hash(events)
    pol = policy_updated("w", 2, checksum="c" * 64, status="ACTIVE", ts="2026-01-01T00:00:02Z")
    server.apply_policy(pol)
    mine.apply_policy(pol)
    assert mine.policy_hash("w") == server.policy_hash("w") == policy_state_hash("w", 2, "c" * 64, "ACTIVE")
    assert StreamState().policy_hash("w") == policy_state_hash("w", 0, None, None)


def test_duplicates_and_stale_entries_change_nothing():
    s = StreamState()
    assert s.apply_activation(_act("s1", "long", True, 1.0, "e2", "2026-01-01T00:00:02Z"))
    assert not s.apply_activation(_act("s1", "long", True, 1.0, "e2", "2026-01-01T00:00:02Z"))  # same etag
    assert not s.apply_activation(_act("s1", "long", False, 0.0, "e1", "2026-01-01T00:00:01Z"))  # older
    assert s.activation_entry("w", "s1", "long")["active"] is True
    key = normalise_queue_key(["a"], 60)
    assert s.apply_queues(key, ["q1"])
    assert not s.apply_queues(key, ["q1"])


def test_merge_with_the_source_keeps_newer_stream_entries_and_drops_unknown_ones():
    s = StreamState()
    s.apply_activation(_act("s1", "long", True, 1.0, "new", "2026-01-01T00:00:05Z"))
    s.apply_activation(_act("gone", "long", True, 1.0, "g", "2026-01-01T00:00:00Z"))
    truth = [_act("s1", "long", False, 0.0, "old", "2026-01-01T00:00:01Z"),
             _act("s2", "short", True, 0.3, "x", "2026-01-01T00:00:02Z")]
    changed = s.merge_activation("w", truth)
    assert s.activation_entry("w", "s1", "long")["etag"] == "new"  # newer from the stream: kept
    assert s.activation_entry("w", "s2", "short")["weight"] == 0.3
    assert s.activation_entry("w", "gone", "long") is None
    assert {(c["strategy_id"], c["active"]) for c in changed} == {("s2", True), ("gone", False)}
