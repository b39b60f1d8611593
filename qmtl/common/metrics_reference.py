"""The metrics reference: every series each service declares (name, type, labels, meaning),
read from the services' own registries — so the reference cannot drift from the code.

``python -m qmtl.common.metrics_reference > docs/metrics.md`` regenerates the document;
``tests/contract/test_metrics_reference.py`` fails when it is stale or when a service's
``/metrics`` serves anything else.
"""

from __future__ import annotations

import tempfile
import typing as t

from prometheus_client import CollectorRegistry

SERVICES = ("gateway", "worldservice", "dagmanager")


def registries(data_dir: str) -> dict[str, CollectorRegistry]:
    """Each service's registry, from its app built on embedded defaults (nothing started)."""
    from qmtl.bus.inproc import InProcessBus
    from qmtl.common.config import load_config
    from qmtl.dagmanager.app import create_app as dm_app
    from qmtl.dagmanager.app import create_service as dm_service
    from qmtl.gateway.app import create_app as gw_app
    from qmtl.worldservice.app import create_app as ws_app

    cfg = load_config(None, overrides={"data_dir": data_dir})
    bus = InProcessBus()
    dm = dm_service(cfg, bus=bus)
    dm_app(cfg, bus=bus, service=dm)  # the app registers its HTTP server's metrics on the service's registry
    return {
        "gateway": gw_app(cfg, bus=bus).service.registry,
        "worldservice": ws_app(cfg, bus=bus).service.metrics.registry,
        "dagmanager": dm.metrics.registry,
    }


def describe(registry: CollectorRegistry) -> list[dict[str, t.Any]]:
    """One entry per metric family: ``name`` (as exposed: counters end in ``_total``),
    ``type``, ``labels``, ``help``."""
    out: list[dict[str, t.Any]] = []
    for collector in list(registry._collector_to_names):  # the registry's public API has no listing of collectors
        kind = getattr(collector, "_type", None)
        name = getattr(collector, "_name", None)
        if kind is None or name is None:
            describe = getattr(collector, "describe", None)  # optional in the Collector protocol
            for family in (describe() if describe is not None else None) or collector.collect():
                out.append({"name": family.name, "type": family.type, "labels": [], "help": family.documentation})
            continue
        exposed = name + "_total" if kind == "counter" else name
        out.append({"name": exposed, "type": kind, "labels": list(getattr(collector, "_labelnames", ())),
                    "help": getattr(collector, "_documentation", "")})
    return sorted(out, key=lambda m: m["name"])


def render(described: dict[str, list[dict[str, t.Any]]]) -> str:
    lines = [
        "# Metrics reference",
        "",
        "Generated from the services' registries by `python -m qmtl.common.metrics_reference`;",
        "`tests/contract/test_metrics_reference.py` fails when this file is stale or when `/metrics`",
        "serves a family that is not listed here. Each service serves its own registry at `/metrics`",
        "(Prometheus text 0.0.4, or OpenMetrics 1.0 when `Accept` asks for it). A series without",
        "labels, and every labelled series whose label values are known at start (topics, WebSocket",
        "routes, backends), is served from the first scrape at zero. Histograms expose `_bucket`,",
        "`_sum` and `_count`; read quantiles with `histogram_quantile` (e.g. the p95 of",
        "`world_decide_latency_ms`). Counters expose `_total` (and `_created`).",
        "",
        "A Grafana dashboard built on these names is in `docs/grafana/qmtl-control-plane.json`.",
    ]
    for service in SERVICES:
        lines += ["", f"## {service}", "", "| name | type | labels | meaning |", "|---|---|---|---|"]
        for m in described[service]:
            labels = ", ".join(f"`{label}`" for label in m["labels"]) or "—"
            meaning = " ".join(str(m["help"]).split()).replace("|", "\\|")
            lines.append(f"| `{m['name']}` | {m['type']} | {labels} | {meaning} |")
    return "\n".join(lines) + "\n"


def generate() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        return render({name: describe(reg) for name, reg in registries(tmp).items()})


if __name__ == "__main__":  # pragma: no cover
    print(generate(), end="")
