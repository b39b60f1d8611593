"""EventStream's session with injected time and a fake transport (no Gateway, no real
sleeps): jittered backoff, fallback after ``fallback_after`` rounds, back to ``stream_url``
after ``primary_retry_interval`` (resuming), token refresh at ``refresh_at`` of its lifetime,
the HTTP reconcile while down, and freshness. The same behaviours against a real stack are
in test_stream_live.py."""

from __future__ import annotations

import random
from urllib.parse import parse_qs, urlsplit

import pytest

from qmtl.common.clock import ManualClock
from qmtl.sdk import EventStream, StreamEvent, StreamOptions
from tests.sdk.fakes import (
    FALLBACK_URL,
    STREAM_URL,
    FakeConnection,
    FakeGateway,
    FakeTransport,
    ManualSleep,
    activation,
    change,
    settle,
)
from tests.sdk.fakes import snapshot as snapshot_frame

W = "w1"


def resumed_from(conn: FakeConnection) -> str | None:
    return (parse_qs(urlsplit(conn.url).query).get("last_event_id") or [None])[0]


def greet(conn: FakeConnection) -> None:
    """The Gateway's first frame: a snapshot on a fresh stream connection, a heartbeat otherwise."""
    if conn.route == "stream" and resumed_from(conn) is None:
        conn.push(snapshot_frame(W, [activation(W, "a")]))
    else:
        conn.push({"type": "heartbeat", "data": {}})


class Harness:
    def __init__(self, *, ttl: float = 60.0, verify_with_source: bool = False, **options: object) -> None:
        self.clock = ManualClock()
        self.sleep = ManualSleep(self.clock)
        self.gw = FakeGateway(self.clock, ttl=ttl)
        self.gw.activations[W] = [activation(W, "a")]  # the source of truth agrees with the snapshot
        self.transport = FakeTransport(greet)
        self.events: list[StreamEvent] = []
        self.stream = EventStream(
            self.gw, world_id=W, topics=["activation"], on_event=self.events.append,  # type: ignore[arg-type]
            verify_with_source=verify_with_source, options=StreamOptions(**options),  # type: ignore[arg-type]
            clock=self.clock, sleep=self.sleep, transport=self.transport,
        )

    async def __aenter__(self) -> Harness:
        await self.stream.start()
        await settle()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stream.stop()


async def test_jittered_exponential_backoff_then_the_fallback_route():
    async with Harness(reconnect_base=0.1, reconnect_max=1.0, fallback_after=2, rng=random.Random(3)) as h:
        h.transport.down = {"stream", "fallback"}
        h.transport.live.server_close(1001)
        await settle()
        for _ in range(6):
            await h.sleep.advance(1.0)
        # the first connection; after it closed, rounds on stream_url alone, then stream_url
        # and fallback_url in every round once fallback_after (2) rounds failed
        resume = "?last_event_id=ep.1"
        assert h.transport.attempts[:5] == [STREAM_URL, STREAM_URL + resume, STREAM_URL + resume,
                                            STREAM_URL + resume, FALLBACK_URL + resume]
        assert h.stream.status == "down" and h.stream.stats.connect_failures >= 5
        # the delays: uniform in [cap/2, cap], cap doubling from reconnect_base up to reconnect_max
        rng = random.Random(3)
        caps = [min(1.0, 0.1 * 2 ** (n - 1)) for n in (1, 1, 2, 3, 4, 5)]
        expected = [rng.uniform(c / 2, c) for c in caps]
        backoffs = [s for s in h.sleep.requested if s < 1.5]  # the refresh (45 s) and reconcile (2 s) waits aside
        assert backoffs[:6] == pytest.approx(expected)


async def test_back_to_the_stream_url_after_primary_retry_interval_resuming():
    async with Harness(fallback_after=1, reconnect_max=0.5, primary_retry_interval=30.0) as h:
        first = h.transport.live
        first.push(change(W, "b", 2))
        await settle()
        assert h.stream.route == "stream" and h.stream.last_event_id == "ep.2"
        h.transport.down = {"stream"}
        first.server_close(1001)
        await h.sleep.advance(1.0)
        fallback = h.transport.live
        assert fallback.route == "fallback" and resumed_from(fallback) == "ep.2" and h.stream.route == "fallback"
        fallback.push(change(W, "c", 3))
        await settle()
        h.transport.down = set()
        await h.sleep.advance(29.0)
        assert h.stream.route == "fallback"  # not before primary_retry_interval
        await h.sleep.advance(1.0)
        back = h.transport.live
        assert back.route == "stream" and resumed_from(back) == "ep.3" and h.stream.route == "stream"
        assert fallback.closed and h.stream.stats.fallback_connects == 1
        assert 1000 not in h.stream.stats.refusals  # our own close is no refusal
        assert [e.data["strategy_id"] for e in h.events if e.type == "activation_updated"] == ["b", "c"]


async def test_token_refreshed_at_refresh_at_of_its_lifetime_and_handed_to_the_open_connection():
    async with Harness(ttl=10.0, refresh_at=0.5) as h:
        first = h.stream.descriptor["token"]
        await h.sleep.advance(4.9)
        assert h.gw.subscribes == 1
        await h.sleep.advance(0.2)
        assert h.gw.subscribes == 2 and h.stream.stats.token_refreshes == 1
        token = h.stream.descriptor["token"]
        assert token != first and h.transport.live.sent == [{"type": "refresh", "token": token}]
        await h.sleep.advance(5.0)  # half of the new token's lifetime
        assert h.stream.stats.token_refreshes == 2


async def test_reconciles_over_http_while_down_then_asks_for_a_snapshot():
    async with Harness(verify_with_source=True, reconcile_after=3.0, reconcile_interval=1.0, reconnect_max=5.0) as h:
        await h.stream.wait_synced(1)
        h.transport.down = {"stream", "fallback"}
        h.gw.activations[W] = [activation(W, "a", active=False, etag="e2", ts="2026-01-02T00:00:00Z")]
        h.transport.live.server_close(1001)
        await h.sleep.advance(2.0)
        assert h.stream.stats.reconciles == 0  # down for less than reconcile_after
        await h.sleep.advance(2.0)
        assert h.stream.stats.reconciles >= 1 and h.stream.fresh(0.5)
        assert [(e.source, e.data["active"]) for e in h.events if e.type == "activation_updated"] == [("reconcile", False)]
        assert h.stream.state.activation_entry(W, "a", "long")["etag"] == "e2"
        h.transport.down = set()
        await h.sleep.advance(5.0)
        assert h.stream.status == "live" and resumed_from(h.transport.live) is None  # a snapshot, not a resume


async def test_fresh_while_live_then_for_max_age_after_the_last_contact():
    async with Harness(reconcile_after=100.0) as h:
        await h.stream.wait_synced(1)
        assert h.stream.fresh(0)
        h.transport.down = {"stream", "fallback"}
        h.transport.live.server_close(1001)
        await h.sleep.advance(9.0)
        assert h.stream.status == "down" and h.stream.fresh(10) and not h.stream.fresh(8)
        await h.sleep.advance(2.0)
        assert not h.stream.fresh(10)
