"""TagQueryManager: keeps every TagQueryNode's upstream queues current.

1. :meth:`TagQueryManager.resolve` asks ``GET /queues/by_tag`` for each node's key
   ``(tags, interval, match_mode)`` and sets the node's queues.
2. :meth:`TagQueryManager.start` then follows changes on the descriptor stream (an
   :class:`~qmtl.sdk.EventStream` on the ``queues`` topic with the nodes' keys, which
   itself reconnects, resumes and reconciles over HTTP while it is down).
3. When no descriptor can be had (``POST /events/subscribe`` unavailable: not built, 404,
   503, unreachable), it falls back to the legacy ``GET /queues/watch`` stream per key plus
   an HTTP reconcile every ``reconcile_interval`` seconds, and keeps trying to get a
   descriptor every ``upgrade_interval`` seconds to move back to the event stream.

``mode`` says which of ``stream`` | ``watch`` | ``ws`` is in use.

Aug-2025 code keeps working unchanged (``qmtl.sdk.tagquery_manager`` is the old import path):
``TagQueryManager(gateway_url=None, *, ws_client=None, world_id=None, strategy_id=None)``
with a URL string (a :class:`GatewayClient` is made and closed with the manager) or no
Gateway at all, ``register``/``unregister`` of nodes that expose ``query_tags``,
``interval``, ``match_mode`` (a string or an enum with ``.value``) and ``update_queues``,
``await resolve_tags(offline=False)``, ``await handle_message(frame)`` (a ``queue_update``
as ``{"event"|"type": ..., "data": {...}}`` or flat), ``await start()``, ``await stop()``.
Given a ``ws_client`` (:class:`~qmtl.sdk.ws_client.WebSocketClient`), the manager becomes
its ``on_message``, starts it, and reconciles over ``/queues/by_tag`` every
``reconcile_interval`` seconds (``mode == "ws"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
from collections.abc import Callable, Iterable
from typing import Any, Self

from qmtl.common.tasks import detach

from .client import GatewayClient
from .dag import Dag, TagQueryNode
from .errors import ProblemError, QmtlError
from .state import QueueKey, normalise_queue_key
from .stream import EventStream, StreamEvent, StreamOptions
from .ws_client import WebSocketClient

__all__ = ["TagQueryManager"]

log = logging.getLogger(__name__)

UpdateCallback = Callable[[TagQueryNode, list[str]], Any]


class TagQueryManager:
    def __init__(
        self,
        client: GatewayClient | str | None = None,
        *,
        ws_client: WebSocketClient | None = None,
        world_id: str | None = None,
        strategy_id: str | None = None,
        stream: EventStream | None = None,
        on_update: UpdateCallback | None = None,
        reconcile_interval: float = 5.0,
        upgrade_interval: float = 30.0,
        stream_options: StreamOptions | dict[str, Any] | None = None,
        gateway_url: str | None = None,
    ) -> None:
        if client is None and gateway_url is not None:
            client = gateway_url
        self._own_client = isinstance(client, str)
        self.client: GatewayClient | None = GatewayClient(client) if isinstance(client, str) else client
        self.gateway_url = self.client.base_url if self.client is not None else None
        self.ws_client = ws_client
        if ws_client is not None:
            ws_client.on_message = self.handle_message
        self.world_id = world_id
        self.strategy_id = strategy_id
        self.stream = stream
        self._own_stream = stream is None
        self.on_update = on_update
        self.reconcile_interval = reconcile_interval
        self.upgrade_interval = upgrade_interval
        # the tuning of the stream it makes (a dict of EventStream keywords still works)
        self.stream_options: StreamOptions | dict[str, Any] = (
            stream_options if isinstance(stream_options, StreamOptions) else dict(stream_options or {}))
        self.nodes: dict[QueueKey, list[TagQueryNode]] = {}
        self.mode: str | None = None  # stream | watch
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.updates = 0

    # -- nodes ---------------------------------------------------------------------------------
    def register(self, *items: TagQueryNode | Dag | Any) -> None:
        for item in items:
            nodes = item.tag_query_nodes() if isinstance(item, Dag) else [item]
            for node in nodes:
                key = _node_key(node)
                bucket = self.nodes.setdefault(key, [])
                if all(n is not node for n in bucket):
                    bucket.append(node)

    def unregister(self, node: Any) -> None:
        """Stop updating ``node`` (its key is forgotten with its last node)."""
        key = _node_key(node)
        bucket = self.nodes.get(key)
        if bucket is not None:
            bucket[:] = [n for n in bucket if n is not node]
            if not bucket:
                del self.nodes[key]

    @property
    def keys(self) -> list[QueueKey]:
        return list(self.nodes)

    def _apply(self, key: QueueKey, queues: Iterable[str]) -> None:
        queues = sorted(set(queues))
        for node in self.nodes.get(key, []):
            if node.update_queues(list(queues)) is not False:  # older nodes return None
                self.updates += 1
                if self.on_update is not None:
                    result = self.on_update(node, list(queues))
                    if inspect.isawaitable(result):
                        detach(result)

    # -- resolution ------------------------------------------------------------------------------
    async def resolve(self) -> None:
        """Set every node's queues from ``GET /queues/by_tag`` now."""
        if self.client is None:
            raise QmtlError("this TagQueryManager has no Gateway to ask (gateway_url was None)")
        for key in self.keys:
            body = await self.client.queues_by_tag(list(key[0]), key[1], key[2])
            self._apply(key, body.get("queues") or [])

    async def resolve_tags(self, *, offline: bool = False) -> None:
        """The Aug-2025 name of :meth:`resolve`; ``offline`` (or no Gateway) empties every node's queues."""
        if offline or self.client is None:
            for nodes in self.nodes.values():
                for node in nodes:
                    node.update_queues([])
            return
        await self.resolve()

    async def handle_message(self, data: Any) -> None:
        """Apply one WebSocket frame (a ``queue_update`` or a queues ``snapshot``; others are ignored)."""
        if not isinstance(data, dict):
            return
        payload = data.get("data", data)
        if isinstance(payload, dict):
            self._on_event(StreamEvent(type=data.get("type") or data.get("event") or "", data=payload))

    # -- following -------------------------------------------------------------------------------
    async def start(self) -> Self:
        """Resolve every node, then follow changes (event stream, or the watch fallback)."""
        self._stopping = False
        if self.client is None:  # no Gateway (Aug-2025 offline use): only a given ws_client
            self.mode = "ws" if self.ws_client is not None else None
            if self.ws_client is not None:
                await self.ws_client.start()
            return self
        await self.resolve()
        if self.ws_client is not None:
            await self.ws_client.start()
            self.mode = "ws"
            self._tasks = [asyncio.create_task(self._reconcile_loop(), name="qmtl-tagquery-reconcile")]
            return self
        if await self._start_stream():
            self.mode = "stream"
        else:
            self.mode = "watch"
            self._start_watch()
        return self

    def _gateway(self) -> GatewayClient:
        """The Gateway client of the following modes (``start`` never enters them without one)."""
        if self.client is None:
            raise RuntimeError("this TagQueryManager has no Gateway to follow queues from")
        return self.client

    async def _start_stream(self) -> bool:
        if self.stream is not None and not self._own_stream:
            await self.stream.add_queue_keys(self.keys)
            self.stream.add_listener(self._on_event)
            return True
        opts = self.stream_options
        stream = EventStream(
            self._gateway(), topics=["queues"], queue_keys=self.keys, world_id=None, strategy_id=self.strategy_id,
            on_event=self._on_event, **({"options": opts} if isinstance(opts, StreamOptions) else opts),
        )
        try:
            # a descriptor must be had now; the stream handles every later outage itself
            await stream.start(require_descriptor=True)
        except (ProblemError, QmtlError) as exc:
            log.warning("TagQueryManager: no event-stream descriptor (%s); falling back to /queues/watch", exc)
            return False
        self.stream = stream
        return True

    def _on_event(self, event: StreamEvent) -> None:
        if event.type == "snapshot" and isinstance(event.data, dict) and event.data.get("topic") == "queues":
            for item in event.data.get("items") or []:
                try:
                    key = normalise_queue_key(item["tags"], item["interval"], item.get("match_mode"))
                except (KeyError, ValueError, TypeError):
                    continue
                self._apply(key, item.get("queues") or [])
        elif event.type == "queue_update" and isinstance(event.data, dict):
            try:
                key = normalise_queue_key(event.data["tags"], event.data["interval"], event.data.get("match_mode"))
            except (KeyError, ValueError, TypeError):
                return
            self._apply(key, event.data.get("queues") or [])

    def _start_watch(self) -> None:
        self._tasks = [asyncio.create_task(self._watch(key), name=f"qmtl-watch-{i}") for i, key in enumerate(self.keys)]
        self._tasks.append(asyncio.create_task(self._reconcile_loop(), name="qmtl-tagquery-reconcile"))
        self._tasks.append(asyncio.create_task(self._upgrade_loop(), name="qmtl-tagquery-upgrade"))

    async def _watch(self, key: QueueKey) -> None:
        failures = 0
        while not self._stopping:
            try:
                async for body in self._gateway().watch_queues(list(key[0]), key[1], key[2]):
                    failures = 0
                    self._apply(key, body.get("queues") or [])
            except QmtlError as exc:
                log.info("TagQueryManager: /queues/watch for %s failed (%s)", key, exc)
            failures += 1
            cap = min(5.0, 0.1 * 2 ** min(failures, 6))
            await asyncio.sleep(random.uniform(cap / 2, cap))

    async def _reconcile_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.reconcile_interval)
            with contextlib.suppress(QmtlError):
                await self.resolve()

    async def _upgrade_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.upgrade_interval)
            if await self._start_stream():
                log.info("TagQueryManager: event stream available again; leaving /queues/watch")
                self.mode = "stream"
                current = asyncio.current_task()
                others = [t for t in self._tasks if t is not current]
                for t in others:
                    t.cancel()
                await asyncio.gather(*others, return_exceptions=True)
                self._tasks = []
                return

    async def stop(self) -> None:
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.stream is not None and self._own_stream:
            await self.stream.stop()
            self.stream = None
        if self.ws_client is not None:
            await self.ws_client.stop()
        if self._own_client and self.client is not None:
            await self.client.aclose()
            self.client = None
            self._own_client = False

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _node_key(node: Any) -> QueueKey:
    """A node's queue key: ours (``query_key``) or an Aug-2025 node (``query_tags``, ``interval``, ``match_mode``)."""
    if isinstance(node, TagQueryNode):
        return normalise_queue_key(*node.query_key)
    tags = getattr(node, "query_tags", None)
    if tags is None or not callable(getattr(node, "update_queues", None)):
        raise TypeError(f"expected a TagQueryNode or a Dag, got {type(node).__name__}")
    mode = getattr(node, "match_mode", None)
    mode = getattr(mode, "value", mode)  # an enum of that era, or a string
    return normalise_queue_key(list(tags), getattr(node, "interval", None), mode)
