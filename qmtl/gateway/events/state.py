"""The state the Gateway keeps per key, so it can snapshot a new subscriber (SPEC §5).

Three state topics, each a map of keys to the latest applied value:

* **activation** — per world, one entry per ``(strategy_id, side)``: the latest
  ActivationUpdated for it;
* **policy** — per world, one entry per ``policy_version``: the latest PolicyUpdated for
  it; the world's *default* policy is the ``ACTIVE`` one with the newest ``ts``;
* **queues** — per ``(sorted unique tags, interval, match_mode)``: the latest queue set.

And sentinel traffic weights per ``sentinel_id`` (not a topic: relayed, never snapshotted).

**Idempotence and order** (at-least-once delivery makes both necessary):

* an event whose ``etag`` was already applied to its entry is a *duplicate* (activation,
  queues; a queue set equal to the one held is a duplicate too); a PolicyUpdated equal
  to the one held for its version is a duplicate;
* an event whose ``ts`` is older than the ``ts`` held for its entry is *stale* and never
  applied. An event's own ``ts`` counts for at most ``max_skew`` seconds past the
  Gateway's clock when it arrives (:meth:`StateStore.when`): a ``ts`` in 2099 is held as
  "now + skew", so it cannot make every genuine later update look older (callbacks with
  such a ``ts`` are refused before they get here; this is the bound for every path).
  Within a key, the ControlBus delivers events in the producer's partition order, which
  is the order they are applied in; timestamps only arbitrate between paths (bus,
  callback, WorldService seed, replays). Equal ``ts``: activation and queues apply it (a new etag means a new value);
  a policy version applies it only when its status moves forward in the lifecycle
  DRAFT → ACTIVE → DEPRECATED (WorldService stamps the events of one change with one ``ts``);
* entries are independent: an older event for one strategy is still applied after a newer
  event for another strategy of the same world (both are news).

**State hashes** equal WorldService's (``qmtl.common.statehash``) when the Gateway holds
the whole set: activation hashes every entry of a world, policy hashes the default policy.
A queue set hashes ``{tags, interval, match_mode, queues}`` (:func:`queue_state_hash`).
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from qmtl.bus.keys import queue_key
from qmtl.common.statehash import (
    activation_entry_digest,
    activation_hash_of_sum,
    activation_state_hash,
    canonical_json,
    policy_state_hash,
)
from qmtl.contracts.constants import DEFAULT_MATCH_MODE, MATCH_MODES, PolicyStatus

__all__ = [
    "APPLIED",
    "DUPLICATE",
    "STALE",
    "QueueKey",
    "StateStore",
    "normalise_queue_key",
    "parse_ts",
    "queue_state_hash",
]

APPLIED = "applied"
DUPLICATE = "duplicate"
STALE = "stale"

_POLICY_RANK = {status: rank for rank, status in enumerate(PolicyStatus)}  # the schema lists them in lifecycle order
_RECENT_ETAGS = 8  # per activation entry: etags applied before the current one

QueueKey = tuple  # (tags: tuple[str, ...], interval: int, match_mode: str)


def parse_ts(value: Any) -> float | None:
    """RFC 3339 → seconds since the epoch (``None`` when absent or unparsable)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:  # naive: taken as UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def normalise_tags(tags: Iterable[str]) -> tuple[str, ...]:
    """Sorted, unique, blanks stripped, empties dropped (as the DAG Manager's tag index)."""
    if isinstance(tags, str):
        tags = tags.split(",")
    return tuple(sorted({t.strip() for t in tags if isinstance(t, str) and t.strip()}))


def normalise_queue_key(tags: Iterable[str], interval: Any, match_mode: Any = None) -> QueueKey:
    """``(tags, interval, match_mode)`` in canonical form; ValueError when unusable."""
    norm = normalise_tags(tags)
    if not norm:
        raise ValueError("a queue key needs at least one non-blank tag")
    try:
        iv = int(interval)
    except (TypeError, ValueError):
        raise ValueError(f"interval must be an integer, not {interval!r}") from None
    if iv < 1:
        raise ValueError("interval must be >= 1")
    mode = match_mode or DEFAULT_MATCH_MODE
    if mode not in MATCH_MODES:
        raise ValueError(f"match_mode must be one of {', '.join(MATCH_MODES)}, not {mode!r}")
    return (norm, iv, mode)


def queue_state_hash(key: QueueKey, queues: Iterable[str]) -> str:
    """SHA-256 hex of canonical JSON ``{interval, match_mode, queues (sorted), tags (sorted)}``."""
    tags, interval, mode = key
    doc = {"tags": list(tags), "interval": int(interval), "match_mode": mode, "queues": sorted(set(queues))}
    return hashlib.sha256(canonical_json(doc)).hexdigest()


def _combined_hash(hashes: Iterable[str]) -> str:
    return hashlib.sha256(canonical_json(sorted(hashes))).hexdigest()


class _Activation:
    __slots__ = ("digest", "etag", "event", "recent", "ts")

    def __init__(self, event: dict, ts: float, recent: deque) -> None:
        self.event = event
        self.ts = ts
        self.etag = event["etag"]
        self.recent = recent
        self.digest = activation_entry_digest(event)  # the entry's share of the world's hash (see statehash)


class _World:
    """A world's activation entries and the sum of their digests: a change subtracts the old
    entry's digest and adds the new one, so the hash costs O(1) per event whatever the
    world's size (``statehash``: the activation hash is defined on that sum)."""

    __slots__ = ("_hash", "_sum", "entries", "published_hash")

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], _Activation] = {}
        self._sum = 0
        self._hash: str | None = None
        self.published_hash: str | None = None  # state_hash of the last applied event, if any

    def put(self, key: tuple[str, str], entry: _Activation) -> None:
        old = self.entries.get(key)
        self._sum += entry.digest - (old.digest if old is not None else 0)
        self.entries[key] = entry
        self._hash = None

    def state_hash(self) -> str:
        """Equal to ``statehash.activation_state_hash`` of the entries."""
        if self._hash is None:
            self._hash = activation_hash_of_sum(self._sum)
        return self._hash


class _Policy:
    __slots__ = ("event", "rank", "ts")

    def __init__(self, event: dict, ts: float) -> None:
        self.event = event
        self.ts = ts
        self.rank = _POLICY_RANK.get(event["status"], 0)


class _Queues:
    __slots__ = ("etag", "hash", "queues", "ts")

    def __init__(self, key: QueueKey, queues: Iterable[str], etag: str | None, ts: float) -> None:
        self.queues = tuple(sorted(set(queues)))
        self.etag = etag
        self.ts = ts
        self.hash = queue_state_hash(key, self.queues)


class StateStore:
    """Current state per key; every ``apply_*`` returns ``(outcome, state_hash_after)``."""

    def __init__(self, clock: Any = time.time, max_skew: float = 60.0) -> None:
        self._clock = clock
        self.max_skew = max_skew
        self.worlds: dict[str, _World] = {}
        self.policies: dict[str, dict[int, _Policy]] = {}
        self.queues: dict[QueueKey, _Queues] = {}
        self.sentinels: dict[str, tuple[float, float | None]] = {}

    def stamp(self, value: Any) -> float:
        """:meth:`when` for an event that always gets an ordering time (the Gateway's clock
        when its ``ts`` is absent or unparsable)."""
        parsed = parse_ts(value)
        now = self._clock()
        return now if parsed is None else min(parsed, now + self.max_skew)

    def when(self, value: Any, *, default_now: bool = True) -> float | None:
        """An event's ``ts`` as ordering time: parsed, capped at the Gateway's clock plus
        ``max_skew``; absent or unparsable → the Gateway's clock (``None`` when not
        ``default_now``)."""
        parsed = parse_ts(value)
        now = self._clock()
        if parsed is None:
            return now if default_now else None
        return min(parsed, now + self.max_skew)

    # -- activation ------------------------------------------------------------------
    def apply_activation(self, event: Mapping[str, Any], *, with_hash: bool = True) -> tuple[str, str | None]:
        world_id = event["world_id"]
        world = self.worlds.get(world_id)
        if world is None:
            world = self.worlds[world_id] = _World()
        key = (event["strategy_id"], event["side"])
        ts = self.stamp(event.get("ts"))
        etag = event["etag"]
        current = world.entries.get(key)
        if current is not None:
            if etag == current.etag or etag in current.recent:
                return DUPLICATE, world.state_hash() if with_hash else None
            if ts < current.ts:
                return STALE, world.state_hash() if with_hash else None
            recent = current.recent
            recent.append(current.etag)
        else:
            recent = deque(maxlen=_RECENT_ETAGS)
        world.put(key, _Activation(dict(event), ts, recent))
        published = event.get("state_hash")
        world.published_hash = published if isinstance(published, str) and published else None
        return APPLIED, world.state_hash() if with_hash else None

    def mismatched_worlds(self) -> int:
        """Worlds whose hash differs from the state_hash their last applied event carried."""
        return sum(1 for w in self.worlds.values() if w.published_hash is not None and w.published_hash != w.state_hash())

    def activation_hash(self, world_id: str) -> str:
        world = self.worlds.get(world_id)
        return world.state_hash() if world is not None else activation_state_hash([])

    def activation_items(self, world_id: str) -> list[dict]:
        world = self.worlds.get(world_id)
        if world is None:
            return []
        out = []
        for k in sorted(world.entries):
            item = dict(world.entries[k].event)
            item.pop("state_hash", None)  # the hash at that event's time; the snapshot's is current
            out.append(item)
        return out

    # -- policy ------------------------------------------------------------------------
    def apply_policy(self, event: Mapping[str, Any]) -> tuple[str, str]:
        world_id = event["world_id"]
        versions = self.policies.setdefault(world_id, {})
        version = int(event["policy_version"])
        ts = self.stamp(event.get("ts"))
        incoming = _Policy(dict(event), ts)
        current = versions.get(version)
        if current is not None:
            same = (
                current.event.get("status") == event.get("status")
                and current.event.get("checksum") == event.get("checksum")
                and current.ts == ts
            )
            if same:
                return DUPLICATE, self.policy_hash(world_id)
            if ts < current.ts or (ts == current.ts and incoming.rank <= current.rank):
                return STALE, self.policy_hash(world_id)
        versions[version] = incoming
        return APPLIED, self.policy_hash(world_id)

    def default_policy(self, world_id: str) -> dict | None:
        best: _Policy | None = None
        for version, p in (self.policies.get(world_id) or {}).items():
            if p.event.get("status") != PolicyStatus.ACTIVE:
                continue
            if best is None or (p.ts, version) > (best.ts, int(best.event["policy_version"])):
                best = p
        return best.event if best is not None else None

    def policy_hash(self, world_id: str) -> str:
        d = self.default_policy(world_id)
        if d is None:
            return policy_state_hash(world_id, 0, None, None)
        return policy_state_hash(world_id, int(d["policy_version"]), d.get("checksum"), d.get("status"))

    def policy_items(self, world_id: str) -> list[dict]:
        versions = self.policies.get(world_id) or {}
        return [dict(versions[v].event) for v in sorted(versions)]

    # -- queues ------------------------------------------------------------------------
    def apply_queues(
        self, key: QueueKey, queues: Iterable[str], *, etag: str | None = None, ts: Any = None
    ) -> tuple[str, str]:
        """Apply a queue set. ``ts`` absent (legacy callback, DAG Manager lookup): the
        Gateway's receive time stands in, so an older in-flight event cannot undo it."""
        when = self.stamp(ts)
        current = self.queues.get(key)
        new_set = tuple(sorted(set(queues)))
        if current is not None:
            if (etag is not None and etag == current.etag) or new_set == current.queues:
                if when > current.ts:  # same content, newer stamp: adopt it quietly
                    current.ts = when
                    current.etag = etag or current.etag
                return DUPLICATE, current.hash
            if when < current.ts:
                return STALE, current.hash
        entry = self.queues[key] = _Queues(key, new_set, etag, when)
        return APPLIED, entry.hash

    def queue_hash(self, key: QueueKey) -> str | None:
        entry = self.queues.get(key)
        return entry.hash if entry is not None else None

    def queue_item(self, key: QueueKey) -> dict | None:
        entry = self.queues.get(key)
        if entry is None:
            return None
        tags, interval, mode = key
        item = {"tags": list(tags), "interval": interval, "match_mode": mode, "queues": list(entry.queues), "state_hash": entry.hash}
        if entry.etag:
            item["etag"] = entry.etag
        return item

    def queue_items(self, keys: Iterable[QueueKey] | None) -> tuple[list[dict], str]:
        """Items for ``keys`` (every held key when None) and the hash of their hashes."""
        chosen = sorted(self.queues) if keys is None else sorted(set(keys))
        items = [item for item in (self.queue_item(k) for k in chosen) if item is not None]
        return items, _combined_hash(i["state_hash"] for i in items)

    # -- sentinels ---------------------------------------------------------------------
    def apply_sentinel(self, sentinel_id: str, weight: float, ts: Any = None) -> str:
        when = self.when(ts, default_now=False)
        current = self.sentinels.get(sentinel_id)
        if current is not None:
            cur_weight, cur_ts = current
            if when is not None and cur_ts is not None:
                if when == cur_ts and float(weight) == cur_weight:
                    return DUPLICATE
                if when < cur_ts:
                    return STALE
        self.sentinels[sentinel_id] = (float(weight), when)
        return APPLIED


def bus_key_of(key: QueueKey) -> str:
    """The ControlBus partition key of a queue key (match_mode is not part of it)."""
    return queue_key(key[0], key[1])
