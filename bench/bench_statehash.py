"""Gateway event state: CPU per applied ActivationUpdated (entry stored + world state hash),
for worlds of 10, 1,000 and 10,000 activations (issue 16, "WS relay, per event").

    .venv/bin/python bench/bench_statehash.py

The hash is incremental (``qmtl.common.statehash``: the sum of per-entry digests), so the
cost per event should not grow with the world. Goal: ≤ 20 µs per event at every size and
the 10,000-entry world within 2x of the 10-entry one. CPU time (process_time), so a busy
machine changes the figures little. Exit status 1 when a goal is missed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qmtl.gateway.events.state import StateStore
from tests.helpers.events import activation_updated

GOAL_US = 20.0
SIZES = (10, 1_000, 10_000)
EVENTS = 20_000


def per_event_us(n: int) -> float:
    s = StateStore()
    for i in range(n):
        s.apply_activation(activation_updated("w", f"s{i}", etag=f"e{i}", ts="2026-11-26T12:00:00Z"))
    events = [activation_updated("w", f"s{i % n}", etag=f"x{i}", ts="2026-11-26T12:00:01Z", weight=(i % 7) / 7) for i in range(EVENTS)]
    c0 = time.process_time()
    for e in events:
        s.apply_activation(e)
    return (time.process_time() - c0) / EVENTS * 1e6


def main() -> int:
    figures = {n: per_event_us(n) for n in SIZES}
    print(f"apply_activation + state hash, CPU µs per event ({EVENTS} events per world size)")
    for n, us in figures.items():
        print(f"  world of {n:>6} activations: {us:6.1f} µs   goal ≤ {GOAL_US:.0f} µs: {'met' if us <= GOAL_US else 'MISSED'}")
    ratio = figures[SIZES[-1]] / figures[SIZES[0]]
    print(f"  10,000 / 10 entries: {ratio:.2f}x   goal ≤ 2x (independent of world size): {'met' if ratio <= 2 else 'MISSED'}")
    return 0 if all(us <= GOAL_US for us in figures.values()) and ratio <= 2 else 1


if __name__ == "__main__":
    sys.exit(main())
