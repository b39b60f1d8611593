"""The legacy Gateway callback sender: bounded, ordered, retried, never in the way."""

from __future__ import annotations

import asyncio

import httpx

from qmtl.dagmanager.callbacks import GatewayCallback
from qmtl.dagmanager.metrics import DagManagerMetrics


def sample(metrics: DagManagerMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels or None) or 0.0


async def test_disabled_without_a_url():
    cb = GatewayCallback("", metrics=DagManagerMetrics())
    await cb.start()
    assert cb.enabled is False and cb.send("queue_update", {"x": 1}) is False
    await cb.close()


async def test_posts_in_order_and_retries_server_errors_but_not_client_errors():
    seen: list[tuple[str, dict, str | None]] = []
    statuses = iter([503, 200, 400, 200])

    def handler(request: httpx.Request) -> httpx.Response:
        import json

        seen.append((request.url.path, json.loads(request.content), request.headers.get("x-correlation-id")))
        return httpx.Response(next(statuses))

    metrics = DagManagerMetrics()
    cb = GatewayCallback("http://gw:8000/", metrics=metrics, backoff=0.001, transport=httpx.MockTransport(handler))
    await cb.start()
    try:
        assert cb.send("queue_update", {"n": 1}) and cb.send("sentinel_weight", {"n": 2}) and cb.send("queue_update", {"n": 3})
        await cb.drain(timeout=5)
    finally:
        await cb.close()
    assert [p for p, _, _ in seen] == ["/callbacks/dag-event"] * 4
    # 503 then 200 for the first body; 400 (refused, not retried) for the second; 200 for the third
    assert [b["data"]["n"] for _, b, _ in seen] == [1, 1, 2, 3]
    assert seen[0][1] == {"event": "queue_update", "data": {"n": 1}}
    assert sample(metrics, "dm_gateway_callbacks_total", event="queue_update", result="ok") == 2
    assert sample(metrics, "dm_gateway_callbacks_total", event="sentinel_weight", result="rejected") == 1


async def test_a_full_queue_drops_the_oldest_body_and_counts_it():
    release = asyncio.Event()
    got: list[int] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        import json

        got.append(json.loads(request.content)["data"]["n"])
        await release.wait()
        return httpx.Response(200)

    metrics = DagManagerMetrics()
    cb = GatewayCallback("http://gw", metrics=metrics, queue_size=2, transport=httpx.MockTransport(handler))
    await cb.start()
    try:
        cb.send("queue_update", {"n": 0})
        await asyncio.sleep(0.05)  # the sender holds body 0 (its POST is in flight)
        for n in (1, 2, 3, 4):  # room for two: 1 and 2 are dropped
            cb.send("queue_update", {"n": n})
        release.set()
        await cb.drain(timeout=5)
    finally:
        await cb.close()
    assert got == [0, 3, 4]
    assert sample(metrics, "dm_gateway_callbacks_dropped_total") == 2


async def test_an_unreachable_gateway_costs_bounded_time():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    metrics = DagManagerMetrics()
    cb = GatewayCallback("http://gw", metrics=metrics, retries=2, backoff=0.01, transport=httpx.MockTransport(handler))
    await cb.start()
    try:
        cb.send("sentinel_weight", {"n": 1})
        await cb.drain(timeout=5)
    finally:
        await cb.close()
    assert sample(metrics, "dm_gateway_callbacks_total", event="sentinel_weight", result="failed") == 1


async def test_the_service_token_goes_with_every_callback():
    """In jwt mode the Gateway accepts callbacks only with the shared service token."""
    tokens: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        tokens.append(request.headers.get("x-qmtl-service-token"))
        return httpx.Response(202)

    cb = GatewayCallback("http://gw:8000", metrics=DagManagerMetrics(), service_token="s3cret",
                         transport=httpx.MockTransport(handler))
    await cb.start()
    try:
        assert cb.send("sentinel_weight", {"sentinel_id": "s", "weight": 0.5})
        await cb.drain(timeout=5)
    finally:
        await cb.close()
    assert tokens == ["s3cret"]
