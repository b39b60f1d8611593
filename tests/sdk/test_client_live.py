"""GatewayClient against a live ``qmtl up``: every worlds route, strategies and queues,
problem+json as exceptions, correlation ids, and the retry rules.

Every client here runs with ``validate_responses=True``: each 2xx answer is also checked
against its schema in ``specs/schemas/``.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from qmtl.common.nodeid import compute_node_id
from qmtl.sdk import (
    BadRequest,
    Conflict,
    Dag,
    GatewayClient,
    LiveGuardRefused,
    Node,
    NotFound,
    TagQueryNode,
    TransportError,
    Unavailable,
    Unprocessable,
)
from tests.helpers.server import free_port

POLICY = """\
gates: {all: [{metric: sharpe, op: ">=", value: 1.0}]}
hysteresis: {promote_after: 1, demote_after: 1, max_mode: dryrun}
"""


class Faulty(httpx.AsyncBaseTransport):
    """Answers the next planned items for a path (a status code, or an exception to
    raise) before forwarding to the real Gateway; records every attempt."""

    def __init__(self, plan: dict[str, list]) -> None:
        self.plan = {k: list(v) for k, v in plan.items()}
        self.inner = httpx.AsyncHTTPTransport()
        self.seen: list[tuple[str, str, str | None]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.method, request.url.path, request.headers.get("x-correlation-id")))
        queue = self.plan.get(request.url.path)
        if queue:
            item = queue.pop(0)
            if isinstance(item, BaseException):
                raise item
            return httpx.Response(item, headers={"Retry-After": "0", "Content-Type": "application/problem+json"},
                                  json={"title": "Service Unavailable", "status": item, "detail": "injected"})
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture
async def client(live):
    async with GatewayClient(live.url, validate_responses=True, backoff_base=0.05) as c:
        yield c


async def test_every_worlds_route_round_trips(client, live):
    w = live.world_id()
    world = await client.create_world(w, "SDK world", labels={"desk": "sdk"})
    assert world["world_id"] == w and world["labels"] == {"desk": "sdk"}
    assert (await client.get_world(w))["name"] == "SDK world"
    assert w in [x["world_id"] async for x in client.iter_worlds(page_size=2)]
    assert (await client.update_world(w, description="updated"))["description"] == "updated"

    policy = await client.create_policy(w, POLICY, set_default=True)
    assert policy["version"] == 1 and policy["status"] == "ACTIVE"
    second = await client.create_policy(w, POLICY.replace("1.0", "2.0"))
    listed = await client.list_policies(w)
    assert [p["version"] for p in listed["policies"]] == [1, 2] and listed["default_version"] == 1
    assert (await client.get_policy(w, 2))["checksum"] == second["checksum"]
    assert (await client.set_default_policy(w, 2))["default_policy_version"] == 2
    assert (await client.policy_state_hash(w))["state_hash"]

    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    state = await client.record_observation(w, data_end=now, samples=100, metrics={"sharpe": 3.0})
    assert state["passed"] is True
    assert (await client.get_observation(w))["recorded_at"] == state["recorded_at"]
    decision = await client.decide(w)
    assert decision["world_id"] == w and decision["effective_mode"] in ("backtest", "dryrun")

    plan = await client.evaluate(w, [{"strategy_id": "s-good", "metrics": {"sharpe": 2.5}},
                                     {"strategy_id": "s-bad", "metrics": {"sharpe": 0.1}}])
    assert plan["activate"] and "s-bad" in plan["reasons"]
    with pytest.raises(LiveGuardRefused) as refused:
        await client.apply(w, plan)
    assert refused.value.status == 403 and refused.value.required_header == "X-Allow-Live"
    applied = await client.apply(w, plan, run_id="run-1", consent_live=True)
    assert applied["ok"] and applied["run_id"] == "run-1"
    again = await client.apply(w, plan, run_id="run-1", consent_live=True)  # idempotent by run_id
    assert again["state_hash"] == applied["state_hash"]

    act = await client.get_activation(w, "s-good", "long")
    assert act["active"] is True and act["weight"] > 0
    off = await client.override_activation(w, "s-good", "short", False, reason="review")
    assert off["active"] is False
    with pytest.raises(LiveGuardRefused):
        await client.override_activation(w, "s-good", "short", True)
    full = await client.list_activations(w)
    assert {(a["strategy_id"], a["side"]) for a in full["activations"]} >= {("s-good", "long"), ("s-good", "short")}
    assert (await client.activation_state_hash(w))["state_hash"] == full["state_hash"]
    unknown = await client.get_activation(w, "never-seen", "long")
    assert unknown["active"] is False and unknown["weight"] == 0

    records = [r async for r in client.iter_audit(w, page_size=5)]
    assert len(records) >= 5 and all(r.get("correlation_id") for r in records)

    await client.delete_world(w)
    with pytest.raises(NotFound) as gone:
        await client.get_world(w)
    assert gone.value.status == 404 and gone.value.correlation_id


async def test_problem_details_are_carried_by_the_exception(client, live):
    with pytest.raises(Unprocessable) as bad:
        await client.create_world("Not A Slug!", "x", correlation_id="sdk-test-cid-1")
    err = bad.value
    assert err.status == 422 and err.title and err.detail
    assert err.correlation_id == "sdk-test-cid-1"  # ours, echoed
    assert any(e.get("pointer") == "/world_id" for e in err.errors), err.errors
    assert "sdk-test-cid-1" in str(err)

    resp = await client.request("GET", "/health", idempotent=True, correlation_id="sdk-test-cid-2")
    assert resp.correlation_id == "sdk-test-cid-2" and resp.headers["x-correlation-id"] == "sdk-test-cid-2"


async def test_strategy_submit_status_duplicate_and_guards(client, live):
    tag = live.world_id("t")
    producer = Node("StreamInput", code=f"feed {tag}", interval=60, period=10, tags=[tag, "price"])
    ack = await client.submit_strategy(Dag([producer], name="producer"), run_type="backtest")
    assert ack["strategy_id"].startswith("s-") and ack.get("sentinel_id")
    done = await client.wait_for_status(ack["strategy_id"], timeout=15)
    assert done["status"] == "completed"
    queues = (await client.queues_by_tag([tag], 60))["queues"]
    assert len(queues) == 1

    # a TagQueryNode: the ack's queue_map fills the node's queues
    tq = TagQueryNode([tag], interval=60)
    consumer = Dag([Node("Compute", code="use", interval=60, period=1, inputs=[tq])], name="consumer")
    ack2 = await client.submit_strategy(consumer, run_type="backtest")
    assert ack2["queue_map"][tq.node_id] == queues and tq.queues == queues

    with pytest.raises(Conflict) as dup:
        await client.submit_strategy(consumer, run_type="backtest")
    assert dup.value.strategy_id == ack2["strategy_id"]

    body = consumer.submission(run_type="backtest")
    body["node_ids_crc32"] = (body["node_ids_crc32"] + 1) % 2**32
    with pytest.raises(BadRequest) as crc:
        await client.submit_strategy(body)
    assert crc.value.get("expected") == consumer.crc32() and crc.value.get("received") == body["node_ids_crc32"]
    assert crc.value.errors[0]["pointer"] == "/node_ids_crc32"

    bad = Node("Compute", code="x")
    d = Dag([bad]).to_dict()
    d["nodes"][0]["node_id"] = compute_node_id("Compute", "a", "b", "c")  # not this node's id
    with pytest.raises(BadRequest) as mismatch:
        await client.submit_strategy(d, run_type="backtest")  # a DAG dict: CRC and encoding done by the client
    assert mismatch.value.status == 400 and bad.node_id in str(mismatch.value.body)  # the expected id is named

    with pytest.raises(NotFound):
        await client.strategy_status("s-does-not-exist")


async def test_idempotent_calls_retry_503_with_the_same_correlation_id(live):
    faulty = Faulty({"/health": [503, 503], "/worlds": [503]})
    async with GatewayClient(live.url, transport=faulty, backoff_base=0.01, retries=3) as c:
        resp = await c.request("GET", "/health", idempotent=True)
        assert resp.status == 200 and resp.attempts == 3
        cids = {cid for _m, p, cid in faulty.seen if p == "/health"}
        assert len(cids) == 1 and resp.correlation_id in cids
        # not idempotent: a 503 is not retried (the world may have been created)
        with pytest.raises(Unavailable) as unavailable:
            await c.create_world(live.world_id(), "x")
        assert unavailable.value.retry_after == 0
        assert sum(1 for m, p, _ in faulty.seen if (m, p) == ("POST", "/worlds")) == 1


async def test_a_token_callable_is_asked_again_for_every_retry(live):
    faulty = Faulty({"/health": [503, 503]})
    issued: list[str] = []

    def token() -> str:
        issued.append(f"t{len(issued)}")
        return issued[-1]

    async with GatewayClient(live.url, transport=faulty, backoff_base=0.01, retries=3, token=token) as c:
        resp = await c.request("GET", "/health", idempotent=True)
    assert resp.status == 200 and resp.attempts == 3
    assert issued == ["t0", "t1", "t2"]  # one fresh token per attempt, not one per call


async def test_submit_is_retried_on_503_and_connection_refused_is_retried_for_any_call(live):
    req = httpx.Request("POST", live.url)
    faulty = Faulty({"/strategies": [503], "/worlds": [httpx.ConnectError("refused", request=req)]})
    async with GatewayClient(live.url, transport=faulty, backoff_base=0.01) as c:
        ack = await c.submit_strategy(Dag([Node("Compute", code=f"retry {live.world_id()}")]), run_type="backtest")
        assert ack["strategy_id"] and sum(1 for _m, p, _ in faulty.seen if p == "/strategies") == 2
        w = live.world_id()
        assert (await c.create_world(w, "x"))["world_id"] == w  # the request never left: safe
        # a read timeout on a non-idempotent call is not retried
        faulty.plan["/worlds"] = [httpx.ReadTimeout("slow", request=req)]
        with pytest.raises(TransportError):
            await c.create_world(live.world_id(), "y")


async def test_connection_errors_are_retried_until_the_gateway_answers(proxies):
    proxies.stream_proxy.close()  # the proxy forwards HTTP too: closed = connection refused
    async with GatewayClient(proxies.stream_proxy.url, backoff_base=0.2, backoff_max=0.5, retries=8) as c:
        loop = asyncio.get_running_loop()
        loop.call_later(0.6, proxies.stream_proxy.open)
        resp = await c.request("GET", "/health", idempotent=True)
        assert resp.status == 200 and resp.attempts > 1
    port = free_port()
    async with GatewayClient(f"http://127.0.0.1:{port}", retries=2, backoff_base=0.01) as c:
        with pytest.raises(TransportError) as down:
            await c.health()
        assert down.value.attempts == 3 and down.value.correlation_id


async def test_queues_and_subscribe_and_status(client, live):
    tag = live.world_id("q")
    assert (await client.queues_by_tag([tag], 60, "all"))["queues"] == []
    assert (await client.queues_state_hash([tag], 60))["state_hash"]
    desc = await client.subscribe(["queues"], queue_keys=[([tag], 60)])
    assert desc["stream_url"].endswith("/ws/evt") and desc["token"] and desc["fallback_url"]
    with pytest.raises(Unprocessable):
        await client.subscribe(["activation"])  # activation needs a world
    status = await client.status()
    assert status["degradation"] in ("NORMAL", "PARTIAL", "MINIMAL", "STATIC")
    assert (await client.jwks())["keys"]
