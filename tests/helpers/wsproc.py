"""A real WorldService process for tests: started, killed (a real outage) and restarted
on the same port and data directory. ``service="dagmanager"`` starts a DAG Manager the
same way; ``argv`` replaces the ``qmtl`` executable (e.g. a launcher that installs a
test hook, see tests/helpers/ws_hooked.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from tests.helpers.server import LogFile, free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
QMTL = str(Path(sys.executable).parent / "qmtl")


class WorldServiceProcess(LogFile):
    def __init__(self, data_dir: Path, *, service_token: str, env: Mapping[str, str] | None = None, port: int | None = None,
                 service: str = "worldservice", argv: list[str] | None = None) -> None:
        self.service = service
        self.argv = list(argv or [QMTL])
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.service_token = service_token
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir / f"{service}.log"

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QMTL")}
        env.update({
            f"QMTL__{self.service.upper()}__SERVICE_TOKEN": self.service_token,
            "QMTL__LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 20.0) -> None:
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child process writes to it
        self.proc = subprocess.Popen(
            [*self.argv, self.service, "--port", str(self.port), "--data-dir", str(self.data_dir)],
            cwd=ROOT, env=self._env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        if wait_healthy(self.proc, self.url, timeout, self.service, self.log_tail):
            return
        self.stop()
        raise RuntimeError(f"{self.service} did not become healthy within {timeout} s:\n{self.log_tail()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGKILL: a real, abrupt outage (connections refused from now on)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def freeze(self) -> None:
        """SIGSTOP: the process holds its port but answers nothing (timeouts, not refusals)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)



# --------------------------------------------------------------------------- Gateway side

SERVICE_TOKEN = "test-service-token"
WORLDS_PARTS = ("auth", "worlds", "status")


def gateway_config(tmp_path: Path, ws_url: str, *, dagmanager_url: str = "http://127.0.0.1:9", **gateway: object):
    """A Config for an in-process Gateway proxying to ``ws_url`` (memory kv, SQLite in tmp)."""
    from qmtl.common.config import load_config

    data = Path(tmp_path) / "gw"
    data.mkdir(parents=True, exist_ok=True)
    # The SPEC budget (300 ms) is the default everywhere else; tests that are not about the
    # budget get more room, because a loaded CI machine can take longer than 300 ms to commit
    # a WorldService write (and writes are not retried).
    section = {"worldservice_url": ws_url, "dagmanager_url": dagmanager_url, "service_token": SERVICE_TOKEN, "kv_url": "memory://",
               "worldservice_budget": {"timeout": 3.0, "retries": 2}}
    section.update(gateway)
    return load_config(environ={}, overrides={"data_dir": str(data), "gateway": section})


class _NoServerErrors(httpx.AsyncClient):
    """An httpx client that fails the test on any 500 (the rules say: no 500, ever)."""

    async def send(self, request, **kwargs):  # type: ignore[override]
        response = await super().send(request, **kwargs)
        if response.status_code == 500:
            await response.aread()
            raise AssertionError(f"HTTP 500 from {request.method} {request.url}: {response.text}")
        return response


def client(base_url: str, **kwargs) -> httpx.AsyncClient:
    return _NoServerErrors(base_url=base_url, timeout=kwargs.pop("timeout", 15), **kwargs)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (0.0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        key, _, value = line.rpartition(" ")
        if key == name and not want:
            return float(value)
        if key.startswith(name + "{") and key.endswith("}"):
            got = ",".join(sorted(key[len(name) + 1:-1].split(",")))
            if got == want:
                return float(value)
    return 0.0


class JwtIssuer:
    """An ES256 key pair: the public key as a PEM file and as a JWKS; mints tokens."""

    def __init__(self, tmp_path: Path, *, issuer: str = "https://idp.test", audience: str = "qmtl-gateway", kid: str = "k1") -> None:
        import jwt
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        self.issuer, self.audience, self.kid = issuer, audience, kid
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.pem_path = Path(tmp_path) / f"jwt-{kid}.pem"
        self.pem_path.write_bytes(self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        jwk = json_loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        jwk.update({"kid": kid, "use": "sig", "alg": "ES256"})
        self.jwks = {"keys": [jwk]}

    def token(self, sub: str = "alice", *, world_roles: dict | None = None, ttl: float = 600, key=None, **claims: object) -> str:
        import jwt

        now = int(time.time())
        payload = {"sub": sub, "iss": self.issuer, "aud": self.audience, "iat": now, "exp": now + int(ttl)}
        if world_roles is not None:
            payload["world_roles"] = world_roles
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, key or self.key, algorithm="ES256", headers={"kid": self.kid})


def json_loads(text: str):
    import json

    return json.loads(text)
