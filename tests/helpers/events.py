"""Builders of the ControlBus event envelopes the tests publish and apply
(specs/schemas/event_activation_updated / event_policy_updated / event_queue_updated).

Each builder returns a fresh, schema-valid dict. Every field can be given by keyword and
has a default, except a QueueUpdated's tags, interval and queues; an optional field
(``run_id``, ``state_hash``, ``match_mode``) is left out while it is None. Any other
keyword is added to the event as is, for tests that need a field the schema refuses.
"""

from __future__ import annotations

from typing import Any

TS = "2025-01-01T00:00:00Z"


def activation_updated(world_id: str = "w", strategy_id: str = "s", *, side: str = "long", active: bool = True,
                       weight: float = 0.5, etag: str = "e1", run_id: str | None = None, ts: str = TS,
                       state_hash: str | None = None, **fields: Any) -> dict:
    event = {"type": "ActivationUpdated", "version": 1, "world_id": world_id, "strategy_id": strategy_id, "side": side,
             "active": active, "weight": weight, "etag": etag}
    if run_id is not None:
        event["run_id"] = run_id
    event["ts"] = ts
    if state_hash is not None:
        event["state_hash"] = state_hash
    event.update(fields)
    return event


def policy_updated(world_id: str = "w", policy_version: int = 1, *, checksum: str | None = None, status: str = "ACTIVE",
                   ts: str = TS, **fields: Any) -> dict:
    """``checksum`` defaults to ``sha256:<policy_version>``."""
    event = {"type": "PolicyUpdated", "version": 1, "world_id": world_id, "policy_version": policy_version,
             "checksum": f"sha256:{policy_version}" if checksum is None else checksum, "status": status, "ts": ts}
    event.update(fields)
    return event


def queue_updated(tags: list[str], interval: int, queues: list[str], *, match_mode: str | None = None, etag: str = "q1",
                  ts: str = TS, **fields: Any) -> dict:
    event: dict[str, Any] = {"type": "QueueUpdated", "version": 1, "tags": tags, "interval": interval, "queues": queues,
                             "etag": etag, "ts": ts}
    if match_mode is not None:
        event["match_mode"] = match_mode
    event.update(fields)
    return event


# -- numbered events: the n-th event of a key, told apart by its etag -------------------
def numbered_activation(world: str, seq: int, **fields: Any) -> dict:
    """Activation ``seq`` of ``world``: etag ``<world>:<seq>``."""
    return activation_updated(world, f"strat-{seq}", etag=f"{world}:{seq}", **fields)


def numbered_queue_update(tags: list[str], interval: int, seq: int, **fields: Any) -> dict:
    """Queue update ``seq`` of (tags, interval): etag ``<seq>``, one queue ``q-<seq>``."""
    return queue_updated(tags, interval, [f"q-{seq}"], etag=str(seq), **fields)
