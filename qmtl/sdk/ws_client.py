"""``qmtl.sdk.ws_client.WebSocketClient``: the existing client of the Gateway's WebSocket,
kept with its constructor and behaviour so code written against it keeps working.

* ``WebSocketClient(url, *, on_message=None, token=None, max_retries=5, max_total_time=None,
  base_delay=0.5, backoff_factor=2.0, max_delay=8.0)`` — the keyword arguments of the
  Aug-2025 client (``max_retries=None`` retries without limit); ``await start()`` listens in
  the background, ``await stop()`` ends it. ``on_message`` may also be set after
  construction (``TagQueryManager`` does).
* A URL without a path gets ``/ws`` (the legacy route); ``http(s)://`` becomes ``ws(s)://``.
* ``token`` is sent as ``Authorization: Bearer <token>`` (a caller JWT, or the token of a
  ``POST /events/subscribe`` descriptor).
* Each text frame is parsed as JSON and passed to ``await on_message(data)`` (frames that are
  not JSON are skipped). Frames are CloudEvents; ``type`` names the event and ``data`` its
  body (the flat body of older frames is read when there is no ``data``).
* ``queue_topics`` and ``sentinel_weights`` track ``queue_update`` and ``sentinel_weight``
  frames: ``sentinel_weights[sentinel_id] = weight``; ``queue_topics`` maps a queue key
  ``"<sorted tags joined by ','>|<interval>|<match_mode>"`` to its queue list (and, for the
  older ``queue_created`` frames, a queue id to its topic).
* A lost connection is retried with exponential backoff (``base_delay`` times ``backoff_factor``
  per failure up to ``max_delay``, jittered)
  until ``max_retries`` consecutive attempts have failed or ``max_total_time`` seconds have
  passed since the first failure; a connection that opens resets the count. The Gateway's
  ``/ws`` accepts ``?last_event_id=``: the client passes the id of the last frame it saw, so
  a reconnect to the same Gateway process replays what was missed.

New code should prefer :class:`qmtl.sdk.EventStream` (snapshots, state hashes, token
refresh, HTTP reconciliation).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["WebSocketClient"]

log = logging.getLogger(__name__)


def _normalise_url(url: str) -> str:
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path if parts.path not in ("", "/") else "/ws"
    return urlunsplit(parts._replace(scheme=scheme, path=path))


class WebSocketClient:
    """Subscribe to the Gateway's WebSocket (``/ws`` by default)."""

    def __init__(
        self,
        url: str,
        *,
        on_message: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
        token: str | None = None,
        max_retries: int | None = 5,
        max_total_time: float | None = None,
        base_delay: float = 0.5,
        max_delay: float = 8.0,
        backoff_factor: float = 2.0,
    ) -> None:
        self.url = _normalise_url(url)
        self.on_message = on_message
        self.token = token
        self.max_retries = max_retries
        self.max_total_time = max_total_time
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.backoff_factor = backoff_factor
        self.queue_topics: dict[str, Any] = {}
        self.sentinel_weights: dict[str, float] = {}
        self.last_event_id: str | None = None
        self.connects = 0
        self._task: asyncio.Task[None] | None = None
        self._stop_event = asyncio.Event()
        self._ws: Any = None

    # -- frames ----------------------------------------------------------------------------------
    async def _handle(self, data: dict[str, Any]) -> None:
        event = data.get("type") or data.get("event")
        payload = data.get("data", data)
        if not isinstance(payload, dict):
            payload = {}
        if isinstance(data.get("id"), str) and data.get("specversion"):
            self.last_event_id = data["id"]
        if event == "queue_update":
            tags, interval = payload.get("tags"), payload.get("interval")
            if isinstance(tags, list) and interval is not None:
                key = f"{','.join(sorted({str(t) for t in tags}))}|{interval}|{payload.get('match_mode') or 'any'}"
                self.queue_topics[key] = list(payload.get("queues") or [])
        elif event == "queue_created":
            qid, topic = payload.get("queue_id"), payload.get("topic")
            if qid and topic:
                self.queue_topics[qid] = topic
        elif event == "sentinel_weight":
            sid, weight = payload.get("sentinel_id"), payload.get("weight")
            if sid is not None and weight is not None:
                try:
                    self.sentinel_weights[sid] = float(weight)
                except (TypeError, ValueError):
                    log.warning("invalid weight received for sentinel %s: %r", sid, weight)
        if self.on_message is not None:
            await self.on_message(data)

    # -- connection --------------------------------------------------------------------------------
    def _connect_url(self) -> str:
        if not self.last_event_id:
            return self.url
        parts = urlsplit(self.url)
        query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "last_event_id"]
        query.append(("last_event_id", self.last_event_id))
        return urlunsplit(parts._replace(query=urlencode(query)))

    async def _listen(self) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

        loop = asyncio.get_running_loop()
        failures = 0
        first_failure: float | None = None
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        while not self._stop_event.is_set():
            opened = False  # counts as opened once a frame arrived (a refusal is accept + close)
            try:
                async with connect(self._connect_url(), additional_headers=headers, proxy=None, max_size=None,
                                   open_timeout=10, close_timeout=2) as ws:
                    self._ws = ws
                    self.connects += 1
                    async for message in ws:
                        if not opened:
                            opened = True
                            failures, first_failure = 0, None
                        if isinstance(message, bytes):
                            message = message.decode("utf-8", "replace")
                        try:
                            data = json.loads(message)
                        except ValueError:
                            continue
                        if isinstance(data, dict):
                            await self._handle(data)
                        if self._stop_event.is_set():
                            break
            except asyncio.CancelledError:
                raise
            except (TimeoutError, OSError, InvalidHandshake, InvalidURI, ConnectionClosed) as exc:
                log.debug("WebSocketClient: %s: %s", type(exc).__name__, exc)
            finally:
                self._ws = None
            if self._stop_event.is_set():
                break
            if not opened:
                failures += 1
            if first_failure is None:
                first_failure = loop.time()
            if self.max_retries is not None and failures > self.max_retries:
                log.warning("WebSocketClient: giving up on %s after %d failed attempts", self.url, failures)
                break
            if self.max_total_time is not None and loop.time() - first_failure > self.max_total_time:
                log.warning("WebSocketClient: giving up on %s after %.1fs", self.url, loop.time() - first_failure)
                break
            cap = min(self.max_delay, self.base_delay * self.backoff_factor ** max(0, failures - 1))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), random.uniform(cap / 2, cap))

    async def start(self) -> None:
        """Start listening in the background."""
        if self._task is None or self._task.done():
            self._stop_event.clear()
            self._task = asyncio.create_task(self._listen())

    async def stop(self) -> None:
        """Stop the background listener and close the connection."""
        self._stop_event.set()
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2)
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=3.0)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            except Exception as exc:  # stopping must not raise what the listener hit
                log.debug("WebSocketClient: listener ended with %r", exc)
            finally:
                self._task = None
