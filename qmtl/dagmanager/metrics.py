"""The DAG Manager's Prometheus metrics, on a registry of its own (no global registry:
three services may share one process)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from qmtl.common.labels import BoundedLabel

DIFF_BUCKETS_MS = (1, 2, 5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 5120)


class DagManagerMetrics:
    def __init__(self, *, sentinel_label_cap: int = 200) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.diff_duration_ms = Histogram(
            "diff_duration_ms", "Duration of a DAG diff in milliseconds (database work included, topic creation excluded)",
            buckets=DIFF_BUCKETS_MS, registry=r,
        )
        self.diff_nodes = Histogram(
            "dm_diff_nodes", "Nodes per diffed DAG", buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000), registry=r,
        )
        self.diffs = Counter("dm_diffs", "Diffs by outcome", ["result"], registry=r)
        self.queues_created = Counter("dm_queues_created", "Queues created by diffs", registry=r)
        self.queues_reused = Counter("dm_queues_reused", "Queue assignments that reused an existing queue", registry=r)
        self.name_clashes = Counter("dm_queue_name_clashes", "New queue names lengthened because the short name was taken", registry=r)
        self.topic_create_failures = Counter("dm_topic_create_failures", "Topic creations that failed (auto-creation remains)", registry=r)
        self.queues_collected = Counter("dm_gc_collected", "Queues collected by GC", registry=r)
        self.gc_runs = Counter("dm_gc_runs", "GC passes by outcome", ["result"], registry=r)
        self.queue_updated = Counter("dm_queue_updated_published", "QueueUpdated events published on the ControlBus", registry=r)
        self.queue_updated_failed = Counter(
            "dm_queue_updated_failed",
            "Attempts to publish a QueueUpdated the ControlBus refused or could not take (retried from the outbox)", registry=r)
        self.outbox_pending = Gauge("dm_outbox_pending", "Committed QueueUpdated events not yet published", registry=r)
        self.outbox_oldest_age = Gauge("dm_outbox_oldest_age_seconds", "Age of the oldest committed event not yet published (0 when none)", registry=r)
        self.gc_skipped = Counter("dm_gc_skipped", "Periodic GC passes left to another replica (it ran within the interval)", registry=r)
        self.tag_watches = Gauge("dm_tag_watches", "Watched (tags, interval, match_mode) keys known to this process", registry=r)
        self.callbacks = Counter("dm_gateway_callbacks", "Gateway HTTP callbacks by event and result", ["event", "result"], registry=r)
        self.callbacks_dropped = Counter("dm_gateway_callbacks_dropped", "Gateway callbacks dropped because the send queue was full", registry=r)
        self.sentinel_weight = Gauge("dm_sentinel_weight", "Traffic weight last set per sentinel (beyond dagmanager.metric_label_cap "
                                     "distinct ids: one series 'other')", ["sentinel_id"], registry=r)
        self.sentinel_label = BoundedLabel(sentinel_label_cap)  # dagmanager.metric_label_cap

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


__all__ = ["DagManagerMetrics"]
