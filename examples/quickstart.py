#!/usr/bin/env python3
"""QMTL quickstart: run it against ``qmtl up``.

    qmtl up                              # in one terminal (Gateway on :8000)
    python examples/quickstart.py        # in another (or: ... http://host:port)

It creates a world and a policy, subscribes to the world's events, submits a strategy
whose TagQueryNode consumes every queue tagged ``price``, applies an activation plan,
prints each event as it arrives, and exits 0 once the strategy is diffed, its
TagQueryNode is resolved and the activation has been seen (1 after 60 s otherwise).
"""

from __future__ import annotations

import asyncio
import sys
import uuid

from qmtl.sdk import (
    ActivationGate,
    Conflict,
    Dag,
    EventStream,
    GatewayClient,
    Node,
    QmtlError,
    StreamEvent,
    TagQueryManager,
    TagQueryNode,
)

POLICY = """\
# promote after 2 passing observations, never beyond dry-run
gates: {all: [{metric: sharpe, op: ">=", value: 1.0}]}
hysteresis: {promote_after: 2, demote_after: 1, max_mode: dryrun}
"""


def describe(ev: StreamEvent) -> str:
    d = ev.data if isinstance(ev.data, dict) else {}
    if ev.type == "snapshot":
        return f"snapshot      {d.get('topic')}: {len(d.get('items') or [])} item(s), state_hash {str(d.get('state_hash'))[:12]}…"
    if ev.type == "activation_updated":
        return (f"activation    {d.get('strategy_id')} {d.get('side')}: active={d.get('active')} "
                f"weight={d.get('weight')} (run {d.get('run_id', '-')})")
    if ev.type == "policy_updated":
        return f"policy        v{d.get('policy_version')} {d.get('status')}"
    if ev.type == "queue_update":
        return f"queues        {d.get('tags')}/{d.get('interval')}s/{d.get('match_mode')}: {d.get('queues')}"
    if ev.type == "progress":
        return f"progress      {d.get('strategy_id')}: {d.get('status')}"
    if ev.type == "queue_map":
        return f"queue_map     {d.get('strategy_id')}: {len(d.get('queue_map') or {})} node(s) mapped to queues"
    return f"{ev.type:<13} {d}"


async def main(url: str) -> int:
    world_id = f"quickstart-{uuid.uuid4().hex[:6]}"
    async with GatewayClient(url) as client:
        # 1. a world and its policy
        await client.create_world(world_id, "Quickstart", description="created by examples/quickstart.py")
        policy = await client.create_policy(world_id, POLICY, set_default=True)
        print(f"world {world_id} with policy v{policy['version']} (default)")

        # 2. the strategy: a price feed, a TagQueryNode over every 'price' queue, a signal
        price = Node("StreamInput", code="quickstart price feed v1", interval=60, period=30, tags=["btc", "price"])
        peers = TagQueryNode(["price"], interval=60, match_mode="any")
        signal = Node("Compute", code="def signal(view): return view.mean()", config={"window": 20},
                      interval=60, period=20, inputs=[price, peers])
        dag = Dag([signal], name=f"quickstart-{world_id}")

        # 3. subscribe before submitting, so no event is missed; the TagQueryManager
        #    resolves the TagQueryNode and follows its queue set on the same stream
        done = {"diffed": asyncio.Event(), "resolved": asyncio.Event(), "activated": asyncio.Event()}
        strategy: dict[str, str] = {}

        def on_event(ev: StreamEvent) -> None:
            print(f"  [{ev.source:<9}] {describe(ev)}", flush=True)
            d = ev.data if isinstance(ev.data, dict) else {}
            if ev.type == "progress" and d.get("strategy_id") == strategy.get("id") and d.get("status") == "completed":
                done["diffed"].set()
            if ev.type == "activation_updated" and d.get("strategy_id") == strategy.get("id") and d.get("active"):
                done["activated"].set()

        def on_queues(node: TagQueryNode, queues: list[str]) -> None:
            print(f"  TagQueryNode {node.node_id[:12]}… now reads {queues}", flush=True)
            done["resolved"].set()

        stream = EventStream(client, world_id=world_id, topics=["activation", "policy", "queues"],
                             queue_keys=[peers.query_key], on_event=on_event)
        await stream.start()
        manager = TagQueryManager(client, stream=stream, on_update=on_queues)
        manager.register(dag)
        try:
            await stream.wait_synced(15)
            await manager.start()

            try:
                ack = await client.submit_strategy(dag, run_type="backtest", world_id=world_id, meta={"name": "quickstart"})
                strategy["id"] = ack["strategy_id"]
            except Conflict as dup:  # the same DAG was submitted before: reuse it
                strategy["id"] = dup.strategy_id or ""
            print(f"strategy {strategy['id']}: {len(dag)} nodes, TagQueryNode {peers.node_id[:12]}… → {peers.queues or 'resolving'}")
            if peers.queues:
                done["resolved"].set()
            if (await client.strategy_status(strategy["id"]))["status"] == "completed":
                done["diffed"].set()

            # 4. the activation plan: this strategy, long side, half weight (apply always
            #    needs the caller's explicit consent: the live guard)
            result = await client.apply(world_id, {"activate": [{"strategy_id": strategy["id"], "side": "long", "weight": 0.5}]},
                                        consent_live=True)
            print(f"applied run {result['run_id']}: {len(result['activated'])} activated")

            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in done.values())), 60)
            gate = ActivationGate(client, stream=stream)
            print(f"orders for {strategy['id']} long: {'allowed' if gate.is_active(world_id, strategy['id'], 'long') else 'gated off'}"
                  f" (weight {gate.weight(world_id, strategy['id'], 'long')}); short: "
                  f"{'allowed' if gate.is_active(world_id, strategy['id'], 'short') else 'gated off'}")
            print(f"decision: {(await client.decide(world_id))['effective_mode']}")
        finally:
            await manager.stop()
            await stream.stop()
    print("done.")
    return 0


if __name__ == "__main__":
    gateway = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
    try:
        sys.exit(asyncio.run(main(gateway)))
    except (QmtlError, TimeoutError) as exc:
        print(f"quickstart failed: {exc!r}", file=sys.stderr)
        sys.exit(1)
