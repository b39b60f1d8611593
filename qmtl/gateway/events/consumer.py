"""The Gateway's ControlBus consumer.

**Identity.** Every Gateway replica consumes every partition of the three control topics
as ``gateway-<instance id>`` (``gateway.events.instance_id``, or generated per process).
The bus gives each consumer identity every event (fan-out, no group rebalancing). A
replica restarted with the same instance id resumes after its last committed offsets.

**At-least-once.** An event is committed only after it was applied to the state store and
its frame handed to the subscribers' buffers. Commits are batched (the last applied message
per partition, every ``commit_interval`` seconds and when the subscription ends). A crash
between apply and commit replays the event; the state store makes the replay a no-op.

**State rebuild after a restart.** The state store lives in memory. At start, before the
live subscription, the consumer replays the control topics from the beginning (compacted,
bounded retention) with a throw-away identity ``gateway-<id>.rebuild-<epoch>`` — never
committed — into the state store, without relaying, up to the live identity's committed
offsets: exactly what this instance had already relayed before it stopped. Then the live
subscription resumes at those offsets and relays everything after them (what was
published while the replica was away included). ``ready`` is set once the live
subscription has also applied everything that was on the bus when it started (the end
offsets then); ``/ws/evt`` snapshots and the probes wait for it, so a new subscriber never
gets a snapshot of a Gateway that is still catching up.

**Broker away.** The Kafka bus reconnects its consumer with backoff by itself; when a
subscription fails outright (or the bus raises), this consumer re-subscribes with
exponential backoff (0.1 s → 5 s, jittered) and resumes after the last commit.

**Metrics.** ``controlbus_lag_ms{topic}`` (publish → apply, per event),
``controlbus_consumer_offset_lag{topic}`` and ``partition_skew_seconds{topic}``
(from the partitions' end offsets, every ``metrics_interval`` seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from qmtl.bus.base import CONTROL_TOPICS, BusMessage, ControlBus
from qmtl.common import logs, tracing
from qmtl.common.resilience import Backoff

from .metrics import EventMetrics

log = logging.getLogger(__name__)

TP = tuple  # (topic, partition)


class ControlBusConsumer:
    """See the module docstring. ``apply(topic, event, relay)`` applies one event."""

    commit_interval = 0.2
    metrics_interval = 2.0
    yield_every = 64
    rebuild_idle = 1.0  # no message for this long (and the bus cannot say more) = caught up
    rebuild_timeout = 60.0

    def __init__(
        self,
        bus: ControlBus,
        apply: Callable[[str, dict, bool], str],
        *,
        consumer_id: str,
        epoch: str,
        metrics: EventMetrics,
        topics: tuple[str, ...] = CONTROL_TOPICS,
        tracer_provider: Any = None,
    ) -> None:
        self.bus = bus
        self.apply = apply
        self.tracer_provider = tracer_provider
        self.consumer_id = consumer_id
        self.rebuild_id = f"{consumer_id}.rebuild-{epoch}"
        self.metrics = metrics
        self.topics = topics
        self.ready = asyncio.Event()
        self.sub: Any = None
        self._task: asyncio.Task | None = None
        self._metrics_task: asyncio.Task | None = None
        self._stopping = False
        self._pending: dict[TP, BusMessage] = {}
        self._commit_lock = asyncio.Lock()
        # Next offset and event time of the last applied message per partition.
        self.applied: dict[TP, tuple[int, float]] = {}
        self.stats = {"consumed": 0, "rebuilt": 0, "reconnects": 0, "commits": 0}
        self._catchup: dict[TP, int] = {}
        self._last_progress = 0.0
        self._watchdog: asyncio.Task | None = None
        self._lag_gauges = {t: metrics.controlbus_lag_ms.labels(t) for t in topics}
        self.offset_lag: dict[str, int] | None = None  # messages behind per topic, last measured

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"controlbus-consumer[{self.consumer_id}]")
        self._metrics_task = asyncio.create_task(self._metrics_loop(), name="controlbus-consumer-metrics")

    def stopping(self) -> bool:
        return self._stopping

    async def stop(self) -> None:
        self._stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watchdog
            self._watchdog = None
        for task in (self._metrics_task, self._task):
            if task is not None:
                task.cancel()
        for task in (self._metrics_task, self._task):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._task = self._metrics_task = None

    # -- the loop ------------------------------------------------------------------------
    async def _run(self) -> None:
        logs.label_task(f"controlbus:{self.consumer_id}")
        backoff = Backoff(0.1, 5.0)
        while not self._stopping:
            try:
                n = await asyncio.wait_for(self._rebuild(), self.rebuild_timeout)
                if n:
                    log.info("state rebuilt from %d ControlBus events (%s)", n, self.consumer_id)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = backoff.next()
                log.warning("state rebuild failed (%s: %s); retrying in %.2fs", type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
        await self._arm_catchup()
        backoff.reset()
        while not self._stopping:
            sub = None
            flusher = None
            try:
                sub = await self.bus.subscribe(list(self.topics), consumer_id=self.consumer_id, from_beginning=True)
                self.sub = sub
                flusher = asyncio.create_task(self._flush_loop(sub), name="controlbus-commits")
                n = 0
                async for msg in sub:
                    self._handle(msg)
                    backoff.reset()
                    n += 1
                    if n % self.yield_every == 0:
                        await asyncio.sleep(0)  # let the writers run during a burst
                if self.stopping():  # stop() ended the subscription
                    break
                raise ConnectionError("the ControlBus subscription ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = backoff.next()
                self.stats["reconnects"] += 1
                self.metrics.controlbus_reconnects.inc()
                log.warning(
                    "ControlBus consumer %s failed (%s: %s); re-subscribing in %.2fs",
                    self.consumer_id, type(exc).__name__, exc, delay,
                )
                await self._close(sub, flusher)
                sub = flusher = None
                await asyncio.sleep(delay)
            finally:
                if sub is not None:
                    await asyncio.shield(self._close(sub, flusher))

    async def _close(self, sub: Any, flusher: asyncio.Task | None) -> None:
        if flusher is not None:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await flusher
        if sub is not None:
            with contextlib.suppress(Exception):
                await self._flush(sub)
            with contextlib.suppress(Exception):
                await sub.close()
        if self.sub is sub:
            self.sub = None

    async def _arm_catchup(self) -> None:
        """``ready`` once the live subscription has applied what was on the bus now."""
        try:
            ends = await asyncio.wait_for(self._end_offsets(), 10)
        except Exception:
            ends = None
        self._catchup = {
            tp: end for tp, end in (ends or {}).items() if end > self.applied.get(tp, (0, 0.0))[0]
        }
        self._last_progress = time.monotonic()
        if not self._catchup:
            self.ready.set()
            return
        log.info("catching up on %d ControlBus message(s) before serving snapshots",
                 sum(end - self.applied.get(tp, (0, 0.0))[0] for tp, end in self._catchup.items()))
        self._watchdog = asyncio.create_task(self._catchup_watchdog(), name="controlbus-catchup")

    async def _catchup_watchdog(self) -> None:
        # Trailing invalid events are skipped by the bus, never seen here: if nothing
        # arrives for a while, what is left cannot be applied anyway.
        while not self.ready.is_set():
            await asyncio.sleep(0.1)
            sub = self.sub
            if sub is None or not getattr(sub, "ready", True):
                self._last_progress = time.monotonic()
                continue
            lag = getattr(sub, "lag", None)
            if callable(lag) and not any(lag().get(tp, 0) for tp in self._catchup):
                self._catchup.clear()
                self.ready.set()
            elif time.monotonic() - self._last_progress > self.rebuild_idle:
                log.warning("catch-up idle for %.1fs; serving snapshots", self.rebuild_idle)
                self._catchup.clear()
                self.ready.set()

    def _handle(self, msg: BusMessage) -> None:
        self.stats["consumed"] += 1
        try:
            if msg.headers and tracing.TRACEPARENT in msg.headers:  # continue the producer's trace
                with tracing.consumed(msg.headers, f"{msg.topic} process", self.tracer_provider):
                    self.apply(msg.topic, msg.value, True)
            else:
                self.apply(msg.topic, msg.value, True)
        except Exception:
            # A bug in applying one event must not stop the stream; it is committed
            # anyway (re-reading it would fail the same way).
            self.metrics.consume_errors.labels(msg.topic).inc()
            log.exception("could not apply %s event at %s[%d]@%d", msg.topic, msg.topic, msg.partition, msg.offset)
        now = time.time()
        ts_ms = msg.timestamp_ms or 0
        if ts_ms:
            gauge = self._lag_gauges.get(msg.topic)
            if gauge is not None:
                gauge.set(max(0.0, now * 1000 - ts_ms))
        tp = (msg.topic, msg.partition)
        self.applied[tp] = (msg.offset + 1, ts_ms / 1000 if ts_ms else now)
        self._pending[tp] = msg
        if self._catchup:
            self._last_progress = time.monotonic()
            target = self._catchup.get(tp)
            if target is not None and msg.offset + 1 >= target:
                del self._catchup[tp]
                if not self._catchup:
                    self.ready.set()

    # -- commits -------------------------------------------------------------------------
    async def _flush(self, sub: Any) -> None:
        async with self._commit_lock:
            if not self._pending:
                return
            pending, self._pending = self._pending, {}
            for msg in pending.values():
                await sub.commit(msg)
            self.stats["commits"] += 1

    async def _flush_loop(self, sub: Any) -> None:
        while True:
            await asyncio.sleep(self.commit_interval)
            try:
                await self._flush(sub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # kept pending by the bus; retried next time
                log.warning("commit failed (%s: %s)", type(exc).__name__, exc)

    # -- rebuild -------------------------------------------------------------------------
    async def _rebuild(self) -> int:
        committed = await self.bus.committed_offsets(self.consumer_id, self.topics)
        targets = {tp: off for tp, off in (committed or {}).items() if off > 0}
        now = time.time()
        for tp, off in targets.items():  # where the live subscription resumes (for the lag metrics)
            self.applied.setdefault(tp, (off, now))
        if not targets:
            return 0
        sub = await self.bus.subscribe(list(self.topics), consumer_id=self.rebuild_id, from_beginning=True)
        applied = 0
        remaining = set(targets)
        try:
            it = sub.__aiter__()
            while remaining:
                try:
                    msg = await asyncio.wait_for(it.__anext__(), self.rebuild_idle)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    lag = getattr(sub, "lag", None)
                    if callable(lag):
                        behind = lag()
                        remaining = {tp for tp in remaining if behind.get(tp, 0) > 0}
                        continue
                    if getattr(sub, "ready", True):
                        log.warning("state rebuild idle for %.1fs with %d partition(s) short of the committed offsets; "
                                    "taking it as caught up", self.rebuild_idle, len(remaining))
                        break
                    continue
                tp = (msg.topic, msg.partition)
                if tp not in remaining:
                    continue
                target = targets[tp]
                if msg.offset >= target:
                    remaining.discard(tp)
                    continue
                try:
                    self.apply(msg.topic, msg.value, False)
                except Exception:
                    self.metrics.consume_errors.labels(msg.topic).inc()
                    log.exception("could not replay %s event at offset %d", msg.topic, msg.offset)
                applied += 1
                self.metrics.rebuild_events.labels(msg.topic).inc()
                if msg.offset + 1 >= target:
                    remaining.discard(tp)
                if applied % self.yield_every == 0:
                    await asyncio.sleep(0)
        finally:
            with contextlib.suppress(Exception):
                await sub.close()
        self.stats["rebuilt"] += applied
        return applied

    # -- offset lag and skew ---------------------------------------------------------------
    async def update_lag_metrics(self) -> dict[str, int] | None:
        ends = await self._end_offsets()
        if ends is None:
            return None
        now = time.time()
        per_topic: dict[str, int] = dict.fromkeys(self.topics, 0)
        lags: dict[str, list[float]] = {t: [] for t in self.topics}
        for (topic, p), end in ends.items():
            if topic not in per_topic:
                continue
            nxt, ts = self.applied.get((topic, p), (0, 0.0))
            behind = max(0, end - nxt)
            per_topic[topic] += behind
            lags[topic].append(max(0.0, now - ts) if behind and ts else 0.0)
        self.offset_lag = per_topic
        for topic in self.topics:
            self.metrics.consumer_offset_lag.labels(topic).set(per_topic[topic])
            values = lags[topic]
            self.metrics.partition_skew_seconds.labels(topic).set((max(values) - min(values)) if values else 0.0)
        return per_topic

    async def _end_offsets(self) -> dict[TP, int] | None:
        try:
            return await self.bus.end_offsets(self.topics)
        except Exception as exc:  # the broker is away: unknown for now
            log.debug("end offsets unavailable: %s: %s", type(exc).__name__, exc)
            return None

    async def _metrics_loop(self) -> None:
        while True:
            await asyncio.sleep(self.metrics_interval)
            try:
                await self.update_lag_metrics()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("offset lag unavailable: %s", exc)
