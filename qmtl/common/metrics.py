"""The ``/metrics`` exposition every service shares: Prometheus text or OpenMetrics, as
the scraper asks (``Accept``), from the service's own registry (never the global one:
three services may share one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

__all__ = ["exposition"]


def exposition(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """``(body, content type)``: OpenMetrics 1.0 when ``accept`` asks for
    ``application/openmetrics-text`` (Prometheus does), else the Prometheus text format
    0.0.4 — each with its full content type (version and charset), never bare ``text/plain``."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
