"""What a WebSocket connection holds is let go when it closes (issue 16, "memory per WebSocket
client"): after many connect/close cycles against a real server (uvicorn, in-process), the
hub's and the caps' per-connection structures are empty again, no Subscriber or per-connection
task survives, and the Python memory allocated while the connections came and went is back
(tracemalloc, over the Gateway's event modules and the WebSocket stack). Timing-free: it waits
for the server to notice the closes (I/O), never for time to pass. The RSS side (allocator
behaviour) is measured by bench/bench_ws_memory.py."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

from qmtl.bus import InProcessBus
from qmtl.contracts.events import event_validators
from qmtl.gateway.events.hub import ClientBuffer, Subscriber
from tests.helpers.gateway_events import Gateway, connect, recv

CYCLES = 400  # connect/close cycles measured (half /ws/evt with a descriptor token, half /ws)
BATCH = 20  # clients open at once
# Python memory still allocated after the cycles, per cycle. A connection holds ~27 KB while
# open; keeping even one small object per connection (a dict entry, a task, a bound method)
# costs more than this.
RETAINED_BYTES_PER_CYCLE = 60
WATCHED = ("qmtl/gateway", "qmtl/common", "uvicorn/", "websockets/", "starlette/", "asyncio/")


def _live(kind: type) -> int:
    return sum(1 for o in gc.get_objects() if type(o) is kind)


async def _cycles(gw: Gateway, token: str, n: int) -> None:
    for _ in range(n // BATCH):
        half = BATCH // 2
        clients = await asyncio.gather(*(connect(gw.ws_url + "/ws/evt", token) for _ in range(half)),
                                       *(connect(gw.ws_url + "/ws") for _ in range(half)))
        for ws in clients[:half]:
            assert (await recv(ws))["type"] == "snapshot"
        assert len(gw.events.hub.subscribers) >= half  # they were registered while open
        await asyncio.gather(*(ws.close() for ws in clients))
        del clients
        await _released(gw)


async def _released(gw: Gateway) -> None:
    """Until the server has handled every close (I/O, bounded)."""
    for _ in range(1000):
        if not gw.events.hub.subscribers and gw.events.caps.open == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(gw.events.hub.subscribers)} subscribers, {gw.events.caps.open} streams still held")


def _held_bytes(snapshot: tracemalloc.Snapshot) -> int:
    filters = [tracemalloc.Filter(True, f"*{part}*") for part in WATCHED]
    return sum(s.size for s in snapshot.filter_traces(filters).statistics("filename"))


def test_connections_are_released_on_close(tmp_path):
    # On uvloop, as ``qmtl up`` runs: a cancelled timer is freed at once (the stdlib loop keeps
    # up to 100 in its heap, each holding its task's context, which would blur the figure).
    import uvloop

    uvloop.run(_released_on_close(str(tmp_path / "gw")))


async def _released_on_close(data_dir: str) -> None:
    bus = InProcessBus(validator=event_validators())
    await bus.start()
    gw = await Gateway(bus, data_dir).start()
    try:
        await _check_released_on_close(gw)
    finally:
        await gw.stop()
        await bus.close()


async def _check_released_on_close(gw: Gateway) -> None:
    token = (await gw.descriptor({"topics": ["queues"]}))["token"]
    await _cycles(gw, token, 2 * BATCH)  # first-use costs (imports, caches, lazily built routes)
    gc.collect()
    tasks_before = len(asyncio.all_tasks())
    subscribers_before, buffers_before = _live(Subscriber), _live(ClientBuffer)
    tracemalloc.start(1)
    try:
        # Held memory after CYCLES and after CYCLES more: what the last batch leaves in flight
        # for a moment (close timers, a snapshot frame) is there both times; what a connection
        # keeps for good grows with the cycles.
        await _cycles(gw, token, CYCLES)
        gc.collect()
        before = _held_bytes(tracemalloc.take_snapshot())
        await _cycles(gw, token, CYCLES)
        gc.collect()
        after = _held_bytes(tracemalloc.take_snapshot())
    finally:
        tracemalloc.stop()

    hub, caps = gw.events.hub, gw.events.caps
    assert hub.subscribers == []
    assert caps.open == 0 and caps.by_subject == {}
    assert _live(Subscriber) == subscribers_before  # none of the 400 survives (other tests may hold theirs)
    assert _live(ClientBuffer) == buffers_before
    assert len(asyncio.all_tasks()) <= tasks_before  # no writer / reader / expiry task left behind
    assert await gw.metric("ws_subscribers", route="/ws/evt") == 0
    assert await gw.metric("ws_subscribers", route="/ws") == 0
    retained = after - before
    assert retained <= CYCLES * RETAINED_BYTES_PER_CYCLE, (
        f"{retained} bytes still allocated after {CYCLES} connect/close cycles ({retained / CYCLES:.0f} per cycle)")
