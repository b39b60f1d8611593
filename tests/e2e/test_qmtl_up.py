"""`qmtl up` starts the three services in one process, answers on all three ports, stops on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.helpers.server import free_port, wait_all_healthy

QMTL = str(Path(sys.executable).with_name("qmtl"))


def test_qmtl_up_serves_all_three_and_stops_on_ctrl_c(tmp_path):
    ports = [free_port(), free_port(), free_port()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMTL")}
    proc = subprocess.Popen(
        [QMTL, "up", "--data-dir", str(tmp_path / "data"), "--gateway-port", str(ports[0]),
         "--worldservice-port", str(ports[1]), "--dagmanager-port", str(ports[2])],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        wait_all_healthy(urls, proc)
        health = [httpx.get(u + "/health", timeout=2).json() for u in urls]
        assert [h["status"] for h in health] == ["ok", "ok", "ok"]
        # Each serves its own bundled spec (JSON and YAML), Swagger UI, the AsyncAPI document and page
        # (what they render in a browser: tests/e2e/test_docs_browser.py).
        titles = [httpx.get(u + "/openapi.json", timeout=2).json()["info"]["title"] for u in urls]
        assert titles[0] == "QMTL Gateway" and "WorldService" in titles[1] and "DAG Manager" in titles[2]
        for u in urls:
            for path, ctype in (("/openapi.yaml", "application/yaml"), ("/docs", "text/html"), ("/asyncapi", "text/html"),
                                ("/asyncapi.json", "application/json"), ("/asyncapi.yaml", "application/yaml")):
                r = httpx.get(u + path, timeout=2)
                assert r.status_code == 200 and r.headers["content-type"].startswith(ctype), (u, path, r.status_code)
        # The Gateway reaches WorldService through the worlds proxy.
        r = httpx.get(urls[0] + "/worlds", timeout=5)
        assert r.status_code == 200, r.text
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        for p in ports:
            assert f":{p}" in out  # the URLs were printed
        assert "stopped." in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
