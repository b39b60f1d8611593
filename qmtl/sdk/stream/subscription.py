"""Subscription: what the stream follows — topics, world, strategy and queue keys (normalised),
as the descriptor request asks for them and as the HTTP reconcile walks them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from qmtl.sdk.state import QueueKey, normalise_queue_key
from qmtl.sdk.types import TOPIC_VALUES

__all__ = ["WORLD_TOPICS", "Subscription"]

#: the topics scoped to one world (they need a ``world_id``)
WORLD_TOPICS = ("activation", "policy")


class Subscription:
    def __init__(self, topics: Iterable[str], *, world_id: str | None, strategy_id: str | None,
                 queue_keys: Iterable[Any]) -> None:
        self.topics = normalise_topics(topics)
        if any(t in WORLD_TOPICS for t in self.topics) and not world_id:
            raise ValueError("the activation and policy topics need a world_id")
        self.world_id = world_id
        self.strategy_id = strategy_id
        self.queue_keys: list[QueueKey] = []
        self.add_keys(queue_keys)

    def add_keys(self, keys: Iterable[Any]) -> bool:
        """Follow more queue keys (the ``queues`` topic with them); True when one is new."""
        before = len(self.queue_keys)
        for key in keys:
            k = _queue_key(key)
            if k not in self.queue_keys:
                self.queue_keys.append(k)
        if self.queue_keys and "queues" not in self.topics:
            self.topics.append("queues")
        return len(self.queue_keys) > before

    def world_of(self, topic: str) -> str | None:
        """The world a topic is scoped to (None for ``queues``)."""
        return self.world_id if topic in WORLD_TOPICS else None

    def queue_key_bodies(self) -> list[dict[str, Any]] | None:
        """The queue keys as the subscribe request takes them (None without any)."""
        return [{"tags": list(k[0]), "interval": k[1], "match_mode": k[2]} for k in self.queue_keys] or None


def _queue_key(key: Any) -> QueueKey:
    """``{"tags", "interval", "match_mode"}``, a normalised key, or ``(tags, interval[, mode])``."""
    if isinstance(key, Mapping):
        return normalise_queue_key(key["tags"], key["interval"], key.get("match_mode"))
    if isinstance(key, tuple) and len(key) == 3 and isinstance(key[0], tuple):
        return normalise_queue_key(key[0], key[1], key[2])
    tags, interval, *rest = key
    return normalise_queue_key(tags, interval, rest[0] if rest else None)


def normalise_topics(topics: Iterable[str]) -> list[str]:
    out: list[str] = []
    for t in topics:
        t = "queues" if t == "queue" else t
        if t not in TOPIC_VALUES:
            raise ValueError(f"unknown topic {t!r}: use activation, policy or queues")
        if t not in out:
            out.append(t)
    if not out:
        raise ValueError("at least one topic is needed")
    return out
