"""What an operator sees of `qmtl up`: JSON logs with one access line per request, a fresh
start without warnings (but the announced development modes), and /metrics serving every
series of the reference from the first scrape, in the content type the scraper asked for."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from tests.contract.test_metrics_reference import reference_names
from tests.helpers.server import free_port, wait_all_healthy

QMTL = str(Path(sys.executable).with_name("qmtl"))
# Warnings a fresh embedded start gives on purpose: permissive development modes are announced.
ANNOUNCED = ("DEVELOPMENT mode",)


def test_qmtl_up_json_logs_access_lines_and_metrics_from_start(tmp_path):
    ports = [free_port(), free_port(), free_port()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMTL")}
    env["PYTHONUNBUFFERED"] = "1"
    err_path = tmp_path / "stderr.log"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [QMTL, "up", "--log-format", "json", "--data-dir", str(tmp_path / "data"), "--gateway-port", str(ports[0]),
             "--worldservice-port", str(ports[1]), "--dagmanager-port", str(ports[2])],
            stdout=subprocess.PIPE, stderr=err, text=True, env=env,
        )
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        wait_all_healthy(urls, proc)
        # every series of the reference is served from the first scrape
        allowed = reference_names()
        for url, service in zip(urls, ("gateway", "worldservice", "dagmanager")):
            r = httpx.get(url + "/metrics", timeout=5)
            assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
            families = {f.name: f for f in text_string_to_metric_families(r.text)}
            samples = {s.name for f in families.values() for s in f.samples}
            assert samples <= set(allowed), f"{service} serves series missing from docs/metrics.md: {sorted(samples - set(allowed))}"
            om = httpx.get(url + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}, timeout=5)
            assert om.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
            assert {f.name for f in openmetrics_families(om.text)}  # parses as OpenMetrics
        gw_metrics = httpx.get(urls[0] + "/metrics", timeout=5).text
        for present_at_zero in ('ws_dropped_subscribers_total{route="/ws/evt"} 0.0', "sentinel_skew_seconds_count 0.0",
                                'controlbus_lag_ms{topic="control.activation"} 0.0', "lost_requests_total 0.0"):
            assert present_at_zero in gw_metrics, present_at_zero

        r = httpx.get(urls[0] + "/worlds/no-such-world/decide", headers={"X-Correlation-ID": "op-trace-1"}, timeout=5)
        assert r.status_code == 404
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)

    lines = [line for line in err_path.read_text().splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON log line: {line!r}") from None
    assert all({"ts", "level", "logger", "message", "correlation_id"} <= set(r) for r in records)
    warnings = [r for r in records if r["level"] in ("WARNING", "ERROR", "CRITICAL")]
    unexpected = [r["message"] for r in warnings if not any(a in r["message"] for a in ANNOUNCED)]
    assert not unexpected, f"a normal fresh start logged: {unexpected}"
    access = [r for r in records if r["logger"] == "qmtl.access" and r.get("correlation_id") == "op-trace-1"]
    by_service = {r["service"]: r for r in access}
    assert set(by_service) == {"gateway", "worldservice"}, access  # the proxied call, one line on each side
    for r in by_service.values():
        assert r["method"] == "GET" and r["route"] == "/worlds/{world_id}/decide" and r["status"] == 404
        assert r["duration_ms"] >= 0
    assert by_service["gateway"]["subject"] == "dev-user"  # the verified (here: development) caller
    assert by_service["gateway"]["duration_ms"] >= by_service["worldservice"]["duration_ms"]
