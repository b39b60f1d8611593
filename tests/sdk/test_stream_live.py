"""EventStream against a live ``qmtl up`` (token TTL 3 s, stream behind a TCP proxy):
snapshot then ordered deltas with verified hashes, duplicates dropped, token refresh,
resume after a cut, fallback_url, HTTP reconcile while the stream stays down, and the
activation gate."""

from __future__ import annotations

import asyncio
import json
import time

import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from qmtl.sdk import ActivationGate, EventStream, GatewayClient, StreamEvent, StreamOptions
from tests.sdk.live import wait_until


@pytest.fixture
async def client(live):
    async with GatewayClient(live.url, backoff_base=0.05) as c:
        yield c


async def new_world(client, live) -> str:
    w = live.world_id()
    await client.create_world(w, "stream test")
    return w


async def apply(client, w, activate=(), deactivate=(), weight=None):
    entries = [{"strategy_id": s, "side": "long", "weight": weight} if weight is not None else s for s in activate]
    return await client.apply(w, {"activate": list(entries), "deactivate": list(deactivate)}, consent_live=True)


def truth_view(activations: dict) -> dict:
    return {(a["strategy_id"], a["side"]): (a["active"], float(a["weight"])) for a in activations["activations"]}


def local_view(stream: EventStream, w: str) -> dict:
    return {k: (e["active"], float(e["weight"])) for k, e in (stream.state.activation.get(w) or {}).items()}


class Collector:
    def __init__(self) -> None:
        self.events: list[StreamEvent] = []

    def __call__(self, event: StreamEvent) -> None:
        self.events.append(event)

    def of(self, type_: str, source: str | None = None) -> list[StreamEvent]:
        return [e for e in self.events if e.type == type_ and (source is None or e.source == source)]


async def test_snapshot_then_ordered_deltas_with_verified_hashes(client, live):
    w = await new_world(client, live)
    await apply(client, w, activate=["s-1"])
    got = Collector()
    async with EventStream(client, world_id=w, topics=["activation", "policy"], on_event=got) as stream:
        await stream.wait_synced(10)
        snaps = got.of("snapshot")
        assert [s.data["topic"] for s in snaps] == ["activation", "policy"]
        assert {(i["strategy_id"], i["side"]) for i in snaps[0].data["items"]} == {("s-1", "long"), ("s-1", "short")}
        for i in range(5):
            await apply(client, w, activate=[f"s-{i + 2}"], deactivate=[f"s-{i + 1}"])
        await wait_until(lambda: len(got.of("activation_updated")) >= 20, 10, what="20 activation frames")
        deltas = got.of("activation_updated", "stream")
        seqs = [e.seq for e in deltas]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert all(e.frame and e.frame.get("statehash") for e in deltas)
        truth = await client.list_activations(w)
        await wait_until(lambda: local_view(stream, w) == truth_view(truth), 5, what="convergence")
        assert stream.state.activation_hash(w) == truth["state_hash"]
        assert stream.stats.hash_mismatches == 0 and stream.stats.snapshots == 2

        # the same frames again (a replay after a reconnect): dropped, nothing emitted
        before = len(got.events)
        for e in deltas[-3:]:
            await stream.sync.on_text(json.dumps(e.frame), "stream")
        assert len(got.events) == before and stream.stats.duplicates >= 3


async def test_token_refreshed_before_expiry_and_resume_after_an_outage(client, proxies):
    live = proxies
    w = await new_world(client, live)
    got = Collector()
    stream = EventStream(client, world_id=w, topics=["activation"], on_event=got,
                         options=StreamOptions(reconcile_after=30))
    await stream.start()
    try:
        await stream.wait_synced(10)
        first_token = stream.descriptor["token"]
        await apply(client, w, activate=["a"])
        # live through more than two token lifetimes (TTL 3 s)
        await wait_until(lambda: stream.stats.token_refreshes >= 2, 8, what="two token refreshes")
        assert stream.descriptor["token"] != first_token
        # the first token has expired (the Gateway allows 2 s of clock skew): refused with 1008
        exp = jwt.decode(first_token, options={"verify_signature": False})["exp"]
        await wait_until(lambda: time.time() > exp + 2.5, 8, what="the first token's expiry")
        with pytest.raises(ConnectionClosed) as refused:
            async with connect(stream.descriptor["stream_url"], additional_headers={"Authorization": f"Bearer {first_token}"},
                               proxy=None) as ws:
                await asyncio.wait_for(ws.recv(), 5)
        assert refused.value.rcvd.code == 1008

        # both routes down: changes happen meanwhile, then the stream comes back
        live.stream_proxy.close()
        live.fallback_proxy.close()
        await wait_until(lambda: stream.status == "down", 5, what="stream down")
        await apply(client, w, activate=["b"], deactivate=["a"])
        await apply(client, w, activate=["c"])
        await asyncio.sleep(1.0)
        live.stream_proxy.open()
        live.fallback_proxy.open()
        await wait_until(lambda: local_view(stream, w).get(("c", "short")) == (True, 1.0), 10, what="missed frames")
        assert stream.stats.resumes >= 1  # resumed from the Gateway's ring, with a fresh token
        assert stream.stats.snapshots == 1  # no second snapshot: exactly the missed frames were replayed
        assert len(got.of("activation_updated")) == 8  # a(2) + b(2) + a off(2) + c(2): none lost, none twice
        truth = await client.list_activations(w)
        assert local_view(stream, w) == truth_view(truth) and stream.stats.hash_mismatches == 0
    finally:
        await stream.stop()


async def test_fallback_url_when_the_stream_url_fails(client, proxies):
    live = proxies
    w = await new_world(client, live)
    got = Collector()
    async with EventStream(client, world_id=w, topics=["activation"], on_event=got,
                           options=StreamOptions(reconcile_after=30, reconnect_max=0.5)) as stream:
        await stream.wait_synced(10)
        live.stream_proxy.close()  # stream_url refuses from now on; fallback_url works
        await apply(client, w, activate=["f1"])
        await wait_until(lambda: stream.route == "fallback", 10, what="fallback route")
        await apply(client, w, activate=["f2"], deactivate=["f1"])
        truth = await client.list_activations(w)
        await wait_until(lambda: local_view(stream, w) == truth_view(truth), 10, what="convergence via fallback")
        assert stream.stats.fallback_connects >= 1
        assert {e.data["strategy_id"] for e in got.of("activation_updated")} >= {"f1", "f2"}


async def test_back_to_the_stream_url_after_primary_retry_interval(client, proxies):
    live = proxies
    w = await new_world(client, live)
    got = Collector()
    async with EventStream(client, world_id=w, topics=["activation"], on_event=got,
                           options=StreamOptions(reconcile_after=30, reconnect_max=0.5,
                                                 primary_retry_interval=1.0)) as stream:
        await stream.wait_synced(10)
        live.stream_proxy.close()
        await wait_until(lambda: stream.route == "fallback", 10, what="fallback route")
        live.stream_proxy.open()
        await apply(client, w, activate=["p1"])
        await wait_until(lambda: stream.route == "stream", 10, what="back on stream_url")
        await apply(client, w, activate=["p2"], deactivate=["p1"])
        truth = await client.list_activations(w)
        await wait_until(lambda: local_view(stream, w) == truth_view(truth), 10, what="convergence on stream_url")
        assert stream.stats.fallback_connects >= 1 and 1000 not in stream.stats.refusals
        assert {e.data["strategy_id"] for e in got.of("activation_updated")} >= {"p1", "p2"}


async def test_http_reconcile_while_the_stream_stays_down(client, proxies):
    live = proxies
    w = await new_world(client, live)
    await apply(client, w, activate=["r1"])
    got = Collector()
    async with EventStream(client, world_id=w, topics=["activation"], on_event=got,
                           options=StreamOptions(reconcile_after=1.0, reconcile_interval=0.5, reconnect_max=0.5)) as stream:
        await stream.wait_synced(10)
        gate = ActivationGate(client, stream=stream, max_age=5)
        assert gate.is_active(w, "r1", "long") and not gate.is_active(w, "r2", "long")
        live.stream_proxy.close()
        live.fallback_proxy.close()
        await apply(client, w, activate=["r2"], deactivate=["r1"])
        await wait_until(lambda: got.of("activation_updated", "reconcile"), 30, what="reconciled changes")  # a liveness bound, generous for a loaded machine
        assert stream.status == "down" and stream.stats.reconciles >= 1
        truth = await client.list_activations(w)
        assert local_view(stream, w) == truth_view(truth)
        # the gate trusts the reconciled copy (it is fresh) and gates r1 off
        assert gate.is_active(w, "r2", "long") and not gate.is_active(w, "r1", "long")
        live.stream_proxy.open()  # (the fallback stays closed: the stream must come back on stream_url)
        await wait_until(lambda: stream.status == "live", 10, what="stream back")
        assert stream.route == "stream"
        # the copy moved on over HTTP: the stream restarts from a fresh snapshot, not a resume
        await wait_until(lambda: stream.stats.snapshots >= 2, 5, what="a fresh snapshot after reconciling")
        await apply(client, w, activate=["r3"])
        await wait_until(lambda: local_view(stream, w).get(("r3", "long")) == (True, 1.0), 5, what="live again")


async def test_a_wrong_local_state_is_detected_by_the_statehash_and_corrected(client, live):
    w = await new_world(client, live)
    await apply(client, w, activate=["h1"])
    async with EventStream(client, world_id=w, topics=["activation"]) as stream:
        await stream.wait_synced(10)
        await wait_until(lambda: stream.stats.verifications >= 1, 5, what="the check after the snapshot")
        # corrupt the copy: a phantom active strategy
        stream.state.activation[w][("ghost", "long")] = {"world_id": w, "strategy_id": "ghost", "side": "long",
                                                         "active": True, "weight": 1.0, "etag": "x", "ts": "2020-01-01T00:00:00Z"}
        await apply(client, w, activate=["h2"])
        await wait_until(lambda: stream.stats.corrections >= 1, 10, what="a correction")
        truth = await client.list_activations(w)
        await wait_until(lambda: local_view(stream, w) == truth_view(truth), 5, what="convergence")
        assert stream.stats.hash_mismatches >= 1 and ("ghost", "long") not in local_view(stream, w)


async def test_async_iteration_and_the_gate_without_a_stream(client, live):
    w = await new_world(client, live)
    stream = EventStream(client, world_id=w, topics=["activation"])
    await stream.start()
    try:
        first = await stream.next_event(10)
        assert first.type == "snapshot"
        await apply(client, w, activate=["i1"], weight=0.25)
        seen = []
        async for ev in stream:
            seen.append(ev)
            if ev.type == "activation_updated":
                break
        assert seen[-1].data["strategy_id"] == "i1" and seen[-1].data["weight"] == 0.25
    finally:
        await stream.stop()

    now = [0.0]
    gate = ActivationGate(client, max_age=10, clock=lambda: now[0])
    assert not gate.is_active(w, "i1", "long")  # unknown: gated off
    assert await gate.check(w, "i1", "long") and gate.weight(w, "i1", "long") == 0.25
    now[0] = 11.0
    assert not gate.is_active(w, "i1", "long")  # stale: gated off
    assert await gate.check(w, "i1", "long")  # refreshed
    gate.observe({"world_id": w, "strategy_id": "i1", "side": "long", "active": True, "weight": 1.0,
                  "etag": "safe-123", "ts": "2026-01-01T00:00:00Z"})
    assert not gate.is_active(w, "i1", "long")  # the Gateway's safe default is never active


async def test_reconcile_reads_the_whole_set_or_each_side_when_the_route_is_missing(live):
    from tests.sdk.test_client_live import Faulty

    async with GatewayClient(live.url) as plain:
        w = await new_world(plain, live)
        await apply(plain, w, activate=["p1"], weight=0.5)
        truth = truth_view(await plain.list_activations(w))
        stream = EventStream(plain, world_id=w, topics=["activation"])  # never started: HTTP only
        assert await stream.reconcile() and local_view(stream, w) == truth
        assert stream.fresh(5) and [(e.source, e.data["side"]) for e in await _drain(stream)] == [("reconcile", "long")]

    faulty = Faulty({f"/worlds/{w}/activations": [501] * 10})
    async with GatewayClient(live.url, transport=faulty) as client:
        stream = EventStream(client, world_id=w, strategy_id="p1", topics=["activation"])
        assert await stream.reconcile()
        assert local_view(stream, w) == truth
        assert {p for _m, p, _c in faulty.seen} >= {f"/worlds/{w}/activations", f"/worlds/{w}/activation"}


async def _drain(stream: EventStream) -> list[StreamEvent]:
    out = []
    while True:
        try:
            out.append(await stream.next_event(0.05))
        except TimeoutError:
            return out
