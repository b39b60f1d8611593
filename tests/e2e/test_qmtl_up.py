"""`qmtl up` starts the three services in one process, answers on all three ports, stops on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.helpers.server import free_port

QMTL = str(Path(sys.executable).with_name("qmtl"))


def _wait_ready(urls, proc, timeout=60.0):
    deadline = time.monotonic() + timeout
    pending = set(urls)
    while pending and time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"qmtl up exited early with {proc.returncode}:\n{out}")
        for url in list(pending):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    pending.discard(url)
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    assert not pending, f"not answering: {pending}"


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
        _wait_ready(urls, proc)
        health = [httpx.get(u + "/health", timeout=2).json() for u in urls]
        assert [h["status"] for h in health] == ["ok", "ok", "ok"]
        # Each serves its own spec and Swagger UI.
        titles = [httpx.get(u + "/openapi.json", timeout=2).json()["info"]["title"] for u in urls]
        assert titles[0] == "QMTL Gateway" and "WorldService" in titles[1] and "DAG Manager" in titles[2]
        assert httpx.get(urls[0] + "/docs/", timeout=2).status_code == 200
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
