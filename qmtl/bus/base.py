"""The ControlBus interface: publish control events with a key, subscribe to topics.

Two implementations: :mod:`qmtl.bus.inproc` (embedded, one process) and
:mod:`qmtl.bus.kafka` (production, aiokafka). Both keep the same contract:

* ``publish`` validates the event against its schema (via the injected
  ``EventValidator``) and raises :class:`InvalidEvent` when it does not conform;
  nothing invalid is ever put on the bus.
* A subscription yields :class:`BusMessage` in order per key (per partition).
  Events that fail validation on consume are counted and skipped (and their
  offset committed), never yielded and never fatal.
* Delivery is at-least-once: a consumer commits after it applied an event; a new
  subscription with the same ``consumer_id`` resumes after the last commit.
* Every consumer identity receives every event (fan-out, not work-sharing).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field

# The three control topics (SPEC §5): the ControlBus channels of specs/asyncapi.yaml.
from qmtl.contracts.constants import CONTROL_TOPICS, TOPIC_ACTIVATION, TOPIC_POLICY, TOPIC_QUEUES  # noqa: F401

# Validates one event for one topic; raises InvalidEvent (or any ValueError) when invalid.
EventValidator = Callable[[str, Mapping], None]


class InvalidEvent(ValueError):
    """An event that does not conform to its topic's schema."""


@dataclass(frozen=True)
class BusMessage:
    topic: str
    key: str
    value: dict
    headers: Mapping[str, str] = field(default_factory=dict)
    partition: int = 0
    offset: int = 0
    timestamp_ms: int = 0


class Subscription(abc.ABC):
    """An open subscription; iterate it, commit what you applied, close it."""

    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[BusMessage]: ...

    @abc.abstractmethod
    async def commit(self, message: BusMessage) -> None:
        """Mark ``message`` (and everything before it on its partition) as applied."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    def lag(self) -> dict[tuple[str, int], int]:
        """Messages not yet delivered per (topic, partition), where known (metrics)."""
        return {}

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class ControlBus(abc.ABC):
    # Whether the bus reaches only this process (the in-process bus), and which services
    # share this bus object — set by the process that builds it (``qmtl.cli``); None when
    # unknown (tests and embedding compose services as they like). See isolation_problem().
    in_process = False
    local_services: frozenset[str] | None = None

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> ControlBus:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def publish(
        self,
        topic: str,
        value: Mapping,
        *,
        key: str,
        headers: Mapping[str, str] | None = None,
    ) -> None: ...

    @abc.abstractmethod
    async def subscribe(
        self,
        topics: Sequence[str],
        *,
        consumer_id: str,
        from_beginning: bool = True,
    ) -> Subscription:
        """Subscribe ``consumer_id`` to ``topics``.

        Resumes after the last offset committed by ``consumer_id``; with no commit,
        starts at the beginning (``from_beginning``) or at the end. Implementations
        commit that starting position at once, so ``from_beginning`` only matters the
        first time an identity subscribes to a partition.
        """

    # -- offsets (for lag metrics and state rebuilds; optional) ----------------------
    async def end_offsets(self, topics: Sequence[str]) -> dict[tuple[str, int], int] | None:
        """The next offset to be written per (topic, partition) of ``topics``; None when
        this bus cannot tell. May raise :class:`~qmtl.bus.errors.BusUnavailable`."""
        return None

    async def committed_offsets(self, consumer_id: str, topics: Sequence[str]) -> dict[tuple[str, int], int] | None:
        """The next offset ``consumer_id`` will read per (topic, partition) of ``topics``,
        for the partitions it has committed on; None when this bus cannot tell. May raise
        :class:`~qmtl.bus.errors.BusUnavailable`."""
        return None

    @property
    def invalid_events(self) -> int:
        """How many invalid events were refused on publish or skipped on consume."""
        return getattr(self, "_invalid_events", 0)


ALL_SERVICES = frozenset({"gateway", "worldservice", "dagmanager"})

_ISOLATED = {
    "gateway": "no ActivationUpdated, PolicyUpdated or QueueUpdated from WorldService or the DAG Manager in other "
               "processes reaches this Gateway: /ws/evt and /ws relay nothing and the worlds caches do not follow "
               "changes made elsewhere",
    "worldservice": "the ActivationUpdated and PolicyUpdated this WorldService publishes reach no Gateway in another "
                    "process: clients' event streams and the Gateways' caches never hear of its changes",
    "dagmanager": "the QueueUpdated this DAG Manager publishes reach no Gateway in another process (only the legacy "
                  "HTTP callback, when dagmanager.gateway_callback_url is set)",
}


def isolation_problem(bus: ControlBus, service: str) -> str | None:
    """Why ``service`` on ``bus`` cannot exchange events with the other services, or None.

    The in-process bus works only when all three services share the process (``qmtl up``);
    one service started alone on it (``qmtl gw`` with ``controlbus.kind: inproc``) would
    otherwise look healthy while no event ever crosses."""
    local = bus.local_services
    if not bus.in_process or local is None or local >= ALL_SERVICES:
        return None
    return (f"controlbus.kind is 'inproc' but this process runs only {', '.join(sorted(local))}: {_ISOLATED[service]}. "
            "Set controlbus.kind: kafka (and bootstrap_servers) on every service, or run all three in one process "
            "with `qmtl up`.")
