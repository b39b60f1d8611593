"""HTTP calls from the Gateway to one backend (WorldService or DAG Manager), on a budget.

Each backend has its own timeout and retry budget (SPEC §4: WorldService 300 ms, 2 retries
with jittered backoff; DAG Manager 500 ms, 1 retry) and its own circuit breaker — or, given
the backend's operations (``operations``: an :class:`~qmtl.contracts.limits.OperationTable`
of its spec), one breaker per operation, so that failures of one operation (one caller
flooding ``GET /worlds`` until WorldService times out, say) refuse that operation only and
not every other caller's decides and writes. The backend's state in ``/status`` and in
``gateway_circuit_breaker_state`` is then its worst operation's. Only
idempotent calls are retried. Every call carries the request's correlation id. Failures
become :class:`BackendUnavailable` (transport error, timeout, 5xx after retries, breaker
open); any other answer, including 4xx, is returned to the caller to interpret. The breakers
read ``monotonic`` (a test's ``ManualClock.monotonic`` to advance through a cool-off).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from qmtl.common import correlation, tracing
from qmtl.common.resilience import AsyncCircuitBreaker, CircuitOpen, RetryPolicy
from qmtl.gateway.transport import DirectRequests, LeanTransport

log = logging.getLogger(__name__)

_STATE_VALUE = {"closed": 0, "half_open": 1, "open": 2}


class BackendUnavailable(Exception):
    """The backend could not answer usefully. ``response`` is its last answer when it did
    answer (a 5xx or 429 after the retries), so a proxy can pass its problem on."""

    def __init__(self, backend: str, reason: str, retry_after: float = 1.0, response: httpx.Response | None = None) -> None:
        super().__init__(f"{backend} unavailable: {reason}")
        self.backend = backend
        self.reason = reason
        self.retry_after = retry_after
        self.response = response


class _Retryable(Exception):
    """A 5xx answer (or 429) that may succeed on retry."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


@dataclass
class BackendMetrics:
    requests: Counter
    errors: Counter
    latency: Histogram
    breaker_state: Gauge
    operation_breaker_state: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> BackendMetrics:
        return cls(
            requests=Counter("gateway_backend_requests", "Calls from the Gateway to a backend", ["backend", "status"], registry=registry),
            errors=Counter("gateway_proxy_errors", "Failed or error-status backend calls by backend and status", ["backend", "status"], registry=registry),
            latency=Histogram("gateway_backend_latency_ms", "Backend call latency (ms), retries included", ["backend"], registry=registry,
                              buckets=(1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 1000, 2000)),
            breaker_state=Gauge("gateway_circuit_breaker_state", "Breaker state per backend (its worst operation's when breakers "
                                "are per operation): 0 closed, 1 half-open, 2 open", ["backend"], registry=registry),
            operation_breaker_state=Gauge("gateway_circuit_breaker_operation_state", "Breaker state per backend operation (method and "
                                          "route of its spec): 0 closed, 1 half-open, 2 open", ["backend", "operation"], registry=registry),
        )


class Backend:
    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        timeout: float,
        retries: int,
        failure_threshold: int = 5,
        reset_timeout: float = 10.0,
        metrics: BackendMetrics | None = None,
        client: httpx.AsyncClient | None = None,
        default_headers: Mapping[str, str] | None = None,
        operations: Any = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.metrics = metrics
        self._failure_threshold, self._reset_timeout, self._monotonic = failure_threshold, reset_timeout, monotonic  # the breakers' clock
        self.breaker = self._new_breaker(name)
        self.operations = operations  # an OperationTable: one breaker per operation
        self._breakers: dict[str, AsyncCircuitBreaker] = {}
        self.policy = RetryPolicy(timeout=timeout, retries=retries)
        # Our own client sends through the lean transport directly (see :meth:`request`); a
        # client injected, or put in its place later (tests: httpx.MockTransport), is used as given.
        self._direct: tuple[httpx.AsyncClient, LeanTransport, DirectRequests | None] | None = None
        if client is None:
            lean = LeanTransport(max_connections=200, max_keepalive=50)
            # trust_env=False: a backend is called at its configured URL, never through a proxy
            # from HTTP_PROXY/ALL_PROXY (the direct send below would not honour one either)
            client = httpx.AsyncClient(base_url=self.base_url, transport=lean, timeout=httpx.Timeout(timeout * 4), trust_env=False)
            self._direct = (client, lean, DirectRequests(client))
        self.client = client
        self.default_headers = dict(default_headers or {})
        if metrics:
            metrics.breaker_state.labels(name).set(0)

    def _new_breaker(self, name: str) -> AsyncCircuitBreaker:
        return AsyncCircuitBreaker(name, failure_threshold=self._failure_threshold, reset_timeout=self._reset_timeout,
                                   clock=self._monotonic, on_state_change=self._on_state)

    def _on_state(self, name: str, old: str, new: str) -> None:
        log.warning("circuit breaker %s: %s -> %s", name, old, new)
        if self.metrics:
            if self.operations is None:
                self.metrics.breaker_state.labels(self.name).set(_STATE_VALUE.get(new, 0))
                return
            self.metrics.operation_breaker_state.labels(self.name, name.partition(" ")[2] or name).set(_STATE_VALUE.get(new, 0))
            self.metrics.breaker_state.labels(self.name).set(_STATE_VALUE.get(self._worst().state, 0))

    def breaker_for(self, method: str, path: str) -> AsyncCircuitBreaker:
        """The breaker guarding this call: the backend's, or its operation's."""
        if self.operations is None:
            return self.breaker
        found = self.operations.find(method.upper(), path.split("?", 1)[0])
        if found is None:
            return self.breaker  # not an operation of the backend's spec: the backend-wide breaker
        key = f"{method.upper()} {found[0]}"
        breaker = self._breakers.get(key)
        if breaker is None:
            breaker = self._breakers[key] = self._new_breaker(f"{self.name} {key}")
        return breaker

    def _worst(self) -> AsyncCircuitBreaker:
        candidates = [self.breaker, *self._breakers.values()]
        return max(candidates, key=lambda b: (_STATE_VALUE.get(b.state, 0), b.failures))

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        """One call on the budget (``timeout``: this call's per-attempt timeout instead of the
        backend's, e.g. a diff budget that scales with the DAG); raises BackendUnavailable
        when the backend cannot answer."""
        if idempotent is None:
            idempotent = method.upper() in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS")
        hdrs = dict(self.default_headers)
        if headers:
            hdrs.update(headers)
        cid = correlation.get()
        if cid:
            hdrs[correlation.HEADER] = cid

        per_call = httpx.USE_CLIENT_DEFAULT if timeout is None else httpx.Timeout(timeout * 4)  # the budget cuts first

        async def attempt() -> httpx.Response:
            client = self.client
            if self._direct is not None and self._direct[0] is client:
                plain = self._direct[2]
                message = None
                if plain is not None and params is None:
                    message = plain.message(method, path, json=json, content=content, headers=hdrs)
                if plain is not None and message is not None:  # the same bytes, without building httpx's request objects
                    limit = self.policy.timeout * 4 if timeout is None else timeout * 4
                    resp = await self._send_plain(self._direct[1], plain.origin, message, method == "HEAD", limit)
                else:
                    resp = await self._send_direct(self._direct[1], client.build_request(
                        method, path, params=params, json=json, content=content, headers=hdrs, timeout=per_call))
            else:
                resp = await client.request(method, path, params=params, json=json, content=content, headers=hdrs, timeout=per_call)
            if resp.status_code >= 500 or resp.status_code == 429:
                raise _Retryable(resp)
            return resp

        def retry_on(exc: BaseException) -> bool:
            return isinstance(exc, (_Retryable, httpx.TransportError))

        started = time.perf_counter()
        status = "error"
        try:
            resp = await self.policy.call(attempt, idempotent=idempotent, retry_on=retry_on, breaker=self.breaker_for(method, path),
                                          timeout=timeout)
            status = str(resp.status_code)
            if resp.status_code >= 400 and self.metrics:
                self.metrics.errors.labels(self.name, status).inc()
            return resp
        except CircuitOpen as exc:
            status = "circuit_open"
            self._count_error(status)
            raise BackendUnavailable(self.name, "circuit breaker open", exc.retry_after) from exc
        except TimeoutError as exc:
            status = "timeout"
            self._count_error(status)
            budget = self.policy.timeout if timeout is None else timeout
            raise BackendUnavailable(self.name, f"no answer within {budget * 1000:.0f} ms") from exc
        except _Retryable as exc:
            status = str(exc.response.status_code)
            self._count_error(status)
            raise BackendUnavailable(self.name, f"answered HTTP {exc.response.status_code}", response=exc.response) from exc
        except httpx.TransportError as exc:
            status = "connect_error"
            self._count_error(status)
            raise BackendUnavailable(self.name, f"{type(exc).__name__}: {exc}") from exc
        finally:
            if self.metrics:
                self.metrics.requests.labels(self.name, status).inc()
                self.metrics.latency.labels(self.name).observe((time.perf_counter() - started) * 1000)

    @staticmethod
    async def _send_direct(transport: LeanTransport, request: httpx.Request) -> httpx.Response:
        """What ``AsyncClient.send`` does for our client, without the layers it does not use:
        no auth, no redirects followed (httpx's default, so none is lost), no cookie jar
        (a backend sets none; extracting them was ~5 % of an uncached decide, py-spy), no
        event hooks. The request was built by the client (base URL, default headers and
        timeouts applied), and the answer is read whole, as ``send`` reads it."""
        response = await transport.handle_async_request(request)
        response.request = request
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    def instrument(self, tracer_provider: Any) -> None:
        """Client spans and ``traceparent`` on this backend's calls (``tracing.instrument_httpx``:
        the instrumentation wraps the client's transport, so with a provider every call goes
        through the transport's own entry point, never the plain path's bytes)."""
        if tracer_provider is None:
            return
        tracing.instrument_httpx(self.client, tracer_provider)
        if self._direct is not None:
            self._direct = (self._direct[0], self._direct[1], None)

    @staticmethod
    async def _send_plain(transport: LeanTransport, origin: tuple[str, int], message: bytes, head_only: bool,
                          limit: float) -> httpx.Response:
        """:meth:`_send_direct` for a request built by :class:`DirectRequests` (the answer has
        no ``request`` attached: nothing here reads it)."""
        status, headers, content = await transport.exchange(origin, message, head_only=head_only, connect_timeout=limit,
                                                            read_timeout=limit)
        response = httpx.Response(status, headers=headers, stream=httpx.ByteStream(content), extensions={"http_version": b"HTTP/1.1"})
        response.read()
        return response

    def _count_error(self, status: str) -> None:
        if self.metrics:
            self.metrics.errors.labels(self.name, status).inc()

    async def probe(self, path: str = "/health") -> bool:
        """A health check outside the retry budget (one short attempt, no breaker effect)."""
        try:
            resp = await self.client.get(path, timeout=self.policy.timeout * 2)
            return resp.status_code < 500
        except (httpx.HTTPError, OSError):
            return False

    def snapshot(self) -> dict:
        snap = self._worst().snapshot()
        snap["name"] = self.name
        if self.operations is not None:
            snap["operations"] = {b.name.partition(" ")[2]: b.state for b in self._breakers.values() if b.state != "closed"}
        snap["url"] = self.base_url
        snap["timeout_ms"] = int(self.policy.timeout * 1000)
        snap["retries"] = self.policy.retries
        return snap

    async def close(self) -> None:
        await self.client.aclose()
