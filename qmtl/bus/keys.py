"""Partition keys for the control topics (SPEC §5).

Per-key order is the only order the ControlBus keeps, so every publisher must derive
the key the same way: ``control.activation`` and ``control.policy`` are keyed by
``world_id``; ``control.queues`` by a stable hash of (sorted tags, interval).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from .base import TOPIC_ACTIVATION, TOPIC_POLICY, TOPIC_QUEUES

__all__ = ["queue_key", "partition_key"]


def queue_key(tags: Iterable[str], interval: int) -> str:
    """A stable key for a (tags, interval) queue subscription.

    Order and duplicates of ``tags`` do not matter: ``queue_key(["b", "a", "a"], 60)
    == queue_key(["a", "b"], 60)``. The key is the first 32 hex digits of the
    SHA-256 of ``"<sorted unique tags joined by ','>|<interval>"``.
    """
    if isinstance(tags, str):
        # A bare string would be split into characters; that is never what is meant.
        raise TypeError("tags must be an iterable of strings, not a string")
    material = ",".join(sorted(set(tags))) + "|" + str(int(interval))
    return hashlib.sha256(material.encode("utf-8")).hexdigest()[:32]


def partition_key(topic: str, event: Mapping) -> str:
    """The partition key of ``event`` on ``topic``.

    Raises ``KeyError`` when the event lacks the field the key is derived from and
    ``ValueError`` for a topic that has no key rule.
    """
    if topic in (TOPIC_ACTIVATION, TOPIC_POLICY):
        return str(event["world_id"])
    if topic == TOPIC_QUEUES:
        return queue_key(event["tags"], event["interval"])
    raise ValueError(f"no partition key rule for topic {topic!r}")
