"""Per-key state of the Gateway event stream: idempotence, order, and state hashes that agree
with WorldService's (``qmtl.common.statehash``)."""

from __future__ import annotations

import random

from qmtl.common.statehash import activation_state_hash, policy_state_hash
from qmtl.gateway.events.state import (
    APPLIED,
    DUPLICATE,
    STALE,
    StateStore,
    normalise_queue_key,
    parse_ts,
    queue_state_hash,
)
from tests.helpers.events import activation_updated, policy_updated


def act(sid, etag, ts, *, world="w", **fields):
    return activation_updated(world, sid, etag=etag, ts=ts, **fields)


def t(sec: float) -> str:
    whole = int(sec)
    return f"2026-11-26T12:00:{whole:02d}.{round((sec - whole) * 1e6):06d}Z"


def test_activation_hash_is_worldservice_hash_of_every_entry():
    rnd = random.Random(7)
    s = StateStore()
    entries = {}
    for i in range(200):
        sid, side = f"s-{rnd.randrange(40)}-é", rnd.choice(["long", "short"])
        active, weight = rnd.random() < 0.5, rnd.choice([0, 1, 0.1, 1 / 3, 0.25])
        outcome, h = s.apply_activation(act(sid, f"e{i}", t(i * 0.1), side=side, active=active, weight=weight))
        assert outcome == APPLIED
        entries[(sid, side)] = {"strategy_id": sid, "side": side, "active": active, "weight": weight}
        assert h == activation_state_hash(entries.values())
    assert s.activation_hash("w") == activation_state_hash(entries.values())
    assert s.activation_hash("unknown") == activation_state_hash([])
    items = s.activation_items("w")
    assert [(i["strategy_id"], i["side"]) for i in items] == sorted(entries)


def test_activation_hash_definition_pinned():
    """The definition clients verify against (statehash docstring, asyncapi), re-implemented here."""
    import hashlib
    import json

    entries = [{"strategy_id": "s-1", "side": "long", "active": True, "weight": 1},
               {"strategy_id": "s-2", "side": "short", "active": False, "weight": 0.25}]
    total = 0
    for e in entries:
        doc = json.dumps({"strategy_id": e["strategy_id"], "side": e["side"], "active": bool(e["active"]),
                          "weight": float(e["weight"])}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        total += int.from_bytes(hashlib.sha256(doc.encode()).digest(), "big")
    expected = hashlib.sha256(b"qmtl.activation.v2:" + (total % 2**256).to_bytes(32, "big")).hexdigest()
    assert activation_state_hash(entries) == activation_state_hash(entries[::-1]) == expected


def test_an_activation_event_costs_one_entry_digest_whatever_the_world_size(monkeypatch):
    from qmtl.gateway.events import state as state_mod

    s = StateStore()
    for i in range(2000):
        s.apply_activation(act(f"s{i}", f"e{i}", t(1), weight=1.0))
    calls = []
    real = state_mod.activation_entry_digest
    monkeypatch.setattr(state_mod, "activation_entry_digest", lambda e: calls.append(1) or real(e))
    outcome, h = s.apply_activation(act("s7", "e-new", t(2), weight=0.5))
    assert outcome == APPLIED and len(calls) == 1  # the changed entry only, not the 2,000 others
    entries = [{"strategy_id": f"s{i}", "side": "long", "active": True, "weight": 0.5 if i == 7 else 1.0} for i in range(2000)]
    assert h == activation_state_hash(entries)


def test_activation_duplicates_stale_and_independent_entries():
    s = StateStore()
    assert s.apply_activation(act("a", "e1", t(1), weight=0.1))[0] == APPLIED
    assert s.apply_activation(act("a", "e1", t(1), weight=0.1))[0] == DUPLICATE
    assert s.apply_activation(act("a", "e2", t(2), weight=0.2))[0] == APPLIED
    assert s.apply_activation(act("a", "e0", t(0.5), weight=0.9))[0] == STALE  # older than held
    assert s.apply_activation(act("a", "e1", t(2), weight=0.1))[0] == DUPLICATE  # an etag applied before, even with a newer-looking ts
    assert s.apply_activation(act("a", "e3", t(2), weight=0.3))[0] == APPLIED  # same ts, new etag: a new value
    # another entry of the same world: its own history, an older ts is still news
    assert s.apply_activation(act("b", "f1", t(0.1)))[0] == APPLIED
    assert [i["weight"] for i in s.activation_items("w")] == [0.3, 0.5]


def test_mismatched_worlds_track_the_published_hash():
    s = StateStore()
    full = activation_state_hash([{"strategy_id": "a", "side": "long", "active": True, "weight": 0.5},
                                  {"strategy_id": "b", "side": "long", "active": True, "weight": 0.5}])
    s.apply_activation(act("a", "e1", t(1), state_hash=full))
    assert s.mismatched_worlds() == 1  # one apply of two entries: half-way
    s.apply_activation(act("b", "e2", t(1), state_hash=full))
    assert s.mismatched_worlds() == 0


def pol(v, status, ts, world="w"):
    return policy_updated(world, v, checksum=f"c{v}", status=status, ts=ts)


def test_policy_default_lifecycle_and_hash():
    s = StateStore()
    assert s.policy_hash("w") == policy_state_hash("w", 0, None, None)
    assert s.apply_policy(pol(1, "DRAFT", t(1)))[0] == APPLIED
    outcome, h = s.apply_policy(pol(1, "ACTIVE", t(1)))  # created as default: same ts, later in the lifecycle
    assert outcome == APPLIED and h == policy_state_hash("w", 1, "c1", "ACTIVE")
    assert s.apply_policy(pol(1, "DRAFT", t(1)))[0] == STALE  # redelivered: never goes back
    assert s.apply_policy(pol(1, "ACTIVE", t(1)))[0] == DUPLICATE
    s.apply_policy(pol(2, "DRAFT", t(2)))
    s.apply_policy(pol(1, "DEPRECATED", t(3)))
    outcome, h = s.apply_policy(pol(2, "ACTIVE", t(3)))
    assert h == policy_state_hash("w", 2, "c2", "ACTIVE")
    assert [p["status"] for p in s.policy_items("w")] == ["DEPRECATED", "ACTIVE"]
    # set-default back to v1 later
    s.apply_policy(pol(2, "DEPRECATED", t(4)))
    assert s.apply_policy(pol(1, "ACTIVE", t(4)))[1] == policy_state_hash("w", 1, "c1", "ACTIVE")
    assert s.apply_policy(pol(2, "ACTIVE", t(3.5)))[0] == STALE


def test_queue_sets_per_key_and_mode():
    s = StateStore()
    k_any = normalise_queue_key(["price", "btc", "btc", " "], 60)
    k_all = normalise_queue_key("btc,price", "60", "all")
    assert k_any == (("btc", "price"), 60, "any") and k_all == (("btc", "price"), 60, "all")
    assert s.apply_queues(k_any, ["q2", "q1"], etag="e1", ts=t(1)) == (APPLIED, queue_state_hash(k_any, ["q1", "q2"]))
    assert s.apply_queues(k_any, ["q1"], etag="e1", ts=t(2))[0] == DUPLICATE  # same etag
    assert s.apply_queues(k_any, ["q1", "q2"], etag="e9", ts=t(3))[0] == DUPLICATE  # same set
    assert s.apply_queues(k_any, ["q3"], etag="e0", ts=t(0.5))[0] == STALE
    assert s.apply_queues(k_all, ["q1"], etag="a1", ts=t(0.5))[0] == APPLIED  # the other mode is its own key
    assert s.queue_hash(normalise_queue_key(["btc"], 60)) is None
    items, combined = s.queue_items(None)
    assert [i["match_mode"] for i in items] == ["all", "any"] and len(combined) == 64
    items, _ = s.queue_items([k_all])
    assert items == [{"tags": ["btc", "price"], "interval": 60, "match_mode": "all", "queues": ["q1"],
                      "state_hash": queue_state_hash(k_all, ["q1"]), "etag": "a1"}]


def test_queue_key_validation():
    for bad in ((["", " "], 60, None), (["a"], 0, None), (["a"], "x", None), (["a"], 60, "some")):
        try:
            normalise_queue_key(*bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")


def test_sentinel_weights_order():
    s = StateStore()
    assert s.apply_sentinel("x", 0.1, t(1)) == APPLIED
    assert s.apply_sentinel("x", 0.1, t(1)) == DUPLICATE
    assert s.apply_sentinel("x", 0.9, t(0.5)) == STALE
    assert s.apply_sentinel("x", 0.2, None) == APPLIED  # no ts: cannot be ordered, relayed


def test_parse_ts():
    assert parse_ts("2026-11-26T12:00:00Z") == parse_ts("2026-11-26T12:00:00+00:00") == parse_ts("2026-11-26T12:00:00")
    assert parse_ts("2026-11-26T12:00:00.5Z") - parse_ts("2026-11-26T12:00:00Z") == 0.5
    assert parse_ts("yesterday") is None and parse_ts(None) is None
