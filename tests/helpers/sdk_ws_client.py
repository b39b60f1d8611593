"""A stand-in for the existing QMTL SDK's ``qmtl.sdk.ws_client.WebSocketClient``.

The real class lives in the QMTL SDK package, which cannot be installed here (``pip
download --no-deps qmtl`` finds no distribution on the package index this project uses).
This is a minimal reimplementation of its observable behaviour, written from the SDK's
published source, so the Gateway can be tested against what an *unmodified* client does:

* ``WebSocketClient(url, *, on_message=None, token=None)``; ``await start()`` runs a
  background listener, ``await stop()`` ends it;
* it connects with the ``websockets`` library to ``url`` exactly as given, sending the
  token (if any) as ``Authorization: Bearer <token>`` — nothing else in the handshake;
* it reads JSON text frames; a frame is dispatched on ``event`` or ``type`` with
  ``payload = frame.get("data", frame)``; ``sentinel_weight`` updates ``sentinel_weights``,
  ``queue_created`` updates ``queue_topics``; every decoded frame, of any type (unknown
  ones included), is passed to ``on_message``; undecodable frames are skipped;
* when the connection drops it reconnects with backoff until stopped (it never sends
  ``last_event_id``: an old client does not know about resuming).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import websockets


class WebSocketClient:
    def __init__(
        self,
        url: str,
        *,
        on_message: Callable[[dict], Awaitable[None]] | None = None,
        token: str | None = None,
        max_backoff: float = 1.0,
    ) -> None:
        self.url = url
        self.on_message = on_message
        self.token = token
        self.queue_topics: dict[str, str] = {}
        self.sentinel_weights: dict[str, float] = {}
        self.connections = 0
        self.close_codes: list[int | None] = []
        self._max_backoff = max_backoff
        self._task: asyncio.Task | None = None
        self._stop_event = asyncio.Event()

    async def _handle(self, data: dict) -> None:
        event = data.get("event") or data.get("type")
        payload = data.get("data", data)
        if event == "queue_created":
            qid, topic = payload.get("queue_id"), payload.get("topic")
            if qid and topic:
                self.queue_topics[qid] = topic
        elif event == "sentinel_weight":
            sid, weight = payload.get("sentinel_id"), payload.get("weight")
            if sid is not None and weight is not None:
                try:
                    self.sentinel_weights[sid] = float(weight)
                except (TypeError, ValueError):
                    pass
        if self.on_message:
            await self.on_message(data)

    async def _listen_once(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        async with websockets.connect(self.url, additional_headers=headers) as ws:
            self.connections += 1
            try:
                while not self._stop_event.is_set():
                    try:
                        msg = await ws.recv()
                    except websockets.ConnectionClosed:
                        break
                    try:
                        data = json.loads(msg)
                    except json.JSONDecodeError:
                        continue
                    await self._handle(data)
            finally:
                self.close_codes.append(ws.close_code)

    async def _listen(self) -> None:
        delay = 0.05
        while not self._stop_event.is_set():
            try:
                await self._listen_once()
                delay = 0.05
            except (OSError, websockets.WebSocketException):
                pass
            if self._stop_event.is_set():
                break
            await asyncio.sleep(delay)
            delay = min(self._max_backoff, delay * 2)

    async def start(self) -> None:
        if self._task is None or self._task.done():
            self._stop_event.clear()
            self._task = asyncio.create_task(self._listen())

    async def stop(self) -> None:
        self._stop_event.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
