"""Topic admin: create (and delete) the Kafka topics that carry node queues.

The interface is small on purpose: ``create(topic, partitions, config)`` is idempotent
(an existing topic is success), ``create_many`` batches it, ``delete(topic)`` returns
whether the topic is gone. Two implementations:

* :class:`EmbeddedTopicAdmin` — the embedded deployment has no Kafka; it records the
  names (tests and ``GET /health`` read them).
* :class:`KafkaTopicAdmin` — aiokafka's ``AIOKafkaAdminClient``. When the cluster does
  not support CreateTopics (librdkafka's mock cluster, some managed offerings), it logs
  that once and falls back to broker auto-creation: it asks for the topic's metadata
  with ``allow_auto_topic_creation``, which makes a broker with
  ``auto.create.topics.enable`` create it (a producer's first send would do the same).

:class:`QueueTopics` is what the diff and GC use: the admin with the queues' partition
count and retention, where a failed creation is counted and left to auto-creation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from .metrics import DagManagerMetrics

log = logging.getLogger(__name__)

# Kafka error codes this module tells apart.
_TOPIC_ALREADY_EXISTS = 36
_UNSUPPORTED_VERSION = 35
_INVALID_REQUEST = 42
_UNKNOWN_TOPIC = 3


class TopicAdminError(RuntimeError):
    """A topic could not be created or deleted (the message says which and why)."""


@runtime_checkable
class TopicAdmin(Protocol):
    @property
    def mode(self) -> str: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def create(self, topic: str, partitions: int, config: Mapping[str, str]) -> None: ...

    async def create_many(self, topics: Sequence[str], partitions: int, config: Mapping[str, str]) -> None: ...

    async def delete(self, topic: str) -> bool: ...


class EmbeddedTopicAdmin:
    """Records topic names; there is no broker in the embedded deployment."""

    mode = "embedded"

    def __init__(self) -> None:
        self.topics: dict[str, tuple[int, dict[str, str]]] = {}
        self.create_calls = 0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def create(self, topic: str, partitions: int, config: Mapping[str, str]) -> None:
        await self.create_many([topic], partitions, config)

    async def create_many(self, topics: Sequence[str], partitions: int, config: Mapping[str, str]) -> None:
        self.create_calls += 1
        spec = (int(partitions), dict(config))
        for topic in topics:
            self.topics.setdefault(topic, spec)

    async def delete(self, topic: str) -> bool:
        self.topics.pop(topic, None)
        return True


class KafkaTopicAdmin:
    """Topic creation through the Kafka admin API, with the auto-creation fallback."""

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        replication_factor: int = 1,
        request_timeout_ms: int = 10_000,
        client_id: str = "qmtl-dagmanager",
        admin: Any = None,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.replication_factor = replication_factor
        self.request_timeout_ms = request_timeout_ms
        self.client_id = client_id
        self._admin = admin
        self._owns_admin = admin is None
        self._auto_create = False
        self._probed = False
        self._started = False
        self._lock = asyncio.Lock()

    @property
    def mode(self) -> str:
        return "kafka-auto-create" if self._auto_create else "kafka-admin"

    async def start(self) -> None:
        """Connect; a broker that is down now does not stop the DAG Manager from starting
        (topics are then created on first use, or auto-created by the broker)."""
        try:
            await self._connect()
        except Exception as exc:
            log.warning("Kafka topic admin cannot reach %s yet (%s); will retry on first topic creation",
                        self.bootstrap_servers, exc)

    async def _connect(self) -> Any:
        if self._started and self._admin is not None:
            return self._admin
        if self._admin is None or self._owns_admin:
            from aiokafka.admin import AIOKafkaAdminClient

            if self._admin is not None:  # a client whose start failed is not reused
                with contextlib.suppress(Exception):
                    await self._admin.close()
            self._admin = AIOKafkaAdminClient(
                bootstrap_servers=self.bootstrap_servers,
                client_id=self.client_id,
                request_timeout_ms=self.request_timeout_ms,
            )
        await self._admin.start()
        self._started = True
        return self._admin

    async def close(self) -> None:
        if self._admin is not None and self._owns_admin:
            with contextlib.suppress(Exception):
                await self._admin.close()
            self._admin = None
        self._started = False

    async def create(self, topic: str, partitions: int, config: Mapping[str, str]) -> None:
        await self.create_many([topic], partitions, config)

    async def create_many(self, topics: Sequence[str], partitions: int, config: Mapping[str, str]) -> None:
        topics = list(dict.fromkeys(topics))
        if not topics:
            return
        try:
            await self._connect()
        except Exception as exc:
            raise TopicAdminError(f"Kafka at {self.bootstrap_servers} is unreachable: {exc}") from exc
        if not self._auto_create and not self._probed:
            await self._probe()
        if not self._auto_create:
            from aiokafka.admin import NewTopic
            from aiokafka.errors import (
                IncompatibleBrokerVersion,
                UnsupportedVersionError,
            )

            new = [
                NewTopic(name=t, num_partitions=int(partitions), replication_factor=self.replication_factor,
                         topic_configs={k: str(v) for k, v in config.items()})
                for t in topics
            ]
            try:
                response = await self._admin.create_topics(new, timeout_ms=self.request_timeout_ms)
            except (IncompatibleBrokerVersion, UnsupportedVersionError) as exc:
                self._fall_back(f"{type(exc).__name__}: {exc}")
            else:
                failed = []
                unsupported = False
                for entry in getattr(response, "topic_errors", None) or getattr(response, "topic_error_codes", []):
                    topic, code = entry[0], entry[1]
                    message = entry[2] if len(entry) > 2 else None
                    if code in (0, _TOPIC_ALREADY_EXISTS):
                        continue
                    if code in (_UNSUPPORTED_VERSION, _INVALID_REQUEST):
                        unsupported = True
                        continue
                    failed.append(f"{topic}: error {code}{f' ({message})' if message else ''}")
                if failed:
                    raise TopicAdminError("CreateTopics failed for " + "; ".join(failed[:10]))
                if not unsupported:
                    return
                self._fall_back("CreateTopics answered UNSUPPORTED_VERSION/INVALID_REQUEST")
        await self._auto_create_topics(topics)

    async def _probe(self) -> None:
        """CreateTopics goes to the controller: a cluster whose metadata names no broker
        as controller (librdkafka's mock cluster) cannot take it."""
        async with self._lock:
            if self._probed:
                return
            info = await self._admin.describe_cluster()
            brokers = {b["node_id"] for b in info.get("brokers", [])}
            if info.get("controller_id") not in brokers:
                self._fall_back(f"the cluster names no reachable controller (controller_id={info.get('controller_id')})")
            self._probed = True

    def _fall_back(self, why: str) -> None:
        if not self._auto_create:
            log.warning(
                "Kafka at %s does not support CreateTopics (%s); data topics will be auto-created by the broker "
                "(metadata request / first produce) with its default partitions and config",
                self.bootstrap_servers, why,
            )
        self._auto_create = True

    async def _auto_create_topics(self, topics: Sequence[str]) -> None:
        """Ask for the topics' metadata with auto-creation allowed; a broker that
        auto-creates topics creates them now (one round trip per 500 topics)."""
        for i in range(0, len(topics), 500):
            batch = list(topics[i : i + 500])
            described = await self._admin.describe_topics(batch)
            errors = [(t.get("topic"), t.get("error_code")) for t in described if t.get("error_code") not in (0, None)]
            # A broker that creates the topic in the background may still answer
            # LEADER_NOT_AVAILABLE (5) for it on this first request: that is success.
            hard = [e for e in errors if e[1] not in (5, _UNKNOWN_TOPIC)]
            if hard:
                raise TopicAdminError(f"auto-creation failed: {hard[:10]}")
            if any(e[1] == _UNKNOWN_TOPIC for e in errors):
                log.warning("broker did not auto-create %d topic(s); they will be created on first produce if enabled",
                            sum(1 for e in errors if e[1] == _UNKNOWN_TOPIC))

    async def delete(self, topic: str) -> bool:
        from aiokafka.errors import IncompatibleBrokerVersion, UnsupportedVersionError

        try:
            await self._connect()
        except Exception as exc:
            raise TopicAdminError(f"Kafka at {self.bootstrap_servers} is unreachable: {exc}") from exc
        if not self._probed:
            await self._probe()
        if self._auto_create:  # no admin API: the topic ages out under its retention
            log.info("Kafka admin API unavailable; topic %s is left to the broker's retention", topic)
            return False
        try:
            response = await self._admin.delete_topics([topic], timeout_ms=self.request_timeout_ms)
        except (IncompatibleBrokerVersion, UnsupportedVersionError) as exc:
            log.info("Kafka does not support DeleteTopics (%s); topic %s is left to the broker's retention", exc, topic)
            return False
        for entry in getattr(response, "topic_error_codes", None) or getattr(response, "topic_errors", []):
            if entry[1] not in (0, _UNKNOWN_TOPIC):
                log.warning("DeleteTopics %s failed with error %s", topic, entry[1])
                return False
        return True


TOPIC_CREATE_TIMEOUT = 10.0


class QueueTopics:
    """The topics of queues: ``partitions`` each, kept ``ttl_seconds`` (retention)."""

    def __init__(self, admin: TopicAdmin, *, partitions: int, ttl_seconds: int, metrics: DagManagerMetrics) -> None:
        self.admin = admin
        self.partitions = int(partitions)
        self.config = {"retention.ms": str(int(ttl_seconds) * 1000)}
        self.metrics = metrics

    async def create(self, topics: list[str]) -> None:
        try:
            await asyncio.wait_for(self.admin.create_many(topics, self.partitions, self.config), TOPIC_CREATE_TIMEOUT)
        except Exception as exc:  # the queue exists; the broker auto-creates the topic on first produce
            self.metrics.topic_create_failures.inc(len(topics))
            log.warning("creating %d topic(s) failed (%s); relying on broker auto-creation", len(topics), exc)


def make_topic_admin(config: Any) -> TopicAdmin:
    """The topic admin a configuration asks for (``dagmanager.kafka_admin`` + ``controlbus``)."""
    if config.dagmanager.kafka_admin:
        if not config.controlbus.bootstrap_servers:
            raise ValueError("dagmanager.kafka_admin needs controlbus.bootstrap_servers")
        return KafkaTopicAdmin(config.controlbus.bootstrap_servers)
    return EmbeddedTopicAdmin()


__all__ = ["QueueTopics", "TopicAdmin", "TopicAdminError", "EmbeddedTopicAdmin", "KafkaTopicAdmin", "make_topic_admin"]
