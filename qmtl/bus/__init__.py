"""ControlBus: internal fan-out of control events (SPEC §5).

``make_bus(config, validator=...)`` builds the bus a deployment asks for:

* ``{"kind": "inproc", "partitions": 4, "retention": 100000}`` (embedded; the default)
* ``{"kind": "kafka", "bootstrap_servers": "host:9092", ...}`` (production); the other
  keys are :class:`~qmtl.bus.kafka.KafkaBus` keyword arguments.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from .base import (
    ALL_SERVICES,
    CONTROL_TOPICS,
    TOPIC_ACTIVATION,
    TOPIC_POLICY,
    TOPIC_QUEUES,
    BusMessage,
    ControlBus,
    EventValidator,
    InvalidEvent,
    Subscription,
    isolation_problem,
)
from .errors import BusClosed, BusError, BusUnavailable
from .inproc import InProcessBus
from .keys import partition_key, queue_key

__all__ = [
    "ALL_SERVICES",
    "isolation_problem",
    "CONTROL_TOPICS",
    "TOPIC_ACTIVATION",
    "TOPIC_POLICY",
    "TOPIC_QUEUES",
    "BusMessage",
    "ControlBus",
    "EventValidator",
    "InvalidEvent",
    "Subscription",
    "BusError",
    "BusUnavailable",
    "BusClosed",
    "InProcessBus",
    "KafkaBus",
    "make_bus",
    "partition_key",
    "queue_key",
]


def __getattr__(name: str) -> Any:
    # KafkaBus imports aiokafka; keep that off the embedded path until asked for.
    if name == "KafkaBus":
        from .kafka import KafkaBus

        return KafkaBus
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_bus(config: Mapping[str, Any] | None, *, validator: EventValidator | None) -> ControlBus:
    """Build a ControlBus from its config section (not started: call ``start()``).

    Unknown keys are an error, so a typo in the config file fails at startup.
    """
    options = dict(config or {})
    kind = str(options.pop("kind", "inproc")).lower()
    if kind in ("inproc", "in-process", "memory"):
        factory: Any = InProcessBus
    elif kind == "kafka":
        from .kafka import KafkaBus as factory

        if not options.get("bootstrap_servers"):
            raise ValueError("ControlBus kind 'kafka' needs 'bootstrap_servers'")
        if isinstance(options.get("reconnect_backoff"), list):
            options["reconnect_backoff"] = tuple(options["reconnect_backoff"])
    else:
        raise ValueError(f"unknown ControlBus kind {kind!r} (expected 'inproc' or 'kafka')")
    accepted = {
        name
        for name, p in inspect.signature(factory).parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name != "validator"
    }
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"unknown ControlBus option(s) for kind {kind!r}: {', '.join(unknown)}")
    return factory(validator=validator, **options)
