"""The HTTP server's connection bounds (uvicorn), shared by every service.

uvicorn bounds what a request may do once its headers are in (``timeout_keep_alive`` for
idle keep-alive connections; the body read timeout is :class:`qmtl.contracts.limits.RequestLimits`'s)
but not a client that connects and sends its headers slowly, or never: such a client holds a
file descriptor forever, and enough of them starve the process (slowloris). Its
``limit_concurrency`` answers 503 to everyone above the cap — ``/health`` included. So each
service runs uvicorn with :func:`server_options`, whose HTTP protocol (uvicorn's httptools
protocol plus :class:`ConnectionGuard`) adds, from the service's ``limits`` section:

* **header timeout**: the request line and headers must arrive within ``header_timeout``
  seconds of the connection (or of the first byte of a keep-alive connection's next
  request); otherwise 408 problem+json and the connection is closed;
* **header size**: more than ``max_header_bytes`` before the headers end → 431 and close;
* **connection cap with headroom for health**: up to ``max_connections`` open HTTP
  connections are served normally (WebSocket streams, once upgraded, are bounded by the
  Gateway's ``events.max_connections`` instead); the next ``health_headroom`` ones may only ask for ``/health``,
  ``/ready`` or ``/metrics`` (anything else gets 503 problem+json with ``Retry-After`` and a
  close); beyond that, a new connection evicts the oldest connection still waiting for its
  headers (a slow client), or is closed at once when there is none. The process therefore
  holds at most ``max_connections + health_headroom`` client sockets, and a probe gets
  through while hundreds of slow clients hold connections.

Nothing is logged per refused connection (a flood would become a log flood): the guard
counts every refusal (``<service>_http_connections_refused_total{reason}``, on the service's
own registry) and logs one summary line per interval while refusals happen.
"""

from __future__ import annotations

import asyncio
import logging
import typing as t
from collections import Counter as Tally
from collections import OrderedDict

import httptools
from prometheus_client import Counter, Gauge
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from qmtl.contracts.limits import problem_body

log = logging.getLogger("qmtl.http")

HEALTH_PATHS = frozenset({"/health", "/ready", "/metrics"})

_REASONS = ("over_cap", "evicted", "header_timeout", "header_too_large", "health_only", "invalid_request")
_STATUS_TEXT = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


class ConnectionGuard:
    """Counts and bounds one server's connections; see the module docstring."""

    report_interval = 10.0

    def __init__(self, limits: t.Any, *, name: str = "http") -> None:
        self.limits = limits
        self.name = name  # the service: it prefixes the metric names (one name, one meaning across services)
        self.refused: Tally[str] = Tally()
        self._unreported: Tally[str] = Tally()
        self._report_handle: asyncio.TimerHandle | None = None
        self.pending: OrderedDict[int, GuardedProtocol] = OrderedDict()  # waiting for their headers, oldest first
        self.open = 0
        # registered on the service's registry by register_guard
        self.refused_total = Counter(f"{name}_http_connections_refused", "Connections refused or cut by the HTTP server's "
                                     "bounds (limits), by reason: over_cap, evicted, header_timeout, header_too_large, "
                                     "health_only, invalid_request", ["reason"], registry=None)
        for reason in _REASONS:
            self.refused_total.labels(reason)
        self.open_gauge = Gauge(f"{name}_http_open_connections", "HTTP connections this server holds open (WebSocket "
                                "streams are ws_subscribers, bounded by gateway.events.max_connections)", registry=None)
        self.open_gauge.set_function(lambda: self.open)

    @property
    def hard_cap(self) -> int:
        return self.limits.max_connections + self.limits.health_headroom

    def count(self, reason: str) -> None:
        self.refused[reason] += 1
        self.refused_total.labels(reason).inc()
        self._unreported[reason] += 1
        if self._report_handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._report_handle = loop.call_later(self.report_interval, self._report)

    def _report(self) -> None:
        self._report_handle = None
        if self._unreported:
            summary = ", ".join(f"{reason} {n}" for reason, n in sorted(self._unreported.items()))
            log.warning("%s: connections refused or cut in the last %.0f s: %s (open now: %d; limits: %d + %d for health)",
                        self.name, self.report_interval, summary, self.open, self.limits.max_connections, self.limits.health_headroom)
            self._unreported.clear()


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the guard's bounds (a subclass per server carries
    its guard as a class attribute: uvicorn instantiates the class itself)."""

    guard: ConnectionGuard

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = _QuietLogger(self.logger, self.guard)  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        guard = self.guard
        guard.open += 1
        self._counted = True
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        if guard.open > guard.hard_cap:
            victim = next(iter(guard.pending.values()), None)
            if victim is None:
                guard.count("over_cap")
                self.transport.abort()
                return
            guard.count("evicted")
            victim._drop_pending()
            victim.transport.abort()
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._uncount()
        self._drop_pending()
        super().connection_lost(exc)

    def _uncount(self) -> None:
        if getattr(self, "_counted", False):
            self._counted = False
            self.guard.open -= 1

    def handle_websocket_upgrade(self) -> None:
        # a WebSocket is the events component's to bound (gateway.events.max_connections):
        # from here on it is not an HTTP connection of this guard
        self._uncount()
        self._drop_pending()
        super().handle_websocket_upgrade()

    # -- waiting for headers ----------------------------------------------------------------
    def _await_headers(self) -> None:
        if self._header_timer is None:
            self._header_bytes = 0
            self._header_timer = self.loop.call_later(self.guard.limits.header_timeout, self._header_timeout)
            self.guard.pending[id(self)] = self

    def _drop_pending(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None
        self.guard.pending.pop(id(self), None)

    def _header_timeout(self) -> None:
        self._header_timer = None
        self.guard.pending.pop(id(self), None)
        if self.transport.is_closing():
            return
        self.guard.count("header_timeout")
        self._refuse(408, "Request Timeout",
                     f"the request headers did not arrive within {self.guard.limits.header_timeout:g} s (limits.header_timeout)",
                     {"limit": "header_timeout", "seconds": self.guard.limits.header_timeout})

    def data_received(self, data: bytes) -> None:
        waiting = self._header_timer is not None
        super().data_received(data)
        if waiting and self._header_timer is not None and not self.transport.is_closing():
            self._header_bytes += len(data)
            if self._header_bytes > self.guard.limits.max_header_bytes:
                self._drop_pending()
                self.guard.count("header_too_large")
                self._refuse(431, "Request Header Fields Too Large",
                             f"the request line and headers exceed {self.guard.limits.max_header_bytes} bytes (limits.max_header_bytes)",
                             {"limit": "max_header_bytes", "max_bytes": self.guard.limits.max_header_bytes})

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._await_headers()  # a keep-alive connection's next request: its headers are on the clock too

    def on_headers_complete(self) -> None:
        self._drop_pending()
        if self.guard.open > self.guard.limits.max_connections and not self.parser.should_upgrade():
            path = httptools.parse_url(self.url).path.decode("latin-1")
            if path not in HEALTH_PATHS:
                self.guard.count("health_only")
                saved = self.app
                self.app = _over_capacity(self.guard.limits.max_connections)
                try:
                    super().on_headers_complete()
                finally:
                    self.app = saved
                return
        super().on_headers_complete()

    def _refuse(self, status: int, title: str, detail: str, ext: dict) -> None:
        body = problem_body(status, title, detail, ext)
        head = b"HTTP/1.1 %d %s\r\ncontent-type: application/problem+json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % (
            status, _STATUS_TEXT[status], len(body))
        self.transport.write(head + body)
        self.transport.close()


class _QuietLogger:
    """uvicorn's logger, except that its per-connection warnings ("Invalid HTTP request
    received.", "Unsupported upgrade request.") are counted by the guard and summarised
    instead of logged one line per connection."""

    def __init__(self, logger: logging.Logger, guard: ConnectionGuard) -> None:
        self._logger = logger
        self._guard = guard

    def warning(self, msg: t.Any, *args: t.Any, **kwargs: t.Any) -> None:
        self._guard.count("invalid_request")

    def __getattr__(self, name: str) -> t.Any:
        return getattr(self._logger, name)


def _over_capacity(cap: int) -> t.Callable:
    async def app(scope: t.Any, receive: t.Any, send: t.Any) -> None:
        payload = problem_body(503, "Service Unavailable",
                               f"this server holds {cap} connections (limits.max_connections); only /health, /ready and /metrics are served above it",
                               {"limit": "max_connections"})
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/problem+json"), (b"content-length", str(len(payload)).encode()),
            (b"retry-after", b"1"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})

    return app


def server_options(guard: ConnectionGuard) -> dict[str, t.Any]:
    """uvicorn.Config keyword arguments that put ``guard`` (an app's ``guard``, built with it
    by :func:`qmtl.contracts.app.build_app` and registered on the service's registry) in
    front of every connection."""
    protocol = type("QmtlHttpProtocol", (GuardedProtocol,), {"guard": guard})
    return {
        "http": protocol,
        "timeout_keep_alive": guard.limits.keep_alive_timeout,
        "backlog": guard.limits.backlog,
    }


def register_guard(registry: t.Any, guard: ConnectionGuard) -> None:
    """Put ``guard``'s metrics on a service's registry (replacing the guard of an app built
    earlier on the same registry, so a service object may get a second app)."""
    previous = getattr(registry, "_qmtl_http_guard", None)
    if previous is not None:
        registry.unregister(previous.refused_total)
        registry.unregister(previous.open_gauge)
    registry.register(guard.refused_total)
    registry.register(guard.open_gauge)
    registry._qmtl_http_guard = guard


__all__ = ["ConnectionGuard", "GuardedProtocol", "HEALTH_PATHS", "register_guard", "server_options"]
