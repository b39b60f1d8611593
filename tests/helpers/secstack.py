"""A production-configured control plane as separate OS processes, for attack tests and
benchmarks: ``qmtl worldservice`` (``rbac: enforce``), ``qmtl dagmanager`` and one or more
``qmtl gw`` (JWT mode with an ES256 key, the shared service token, Redis as its key-value
store), each on a free port with its own data directory and log file.

Each process is its own session (``start_new_session``), so stopping it never touches
anything else; :meth:`ServiceProcess.fd_count` and :meth:`rss_kb` read ``/proc/<pid>``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path

from tests.helpers.server import LogFile, free_port, wait_healthy
from tests.helpers.wsproc import JwtIssuer

ROOT = Path(__file__).resolve().parents[2]
QMTL = str(Path(sys.executable).parent / "qmtl")
REDIS_URL = os.environ.get("QMTL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ISSUER = "https://idp.security.test"
AUDIENCE = "qmtl-security"


class ServiceProcess(LogFile):
    def __init__(self, command: str, data_dir: Path, env: Mapping[str, str], *, args: list[str] | None = None) -> None:
        self.command = command
        self.data_dir = Path(data_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(env)
        self.args = list(args or [])
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir / f"{command}.log"

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("QMTL")}
        env.update({"PYTHONUNBUFFERED": "1", **self.env})
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [QMTL, self.command, "--port", str(self.port), "--data-dir", str(self.data_dir), *self.args],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if wait_healthy(self.proc, self.url, timeout, f"qmtl {self.command}", self.log_tail):
            return self
        self.stop()
        raise RuntimeError(f"qmtl {self.command} did not answer /health within {timeout} s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)



class SecureStack:
    """WorldService + DAG Manager + Gateways, production-configured. ``gateway_env`` and
    ``extra`` (per service: ``{"gateway": {...}, "worldservice": {...}}``) add environment
    overrides (``QMTL__...``)."""

    def __init__(self, base: Path, *, extra: Mapping[str, Mapping[str, str]] | None = None) -> None:
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.idp = JwtIssuer(self.base, issuer=ISSUER, audience=AUDIENCE)
        self.service_token = uuid.uuid4().hex
        self.extra = {k: dict(v) for k, v in (extra or {}).items()}
        self.worldservice: ServiceProcess | None = None
        self.dagmanager: ServiceProcess | None = None
        self.gateways: list[ServiceProcess] = []

    def start(self, gateways: int = 1) -> SecureStack:
        try:
            return self._start(gateways)
        except BaseException:
            self.stop()  # nothing started is left running
            raise

    def _start(self, gateways: int) -> SecureStack:
        self.worldservice = ServiceProcess("worldservice", self.base / "ws", {
            "QMTL__WORLDSERVICE__RBAC": "enforce", "QMTL__WORLDSERVICE__SERVICE_TOKEN": self.service_token,
            **self.extra.get("worldservice", {})}).start()
        self.dagmanager = ServiceProcess("dagmanager", self.base / "dm", {
            "QMTL__DAGMANAGER__SERVICE_TOKEN": self.service_token, **self.extra.get("dagmanager", {})}).start()
        for i in range(gateways):
            self.add_gateway(f"gw{i}")
        return self

    def add_gateway(self, name: str, **env: str) -> ServiceProcess:
        assert self.worldservice is not None and self.dagmanager is not None
        gw = ServiceProcess("gw", self.base / name, {
            "QMTL__GATEWAY__AUTH__MODE": "jwt",
            "QMTL__GATEWAY__AUTH__PUBLIC_KEYS": json.dumps([str(self.idp.pem_path)]),
            "QMTL__GATEWAY__AUTH__ISSUER": ISSUER,
            "QMTL__GATEWAY__AUTH__AUDIENCE": AUDIENCE,
            "QMTL__GATEWAY__SERVICE_TOKEN": self.service_token,
            "QMTL__GATEWAY__KV_URL": REDIS_URL,
            "QMTL__GATEWAY__WORLDSERVICE_BUDGET__TIMEOUT": "3",
            **self.extra.get("gateway", {}), **env,
        }, args=["--worldservice-url", self.worldservice.url, "--dagmanager-url", self.dagmanager.url]).start()
        self.gateways.append(gw)
        return gw

    @property
    def gateway(self) -> ServiceProcess:
        return self.gateways[0]

    def token(self, sub: str | None = None, **kw: object) -> str:
        return self.idp.token(sub or f"u-{uuid.uuid4().hex[:8]}", **kw)

    def service_headers(self) -> dict[str, str]:
        return {"X-QMTL-Service-Token": self.service_token}

    def stop(self) -> None:
        for proc in [*self.gateways, self.dagmanager, self.worldservice]:
            if proc is not None:
                proc.stop()
