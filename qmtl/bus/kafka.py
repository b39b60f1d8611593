"""The Kafka ControlBus (production), over aiokafka.

Design points (SPEC §5, DESIGN.md):

* **Fan-out without group rebalancing.** Every ``consumer_id`` is its own identity
  and must see every partition, so a subscription ``assign()``s all partitions of
  its topics itself. ``group_id=consumer_id`` is used only to store committed
  offsets; no group is joined, so nothing depends on rebalances (which also fail
  on librdkafka's mock cluster).
* **Topic creation** goes through the admin API (compacted, bounded retention) and
  falls back to the broker's auto-creation when the admin API is unsupported or
  fails (the mock cluster does not implement CreateTopics).
* **Producer**: idempotent, ``acks=all``, compact JSON values, the key as UTF-8,
  headers as Kafka headers. ``publish`` retries with backoff within a bounded time,
  then raises :class:`BusUnavailable`.
* **Consumer**: one background task per subscription owns an ``AIOKafkaConsumer``;
  when it fails it is rebuilt with backoff and resumes where it left off (or at
  the committed offsets). Decoding and validation happen as the application
  iterates, so an invalid or undecodable message is counted, skipped, and its
  offset still gets committed (see :class:`~qmtl.bus._common.PartitionProgress`).

``topic_prefix`` maps the logical topic names used in the API (``control.policy``)
onto physical Kafka topics (``<prefix>control.policy``), for shared clusters and
tests; validators and :class:`BusMessage` always see the logical name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    OutOfOrderSequenceNumber,
    ProducerClosed,
    ProducerFenced,
    UnknownProducerId,
)

from qmtl.common.resilience import Backoff

from ._common import (
    PartitionProgress,
    check_event,
    encode_event,
    normalise_headers,
)
from .base import CONTROL_TOPICS, BusMessage, ControlBus, EventValidator, InvalidEvent, Subscription
from .errors import BusClosed, BusError, BusUnavailable

__all__ = ["KafkaBus", "KafkaSubscription", "BusUnavailable"]

log = logging.getLogger("qmtl.bus.kafka")

# Errors after which the idempotent producer's state is not trustworthy: rebuild it.
_PRODUCER_STATE_ERRORS = (
    OutOfOrderSequenceNumber,
    UnknownProducerId,
    InvalidProducerEpoch,
    ProducerFenced,
    ProducerClosed,
)
_TOPIC_EXISTS = 36  # Kafka error code TOPIC_ALREADY_EXISTS


class KafkaBus(ControlBus):
    """ControlBus over Kafka (or any Kafka-protocol broker: Redpanda, librdkafka mock)."""

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        validator: EventValidator | None = None,
        client_id: str = "qmtl",
        create_topics: bool = True,
        num_partitions: int = 4,
        replication_factor: int = 1,
        retention_ms: int = 7 * 24 * 3600 * 1000,
        request_timeout_ms: int = 10_000,
        reconnect_backoff: tuple[float, float] = (0.1, 5.0),
        publish_timeout_ms: int = 10_000,
        topic_prefix: str = "",
        cleanup_policy: str = "compact",
        max_buffered_batches: int = 16,
        fetch_max_wait_ms: int = 500,
    ) -> None:
        if not bootstrap_servers:
            raise ValueError("bootstrap_servers is required")
        Backoff(*reconnect_backoff)  # validates the pair
        self.bootstrap_servers = bootstrap_servers
        self._validator = validator
        self._client_id = client_id
        self._create_topics = create_topics
        self._num_partitions = num_partitions
        self._replication_factor = replication_factor
        self._retention_ms = retention_ms
        self._request_timeout_ms = request_timeout_ms
        self._backoff = (float(reconnect_backoff[0]), float(reconnect_backoff[1]))
        self._publish_timeout = publish_timeout_ms / 1000
        self._prefix = topic_prefix
        self._cleanup_policy = cleanup_policy
        self._max_buffered_batches = max_buffered_batches
        # How long a fetch waits at the broker for data (aiokafka's default). A broker answers
        # a waiting fetch as soon as data arrives; librdkafka's mock cluster holds it for the
        # whole wait, so tests and benchmarks against the mock set a few milliseconds.
        self._fetch_max_wait_ms = int(fetch_max_wait_ms)

        self._invalid_events = 0
        self._started = False
        self._closed = False
        self._producer: AIOKafkaProducer | None = None
        self._producer_lock: asyncio.Lock | None = None
        self._topics_lock: asyncio.Lock | None = None
        self._ensured_topics: set[str] = set()
        self._admin_usable = True
        self._subs: set[KafkaSubscription] = set()
        self._meta: AIOKafkaConsumer | None = None  # group-less consumer for end offsets
        self._meta_lock: asyncio.Lock | None = None

    # -- names ------------------------------------------------------------------
    def physical_topic(self, topic: str) -> str:
        return self._prefix + topic

    def logical_topic(self, physical: str) -> str:
        if self._prefix and physical.startswith(self._prefix):
            return physical[len(self._prefix) :]
        return physical

    @property
    def _request_timeout(self) -> float:
        return self._request_timeout_ms / 1000

    def _unavailable(self, what: str, err: BaseException | None) -> BusUnavailable:
        cause = f" (last error: {type(err).__name__}: {err})" if err is not None else ""
        return BusUnavailable(f"Kafka ControlBus at {self.bootstrap_servers} unavailable: {what}{cause}")

    def _check_open(self) -> None:
        if self._closed:
            raise BusClosed("the Kafka ControlBus is closed")

    # -- lifecycle ------------------------------------------------------------
    async def start(self) -> None:
        """Connect the producer and create the control topics.

        A broker that is away is not fatal: the failure is logged and everything
        is retried when the bus is used (``publish`` raises :class:`BusUnavailable`
        after its time bound; subscriptions keep reconnecting).
        """
        self._check_open()
        if self._started:
            return
        self._started = True
        self._producer_lock = self._producer_lock or asyncio.Lock()
        self._topics_lock = self._topics_lock or asyncio.Lock()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(self._request_timeout, self._publish_timeout)
        try:
            await self._get_producer(deadline)
            if self._create_topics:
                await self._ensure_topics([self.physical_topic(t) for t in CONTROL_TOPICS], deadline)
        except (TimeoutError, BusUnavailable, KafkaError, OSError) as exc:
            log.warning(
                "Kafka ControlBus at %s not reachable at start (%s: %s); will retry on use",
                self.bootstrap_servers, type(exc).__name__, exc,
            )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subs):
            await sub.close()
        meta, self._meta = self._meta, None
        if meta is not None:
            await self._stop_client(meta, "offsets consumer stop")
        producer, self._producer = self._producer, None
        if producer is not None:
            await self._stop_producer(producer)

    # -- producer ---------------------------------------------------------------
    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers,
            client_id=self._client_id,
            enable_idempotence=True,
            acks="all",
            request_timeout_ms=self._request_timeout_ms,
            retry_backoff_ms=max(1, int(self._backoff[0] * 1000)),
        )

    async def _get_producer(self, deadline: float) -> AIOKafkaProducer:
        producer = self._producer
        if producer is not None:
            return producer
        if self._producer_lock is None:
            self._producer_lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        async with self._producer_lock:
            if self._producer is not None:
                return self._producer
            self._check_open()
            producer = self._new_producer()
            try:
                await asyncio.wait_for(producer.start(), max(0.001, deadline - loop.time()))
                self._check_open()  # closed meanwhile: do not leak a running producer
            except BaseException:
                await self._stop_producer(producer)
                raise
            self._producer = producer
            return producer

    async def _reset_producer(self, bad: AIOKafkaProducer) -> None:
        if self._producer is bad:
            self._producer = None
            log.warning("rebuilding the Kafka producer after a producer-state error")
            await self._stop_producer(bad)

    async def _stop_producer(self, producer: AIOKafkaProducer) -> None:
        """Stop ``producer`` within a bounded time, even with the broker away.

        ``AIOKafkaProducer.stop`` flushes first, and an idempotent producer retries a
        batch for as long as its partition has a leader, so with the broker down it
        would wait forever. After the time bound, the sender task is cancelled (so it
        cannot re-queue in-flight batches) and the queued batches are failed with
        :class:`BusClosed` (so the flush inside ``stop`` returns and any ``publish``
        waiting on them gets an answer). aiokafka has no public API for either; the
        attributes are looked up defensively and stopping falls back to cancelling.
        """
        stopper = asyncio.ensure_future(producer.stop())
        done, _ = await asyncio.wait({stopper}, timeout=self._request_timeout)
        if not done:
            log.warning("Kafka producer did not flush within %.1fs; dropping undelivered events",
                        self._request_timeout)
            sender_task = getattr(getattr(producer, "_sender", None), "sender_task", None)
            if sender_task is not None and not sender_task.done():
                sender_task.cancel()
                await asyncio.wait({sender_task}, timeout=self._request_timeout)
            accumulator = getattr(producer, "_message_accumulator", None)
            if accumulator is not None:
                _fail_batches(accumulator, BusClosed("the bus was closed before the event was delivered"))
            await asyncio.wait({stopper}, timeout=self._request_timeout)
            for _ in range(5):  # let aiokafka's flush task see the failed batches
                await asyncio.sleep(0)
        await _reap(stopper, "producer stop")
        await _close_client(getattr(producer, "client", None), self._request_timeout)

    # -- topics ---------------------------------------------------------------
    async def ensure_topics(self, topics: Iterable[str]) -> None:
        """Make sure the (logical) ``topics`` exist; see the module docstring."""
        self._check_open()
        deadline = asyncio.get_running_loop().time() + self._publish_timeout
        await self._ensure_topics([self.physical_topic(t) for t in topics], deadline)

    async def _ensure_topics(self, physical: list[str], deadline: float) -> None:
        missing = [t for t in physical if t not in self._ensured_topics]
        if not missing:
            return
        if self._topics_lock is None:
            self._topics_lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        async with self._topics_lock:
            missing = [t for t in missing if t not in self._ensured_topics]
            if not missing:
                return
            if self._create_topics and self._admin_usable:
                await self._admin_create(missing, deadline)
            producer = await self._get_producer(deadline)
            for topic in missing:
                # A metadata request for the topic also triggers the broker's
                # auto-creation when the admin path was not available.
                await asyncio.wait_for(producer.partitions_for(topic), max(0.001, deadline - loop.time()))
                self._ensured_topics.add(topic)

    async def _admin_create(self, topics: list[str], deadline: float) -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        loop = asyncio.get_running_loop()
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap_servers,
            client_id=self._client_id,
            request_timeout_ms=self._request_timeout_ms,
        )
        configs = {"cleanup.policy": self._cleanup_policy, "retention.ms": str(self._retention_ms)}
        new = [NewTopic(t, self._num_partitions, self._replication_factor, topic_configs=configs) for t in topics]
        try:
            await asyncio.wait_for(admin.start(), max(0.001, deadline - loop.time()))
            response = await asyncio.wait_for(
                admin.create_topics(new, timeout_ms=self._request_timeout_ms),
                max(0.001, deadline - loop.time()),
            )
            failed = [
                (err[0], err[1], err[2] if len(err) > 2 else "")
                for err in getattr(response, "topic_errors", [])
                if err[1] not in (0, _TOPIC_EXISTS)
            ]
            if failed:
                log.warning(
                    "CreateTopics refused %s; falling back to broker auto-creation "
                    "(those topics get the broker's defaults, not cleanup.policy=%s)",
                    failed, self._cleanup_policy,
                )
        except (TimeoutError, KafkaError, OSError) as exc:
            # Broker away or refusing: try again next time, carry on with auto-creation.
            log.warning("CreateTopics failed (%s: %s); falling back to broker auto-creation",
                        type(exc).__name__, exc)
        except Exception as exc:  # the admin API is not supported (e.g. librdkafka mock)
            self._admin_usable = False
            log.warning(
                "the Kafka admin API is not usable here (%s: %s); relying on broker "
                "auto-creation of topics (they get the broker's defaults, not "
                "cleanup.policy=%s)", type(exc).__name__, exc, self._cleanup_policy,
            )
        finally:
            with contextlib.suppress(Exception):
                await admin.close()

    async def _partitions(self, physical: str, deadline: float) -> set[int]:
        await self._ensure_topics([physical], deadline)
        producer = await self._get_producer(deadline)
        loop = asyncio.get_running_loop()
        return set(await asyncio.wait_for(producer.partitions_for(physical), max(0.001, deadline - loop.time())))

    async def partitions(self, topic: str) -> set[int]:
        """The partitions of the logical ``topic`` (created first when it does not exist)."""
        self._check_open()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._request_timeout
        try:
            return await self._partitions(self.physical_topic(topic), deadline)
        except BusUnavailable:
            raise
        except (TimeoutError, KafkaError, OSError) as exc:
            raise self._unavailable(f"partitions of {topic}", exc) from exc

    # -- offsets ----------------------------------------------------------------
    def _offsets_consumer(self, group_id: str | None) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            client_id=f"{self._client_id}-offsets",
            group_id=group_id,
            enable_auto_commit=False,
            request_timeout_ms=self._request_timeout_ms,
            retry_backoff_ms=max(1, int(self._backoff[0] * 1000)),
        )

    async def _stop_client(self, consumer: AIOKafkaConsumer, what: str) -> None:
        stopper = asyncio.ensure_future(consumer.stop())
        await asyncio.wait({stopper}, timeout=self._request_timeout)
        await _reap(stopper, what)
        await _close_client(getattr(consumer, "_client", None), self._request_timeout)

    async def _topic_partitions(self, topics: Sequence[str], deadline: float) -> list[TopicPartition]:
        tps: list[TopicPartition] = []
        for topic in topics:
            physical = self.physical_topic(topic)
            tps.extend(TopicPartition(physical, p) for p in sorted(await self._partitions(physical, deadline)))
        return tps

    async def end_offsets(self, topics: Sequence[str]) -> dict[tuple[str, int], int]:
        """Next offset to be written per (logical topic, partition), from the broker (one
        long-lived group-less consumer, rebuilt after a failure). Raises
        :class:`BusUnavailable` when the broker does not answer within ``request_timeout_ms``."""
        self._check_open()
        if self._meta_lock is None:
            self._meta_lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._request_timeout

        def left() -> float:
            return max(0.001, deadline - loop.time())

        async with self._meta_lock:
            try:
                if self._meta is None:
                    consumer = self._offsets_consumer(None)
                    try:
                        await asyncio.wait_for(consumer.start(), left())
                    except BaseException:
                        await self._stop_client(consumer, "offsets consumer stop")
                        raise
                    self._meta = consumer
                tps = await self._topic_partitions(topics, deadline)
                ends = await asyncio.wait_for(self._meta.end_offsets(tps), left()) if tps else {}
            except (TimeoutError, KafkaError, OSError, BusUnavailable) as exc:
                meta, self._meta = self._meta, None
                if meta is not None:
                    await self._stop_client(meta, "offsets consumer stop")
                if isinstance(exc, BusUnavailable):
                    raise
                raise self._unavailable("end offsets", exc) from exc
        return {(self.logical_topic(tp.topic), tp.partition): int(off) for tp, off in ends.items()}

    async def committed_offsets(self, consumer_id: str, topics: Sequence[str]) -> dict[tuple[str, int], int]:
        """Offsets committed by ``consumer_id`` per (logical topic, partition) (partitions it
        never committed on are absent). Raises :class:`BusUnavailable` like :meth:`end_offsets`."""
        self._check_open()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._request_timeout

        def left() -> float:
            return max(0.001, deadline - loop.time())

        consumer = self._offsets_consumer(consumer_id)
        try:
            await asyncio.wait_for(consumer.start(), left())
            tps = await self._topic_partitions(topics, deadline)
            consumer.assign(tps)
            out: dict[tuple[str, int], int] = {}
            for tp in tps:
                off = await asyncio.wait_for(consumer.committed(tp), left())
                if off is not None:
                    out[(self.logical_topic(tp.topic), tp.partition)] = int(off)
            return out
        except BusUnavailable:
            raise
        except (TimeoutError, KafkaError, OSError) as exc:
            raise self._unavailable(f"committed offsets of {consumer_id}", exc) from exc
        finally:
            await self._stop_client(consumer, "offsets consumer stop")

    # -- publish --------------------------------------------------------------
    async def publish(
        self,
        topic: str,
        value: Mapping,
        *,
        key: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._check_open()
        if not isinstance(key, str):
            raise TypeError(f"key must be str, not {type(key).__name__}")
        try:
            check_event(self._validator, topic, value)
            payload = encode_event(value).encode("utf-8")
        except InvalidEvent:
            self._invalid_events += 1
            raise
        kafka_headers = [(k, v.encode("utf-8")) for k, v in normalise_headers(headers).items()]
        physical = self.physical_topic(topic)
        key_bytes = key.encode("utf-8")

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._publish_timeout
        backoff = Backoff(*self._backoff)
        last_error: BaseException | None = None
        while True:
            self._check_open()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise self._unavailable(
                    f"could not publish to {topic!r} within {self._publish_timeout:g}s", last_error
                )
            producer = None
            try:
                await self._ensure_topics([physical], deadline)
                producer = await self._get_producer(deadline)
                remaining = max(0.001, deadline - loop.time())
                delivery = await asyncio.wait_for(
                    producer.send(physical, payload, key=key_bytes, headers=kafka_headers), remaining
                )
                # shield: the timeout must not cancel the delivery future itself
                # (the batch stays queued in the producer either way).
                await asyncio.wait_for(asyncio.shield(delivery), max(0.001, deadline - loop.time()))
                return
            except BusClosed:
                raise
            except _PRODUCER_STATE_ERRORS as exc:
                last_error = exc
                if producer is not None:
                    await self._reset_producer(producer)
            except (TimeoutError, KafkaError, OSError) as exc:
                last_error = exc
                if isinstance(exc, KafkaError) and not _transient(exc):
                    raise BusError(f"Kafka refused the event on {topic!r}: {type(exc).__name__}: {exc}") from exc
            delay = min(backoff.next(), deadline - loop.time())
            if delay > 0:
                await asyncio.sleep(delay)

    # -- subscribe ------------------------------------------------------------
    async def subscribe(
        self,
        topics: Sequence[str],
        *,
        consumer_id: str,
        from_beginning: bool = True,
    ) -> KafkaSubscription:
        """Subscribe ``consumer_id`` to every partition of ``topics``.

        A partition ``consumer_id`` never committed on starts at its beginning
        (``from_beginning``) or its end, and that position is committed at once, so
        ``from_beginning`` only matters the first time an identity subscribes.

        Waits (up to request + publish timeouts) until the consumer is positioned, so
        that ``from_beginning=False`` means "after what was published before this call".
        If the broker is away it returns anyway; the subscription keeps trying.
        """
        self._check_open()
        if isinstance(topics, str):
            topics = [topics]
        if not topics:
            raise ValueError("subscribe needs at least one topic")
        if not consumer_id:
            raise ValueError("consumer_id must be a non-empty string")
        sub = KafkaSubscription(self, list(dict.fromkeys(topics)), consumer_id, from_beginning)
        self._subs.add(sub)
        sub._start()
        try:
            await asyncio.wait_for(sub._ready.wait(), self._request_timeout + self._publish_timeout)
        except TimeoutError:
            log.warning(
                "subscription %s to %s not ready yet (broker away?); it keeps retrying",
                consumer_id, list(topics),
            )
        return sub


def _transient(exc: KafkaError) -> bool:
    return bool(getattr(exc, "retriable", False)) or isinstance(
        exc, (KafkaConnectionError, KafkaTimeoutError)
    )


_CLOSED = object()


def _fail_batches(accumulator, exc: BaseException) -> None:
    """Fail every batch still queued in an aiokafka producer (see ``_stop_producer``)."""
    batches = [b for queue in getattr(accumulator, "_batches", {}).values() for b in queue]
    batches += list(getattr(accumulator, "_pending_batches", ()))
    accumulator.fail_all(exc)
    # Nobody waits on these internal futures any more: mark their errors as seen.
    for batch in batches:
        for fut in (getattr(batch, "future", None), getattr(batch, "_drain_waiter", None)):
            if fut is not None and fut.done() and not fut.cancelled():
                fut.exception()


async def _close_client(client: Any, timeout: float) -> None:
    """Close an aiokafka client whose owner's stop() was cut short (broker away): otherwise its
    metadata task (``_md_synchronizer``) outlives the bus. ``close()`` is safe to repeat."""
    if client is None:
        return
    try:
        await asyncio.shield(asyncio.wait_for(client.close(), timeout))
    except Exception as exc:  # closing must not fail the caller
        log.debug("closing an aiokafka client: %r", exc)


async def _reap(task: asyncio.Future, what: str) -> None:
    """Finish ``task`` (cancelling it if still running) and log, not raise, its error."""
    if not task.done():
        log.warning("%s did not finish in time; cancelling it", what)
        task.cancel()
        await asyncio.wait({task})
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        log.debug("%s failed: %s: %s", what, type(exc).__name__, exc)


class KafkaSubscription(Subscription):
    """A subscription on a :class:`KafkaBus`; iterate it, commit, close."""

    def __init__(self, bus: KafkaBus, topics: list[str], consumer_id: str, from_beginning: bool) -> None:
        self._bus = bus
        self.topics = topics
        self.consumer_id = consumer_id
        self._from_beginning = from_beginning
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=bus._max_buffered_batches)
        self._ready = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task | None = None
        self._consumer: AIOKafkaConsumer | None = None
        # Next offset to fetch per partition, once known: survives consumer rebuilds.
        self._positions: dict[TopicPartition, int] = {}
        self._progress: dict[TopicPartition, PartitionProgress] = {}
        self._pending_commits: dict[TopicPartition, int] = {}
        self._commit_lock = asyncio.Lock()
        self._commit_retry_at = 0.0
        self._commit_backoff = Backoff(*bus._backoff)
        self._batch: list = []
        self._batch_tp: TopicPartition | None = None
        self._idx = 0

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def ready(self) -> bool:
        """True while a consumer is connected and positioned."""
        return self._ready.is_set()

    def _start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"qmtl-bus-consumer[{self.consumer_id}]"
        )

    # -- background consumer ----------------------------------------------------
    async def _run(self) -> None:
        bus = self._bus
        backoff = Backoff(*bus._backoff)
        failures = 0
        while True:
            consumer: AIOKafkaConsumer | None = None
            delay = 0.0
            try:
                consumer = AIOKafkaConsumer(
                    bootstrap_servers=bus.bootstrap_servers,
                    client_id=f"{bus._client_id}-{self.consumer_id}",
                    group_id=self.consumer_id,
                    enable_auto_commit=False,
                    auto_offset_reset="earliest",
                    request_timeout_ms=bus._request_timeout_ms,
                    retry_backoff_ms=max(1, int(bus._backoff[0] * 1000)),
                    fetch_max_wait_ms=bus._fetch_max_wait_ms,
                )
                await self._setup(consumer)
                self._consumer = consumer
                await self._flush_commits(force=True)  # anchors, or commits made while away
                self._ready.set()
                if failures:
                    log.info("consumer %s on %s reconnected", self.consumer_id, self.topics)
                failures = 0
                backoff.reset()
                while True:
                    batches = await consumer.getmany(timeout_ms=60_000, max_records=500)
                    for tp, records in batches.items():
                        if records:
                            self._positions[tp] = records[-1].offset + 1
                            await self._queue.put((tp, records))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closed or bus._closed:
                    return
                delay = backoff.next()
                failures += 1
                log.log(
                    logging.WARNING if failures == 1 else logging.INFO,
                    "consumer %s on %s failed (%s: %s); reconnecting in %.2fs (attempt %d)",
                    self.consumer_id, self.topics, type(exc).__name__, exc, delay, failures,
                )
            finally:
                self._ready.clear()
                self._consumer = None
                if consumer is not None:
                    await self._stop_consumer(consumer)
            await asyncio.sleep(delay)

    async def _setup(self, consumer: AIOKafkaConsumer) -> None:
        bus = self._bus
        loop = asyncio.get_running_loop()
        deadline = loop.time() + bus._request_timeout + bus._publish_timeout

        def left() -> float:
            return max(0.001, deadline - loop.time())

        await asyncio.wait_for(consumer.start(), left())
        tps: list[TopicPartition] = []
        for topic in self.topics:
            physical = bus.physical_topic(topic)
            partitions = await bus._partitions(physical, deadline)
            tps.extend(TopicPartition(physical, p) for p in sorted(partitions))
        consumer.assign(tps)
        unknown: list[TopicPartition] = []
        for tp in tps:
            progress = self._progress.get(tp)
            if progress is None:
                committed = await asyncio.wait_for(consumer.committed(tp), left())
                progress = self._progress[tp] = PartitionProgress(committed)
                if committed is not None and tp not in self._positions:
                    self._positions[tp] = committed
            pos = self._positions.get(tp)
            if pos is None:
                unknown.append(tp)
            else:
                consumer.seek(tp, pos)
        if unknown:
            if self._from_beginning:
                offsets = await asyncio.wait_for(consumer.beginning_offsets(unknown), left())
            else:
                offsets = await asyncio.wait_for(consumer.end_offsets(unknown), left())
            for tp in unknown:
                # Remember it, so a rebuilt consumer does not jump to a newer end,
                # and commit it as this identity's starting point ("anchor"): a
                # replica restarting before it committed anything on a partition then
                # resumes here instead of at a newer end (which would lose events).
                offset = offsets[tp]
                self._positions[tp] = offset
                consumer.seek(tp, offset)
                progress = self._progress[tp]
                if progress.committed is None:
                    progress.committed = offset
                    self._pending_commits[tp] = max(offset, self._pending_commits.get(tp, 0))

    async def _stop_consumer(self, consumer: AIOKafkaConsumer) -> None:
        await self._bus._stop_client(consumer, "consumer stop")

    # -- iteration --------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[BusMessage]:
        return self

    async def __anext__(self) -> BusMessage:
        while True:
            batch = self._batch
            while self._idx < len(batch):
                record = batch[self._idx]
                self._idx += 1
                msg = self._deliver(self._batch_tp, record)
                if msg is not None:
                    return msg
            if self._closed:
                raise StopAsyncIteration
            item = await self._queue.get()
            if item is _CLOSED:
                self._queue.put_nowait(_CLOSED)  # for any other waiter
                raise StopAsyncIteration
            self._batch_tp, self._batch = item
            self._idx = 0

    def _deliver(self, tp: TopicPartition, record) -> BusMessage | None:
        bus = self._bus
        topic = bus.logical_topic(tp.topic)
        progress = self._progress.setdefault(tp, PartitionProgress())
        try:
            if record.value is None:
                raise InvalidEvent("empty message (tombstone)")
            value = json.loads(record.value)
            check_event(bus._validator, topic, value)
        except Exception as exc:  # invalid on the wire: count, skip, never fatal
            bus._invalid_events += 1
            text = f"{type(exc).__name__}: {exc}"
            log.warning(
                "skipping invalid event on %s[%d]@%d for %s: %s",
                topic, tp.partition, record.offset, self.consumer_id, text[:300],
            )
            target = progress.on_skip(record.offset)
            if target is not None:
                self._pending_commits[tp] = max(target, self._pending_commits.get(tp, 0))
            return None
        progress.on_yield(record.offset)
        key = record.key.decode("utf-8", "replace") if record.key is not None else ""
        headers = {
            k: (v.decode("utf-8", "replace") if v is not None else "") for k, v in (record.headers or ())
        }
        return BusMessage(topic, key, value, headers, tp.partition, record.offset, record.timestamp)

    # -- commits ----------------------------------------------------------------
    async def commit(self, message: BusMessage) -> None:
        """Record ``message`` (and all before it on its partition) as applied.

        The commit is sent to the broker before this returns when the broker is
        reachable. When it is not, the offsets stay pending and are sent with the
        next commit or at close (a lost commit only means a replay: at-least-once).
        """
        tp = TopicPartition(self._bus.physical_topic(message.topic), message.partition)
        progress = self._progress.get(tp)
        if progress is None:
            raise ValueError(
                f"message from {message.topic}[{message.partition}] does not belong to this subscription"
            )
        target = progress.on_commit(message.offset)
        if target is not None:
            self._pending_commits[tp] = max(target, self._pending_commits.get(tp, 0))
        await self._flush_commits()

    async def _flush_commits(self, *, force: bool = False) -> None:
        if not self._pending_commits:
            return
        loop = asyncio.get_running_loop()
        async with self._commit_lock:
            if not self._pending_commits:
                return  # flushed by a concurrent caller
            if not force and loop.time() < self._commit_retry_at:
                return  # backing off after a failure; keep them pending
            consumer = self._consumer
            if consumer is None:
                return  # reconnecting; keep them pending
            offsets, self._pending_commits = self._pending_commits, {}
            try:
                await asyncio.wait_for(consumer.commit(offsets), self._bus._request_timeout)
            except BaseException as exc:
                for tp, off in offsets.items():
                    self._pending_commits[tp] = max(off, self._pending_commits.get(tp, 0))
                if isinstance(exc, asyncio.CancelledError):
                    raise
                delay = self._commit_backoff.next()
                self._commit_retry_at = loop.time() + delay
                log.warning(
                    "commit for %s failed (%s: %s); kept pending, retry in >= %.2fs",
                    self.consumer_id, type(exc).__name__, exc, delay,
                )
            else:
                self._commit_backoff.reset()
                self._commit_retry_at = 0.0

    def lag(self) -> dict[tuple[str, int], int]:
        """Messages on the broker not yet delivered, per (topic, partition), as far as
        the last fetch knows (partitions not fetched yet are left out)."""
        consumer = self._consumer
        if consumer is None:
            return {}
        out = {}
        for tp, progress in self._progress.items():
            high = consumer.highwater(tp)
            if high is None:
                continue
            done = max(
                (o for o in (progress.last_yielded, progress.skip_end) if o is not None), default=None
            )
            start = done + 1 if done is not None else (progress.committed or 0)
            out[(self._bus.logical_topic(tp.topic), tp.partition)] = max(0, high - start)
        return out

    @property
    def pending_commits(self) -> dict[tuple[str, int], int]:
        """Offsets committed by the application but not yet confirmed by the broker."""
        return {(self._bus.logical_topic(tp.topic), tp.partition): o for tp, o in self._pending_commits.items()}

    # -- close ------------------------------------------------------------------
    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._bus._subs.discard(self)
        try:
            await self._flush_commits(force=True)
            if self._pending_commits:
                log.warning(
                    "subscription %s closed with %d unconfirmed commit(s); those events "
                    "will be delivered again (at-least-once)", self.consumer_id, len(self._pending_commits),
                )
        finally:
            task, self._task = self._task, None
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise  # close() itself was cancelled
            self._batch = []
            self._idx = 0
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(_CLOSED)
