"""Prometheus metrics of the event stream (SPEC §8), registered on the Gateway's registry."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from qmtl.bus.base import CONTROL_TOPICS

from . import state as st

WS_ROUTES = ("/ws/evt", "/ws")  # the routes of EventsComponent.ws_routes()


@dataclass
class EventMetrics:
    # ControlBus consumer
    controlbus_lag_ms: Gauge
    consumer_offset_lag: Gauge
    partition_skew_seconds: Gauge
    controlbus_events: Counter
    controlbus_reconnects: Counter
    consume_errors: Counter
    rebuild_events: Counter
    state_hash_mismatch: Gauge
    # fan-out
    ws_subscribers: Gauge
    ws_dropped_subscribers: Counter
    ws_aborted: Counter
    ws_rejected: Counter
    ws_connections: Counter
    event_fanout: Counter
    events_relayed: Counter
    relay_seconds: Histogram
    # sentinel traffic
    sentinel_ratio: Gauge
    sentinel_skew_seconds: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry) -> EventMetrics:
        r = registry
        metrics = cls(
            controlbus_lag_ms=Gauge("controlbus_lag_ms", "Time from publish on the ControlBus to apply at this Gateway (ms), last event per topic",
                                    ["topic"], registry=r),
            consumer_offset_lag=Gauge("controlbus_consumer_offset_lag", "Messages on the ControlBus not yet applied by this Gateway, per topic",
                                      ["topic"], registry=r),
            partition_skew_seconds=Gauge(
                "partition_skew_seconds",
                "Per topic: spread (max - min) of the time lag across partitions; a partition with nothing unread has lag 0",
                ["topic"], registry=r,
            ),
            controlbus_events=Counter(
                "controlbus_events", "Control events handled by outcome (applied, duplicate, stale, error) and source (controlbus, callback, local)",
                ["topic", "outcome", "source"], registry=r,
            ),
            controlbus_reconnects=Counter("controlbus_consumer_reconnects", "ControlBus subscriptions re-opened after a failure", registry=r),
            consume_errors=Counter("controlbus_consume_errors", "Events that could not be applied (a bug; never fatal)", ["topic"], registry=r),
            rebuild_events=Counter("controlbus_rebuild_events", "Events replayed into the state store at startup", ["topic"], registry=r),
            state_hash_mismatch=Gauge(
                "gateway_activation_state_hash_mismatch_worlds",
                "Worlds whose activation hash at this Gateway differs from the state_hash of the last ActivationUpdated it applied "
                "(transient during an apply; lasting means the Gateway misses entries)",
                registry=r,
            ),
            ws_subscribers=Gauge("ws_subscribers", "Connected WebSocket subscribers", ["route"], registry=r),
            ws_dropped_subscribers=Counter(
                "ws_dropped_subscribers", "Subscribers disconnected (close 4008) because their buffer overflowed; normal closes are not counted",
                ["route"], registry=r,
            ),
            ws_aborted=Counter(
                "ws_aborted_connections", "Connections dropped at the socket because a close frame (4008/1001) could not be "
                "sent within the close grace (a peer that does not read)", ["route"], registry=r,
            ),
            ws_rejected=Counter("ws_rejected", "WebSocket connections refused, by reason (close 1008, 1013, or 4029; "
                                "total_cap and subject_cap are the connection caps)", ["route", "reason"], registry=r),
            ws_connections=Counter("ws_connections", "WebSocket subscriptions opened, by how the stream started (snapshot, resumed, live)",
                                   ["route", "start"], registry=r),
            event_fanout=Counter("event_fanout", "Frames handed to subscribers (one per subscriber per event)", ["topic"], registry=r),
            events_relayed=Counter("gateway_events_relayed", "Events relayed to the WebSocket streams (once per event)", ["type"], registry=r),
            relay_seconds=Histogram(
                "gateway_relay_seconds", "Time to apply, serialise and fan out one event", registry=r,
                buckets=(0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05),
            ),
            sentinel_ratio=Gauge("gateway_sentinel_traffic_ratio",
                                 "Traffic weight (0-1) of each version sentinel (beyond gateway.metric_label_cap distinct ids: one series 'other')",
                                 ["sentinel_id"], registry=r),
            sentinel_skew_seconds=Histogram(
                "sentinel_skew_seconds", "Time from a sentinel weight change (its ts) to its relay by this Gateway (seconds)",
                registry=r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            ),
        )
        metrics.prime()
        return metrics

    def prime(self) -> None:
        """Create the series whose label values are known at start, so every one is served
        (at zero) from the first scrape instead of appearing with its first event."""
        for topic in CONTROL_TOPICS:
            for gauge in (self.controlbus_lag_ms, self.consumer_offset_lag, self.partition_skew_seconds):
                gauge.labels(topic)
            for counter in (self.consume_errors, self.rebuild_events):
                counter.labels(topic)
            for outcome in (st.APPLIED, st.DUPLICATE, st.STALE):
                self.controlbus_events.labels(topic, outcome, "controlbus")
        for route in WS_ROUTES:
            self.ws_subscribers.labels(route)
            self.ws_dropped_subscribers.labels(route)
            self.ws_aborted.labels(route)
