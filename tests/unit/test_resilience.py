import asyncio
import random

import pytest

from qmtl.common.resilience import (
    DAGMANAGER_BUDGET,
    WORLDSERVICE_BUDGET,
    AsyncCircuitBreaker,
    Budget,
    CircuitOpen,
    RetryPolicy,
)


class FakeClock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class Transient(Exception):
    pass


class Permanent(Exception):
    pass


def is_transient(exc):
    return isinstance(exc, Transient)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def changes():
    return []


@pytest.fixture
def breaker(clock, changes):
    return AsyncCircuitBreaker(
        "ws", failure_threshold=3, reset_timeout=10.0, clock=clock, on_state_change=lambda *a: changes.append(a)
    )


# -- breaker --------------------------------------------------------------------------


def test_opens_after_consecutive_failures(breaker, clock, changes):
    assert breaker.state == "closed" and breaker.opened_at is None
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == "closed" and breaker.failures == 2
    breaker.before_call()  # still admitted
    breaker.record_failure()
    assert breaker.state == "open"
    assert breaker.opened_at == clock.now
    assert changes == [("ws", "closed", "open")]
    with pytest.raises(CircuitOpen) as info:
        breaker.before_call()
    assert info.value.backend == "ws"
    assert info.value.retry_after == pytest.approx(10.0)


def test_success_resets_consecutive_count(breaker):
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    assert breaker.failures == 0
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == "closed"


def trip(breaker):
    for _ in range(breaker.failure_threshold):
        breaker.record_failure()
    assert breaker.state == "open"


def test_half_open_after_reset_timeout_lazily(breaker, clock, changes):
    trip(breaker)
    clock.advance(9.5)
    assert breaker.state == "open"
    assert breaker.snapshot() == {"name": "ws", "state": "open", "failures": 3, "retry_after": pytest.approx(0.5)}
    clock.advance(0.5)
    assert breaker.state == "half_open"
    assert changes[-1] == ("ws", "open", "half_open")


def test_half_open_allows_one_probe_then_closes_on_success(breaker, clock, changes):
    trip(breaker)
    clock.advance(10)
    breaker.before_call()  # the probe
    with pytest.raises(CircuitOpen):
        breaker.before_call()  # a concurrent caller
    breaker.record_success()
    assert breaker.state == "closed"
    assert breaker.failures == 0 and breaker.opened_at is None
    assert changes[-1] == ("ws", "half_open", "closed")
    breaker.before_call()
    breaker.before_call()


def test_half_open_failure_reopens_and_restarts_timer(breaker, clock, changes):
    trip(breaker)
    clock.advance(15)
    breaker.before_call()
    breaker.record_failure()
    assert breaker.state == "open"
    assert breaker.opened_at == clock.now
    assert changes[-2:] == [("ws", "open", "half_open"), ("ws", "half_open", "open")]
    clock.advance(9.9)
    with pytest.raises(CircuitOpen) as info:
        breaker.before_call()
    assert info.value.retry_after == pytest.approx(0.1)
    clock.advance(0.1)
    breaker.before_call()  # probe admitted again


def test_results_while_open_are_ignored(breaker, clock):
    trip(breaker)
    opened = breaker.opened_at
    clock.advance(5)
    breaker.record_success()  # a straggler that started before the breaker opened
    breaker.record_failure()
    assert breaker.state == "open" and breaker.opened_at == opened


def test_release_frees_the_probe_slot(breaker, clock):
    trip(breaker)
    clock.advance(10)
    breaker.before_call()
    breaker.release()
    assert breaker.state == "half_open"
    breaker.before_call()


def test_snapshot_closed(breaker):
    breaker.record_failure()
    assert breaker.snapshot() == {"name": "ws", "state": "closed", "failures": 1, "retry_after": 0.0}


def test_breaker_rejects_bad_config():
    with pytest.raises(ValueError):
        AsyncCircuitBreaker("x", failure_threshold=0)


# -- retry policy ---------------------------------------------------------------------


def test_delays_full_jitter_bounds_and_reproducible():
    policy = RetryPolicy(timeout=1, retries=6, backoff_base=0.1, backoff_max=1.0, rng=random.Random(7))
    delays = list(policy.delays())
    assert len(delays) == 6
    caps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert all(0 <= d <= c for d, c in zip(delays, caps))
    assert len(set(delays)) == 6  # jittered, not constant
    again = RetryPolicy(timeout=1, retries=6, backoff_base=0.1, backoff_max=1.0, rng=random.Random(7))
    assert list(again.delays()) == delays


def test_delays_without_jitter_are_the_caps():
    policy = RetryPolicy(timeout=1, retries=5, backoff_base=0.05, backoff_max=0.3, jitter=False)
    assert list(policy.delays()) == pytest.approx([0.05, 0.1, 0.2, 0.3, 0.3])
    assert list(RetryPolicy(timeout=1, retries=0).delays()) == []


class Script:
    """An async callable that raises or returns the scripted outcomes in order."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.calls = 0

    async def __call__(self):
        self.calls += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome == "hang":
            await asyncio.Event().wait()
        return outcome


def make_policy(retries, slept, timeout=1.0):
    return RetryPolicy(timeout=timeout, retries=retries, jitter=False, sleep=_recorder(slept))


def _recorder(slept):
    async def sleep(delay):
        slept.append(delay)

    return sleep


async def test_retries_transient_errors_then_succeeds():
    slept = []
    fn = Script(Transient(), Transient(), "ok")
    assert await make_policy(2, slept).call(fn, idempotent=True, retry_on=is_transient) == "ok"
    assert fn.calls == 3
    assert slept == pytest.approx([0.05, 0.1])


async def test_gives_up_after_retries_with_last_error():
    slept = []
    last = Transient("third")
    fn = Script(Transient("first"), Transient("second"), last, "never")
    with pytest.raises(Transient) as info:
        await make_policy(2, slept).call(fn, idempotent=True, retry_on=is_transient)
    assert info.value is last
    assert fn.calls == 3 and len(slept) == 2


async def test_non_idempotent_gets_exactly_one_attempt():
    slept = []
    fn = Script(Transient(), "ok")
    with pytest.raises(Transient):
        await make_policy(2, slept).call(fn, idempotent=False, retry_on=is_transient)
    assert fn.calls == 1 and slept == []


async def test_non_transient_error_is_not_retried():
    fn = Script(Permanent(), "ok")
    with pytest.raises(Permanent):
        await make_policy(2, []).call(fn, idempotent=True, retry_on=is_transient)
    assert fn.calls == 1


async def test_timeout_raises_timeout_error_and_is_retried():
    fn = Script("hang", "hang")
    policy = RetryPolicy(timeout=0.01, retries=1, jitter=False, sleep=_recorder([]))
    with pytest.raises(TimeoutError):
        await policy.call(fn, idempotent=True, retry_on=lambda e: False)
    assert fn.calls == 2
    fn = Script("hang", "ok")
    assert await policy.call(fn, idempotent=True, retry_on=lambda e: False) == "ok"


async def test_breaker_records_each_attempt(clock):
    b = AsyncCircuitBreaker("dm", failure_threshold=5, clock=clock)
    fn = Script(Transient(), Transient(), "ok")
    assert await make_policy(2, []).call(fn, idempotent=True, retry_on=is_transient, breaker=b) == "ok"
    assert b.failures == 0 and b.state == "closed"
    fn = Script(Transient(), Transient(), Transient())
    with pytest.raises(Transient):
        await make_policy(2, []).call(fn, idempotent=True, retry_on=is_transient, breaker=b)
    assert b.failures == 3
    with pytest.raises(Permanent):  # the backend answered: not a breaker failure
        await make_policy(2, []).call(Script(Permanent()), idempotent=True, retry_on=is_transient, breaker=b)
    assert b.failures == 0


async def test_circuit_open_stops_retries_and_is_not_retried(clock):
    b = AsyncCircuitBreaker("dm", failure_threshold=2, clock=clock)
    first = Transient("first")
    fn = Script(first, Transient("second"), "never")
    with pytest.raises(CircuitOpen) as info:
        await make_policy(5, []).call(fn, idempotent=True, retry_on=lambda e: True, breaker=b)
    assert fn.calls == 2  # the breaker opened after the second failure
    assert isinstance(info.value.__cause__, Transient)
    fn = Script("ok")
    with pytest.raises(CircuitOpen):
        await make_policy(5, []).call(fn, idempotent=True, retry_on=lambda e: True, breaker=b)
    assert fn.calls == 0


async def test_cancelled_probe_releases_the_breaker(clock):
    b = AsyncCircuitBreaker("dm", failure_threshold=1, reset_timeout=1, clock=clock)
    b.record_failure()
    clock.advance(1)
    policy = RetryPolicy(timeout=5, retries=0)
    task = asyncio.create_task(policy.call(Script("hang"), idempotent=True, retry_on=is_transient, breaker=b))
    await asyncio.sleep(0)
    with pytest.raises(CircuitOpen):
        b.before_call()  # the probe is in flight
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert b.state == "half_open"
    b.before_call()  # slot free again


def test_budgets():
    assert Budget(0.3, 2) == WORLDSERVICE_BUDGET
    assert Budget(0.5, 1) == DAGMANAGER_BUDGET
    policy = WORLDSERVICE_BUDGET.retry_policy(jitter=False)
    assert (policy.timeout, policy.retries, len(list(policy.delays()))) == (0.3, 2, 2)
    with pytest.raises(ValueError):
        RetryPolicy(timeout=0, retries=1)


def test_reconnect_backoff_grows_is_capped_jittered_and_resets():
    from qmtl.common.resilience import Backoff

    b = Backoff(0.1, 1.0)
    delays = [b.next() for _ in range(8)]
    caps = [min(1.0, 0.1 * 2**i) for i in range(8)]
    assert all(cap * 0.5 <= d <= cap for d, cap in zip(delays, caps))
    b.reset()
    assert 0.05 <= b.next() <= 0.1
    with pytest.raises(ValueError):
        Backoff(0, 1)
