"""The worlds proxy's Prometheus metrics (one set per Gateway registry).

The decide latency histogram measures real elapsed time (``time.perf_counter``): it is a
measurement, not a rule, so it does not follow the proxy's injected clock."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from qmtl.gateway.worlds.replies import HIT, MISS, REVALIDATED, SAFE


class WorldsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.decide_latency = Histogram(
            "gateway_world_decide_latency_ms", "GET /worlds/{id}/decide latency at the Gateway (ms), cache hits included "
            "(WorldService's world_decide_latency_ms is the time it takes to compute one)", registry=registry,
            buckets=(0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 1000, 2000),
        )
        self.decide_requests = Counter("world_decide_requests", "Decide answers by cache result", ["result"], registry=registry)
        self.decide_hit_ratio = Gauge("world_decide_cache_hit_ratio", "Share of decide answers served from the Gateway cache (hit or revalidated)",
                                      registry=registry)
        self.activation_requests = Counter("world_activation_requests", "Activation answers by cache result", ["result"], registry=registry)
        self.activation_hit_ratio = Gauge(
            "world_activation_cache_hit_ratio", "Share of activation answers served from the Gateway cache after WorldService revalidated it (304)",
            registry=registry)
        self.live_guard_refusals = Counter("world_live_guard_refusals", "Calls refused by the live guard", ["operation"], registry=registry)
        self.cache_entries = Gauge("world_cache_entries", "Entries held by the worlds caches", ["cache"], registry=registry)
        self.invalidations = Counter("world_cache_invalidations", "Worlds cache entries dropped because the world changed "
                                     "(a write through this Gateway or a consumed ControlBus event)", registry=registry)
        self._decide = [0, 0]  # hits, total
        self._activation = [0, 0]
        self._decide_by = {r: self.decide_requests.labels(r) for r in (HIT, MISS, REVALIDATED, SAFE)}

    @staticmethod
    def started() -> float:
        """The reading :meth:`decide` measures its latency from."""
        return time.perf_counter()

    def decide(self, result: str, started: float) -> None:
        self.decide_latency.observe((time.perf_counter() - started) * 1000)
        self._decide_by[result].inc()
        self._decide[1] += 1
        if result in (HIT, REVALIDATED):
            self._decide[0] += 1
        self.decide_hit_ratio.set(self._decide[0] / self._decide[1])

    def activation(self, result: str) -> None:
        self.activation_requests.labels(result).inc()
        self._activation[1] += 1
        if result in (HIT, REVALIDATED):
            self._activation[0] += 1
        self.activation_hit_ratio.set(self._activation[0] / self._activation[1])
