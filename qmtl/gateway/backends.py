"""HTTP calls from the Gateway to one backend (WorldService or DAG Manager), on a budget.

Each backend has its own timeout and retry budget (SPEC §4: WorldService 300 ms, 2 retries
with jittered backoff; DAG Manager 500 ms, 1 retry) and its own circuit breaker. Only
idempotent calls are retried. Every call carries the request's correlation id. Failures
become :class:`BackendUnavailable` (transport error, timeout, 5xx after retries, breaker
open); any other answer, including 4xx, is returned to the caller to interpret.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from qmtl.common import correlation
from qmtl.common.resilience import AsyncCircuitBreaker, CircuitOpen, RetryPolicy

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

    @classmethod
    def create(cls, registry: CollectorRegistry) -> BackendMetrics:
        return cls(
            requests=Counter("gateway_backend_requests", "Calls from the Gateway to a backend", ["backend", "status"], registry=registry),
            errors=Counter("gateway_proxy_errors", "Failed or error-status backend calls by backend and status", ["backend", "status"], registry=registry),
            latency=Histogram("gateway_backend_latency_ms", "Backend call latency (ms), retries included", ["backend"], registry=registry,
                              buckets=(1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 1000, 2000)),
            breaker_state=Gauge("gateway_circuit_breaker_state", "Breaker state per backend: 0 closed, 1 half-open, 2 open", ["backend"], registry=registry),
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
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.metrics = metrics
        self.breaker = AsyncCircuitBreaker(
            name, failure_threshold=failure_threshold, reset_timeout=reset_timeout, on_state_change=self._on_state
        )
        self.policy = RetryPolicy(timeout=timeout, retries=retries)
        self.client = client or httpx.AsyncClient(
            base_url=self.base_url,
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
            timeout=httpx.Timeout(timeout * 4),
        )
        self.default_headers = dict(default_headers or {})
        if metrics:
            metrics.breaker_state.labels(name).set(0)

    def _on_state(self, name: str, old: str, new: str) -> None:
        log.warning("circuit breaker %s: %s -> %s", name, old, new)
        if self.metrics:
            self.metrics.breaker_state.labels(name).set(_STATE_VALUE.get(new, 0))

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
    ) -> httpx.Response:
        """One call on the budget; raises BackendUnavailable when the backend cannot answer."""
        if idempotent is None:
            idempotent = method.upper() in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS")
        hdrs = dict(self.default_headers)
        if headers:
            hdrs.update(headers)
        cid = correlation.get()
        if cid:
            hdrs[correlation.HEADER] = cid

        async def attempt() -> httpx.Response:
            resp = await self.client.request(method, path, params=params, json=json, content=content, headers=hdrs)
            if resp.status_code >= 500 or resp.status_code == 429:
                raise _Retryable(resp)
            return resp

        def retry_on(exc: BaseException) -> bool:
            return isinstance(exc, (_Retryable, httpx.TransportError))

        started = time.perf_counter()
        status = "error"
        try:
            resp = await self.policy.call(attempt, idempotent=idempotent, retry_on=retry_on, breaker=self.breaker)
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
            raise BackendUnavailable(self.name, f"no answer within {self.policy.timeout * 1000:.0f} ms") from exc
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
        snap = self.breaker.snapshot()
        snap["url"] = self.base_url
        snap["timeout_ms"] = int(self.policy.timeout * 1000)
        snap["retries"] = self.policy.retries
        return snap

    async def close(self) -> None:
        await self.client.aclose()
