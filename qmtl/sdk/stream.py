"""The event-stream client: a consistent, live copy of activation, policy and queue state.

:class:`EventStream` does what SPEC §5 and ``specs/asyncapi.yaml`` ask of a client:

1. ``POST /events/subscribe`` → a descriptor (``stream_url``, ``token``, ``expires_at``,
   ``fallback_url``); connect to ``stream_url`` with ``Authorization: Bearer <token>``.
2. Apply the first frame per topic — a full ``snapshot`` — then the change frames in order.
   Duplicates are dropped (a frame whose ``seq`` is not newer than the last applied one of
   the same Gateway process; an entry whose ``etag`` is already held). Every state frame's
   ``statehash`` is checked against the hash of the local copy (:mod:`qmtl.sdk.state`).
3. Refresh the token before ``expires_at`` (at ``refresh_at`` of its lifetime, read from the
   token's own ``iat``/``exp`` so clock skew does not matter); the open stream gets the new
   token (``{"type": "refresh", "token": ...}``, or the Gateway closes it at the old token's
   expiry), and reconnects use the newest.
4. Reconnect with jittered exponential backoff, resuming from the last applied frame
   (``?last_event_id=``): the Gateway replays exactly what was missed, or sends a fresh
   snapshot when it cannot (another process, a restart). ``stream_url`` is always tried
   first; after ``fallback_after`` failed rounds ``fallback_url`` is tried right after it,
   and a stream on the fallback route goes back to ``stream_url`` after
   ``primary_retry_interval`` seconds (resuming, so nothing is lost in the switch).
5. Check against the source of truth over HTTP (``GET /worlds/{id}/activations``,
   ``/worlds/{id}/policies``, ``/queues/by_tag``) after every snapshot, after connecting
   to the fallback route (which sends no snapshot), and when a ``statehash`` disagrees; the
   newer entry wins. While the stream stays down longer than ``reconcile_after`` seconds
   it reconciles over HTTP every ``reconcile_interval`` seconds, so the copy stays current.

Consume changes with a callback (``on_event``) or as an async iterator::

    async with EventStream(client, world_id="crypto-mom", topics=["activation"]) as stream:
        async for event in stream:
            print(event.type, event.data)

Each :class:`StreamEvent` says where it came from: ``stream`` (a frame), ``snapshot`` (an
entry that changed while disconnected, found in a fresh snapshot) or ``reconcile`` (found
over HTTP). :attr:`EventStream.state` is the current copy; :meth:`EventStream.fresh`
tells whether it can be trusted right now (see :class:`qmtl.sdk.ActivationGate`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .client import GatewayClient
from .errors import NotImplementedByGateway, ProblemError, QmtlError, StreamError
from .state import (
    QueueKey,
    StreamState,
    normalise_queue_key,
    parse_ts,
    queue_snapshot_hash,
)
from .types import SIDE_VALUES, TOPIC_VALUES, StreamDescriptor

__all__ = ["EventStream", "StreamEvent", "StreamStats"]

log = logging.getLogger(__name__)

CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN = 1013
CLOSE_TOO_SLOW = 4008
CLOSE_GOING_AWAY = 1001
STATE_TYPES = ("activation_updated", "policy_updated", "queue_update")
_WORLD_TOPICS = ("activation", "policy")


@dataclass(frozen=True)
class StreamEvent:
    """One change (or snapshot) delivered to the consumer."""

    type: str
    data: Any
    source: str = "stream"  # stream | snapshot | reconcile
    id: str | None = None
    seq: int | None = None
    world_id: str | None = None
    frame: Mapping[str, Any] | None = None

    @property
    def traceparent(self) -> str | None:
        """The W3C trace context of the request that caused this event (the frame's CloudEvents
        distributed-tracing extension), when the Gateway relayed one: join it to your own traces."""
        value = (self.frame or {}).get("traceparent")
        return value if isinstance(value, str) else None


@dataclass
class StreamStats:
    descriptors: int = 0
    token_refreshes: int = 0
    connects: int = 0
    fallback_connects: int = 0
    connect_failures: int = 0
    resumes: int = 0
    snapshots: int = 0
    frames: int = 0
    duplicates: int = 0
    hash_mismatches: int = 0
    verifications: int = 0
    corrections: int = 0
    reconciles: int = 0
    refusals: dict[int, int] = field(default_factory=dict)


Listener = Callable[[StreamEvent], Any]


class EventStream:
    """See the module docstring.

    :param client: a :class:`GatewayClient` (or the Gateway's base URL).
    :param topics: any of ``activation``, ``policy``, ``queues``.
    :param world_id: the world (needed for ``activation`` and ``policy``).
    :param strategy_id: also deliver this strategy's ``progress``/``queue_map`` frames.
    :param queue_keys: ``(tags, interval, match_mode)`` keys to follow (``queues``).
    :param on_event: callback (sync or async) for each :class:`StreamEvent`; without one,
        events are buffered for ``async for`` (``max_buffer`` of them, oldest dropped).
    :param verify_with_source: check snapshots and mismatches against WorldService / the
        DAG Manager over HTTP (recommended: a Gateway restarted on an in-process bus may
        hold less than the source of truth).
    """

    def __init__(
        self,
        client: GatewayClient | str,
        *,
        topics: Iterable[str] = ("activation",),
        world_id: str | None = None,
        strategy_id: str | None = None,
        queue_keys: Iterable[Any] = (),
        on_event: Listener | None = None,
        include_heartbeats: bool = False,
        verify_with_source: bool = True,
        reconnect_base: float = 0.1,
        reconnect_max: float = 5.0,
        fallback_after: int = 2,
        refresh_at: float = 0.75,
        reconcile_after: float = 3.0,
        reconcile_interval: float = 2.0,
        open_timeout: float = 5.0,
        idle_timeout: float = 45.0,
        primary_retry_interval: float = 30.0,
        max_buffer: int = 10_000,
        rng: random.Random | None = None,
    ) -> None:
        self._owns_client = isinstance(client, str)
        self.client = GatewayClient(client) if isinstance(client, str) else client
        self.topics = _normalise_topics(topics)
        if any(t in _WORLD_TOPICS for t in self.topics) and not world_id:
            raise ValueError("the activation and policy topics need a world_id")
        self.world_id = world_id
        self.strategy_id = strategy_id
        self.queue_keys: list[QueueKey] = []
        for key in queue_keys:
            self._add_key(key)
        if self.queue_keys and "queues" not in self.topics:
            self.topics.append("queues")
        self.include_heartbeats = include_heartbeats
        self.verify_with_source = verify_with_source
        self.reconnect_base = reconnect_base
        self.reconnect_max = reconnect_max
        self.fallback_after = max(1, int(fallback_after))
        self.refresh_at = min(max(refresh_at, 0.1), 0.95)
        self.reconcile_after = reconcile_after
        self.reconcile_interval = reconcile_interval
        self.open_timeout = open_timeout
        self.idle_timeout = idle_timeout
        self.refusal_grace = 0.3
        self.primary_retry_interval = primary_retry_interval
        self._back_to_primary = False
        self._rng = rng or random.Random()

        self.state = StreamState()
        self.stats = StreamStats()
        self.status = "idle"  # idle | connecting | live | down | stopped | failed
        self.route: str | None = None  # stream | fallback while live
        self.descriptor: StreamDescriptor | None = None
        self.last_event_id: str | None = None
        self.error: BaseException | None = None
        self._listeners: list[Listener] = [on_event] if on_event is not None else []
        self._buffer: asyncio.Queue[StreamEvent | None] | None = asyncio.Queue() if on_event is None else None
        self._max_buffer = max_buffer
        self._epoch: str | None = None
        self._last_seq = -1
        self._desc_at = 0.0  # monotonic time the descriptor was received
        self._desc_lifetime = 0.0
        self._desc_lock = asyncio.Lock()
        self._ws: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._resnapshot = False
        self._down_since: float | None = time.monotonic()
        self._last_contact: float | None = None
        self._synced_at: float | None = None
        self._synced = asyncio.Event()
        self._pending_snapshots: set[str] = set()
        self._verify_tasks: dict[tuple[str, str | None], asyncio.Task[None]] = {}
        self._last_verify: dict[tuple[str, str | None], float] = {}

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self, *, require_descriptor: bool = False) -> Self:
        """Subscribe and start streaming in the background (returns at once; see
        :meth:`wait_synced`). Raises when the Gateway refuses the subscription itself
        (e.g. 403 no read access, 422 bad topic) — or, with ``require_descriptor``, when no
        descriptor can be had now for any reason; otherwise it keeps trying."""
        if self._tasks:
            return self
        self._stopping = False
        self.status = "connecting"
        self._down_since = time.monotonic()  # "down" until the first connection opens
        try:
            await self._refresh_descriptor(initial=True)
        except ProblemError as exc:
            if require_descriptor or exc.status in (400, 401, 403, 404, 422):
                raise
            log.warning("event stream: cannot subscribe yet (%s); retrying in the background", exc)
        except QmtlError as exc:
            if require_descriptor:
                raise
            log.warning("event stream: cannot subscribe yet (%s); retrying in the background", exc)
        self._tasks = [
            asyncio.create_task(self._run(), name="qmtl-stream"),
            asyncio.create_task(self._refresh_loop(), name="qmtl-stream-refresh"),
            asyncio.create_task(self._reconcile_loop(), name="qmtl-stream-reconcile"),
        ]
        return self

    async def stop(self) -> None:
        self._stopping = True
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2)
        tasks = self._tasks + list(self._verify_tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []
        self._verify_tasks.clear()
        if self.status != "failed":
            self.status = "stopped"
        if self._buffer is not None:
            self._buffer.put_nowait(None)
        if self._owns_client:
            await self.client.aclose()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_synced(self, timeout: float = 10.0) -> None:
        """Wait until the state holds a full snapshot (or an HTTP reconciliation)."""
        await asyncio.wait_for(self._synced.wait(), timeout)

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[StreamEvent]:
        if self._buffer is None:
            raise RuntimeError("this stream delivers to on_event; iterate a stream made without it")
        while True:
            item = await self._buffer.get()
            if item is None:
                if self.error is not None:
                    raise self.error
                return
            yield item

    async def next_event(self, timeout: float) -> StreamEvent:
        """The next buffered event (TimeoutError after ``timeout`` seconds)."""
        if self._buffer is None:
            raise RuntimeError("this stream delivers to on_event")
        item = await asyncio.wait_for(self._buffer.get(), timeout)
        if item is None:
            self._buffer.put_nowait(None)
            raise self.error or StreamError("the stream has stopped")
        return item

    # -- freshness -------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self.status == "live"

    def fresh(self, max_age: float) -> bool:
        """True when the state is current: the stream is live and heard from within
        ``idle_timeout``, or it was last in sync (frame or HTTP reconcile) within ``max_age``."""
        now = time.monotonic()
        if self.status == "live" and self._last_contact is not None and now - self._last_contact <= self.idle_timeout:
            return self._synced.is_set()
        return self._synced_at is not None and now - self._synced_at <= max_age

    # -- queue keys --------------------------------------------------------------------------------
    def _add_key(self, key: Any) -> QueueKey:
        if isinstance(key, Mapping):
            k = normalise_queue_key(key["tags"], key["interval"], key.get("match_mode"))
        elif isinstance(key, tuple) and len(key) == 3 and isinstance(key[0], tuple):
            k = normalise_queue_key(key[0], key[1], key[2])
        else:
            tags, interval, *rest = key
            k = normalise_queue_key(tags, interval, rest[0] if rest else None)
        if k not in self.queue_keys:
            self.queue_keys.append(k)
        return k

    async def add_queue_keys(self, keys: Iterable[Any]) -> None:
        """Follow more queue keys: a new descriptor and a fresh snapshot follow."""
        before = len(self.queue_keys)
        for key in keys:
            self._add_key(key)
        if len(self.queue_keys) == before:
            return
        if "queues" not in self.topics:
            self.topics.append("queues")
        self._resnapshot = True
        self.descriptor = None
        await self._drop_connection()

    # -- descriptor and token ----------------------------------------------------------------------
    async def _refresh_descriptor(self, *, initial: bool = False) -> StreamDescriptor:
        async with self._desc_lock:
            desc = await self.client.subscribe(
                self.topics, world_id=self.world_id, strategy_id=self.strategy_id,
                queue_keys=[{"tags": list(k[0]), "interval": k[1], "match_mode": k[2]} for k in self.queue_keys] or None,
            )
            if self.descriptor is not None and not initial:
                self.stats.token_refreshes += 1
            self.stats.descriptors += 1
            self.descriptor = desc
            self._desc_at = time.monotonic()
            self._desc_lifetime = _token_lifetime(desc)
        ws = self._ws
        if ws is not None and not initial:
            # The Gateway closes a stream (1008) when its token expires: hand it the fresh one.
            with contextlib.suppress(Exception):
                await ws.send(json.dumps({"type": "refresh", "token": desc["token"]}))
        return desc

    def _token_due(self) -> float:
        """Monotonic time at which the token should be refreshed."""
        return self._desc_at + self._desc_lifetime * self.refresh_at

    def _token_expired(self) -> bool:
        return time.monotonic() >= self._desc_at + self._desc_lifetime - 0.5

    async def _ensure_descriptor(self) -> StreamDescriptor:
        if self.descriptor is None or time.monotonic() >= self._token_due():
            return await self._refresh_descriptor()
        return self.descriptor

    async def _refresh_loop(self) -> None:
        failures = 0
        while not self._stopping:
            if self.descriptor is None:
                await asyncio.sleep(0.2)
                continue
            wait = self._token_due() - time.monotonic()
            if wait > 0:
                await asyncio.sleep(min(wait, 60.0))
                continue
            try:
                await self._refresh_descriptor()
                failures = 0
                log.debug("event stream: token refreshed (lifetime %.1fs)", self._desc_lifetime)
            except QmtlError as exc:
                failures += 1
                delay = min(self.reconnect_max, 0.2 * 2 ** min(failures, 6))
                log.info("event stream: token refresh failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)

    # -- the connection loop ------------------------------------------------------------------------
    async def _run(self) -> None:
        failures = 0
        policy_refusals = 0
        while not self._stopping:
            try:
                desc = await self._ensure_descriptor()
            except ProblemError as exc:
                if exc.status in (400, 401, 403, 404, 422):
                    await self._fail(StreamError(f"the Gateway refused the subscription: {exc}"))
                    return
                failures += 1
                self._went_down()
                await self._sleep_backoff(failures)
                continue
            except QmtlError as exc:
                failures += 1
                self._went_down()
                log.debug("event stream: no descriptor (%s)", exc)
                await self._sleep_backoff(failures)
                continue
            # stream_url first; after fallback_after failures in a row, fallback_url right
            # after it in the same round (so a healthy stream_url is always preferred)
            routes = ["stream"]
            if failures >= self.fallback_after and desc.get("fallback_url"):
                routes.append("fallback")
            opened, code = False, None
            for route in routes:
                url = desc["fallback_url"] if route == "fallback" else desc["stream_url"]
                opened, code = await self._connect_and_read(url, desc["token"], route)
                if self._stopping:  # set by stop() while the read was awaited (mypy narrowed it to False)
                    return  # type: ignore[unreachable]
                if code is not None:
                    self.stats.refusals[code] = self.stats.refusals.get(code, 0) + 1
                if opened or code == CLOSE_POLICY:
                    break
                self.stats.connect_failures += 1
            if code == CLOSE_POLICY:
                self.descriptor = None  # the token (or its scope) was refused: get a new one
            if code == CLOSE_POLICY and not opened:
                policy_refusals += 1
                if policy_refusals > 3:
                    await self._fail(StreamError("the stream keeps refusing fresh tokens (close 1008)", code=code))
                    return
            elif opened:
                policy_refusals = 0
            if opened:
                failures = 0
                if code == CLOSE_TOO_SLOW or self._back_to_primary:
                    self._back_to_primary = False
                    continue  # reconnect at once, resuming from the last applied frame
            else:
                failures += 1
            await self._sleep_backoff(max(1, failures))

    async def _sleep_backoff(self, failures: int) -> None:
        cap = min(self.reconnect_max, self.reconnect_base * 2 ** min(failures - 1, 16))
        await asyncio.sleep(self._rng.uniform(cap / 2, cap))

    def _stream_url(self, url: str, route: str) -> str:
        params: list[tuple[str, str]] = []
        if self.last_event_id and not self._resnapshot:
            params.append(("last_event_id", self.last_event_id))
        if not params:
            return url
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True) + params
        return urlunsplit(parts._replace(query=urlencode(query)))

    async def _connect_and_read(self, url: str, token: str, route: str) -> tuple[bool, int | None]:
        """One connection: returns (opened, close code)."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

        target = self._stream_url(url, route)
        resuming = self.last_event_id is not None and not self._resnapshot
        try:
            ws = await asyncio.wait_for(
                connect(target, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=self.open_timeout,
                        max_size=None, proxy=None, ping_interval=20, ping_timeout=20, close_timeout=2),
                self.open_timeout + 1,
            )
        except (TimeoutError, OSError, InvalidHandshake, InvalidURI) as exc:
            log.debug("event stream: cannot connect to %s (%s: %s)", url, type(exc).__name__, exc)
            self._went_down()
            return False, None
        self._ws = ws
        self._resnapshot = False
        self.stats.connects += 1
        if route == "fallback":
            self.stats.fallback_connects += 1
        self._pending_snapshots = set(self.topics) if route == "stream" and not resuming else set()
        code: int | None = None
        opened = False
        try:
            # A refused connection is accepted and closed at once with its code; anything
            # else within the grace period (a frame, or silence) means it is open.
            try:
                text: str | bytes | None = await asyncio.wait_for(ws.recv(), self.refusal_grace)
            except TimeoutError:
                text = None
            opened = True
            self._came_up(route)
            if resuming and route == "stream":
                first = _frame_type(text)
                if first != "snapshot":
                    self.stats.resumes += 1
            leave_at = time.monotonic() + self.primary_retry_interval if route == "fallback" else None
            while not self._stopping:
                if text is not None:
                    await self._on_text(text, route)
                wait = self.idle_timeout
                if leave_at is not None:
                    wait = min(wait, max(0.0, leave_at - time.monotonic()))
                try:
                    text = await asyncio.wait_for(ws.recv(), wait)
                except TimeoutError:
                    if leave_at is not None and time.monotonic() >= leave_at:
                        log.info("event stream: trying stream_url again (on the fallback route for %.0fs)",
                                 self.primary_retry_interval)
                        self._back_to_primary = True
                    else:
                        log.info("event stream: nothing heard for %.0fs; reconnecting", self.idle_timeout)
                    break
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            code = rcvd.code if rcvd is not None else None
            if code in (CLOSE_POLICY, CLOSE_TRY_AGAIN):
                log.info("event stream: %s refused the connection (close %s: %s)", route, code, rcvd.reason if rcvd else "")
                if not opened:
                    self._went_down()
            else:
                log.debug("event stream: connection closed (%s)", code)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug in a handler must not kill the stream silently
            log.exception("event stream: frame handling failed")
        finally:
            self._ws = None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2)
            if not self._stopping:
                self._went_down()
        return opened, code

    async def _drop_connection(self) -> None:
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()

    def _came_up(self, route: str) -> None:
        self.status = "live"
        self.route = route
        self._down_since = None
        self._last_contact = time.monotonic()
        if route == "fallback" and self.verify_with_source:
            # the legacy route sends no snapshot: confirm the copy over HTTP
            self._schedule_verify_all()

    def _went_down(self) -> None:
        if self.status in ("stopped", "failed"):
            return
        self.status = "down"
        self.route = None
        if self._down_since is None:
            self._down_since = time.monotonic()
            if self._last_contact is not None:
                self._synced_at = self._last_contact

    async def _fail(self, error: BaseException) -> None:
        log.error("event stream: %s", error)
        self.error = error
        self.status = "failed"
        self._stopping = True
        if self._buffer is not None:
            self._buffer.put_nowait(None)

    # -- frames ----------------------------------------------------------------------------------------
    async def _on_text(self, text: str | bytes, route: str) -> None:
        try:
            frame = json.loads(text)
        except ValueError:
            log.warning("event stream: a frame that is not JSON was skipped")
            return
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            return
        now = time.monotonic()
        self._last_contact = now
        self._synced_at = now if self._synced.is_set() else self._synced_at
        self.stats.frames += 1
        ftype = frame["type"]
        fid = frame.get("id") if isinstance(frame.get("id"), str) else None
        epoch, seq = _position(fid, frame.get("seq"))
        data = frame.get("data")
        if ftype == "heartbeat":
            if epoch is not None and epoch == self._epoch and seq is not None and seq >= self._last_seq:
                self._last_seq = seq
                self.last_event_id = fid
            if self.include_heartbeats:
                await self._emit(StreamEvent("heartbeat", data, "stream", fid, seq, frame=frame))
            return
        if ftype == "snapshot":
            await self._on_snapshot(frame, data, fid, epoch, seq)
            return
        # a change frame
        if epoch is not None and seq is not None:
            if epoch == self._epoch:
                if seq <= self._last_seq:
                    self.stats.duplicates += 1
                    return
            else:
                if self._epoch is not None and self.verify_with_source:
                    # another Gateway process without a snapshot (the legacy route): what
                    # happened in between is confirmed over HTTP
                    self._schedule_verify_all()
                self._epoch = epoch
            self._last_seq = seq
            self.last_event_id = fid
        await self._on_change(ftype, data, frame, fid, seq)

    async def _on_snapshot(self, frame: dict[str, Any], data: Any, fid: str | None, epoch: str | None, seq: int | None) -> None:
        if not isinstance(data, dict) or data.get("topic") not in TOPIC_VALUES:
            return
        topic = data["topic"]
        if epoch is not None:
            self._epoch = epoch
        if seq is not None:
            self._last_seq = seq
        if fid:
            self.last_event_id = fid
        self.stats.snapshots += 1
        had_state = self._synced.is_set()
        items = data.get("items") or []
        changes: list[StreamEvent] = []
        world_id = data.get("world_id") or self.world_id
        if topic == "activation" and world_id:
            changed = self.state.replace_activation(world_id, [i for i in items if isinstance(i, dict)])
            local = self.state.activation_hash(world_id)
            changes = [StreamEvent("activation_updated", e, "snapshot", fid, seq, world_id) for e in changed]
        elif topic == "policy" and world_id:
            changed = self.state.replace_policies(world_id, [i for i in items if isinstance(i, dict)])
            local = self.state.policy_hash(world_id)
            changes = [StreamEvent("policy_updated", e, "snapshot", fid, seq, world_id) for e in changed]
        else:
            keys = []
            for item in items:
                if not isinstance(item, dict):
                    continue
                try:
                    key = normalise_queue_key(item["tags"], item["interval"], item.get("match_mode"))
                except (KeyError, ValueError, TypeError):
                    continue
                keys.append(key)
                if self.state.apply_queues(key, item.get("queues") or [], item.get("etag")):
                    changes.append(StreamEvent("queue_update", _queue_data(key, item.get("queues") or [], item.get("etag")),
                                               "snapshot", fid, seq))
            local = queue_snapshot_hash(h for h in (self.state.queue_hash(k) for k in keys) if h is not None)
        if data.get("state_hash") and data["state_hash"] != local:
            self.stats.hash_mismatches += 1
            log.warning("event stream: %s snapshot hash %s does not match its items (%s)", topic, data["state_hash"], local)
        await self._emit(StreamEvent("snapshot", data, "stream", fid, seq, world_id if topic != "queues" else None, frame))
        if had_state:
            for ev in changes:
                await self._emit(ev)
        self._pending_snapshots.discard(topic)
        if not self._pending_snapshots:
            self._mark_synced()
        if self.verify_with_source:
            self._schedule_verify(topic, world_id if topic != "queues" else None, min_interval=0.0)

    async def _on_change(self, ftype: str, data: Any, frame: dict[str, Any], fid: str | None, seq: int | None) -> None:
        if not isinstance(data, dict):
            return
        statehash = frame.get("statehash") if isinstance(frame.get("statehash"), str) else None
        if ftype == "activation_updated":
            world_id = str(data.get("world_id") or "")
            if not self.state.apply_activation(data):
                self.stats.duplicates += 1
                return
            await self._check_hash("activation", world_id, statehash, self.state.activation_hash(world_id))
            await self._emit(StreamEvent(ftype, data, "stream", fid, seq, world_id, frame))
        elif ftype == "policy_updated":
            world_id = str(data.get("world_id") or "")
            if not self.state.apply_policy(data):
                self.stats.duplicates += 1
                return
            await self._check_hash("policy", world_id, statehash, self.state.policy_hash(world_id))
            await self._emit(StreamEvent(ftype, data, "stream", fid, seq, world_id, frame))
        elif ftype == "queue_update":
            try:
                key = normalise_queue_key(data["tags"], data["interval"], data.get("match_mode"))
            except (KeyError, ValueError, TypeError):
                return
            if not self.state.apply_queues(key, data.get("queues") or [], data.get("etag")):
                self.stats.duplicates += 1
                return
            await self._check_hash("queues", None, statehash, self.state.queue_hash(key), key=key)
            await self._emit(StreamEvent(ftype, data, "stream", fid, seq, None, frame))
        elif ftype == "sentinel_weight":
            sid = data.get("sentinel_id")
            if isinstance(sid, str) and isinstance(data.get("weight"), (int, float)):
                self.state.apply_sentinel(sid, data["weight"])
            await self._emit(StreamEvent(ftype, data, "stream", fid, seq, None, frame))
        else:  # progress, queue_map and whatever else the Gateway adds
            await self._emit(StreamEvent(ftype, data, "stream", fid, seq, None, frame))

    async def _check_hash(self, topic: str, world_id: str | None, theirs: str | None, ours: str | None,
                          key: QueueKey | None = None) -> None:
        if theirs is None or theirs == ours:
            return
        self.stats.hash_mismatches += 1
        log.info("event stream: %s state hash differs from the Gateway's (%s vs %s); checking the source",
                 topic, (ours or "")[:12], theirs[:12])
        if self.verify_with_source:
            self._schedule_verify(topic, world_id, min_interval=1.0)
        else:
            self._resnapshot = True
            await self._drop_connection()

    def _mark_synced(self) -> None:
        self._synced_at = time.monotonic()
        self._synced.set()

    # -- the source of truth over HTTP ----------------------------------------------------------------------
    def _schedule_verify_all(self) -> None:
        for topic in self.topics:
            self._schedule_verify(topic, self.world_id if topic in _WORLD_TOPICS else None, min_interval=0.0)

    def _schedule_verify(self, topic: str, world_id: str | None, *, min_interval: float) -> None:
        key = (topic, world_id)
        running = self._verify_tasks.get(key)
        if running is not None and not running.done():
            return
        delay = self._last_verify.get(key, -1e9) + min_interval - time.monotonic()
        self._verify_tasks[key] = asyncio.create_task(self._verify_later(max(0.0, delay), topic, world_id),
                                                      name=f"qmtl-verify-{topic}")

    async def _verify_later(self, delay: float, topic: str, world_id: str | None) -> None:
        if delay > 0:  # checked moments ago: once more after the interval, not never
            await asyncio.sleep(delay)
        await self._verify(topic, world_id, "snapshot")

    async def _verify(self, topic: str, world_id: str | None, source: str) -> bool:
        """Compare with the source of truth over HTTP and take its entries where newer."""
        self._last_verify[(topic, world_id)] = time.monotonic()
        try:
            changes = await self._sync_topic(topic, world_id)
        except QmtlError as exc:
            log.info("event stream: cannot reach the source of truth for %s (%s)", topic, exc)
            return False
        self.stats.verifications += 1
        if changes:
            self.stats.corrections += 1
            log.info("event stream: %d %s entr%s corrected from the source of truth", len(changes), topic,
                     "y" if len(changes) == 1 else "ies")
        for ev in changes:
            await self._emit(StreamEvent(ev[0], ev[1], "reconcile" if source == "reconcile" else "snapshot",
                                         world_id=world_id))
        return True

    async def _sync_topic(self, topic: str, world_id: str | None) -> list[tuple[str, dict[str, Any]]]:
        c = self.client
        if topic == "activation" and world_id:
            try:
                entries = (await c.list_activations(world_id)).get("activations") or []
            except NotImplementedByGateway:
                # a Gateway without the whole-set route: every side known here (and this
                # stream's strategy) one by one
                sides = set(self.state.activation.get(world_id) or {})
                if self.strategy_id:
                    sides |= {(self.strategy_id, side) for side in SIDE_VALUES}
                held = self.state.activation.get(world_id) or {}
                entries = [await c.get_activation(world_id, sid, side) for sid, side in sorted(sides)]
                # a safe default says nothing; an inactive side not held here may never have
                # existed (the answer is the same): for the gate, absent is inactive anyway
                entries = [e for e in entries if not str(e.get("etag", "")).startswith("safe-")
                           and (e.get("active") or (e["strategy_id"], e["side"]) in held)]
            changed = self.state.merge_activation(world_id, entries)
            return [("activation_updated", e) for e in changed]
        if topic == "policy" and world_id:
            body = await c.list_policies(world_id)
            items = [{
                "type": "PolicyUpdated", "version": 1, "world_id": world_id, "policy_version": int(p["version"]),
                "checksum": p.get("checksum"), "status": p.get("status"), "ts": p.get("created_at"),
            } for p in body.get("policies") or []]
            truth = _policy_hash_of(world_id, items)
            if truth == self.state.policy_hash(world_id):
                return []
            return [("policy_updated", e) for e in self.state.replace_policies(world_id, items)]
        if topic == "queues":
            keys = list(self.queue_keys) or list(self.state.queues)
            out = []
            for key in keys:
                qbody = await c.queues_by_tag(list(key[0]), key[1], key[2])
                if self.state.apply_queues(key, qbody.get("queues") or [], qbody.get("etag")):
                    out.append(("queue_update", _queue_data(key, qbody.get("queues") or [], qbody.get("etag"))))
            return out
        return []

    async def reconcile(self) -> bool:
        """Bring the copy up to date over HTTP now (every topic); True when all answered."""
        ok = True
        for topic in self.topics:
            ok = await self._verify(topic, self.world_id if topic in _WORLD_TOPICS else None, "reconcile") and ok
        if ok:
            self.stats.reconciles += 1
            self._mark_synced()
        return ok

    async def _reconcile_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.reconcile_interval)
            down = self._down_since
            if self.status == "live" or down is None or time.monotonic() - down < self.reconcile_after:
                continue
            if await self.reconcile():
                # the copy moved on without the stream: resuming from the old position
                # could replay older frames over newer entries, so ask for a snapshot
                self._resnapshot = True

    # -- delivery ------------------------------------------------------------------------------------------
    async def _emit(self, event: StreamEvent) -> None:
        for listener in list(self._listeners):
            try:
                result = listener(event)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("event stream: a listener failed on %s", event.type)
        if self._buffer is not None:
            if self._buffer.qsize() >= self._max_buffer:
                with contextlib.suppress(asyncio.QueueEmpty):
                    self._buffer.get_nowait()
            self._buffer.put_nowait(event)


# -- helpers ---------------------------------------------------------------------------------------------
def _normalise_topics(topics: Iterable[str]) -> list[str]:
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


def _frame_type(text: str | bytes | None) -> str | None:
    if text is None:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc.get("type") if isinstance(doc, dict) else None


def _position(fid: str | None, seq: Any) -> tuple[str | None, int | None]:
    """``<epoch>.<seq>[.<suffix>]`` → (epoch, seq)."""
    if not fid:
        return None, seq if isinstance(seq, int) else None
    parts = fid.split(".")
    if len(parts) >= 2 and parts[1].isdigit():
        return parts[0], int(parts[1])
    return None, seq if isinstance(seq, int) else None


def _token_lifetime(desc: Mapping[str, Any]) -> float:
    """Seconds the token lives, from its own ``iat``/``exp`` (immune to clock skew), else
    from ``expires_at`` against the local clock."""
    import jwt

    try:
        claims = jwt.decode(desc["token"], options={"verify_signature": False})
        exp, iat = float(claims["exp"]), float(claims.get("iat") or 0)
        if iat and exp > iat:
            return exp - iat
    except (jwt.InvalidTokenError, KeyError, TypeError, ValueError):
        log.debug("event stream: the token's lifetime is not readable; using expires_at")
    expires = parse_ts(desc.get("expires_at"))
    if expires is not None:
        return max(1.0, expires - time.time())
    return 60.0


def _queue_data(key: QueueKey, queues: Iterable[str], etag: str | None) -> dict[str, Any]:
    data: dict[str, Any] = {"tags": list(key[0]), "interval": key[1], "match_mode": key[2], "queues": sorted(set(queues))}
    if etag:
        data["etag"] = etag
    return data


def _policy_hash_of(world_id: str, items: list[dict[str, Any]]) -> str:
    tmp = StreamState()
    tmp.replace_policies(world_id, items)
    return tmp.policy_hash(world_id)


AsyncListener = Callable[[StreamEvent], Awaitable[None]]
