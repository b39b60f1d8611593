"""docs/metrics.md is the metrics reference, generated from the services' registries: it must
be current, and the Grafana dashboard may only query metrics it lists."""

from __future__ import annotations

import json
import re
from pathlib import Path

from qmtl.common import metrics_reference

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "metrics.md"
DASHBOARD = ROOT / "docs" / "grafana" / "qmtl-control-plane.json"
# what a family adds to its name in the exposition
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count", "_created"), "counter": ("", "_created"), "gauge": ("",)}


def reference_names() -> dict[str, str]:
    """Every sample name the reference allows → its family's type."""
    out = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\| `([a-z_:][a-z0-9_:]*)` \| (\w+) \|", line)
        if m:
            name, kind = m.groups()
            base = name[: -len("_total")] if kind == "counter" and name.endswith("_total") else name
            for suffix in SUFFIXES.get(kind, ("",)):
                out[(name if suffix == "" else base + suffix)] = kind
    return out


def test_the_reference_is_current():
    assert DOC.read_text() == metrics_reference.generate(), (
        "docs/metrics.md is stale: run `.venv/bin/python -m qmtl.common.metrics_reference > docs/metrics.md`"
    )


def test_one_name_one_meaning_across_services(tmp_path):
    described = {svc: metrics_reference.describe(reg) for svc, reg in metrics_reference.registries(str(tmp_path)).items()}
    seen: dict[str, str] = {}
    for service, families in described.items():
        for family in families:
            assert family["name"] not in seen, f"{family['name']} is declared by {seen.get(family['name'])} and {service}"
            seen[family["name"]] = service
            assert family["help"].strip(), f"{family['name']} has no meaning"


def test_the_dashboard_queries_only_listed_metrics():
    dash = json.loads(DASHBOARD.read_text())
    names = reference_names()
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 12
    functions = {"histogram_quantile", "sum", "max", "min", "rate", "increase", "by", "le", "avg", "irate", "without"}
    used = set()
    for expr in exprs:
        stripped = re.sub(r"\{[^}]*\}", "", re.sub(r"\[[^\]]*\]", "", expr))  # label matchers and ranges
        stripped = re.sub(r"by \([^)]*\)", "", stripped)
        for token in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", stripped):
            if token not in functions:
                used.add(token)
    missing = sorted(used - set(names))
    assert not missing, f"the dashboard queries metrics no service declares: {missing}"
    # the key figures the issue names are all on it
    for key in ("world_decide_latency_ms_bucket", "world_decide_cache_hit_ratio", "controlbus_lag_ms", "event_fanout_total",
                "ws_dropped_subscribers_total", "gateway_ingest_fifo_depth", "gateway_ingest_fsm_total", "gateway_circuit_breaker_state"):
        assert key in used, key
