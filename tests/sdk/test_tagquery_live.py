"""TagQueryManager against a live ``qmtl up``: resolution over ``/queues/by_tag``, changes
on the descriptor stream, and the fallback to ``/queues/watch`` + HTTP reconcile when no
descriptor can be had (then back to the stream once it can)."""

from __future__ import annotations

from qmtl.sdk import Dag, GatewayClient, Node, TagQueryManager, TagQueryNode
from tests.sdk.live import wait_until
from tests.sdk.test_client_live import Faulty


async def produce(client, tag: str, n: int = 1) -> list[str]:
    """Submit a strategy whose node carries ``tag`` (backtest: its queue is indexed)."""
    node = Node("StreamInput", code=f"feed {tag} {n}", interval=60, period=5, tags=[tag, "sdk"])
    ack = await client.submit_strategy(Dag([node]), run_type="backtest")
    status = await client.wait_for_status(ack["strategy_id"], timeout=15)
    assert status["status"] == "completed", status
    return (await client.queues_by_tag([tag], 60))["queues"]


async def test_resolves_then_follows_the_descriptor_stream(live):
    tag = live.world_id("tq")
    async with GatewayClient(live.url) as client:
        first = await produce(client, tag, 1)
        node = TagQueryNode([tag], interval=60)
        other = TagQueryNode([tag, "nothing-else"], interval=60, match_mode="all")
        updates = []
        manager = TagQueryManager(client, on_update=lambda n, q: updates.append((n, q)))
        manager.register(Dag([node, other]))
        async with manager:
            assert manager.mode == "stream"
            assert node.queues == first and other.queues == []  # resolved before start() returns
            more = await produce(client, tag, 2)
            await wait_until(lambda: node.queues == sorted(more), 10, what="the new queue via the stream")
            assert len(more) == 2 and other.queues == []
            assert updates[-1] == (node, sorted(more))
            assert manager.stream.stats.snapshots >= 1 and manager.stream.stats.hash_mismatches == 0


async def test_falls_back_to_watch_and_reconcile_then_returns_to_the_stream(live):
    tag = live.world_id("tw")
    faulty = Faulty({"/events/subscribe": [501, 501]})  # no descriptor for the first two asks
    async with GatewayClient(live.url, transport=faulty) as client:
        node = TagQueryNode([tag], interval=60)
        manager = TagQueryManager(client, reconcile_interval=60, upgrade_interval=60)
        manager.register(node)
        await manager.start()
        try:
            assert manager.mode == "watch"
            queues = await produce(client, tag, 1)
            # only /queues/watch can have told it (the reconcile interval is 60 s)
            await wait_until(lambda: node.queues == queues, 10, what="the queue via /queues/watch")
            assert any(p == "/queues/watch" for _m, p, _c in faulty.seen)
        finally:
            await manager.stop()

        # the watch route failing too: the periodic HTTP reconcile keeps the node current,
        # and the manager moves back to the event stream once a descriptor can be had
        node2 = TagQueryNode([tag, "x2"], interval=60, match_mode="any")
        faulty.plan["/queues/watch"] = [503] * 1000
        manager = TagQueryManager(client, reconcile_interval=0.3, upgrade_interval=1.0)
        manager.register(node2)
        await manager.start()
        try:
            assert manager.mode == "watch"  # the second 501
            more = await produce(client, tag, 2)
            await wait_until(lambda: node2.queues == sorted(more), 10, what="the queue via HTTP reconcile")
            await wait_until(lambda: manager.mode == "stream", 10, what="back on the event stream")
            newest = await produce(client, tag, 3)
            await wait_until(lambda: node2.queues == sorted(newest), 10, what="a change via the stream")
        finally:
            await manager.stop()
