"""The client's copy of the event-stream state, with the same hashes the Gateway sends.

Three state topics (SPEC §5, ``specs/asyncapi.yaml``):

* **activation** — per world, one entry per ``(strategy_id, side)``: the latest
  ActivationUpdated (``active``, ``weight``, ``etag``, ``ts`` …);
* **policy** — per world, one entry per ``policy_version``: the latest PolicyUpdated; the
  world's default policy is the ``ACTIVE`` one with the newest ``ts``;
* **queues** — per queue key ``(sorted unique tags, interval, match_mode)``: the queue set.

Hashes are computed exactly as the Gateway and WorldService compute them
(:mod:`qmtl.common.statehash`; a queue set hashes the canonical JSON of
``{interval, match_mode, queues (sorted), tags (sorted, unique)}``), so a client checks
convergence by comparing its own hash with a frame's ``statehash`` or a probe.

Every ``apply_*`` returns ``True`` when it changed the state. Duplicates (an etag already
held, the same queue set) and stale entries (an older ``ts`` than the one held) change
nothing — the same rules the Gateway applies, so replays after a reconnect are harmless.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeAlias

from qmtl.common.statehash import (
    activation_state_hash,
    canonical_json,
    policy_state_hash,
)

from .types import MATCH_MODE_VALUES

__all__ = [
    "QueueKey",
    "StreamState",
    "normalise_queue_key",
    "parse_ts",
    "queue_set_hash",
    "queue_snapshot_hash",
]

QueueKey: TypeAlias = tuple[tuple[str, ...], int, str]  # (tags, interval, match_mode)


def parse_ts(value: Any) -> float | None:
    """RFC 3339 → seconds since the epoch; None when absent or unparsable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def normalise_queue_key(tags: Iterable[str] | str, interval: Any, match_mode: Any = None) -> QueueKey:
    """``(sorted unique tags, interval, match_mode)``; ValueError when unusable."""
    if isinstance(tags, str):
        tags = tags.split(",")
    norm = tuple(sorted({t.strip() for t in tags if isinstance(t, str) and t.strip()}))
    if not norm:
        raise ValueError("a queue key needs at least one non-blank tag")
    iv = int(interval)
    if iv < 1:
        raise ValueError("interval must be >= 1")
    mode = match_mode or "any"
    if mode not in MATCH_MODE_VALUES:
        raise ValueError(f"match_mode must be one of {', '.join(map(repr, MATCH_MODE_VALUES))}, not {mode!r}")
    return (norm, iv, mode)


def queue_set_hash(key: QueueKey, queues: Iterable[str]) -> str:
    """The hash of one key's queue set (= ``GET /queues/state_hash`` for the key)."""
    tags, interval, mode = key
    doc = {"tags": list(tags), "interval": int(interval), "match_mode": mode, "queues": sorted(set(queues))}
    return hashlib.sha256(canonical_json(doc)).hexdigest()


def queue_snapshot_hash(item_hashes: Iterable[str]) -> str:
    """A queues snapshot's ``state_hash``: SHA-256 of the canonical JSON of the sorted item hashes."""
    return hashlib.sha256(canonical_json(sorted(item_hashes))).hexdigest()


def _act_view(e: Mapping[str, Any]) -> tuple[bool, float]:
    return (bool(e.get("active")), float(e.get("weight") or 0.0))


class StreamState:
    """Current state per key, as the stream (and HTTP reconciliation) told it."""

    def __init__(self) -> None:
        self.activation: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
        self.policies: dict[str, dict[int, dict[str, Any]]] = {}
        self.queues: dict[QueueKey, dict[str, Any]] = {}
        self.sentinels: dict[str, float] = {}

    # -- activation -----------------------------------------------------------------------
    def activation_entry(self, world_id: str, strategy_id: str, side: str) -> dict[str, Any] | None:
        return (self.activation.get(world_id) or {}).get((strategy_id, side))

    def activation_hash(self, world_id: str) -> str:
        return activation_state_hash((self.activation.get(world_id) or {}).values())

    def apply_activation(self, event: Mapping[str, Any]) -> bool:
        """An ActivationUpdated (or an ActivationEnvelope). True when it changed the entry."""
        world = self.activation.setdefault(str(event["world_id"]), {})
        key = (str(event["strategy_id"]), str(event["side"]))
        current = world.get(key)
        if current is not None:
            if event.get("etag") is not None and event.get("etag") == current.get("etag"):
                return False
            new_ts, cur_ts = parse_ts(event.get("ts")), parse_ts(current.get("ts"))
            if new_ts is not None and cur_ts is not None and new_ts < cur_ts:
                return False
        entry = {k: v for k, v in event.items() if k not in ("state_hash", "reason")}
        world[key] = entry
        return True

    def replace_activation(self, world_id: str, entries: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Make ``entries`` the world's whole set; returns the entries that changed
        (new, or with another active/weight), plus removed ones as inactive."""
        old = self.activation.get(world_id) or {}
        new: dict[tuple[str, str], dict[str, Any]] = {}
        for e in entries:
            new[(str(e["strategy_id"]), str(e["side"]))] = {k: v for k, v in e.items() if k not in ("state_hash", "reason")}
        self.activation[world_id] = new
        changed = [e for k, e in new.items() if k not in old or _act_view(old[k]) != _act_view(e)]
        for k, e in old.items():
            if k not in new and e.get("active"):
                changed.append({**e, "active": False, "weight": 0.0})
        return changed

    def merge_activation(self, world_id: str, entries: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Reconcile with the source of truth: ``entries`` is the world's whole set as
        WorldService has it; entries missing from it are removed, and for every entry the
        newer ``ts`` wins (an entry the stream brought after the HTTP read stays).
        Returns what changed (as :meth:`replace_activation`)."""
        held = self.activation.get(world_id) or {}
        merged: list[dict[str, Any]] = []
        for e in entries:
            key = (str(e["strategy_id"]), str(e["side"]))
            mine = held.get(key)
            if mine is not None:
                mt, et = parse_ts(mine.get("ts")), parse_ts(e.get("ts"))
                if mt is not None and et is not None and mt > et:
                    merged.append(mine)
                    continue
            merged.append(dict(e))
        return self.replace_activation(world_id, merged)

    # -- policy -------------------------------------------------------------------------------
    def default_policy(self, world_id: str) -> dict[str, Any] | None:
        best: dict[str, Any] | None = None
        for version, p in (self.policies.get(world_id) or {}).items():
            if p.get("status") != "ACTIVE":
                continue
            rank = (parse_ts(p.get("ts")) or 0.0, version)
            if best is None or rank > (parse_ts(best.get("ts")) or 0.0, int(best["policy_version"])):
                best = p
        return best

    def policy_hash(self, world_id: str) -> str:
        d = self.default_policy(world_id)
        if d is None:
            return policy_state_hash(world_id, 0, None, None)
        return policy_state_hash(world_id, int(d["policy_version"]), d.get("checksum"), d.get("status"))

    def apply_policy(self, event: Mapping[str, Any]) -> bool:
        versions = self.policies.setdefault(str(event["world_id"]), {})
        version = int(event["policy_version"])
        current = versions.get(version)
        if current is not None:
            if current.get("status") == event.get("status") and current.get("checksum") == event.get("checksum"):
                return False
            new_ts, cur_ts = parse_ts(event.get("ts")), parse_ts(current.get("ts"))
            if new_ts is not None and cur_ts is not None and new_ts < cur_ts:
                return False
        versions[version] = dict(event)
        return True

    def replace_policies(self, world_id: str, items: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        old = self.policies.get(world_id) or {}
        new = {int(i["policy_version"]): dict(i) for i in items}
        self.policies[world_id] = new
        return [p for v, p in new.items() if v not in old or
                (old[v].get("status"), old[v].get("checksum")) != (p.get("status"), p.get("checksum"))]

    # -- queues ------------------------------------------------------------------------------
    def queue_set(self, key: QueueKey) -> list[str] | None:
        entry = self.queues.get(key)
        return list(entry["queues"]) if entry is not None else None

    def queue_hash(self, key: QueueKey) -> str | None:
        entry = self.queues.get(key)
        return queue_set_hash(key, entry["queues"]) if entry is not None else None

    def queues_hash(self, keys: Iterable[QueueKey] | None = None) -> str:
        chosen = sorted(self.queues) if keys is None else sorted(set(keys))
        return queue_snapshot_hash(h for h in (self.queue_hash(k) for k in chosen) if h is not None)

    def apply_queues(self, key: QueueKey, queues: Iterable[str], etag: str | None = None) -> bool:
        new = tuple(sorted(set(queues)))
        current = self.queues.get(key)
        if current is not None and current["queues"] == new:
            if etag:
                current["etag"] = etag
            return False
        self.queues[key] = {"queues": new, "etag": etag}
        return True

    # -- sentinels ---------------------------------------------------------------------------
    def apply_sentinel(self, sentinel_id: str, weight: float) -> bool:
        weight = float(weight)
        if self.sentinels.get(sentinel_id) == weight:
            return False
        self.sentinels[sentinel_id] = weight
        return True
