"""The legacy HTTP callback to the Gateway: ``POST {gateway_callback_url}/callbacks/dag-event``.

Kept for compatibility next to the ControlBus (SPEC §5). Best-effort and never in the
way: :meth:`GatewayCallback.send` only puts the body on a bounded queue (dropping the
oldest body when full, counted) and one background task posts them in order, each
with a bounded timeout and a couple of retries with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import httpx

from qmtl.common import correlation, tracing

from .metrics import DagManagerMetrics

log = logging.getLogger(__name__)

CALLBACK_PATH = "/callbacks/dag-event"


class GatewayCallback:
    def __init__(
        self,
        base_url: str,
        *,
        metrics: DagManagerMetrics,
        timeout: float = 2.0,
        retries: int = 2,
        backoff: float = 0.2,
        queue_size: int = 1000,
        transport: httpx.AsyncBaseTransport | None = None,
        service_token: str = "",
        tracer_provider: Any = None,
    ) -> None:
        self.url = base_url.rstrip("/") + CALLBACK_PATH if base_url else ""
        self.metrics = metrics
        self.timeout = timeout
        self.retries = max(0, retries)
        self.backoff = backoff
        self._queue: asyncio.Queue[dict] = asyncio.Queue(maxsize=queue_size)
        self._transport = transport
        self._auth = {"X-QMTL-Service-Token": service_token} if service_token else {}
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task | None = None
        self.tracer_provider = tracer_provider  # traces the callbacks' HTTP requests when tracing is on

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    async def start(self) -> None:
        if not self.enabled or self._task is not None:
            return
        self._client = httpx.AsyncClient(timeout=self.timeout, transport=self._transport)
        tracing.instrument_httpx(self._client, self.tracer_provider)
        self._task = asyncio.create_task(self._run(), name="dagmanager-gateway-callback")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def send(self, event: str, data: Mapping[str, Any]) -> bool:
        """Queue ``{"event": event, "data": data}``; False when callbacks are off."""
        if not self.enabled:
            return False
        body = {"event": event, "data": dict(data)}
        item = {"body": body, "cid": correlation.get()}
        while True:
            try:
                self._queue.put_nowait(item)
                return True
            except asyncio.QueueFull:
                with contextlib.suppress(asyncio.QueueEmpty):
                    self._queue.get_nowait()
                    self._queue.task_done()
                    self.metrics.callbacks_dropped.inc()

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait until every queued callback was attempted (tests, shutdown)."""
        if self._task is None:
            return
        await asyncio.wait_for(self._queue.join(), timeout)

    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                await self._post(item["body"], item["cid"])
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one body stop the sender
                log.exception("gateway callback failed unexpectedly")
            finally:
                self._queue.task_done()

    async def _post(self, body: dict, cid: str | None) -> None:
        assert self._client is not None
        event = body["event"]
        headers = dict(self._auth)
        if cid:
            headers["X-Correlation-ID"] = cid
        for attempt in range(self.retries + 1):
            try:
                response = await self._client.post(self.url, json=body, headers=headers)
                if response.status_code < 300:
                    self.metrics.callbacks.labels(event, "ok").inc()
                    return
                if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                    self.metrics.callbacks.labels(event, "rejected").inc()
                    log.warning("gateway refused %s callback: HTTP %s %s", event, response.status_code, response.text[:200])
                    return
                why = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                why = f"{type(exc).__name__}: {exc}"
            if attempt < self.retries:
                await asyncio.sleep(self.backoff * (2**attempt))
        self.metrics.callbacks.labels(event, "failed").inc()
        log.warning("gateway %s callback to %s failed after %d attempt(s): %s", event, self.url, self.retries + 1, why)


__all__ = ["GatewayCallback", "CALLBACK_PATH"]
