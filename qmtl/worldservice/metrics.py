"""WorldService's Prometheus metrics, on a registry of its own (several services may
share one process, so nothing goes to the global registry)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class WorldServiceMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.decide_latency_ms = Histogram(
            "world_decide_latency_ms",
            "Time WorldService takes to compute a decision (ms); p95 is read from it.",
            buckets=(0.5, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
            registry=r,
        )
        self.apply_total = Counter(
            "world_apply_total", "Apply requests by outcome (succeeded, replayed, rolled_back, conflict).", ["outcome"], registry=r
        )
        self.events_published = Counter(
            "world_events_published_total", "Control events published on the ControlBus, by topic.", ["topic"], registry=r
        )
        self.publish_failures = Counter(
            "world_event_publish_failures_total", "Failed attempts to publish an outbox event (it is retried).", registry=r
        )
        self.events_dropped = Counter(
            "world_events_dropped_total", "Outbox events the bus refused as invalid (never publishable; logged).", registry=r
        )
        self.outbox_pending = Gauge("world_outbox_pending", "Committed events not yet published.", registry=r)
        self.outbox_oldest_age = Gauge(
            "world_outbox_oldest_age_seconds", "Age of the oldest committed event not yet published (0 when none).", registry=r
        )
        self.policy_rejected = Counter("world_policy_rejected_total", "Policy uploads rejected (YAML or schema errors).", registry=r)
        self.activation_not_modified = Counter(
            "world_activation_not_modified_total", "Activation reads answered 304 Not Modified.", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
