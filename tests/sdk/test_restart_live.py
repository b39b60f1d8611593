"""The Gateway crashes mid-stream (``qmtl up`` killed with SIGKILL) and is restarted on the
same ports and data directory: the client gates orders off while it knows nothing fresh,
then resnapshots and ends with exactly WorldService's activation state — including the
entries the restarted Gateway no longer holds (an in-process bus does not outlive it) and
the changes made while the client was away."""

from __future__ import annotations

import asyncio

from qmtl.sdk import ActivationGate, EventStream, GatewayClient, StreamEvent, StreamOptions
from tests.sdk.conftest import embedded_env
from tests.sdk.live import QmtlUp, wait_until


def view(activations) -> dict:
    return {(a["strategy_id"], a["side"]): (a["active"], float(a["weight"])) for a in activations}


async def test_gateway_restart_mid_stream(tmp_path):
    up = QmtlUp(tmp_path / "data", env=embedded_env())
    up.start()
    events: list[StreamEvent] = []
    try:
        async with GatewayClient(up.url, retries=1, backoff_base=0.05, timeout=3) as client:
            await client.create_world("restart", "restart test")
            await client.apply("restart", {"activate": ["s0", "s1"]}, consent_live=True)
            stream = EventStream(client, world_id="restart", topics=["activation", "policy"], on_event=events.append,
                                 options=StreamOptions(reconnect_max=0.5, reconcile_after=1.0, reconcile_interval=0.5))
            gate = ActivationGate(client, stream=stream, max_age=2.0)
            await stream.start()
            try:
                await stream.wait_synced(10)
                assert gate.is_active("restart", "s0", "long") and gate.is_active("restart", "s1", "short")
                epoch_before = stream.last_event_id.split(".")[0]

                await asyncio.to_thread(up.kill)
                await wait_until(lambda: stream.status == "down", 5, what="the stream to notice")
                # nothing fresh for longer than max_age: orders are gated off
                await wait_until(lambda: not gate.is_active("restart", "s0", "long"), 5, what="the gate to close")

                await asyncio.to_thread(up.start)
                # changed while the client may still be away
                await client.apply("restart", {"activate": ["s2"], "deactivate": ["s1"]}, consent_live=True)
                truth = await client.list_activations("restart")
                expected = view(truth["activations"])
                assert expected[("s0", "long")] == (True, 1.0) and expected[("s1", "long")] == (False, 0.0)

                await wait_until(lambda: stream.status == "live", 30, what="the stream to come back")
                def local():
                    return {k: (e["active"], float(e["weight"])) for k, e in stream.state.activation["restart"].items()}
                await wait_until(lambda: local() == expected, 10, what="the client to converge on WorldService's state")
                assert stream.state.activation_hash("restart") == truth["state_hash"]
                assert stream.last_event_id.split(".")[0] != epoch_before  # a new Gateway process
                assert stream.stats.snapshots >= 3  # activation + policy, then a fresh snapshot after the restart
                # s0 was never touched after the restart: only the check against WorldService kept it
                assert gate.is_active("restart", "s0", "long") and gate.is_active("restart", "s2", "long")
                assert not gate.is_active("restart", "s1", "long")

                await client.apply("restart", {"activate": ["s3"]}, consent_live=True)
                await wait_until(lambda: gate.is_active("restart", "s3", "short"), 5, what="live deltas after the restart")
            finally:
                await stream.stop()
    finally:
        up.stop()
