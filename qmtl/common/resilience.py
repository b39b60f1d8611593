"""Budgets for calls to a backend: timeout, bounded retries with jittered backoff, and an
async circuit breaker (SPEC §4).

One :class:`AsyncCircuitBreaker` and one :class:`RetryPolicy` per backend. The breaker is
single-event-loop state (no locks): every method runs to completion without awaiting.

Breaker states::

    closed --(failure_threshold consecutive failures)--> open
    open   --(reset_timeout elapsed, evaluated lazily)--> half_open
    half_open: one probe at a time; success -> closed, failure -> open (timer restarts)

Results recorded while ``open`` come from calls that started before the breaker opened;
they are ignored so stragglers neither close the breaker early nor extend its timer.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "CLOSED",
    "DAGMANAGER_BUDGET",
    "HALF_OPEN",
    "OPEN",
    "WORLDSERVICE_BUDGET",
    "AsyncCircuitBreaker",
    "Budget",
    "CircuitOpen",
    "RetryPolicy",
]

T = TypeVar("T")

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


class CircuitOpen(Exception):
    """The breaker for ``backend`` refuses calls; try again after ``retry_after`` seconds."""

    def __init__(self, backend: str, retry_after: float) -> None:
        super().__init__(f"circuit for {backend!r} is open; retry after {retry_after:.3f}s")
        self.backend = backend
        self.retry_after = retry_after


class AsyncCircuitBreaker:
    """Consecutive-failure circuit breaker for one backend.

    ``on_state_change(name, old, new)`` is called on every transition (e.g. to set a gauge).
    """

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        reset_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        on_state_change: Callable[[str, str, str], None] | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if reset_timeout < 0:
            raise ValueError("reset_timeout must be >= 0")
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self._clock = clock
        self._on_state_change = on_state_change
        self._state = CLOSED
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_in_flight = False

    # -- state -------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """Current state; an expired ``open`` becomes ``half_open`` here (lazily)."""
        opened = self._opened_at  # set whenever the state is open
        if self._state == OPEN and opened is not None and self._clock() - opened >= self.reset_timeout:
            self._probe_in_flight = False
            self._transition(HALF_OPEN)
        return self._state

    @property
    def failures(self) -> int:
        """Consecutive failures since the last success."""
        return self._failures

    @property
    def opened_at(self) -> float | None:
        """Clock time the breaker last opened; None while closed."""
        return self._opened_at

    def retry_after(self) -> float:
        """Seconds until a call may be tried: 0 when closed or a probe slot is free."""
        state, opened = self.state, self._opened_at
        if state == OPEN and opened is not None:
            return max(0.0, opened + self.reset_timeout - self._clock())
        if state == HALF_OPEN and self._probe_in_flight:
            # Unknown until the probe ends; if it fails the breaker reopens for reset_timeout.
            return self.reset_timeout
        return 0.0

    def snapshot(self) -> dict[str, Any]:
        """``{"name", "state", "failures", "retry_after"}`` for ``/status``."""
        return {"name": self.name, "state": self.state, "failures": self._failures, "retry_after": self.retry_after()}

    # -- call protocol -----------------------------------------------------------------
    def before_call(self) -> None:
        """Admit a call or raise :class:`CircuitOpen`. In half_open, admits one probe."""
        state = self.state
        if state == CLOSED:
            return
        if state == HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return
        raise CircuitOpen(self.name, self.retry_after())

    def record_success(self) -> None:
        state = self.state
        if state == OPEN:
            return  # a straggler from before the breaker opened
        self._failures = 0
        self._probe_in_flight = False
        if state == HALF_OPEN:
            self._opened_at = None
            self._transition(CLOSED)

    def record_failure(self) -> None:
        state = self.state
        if state == OPEN:
            return  # a straggler from before the breaker opened
        self._failures += 1
        if state == HALF_OPEN or self._failures >= self.failure_threshold:
            self._probe_in_flight = False
            self._opened_at = self._clock()
            self._transition(OPEN)

    def release(self) -> None:
        """Give back an admitted call that ended without a verdict (e.g. it was cancelled).

        Frees the half_open probe slot without counting a success or a failure.
        """
        self._probe_in_flight = False

    def _transition(self, new: str) -> None:
        old, self._state = self._state, new
        if old != new and self._on_state_change is not None:
            self._on_state_change(self.name, old, new)


class RetryPolicy:
    """Per-attempt timeout plus bounded retries with "full jitter" exponential backoff.

    Retry delay before retry ``n`` (0-based) is ``uniform(0, min(backoff_max, backoff_base * 2**n))``
    (or the cap itself with ``jitter=False``).
    """

    def __init__(
        self,
        *,
        timeout: float,
        retries: int,
        backoff_base: float = 0.05,
        backoff_max: float = 1.0,
        jitter: bool = True,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.timeout = timeout
        self.retries = retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.jitter = jitter
        self._rng = rng if rng is not None else random.Random()
        self._sleep = sleep

    def delays(self) -> Iterator[float]:
        """The ``retries`` backoff delays, in order."""
        for attempt in range(self.retries):
            cap = min(self.backoff_max, self.backoff_base * 2**attempt)
            yield self._rng.uniform(0.0, cap) if self.jitter else cap

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        idempotent: bool,
        retry_on: Callable[[BaseException], bool],
        breaker: AsyncCircuitBreaker | None = None,
        timeout: float | None = None,
    ) -> T:
        """Run ``fn()`` under the budget and return its result (``timeout`` overrides the
        policy's per-attempt timeout for this call).

        * Each attempt runs under ``asyncio.timeout(self.timeout)``; a timeout raises TimeoutError.
        * A *transient* error is a TimeoutError or any exception for which ``retry_on`` is true.
          Transient errors count as breaker failures and are retried (idempotent calls only).
          Any other exception means the backend answered: it counts as a breaker success and
          propagates at once.
        * Non-idempotent calls get exactly one attempt.
        * :class:`CircuitOpen` from the breaker is raised at once (never retried); when it
          stops a retry, the previous attempt's error is its ``__cause__``.
        """
        delays = self.delays() if idempotent else iter(())
        last_exc: BaseException | None = None
        while True:
            if breaker is not None:
                try:
                    breaker.before_call()
                except CircuitOpen as exc:
                    raise exc from last_exc
            try:
                async with asyncio.timeout(self.timeout if timeout is None else timeout):
                    result = await fn()
            except Exception as exc:
                transient = isinstance(exc, TimeoutError) or retry_on(exc)
                if breaker is not None and transient:
                    breaker.record_failure()
                elif breaker is not None:
                    breaker.record_success()
                if not transient:
                    raise
                delay = next(delays, None)
                if delay is None:
                    raise
                last_exc = exc
            except BaseException:  # cancellation: no verdict on the backend
                if breaker is not None:
                    breaker.release()
                raise
            else:
                if breaker is not None:
                    breaker.record_success()
                return result
            await self._sleep(delay)


@dataclass(frozen=True, slots=True)
class Budget:
    """A backend's call budget: per-attempt timeout (seconds) and number of retries."""

    timeout: float
    retries: int

    def retry_policy(self, **kwargs: Any) -> RetryPolicy:
        """A :class:`RetryPolicy` with this budget (extra keyword arguments passed through)."""
        return RetryPolicy(timeout=self.timeout, retries=self.retries, **kwargs)


#: SPEC §4: WorldService 300 ms timeout, 2 retries with jittered backoff.
WORLDSERVICE_BUDGET = Budget(0.3, 2)
#: SPEC §4: DAG Manager 500 ms timeout, 1 retry.
DAGMANAGER_BUDGET = Budget(0.5, 1)


class Backoff:
    """Reconnect backoff for long-lived loops (bus consumers, producers): exponential from
    ``initial`` up to ``maximum`` seconds, jittered to 50–100 %, ``reset()`` after a success.
    (Request retries use :class:`RetryPolicy`, whose budget bounds the attempts.)"""

    def __init__(self, initial: float, maximum: float) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError("backoff needs 0 < initial <= maximum")
        self.initial = initial
        self.maximum = maximum
        self._attempt = 0

    def reset(self) -> None:
        self._attempt = 0

    def next(self) -> float:
        delay = min(self.maximum, self.initial * (2.0 ** min(self._attempt, 30)))
        self._attempt += 1
        return delay * random.uniform(0.5, 1.0)
