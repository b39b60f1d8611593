"""Prometheus metrics of strategy ingest (on the Gateway's registry, served at ``/metrics``)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000)


@dataclass
class IngestMetrics:
    lost_requests: Counter
    e2e_latency: Histogram
    fsm: Counter
    fallback_size: Gauge
    fifo_depth: Gauge
    submissions: Counter
    diff_latency: Histogram
    relay_errors: Counter
    recoveries: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> IngestMetrics:
        return cls(
            lost_requests=Counter(
                "lost_requests", "Accepted strategy submissions the Gateway could not keep (must stay 0)", registry=registry),
            e2e_latency=Histogram(
                "gateway_e2e_latency_ms", "POST /strategies: from request to ack (202), milliseconds", registry=registry,
                buckets=LATENCY_BUCKETS_MS),
            fsm=Counter("gateway_ingest_fsm", "Strategy ingest FSM transitions by the state entered", ["state"], registry=registry),
            fallback_size=Gauge("gateway_ingest_fallback_queue_size", "Strategy ids waiting in the local fallback queue", registry=registry),
            fifo_depth=Gauge("gateway_ingest_fifo_depth", "Strategy ids waiting in the Redis FIFO (last seen)", registry=registry),
            submissions=Counter("gateway_ingest_submissions", "POST /strategies answers by status code", ["status"], registry=registry),
            diff_latency=Histogram(
                "gateway_ingest_diff_latency_ms", "DAG Manager diff calls from the ingest worker, milliseconds", registry=registry,
                buckets=LATENCY_BUCKETS_MS),
            relay_errors=Counter("gateway_ingest_relay_errors", "progress/queue_map frames the event stream failed to relay", registry=registry),
            recoveries=Counter("gateway_ingest_recovered", "Strategy ids re-enqueued from the database mirror, by reason", ["reason"], registry=registry),
        )
