"""WebSocket relay cost per event and per frame (issue 16, row "WS relay, per event").

    .venv/bin/python bench/bench_relay.py [--events 20000] [--repeat 2] [--clients 10]

Each phase is ``bench_ws.py``'s burst phase (its own server process on the in-process bus:
the Gateway's auth + events parts, uvicorn + websockets-sansio on uvloop; ``--events``
ActivationUpdated published as fast as the bus takes them; real ``/ws/evt`` clients in this
process), run with 1 client and with ``--clients`` clients, ``--repeat`` times each,
alternating. The server's CPU (utime + stime from ``/proc``) per event is fitted as

    CPU per event = a + b × clients

where **b** is the cost of one more frame (framing and the socket write of one client) and
**a** the per-event overhead beyond the frames: the bus (validation, encoding), the
Gateway's consumer, the activation state and its hash, building the CloudEvent frame once,
metrics. The publisher runs inside the server process (as WorldService does in
``qmtl up``), so ``a`` includes the publishing side too.

Goals (issue 16): per-event overhead ≤ 20 µs and independent of world size (the size part
is ``bench_statehash.py``); with 10 clients ≥ 8,000 events/s on one core, i.e. a + 10 b ≤
125 µs of server CPU per event. The medians of the repeats are used.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_ws  # noqa: E402

GOAL_OVERHEAD_US = 20.0
GOAL_EVENTS_PER_CORE = 8_000.0


async def measure(args: argparse.Namespace) -> tuple[dict[int, list[float]], dict[str, list[float]]]:
    per_event: dict[int, list[float]] = {1: [], args.clients: []}
    # the 1-client phases' split: the publisher's share and the Gateway's apply per event
    split: dict[str, list[float]] = {"publish": [], "apply": []}
    for rep in range(1, args.repeat + 1):
        for n in per_event:
            phase_args = argparse.Namespace(subscribers=n, timeout=args.timeout, fetch_max_wait_ms=5, server_deflate=False)
            r = await bench_ws.run_phase("inproc", phase_args, "burst", rep, args.events, 0.0, False)
            if not r["complete"]:
                raise RuntimeError(f"{n} client(s): {r['received']:,} of {r['expected']:,} frames arrived within {args.timeout} s")
            us = r["server_cpu_s"] / args.events * 1e6
            per_event[n].append(us)
            if n == 1:
                split["publish"].append(r["publish_us_per_event"])
                split["apply"].append(r["apply_us_per_event"])
            print(f"  {n:>3} client(s), repeat {rep}: server CPU {us:7.1f} µs per event ({r['server_cpu_us_per_msg']:.1f} per frame), "
                  f"{r['delivered_per_s'] / n:,.0f} events/s delivered", flush=True)
    return per_event, split


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=20_000, help="events per phase")
    p.add_argument("--repeat", type=int, default=2, help="phases per client count (medians are fitted)")
    p.add_argument("--clients", type=int, default=10, help="the larger client count (the smaller is 1)")
    p.add_argument("--timeout", type=float, default=60.0, help="max seconds to wait for a phase's frames")
    args = p.parse_args()
    if args.clients < 2:
        p.error("--clients must be at least 2")
    per_event, split = asyncio.run(measure(args))
    one = statistics.median(per_event[1])
    many = statistics.median(per_event[args.clients])
    b = (many - one) / (args.clients - 1)
    a = one - b
    at_ten = a + 10 * b
    events_per_core = 1e6 / at_ten
    print(f"\nfit (medians of {args.repeat}): per frame b = {b:.1f} µs; per event a = {a:.1f} µs "
          f"(1 client {one:.1f} µs, {args.clients} clients {many:.1f} µs per event)")
    pub = statistics.median(split["publish"])
    apply = statistics.median(split["apply"])
    gw = a - pub
    print(f"of a: the publisher {pub:.1f} µs (validation, encoding, the append: WorldService's work, in `qmtl up` the same "
          f"process); the Gateway {gw:.1f} µs, of which its apply (state, hash, the frame, the push) {apply:.1f} µs and "
          f"the bus delivery, the consumer loop and the event loop {gw - apply:.1f} µs")
    print(f"per-event overhead beyond the frames {a:.1f} µs with the publisher, {gw:.1f} µs the Gateway's   goal ≤ "
          f"{GOAL_OVERHEAD_US:.0f} µs: {'met' if a <= GOAL_OVERHEAD_US else 'met by the Gateway' if gw <= GOAL_OVERHEAD_US else 'MISSED'}")
    print(f"10 clients: {at_ten:.1f} µs of server CPU per event = {events_per_core:,.0f} events/s per core   "
          f"goal ≥ {GOAL_EVENTS_PER_CORE:,.0f}: {'met' if events_per_core >= GOAL_EVENTS_PER_CORE else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
