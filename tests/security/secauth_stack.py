"""A production-configured control plane for the secauth attack tests, in its own process:
``qmtl up`` with the Gateway in JWT mode (an ES256 key generated for the run, issuer and
audience required), WorldService on ``rbac: enforce``, one shared service token, PostgreSQL
(a fresh database, dropped afterwards), the DAG Manager's legacy callback to the Gateway on,
short descriptor tokens (3 s) so stream expiry is observable, a small metric-label cap, and
``127.0.0.2/32`` as the only trusted callback network (tests bind their client socket to
127.0.0.2 to come from it; 127.0.0.1 is untrusted).

(Redis is left at the embedded substitute: the Gateway's Redis key prefix is fixed, and
other suites running at the same time use it. Nothing here depends on Redis.)
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import POSTGRES_URL
from tests.helpers.wsproc import JwtIssuer
from tests.sdk.live import QmtlUp

ISSUER = "https://idp.secauth.test"
AUDIENCE = "qmtl-secauth"
TRUSTED_SOURCE = "127.0.0.2"  # inside gateway.callbacks.trusted_networks
UNTRUSTED_SOURCE = "127.0.0.1"
LABEL_CAP = 40
TOKEN_TTL = 3


@dataclass
class Stack:
    up: QmtlUp
    idp: JwtIssuer
    service_token: str

    @property
    def url(self) -> str:
        return self.up.url

    @property
    def dagmanager_url(self) -> str:
        return self.up.dagmanager_url

    @property
    def service_headers(self) -> dict[str, str]:
        return {"X-QMTL-Service-Token": self.service_token}

    def bearer(self, sub: str, world_roles: dict | None = None, **kw) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.idp.token(sub, world_roles=world_roles if world_roles is not None else {}, **kw)}"}

    def client(self, source: str = UNTRUSTED_SOURCE, **kw) -> httpx.AsyncClient:
        """An HTTP client whose connections come from ``source`` (a loopback address)."""
        return httpx.AsyncClient(base_url=self.url, timeout=10,
                                 transport=httpx.AsyncHTTPTransport(local_address=source), **kw)


async def _database(action: str, name: str) -> None:
    import asyncpg

    try:
        conn = await asyncpg.connect(POSTGRES_URL.replace("postgresql://", "postgres://"), timeout=5)
    except Exception as exc:  # environment failure: fail loudly, never skip
        pytest.fail(f"PostgreSQL is required at {POSTGRES_URL}: {exc!r}")
    try:
        if action == "create":
            await conn.execute(f'CREATE DATABASE "{name}"')
        else:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def production_stack(tmp: Path) -> Iterator[Stack]:
    """Start the stack (see the module docstring); stop it and drop its database afterwards."""
    idp = JwtIssuer(tmp, issuer=ISSUER, audience=AUDIENCE)
    name = "qmtl_secauth_" + uuid.uuid4().hex[:12]
    asyncio.run(_database("create", name))
    database = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    token = "svc-" + secrets.token_urlsafe(24)
    up = QmtlUp(tmp / "data")
    up.extra_env = {
        "QMTL__GATEWAY__AUTH__MODE": "jwt",
        "QMTL__GATEWAY__AUTH__PUBLIC_KEYS": json.dumps([str(idp.pem_path)]),
        "QMTL__GATEWAY__AUTH__ISSUER": ISSUER,
        "QMTL__GATEWAY__AUTH__AUDIENCE": AUDIENCE,
        "QMTL__WORLDSERVICE__RBAC": "enforce",
        "QMTL__GATEWAY__SERVICE_TOKEN": token,
        "QMTL__GATEWAY__DATABASE_URL": database,
        "QMTL__WORLDSERVICE__DATABASE_URL": database,
        "QMTL__DAGMANAGER__DATABASE_URL": database,
        "QMTL__DAGMANAGER__GATEWAY_CALLBACK_URL": up.url,
        "QMTL__GATEWAY__EVENTS__TOKEN_TTL": str(TOKEN_TTL),
        "QMTL__GATEWAY__EVENTS__HEARTBEAT_INTERVAL": "0.5",
        "QMTL__GATEWAY__METRIC_LABEL_CAP": str(LABEL_CAP),
        "QMTL__GATEWAY__CALLBACKS__TRUSTED_NETWORKS": json.dumps([f"{TRUSTED_SOURCE}/32"]),
    }
    try:
        up.start()
        yield Stack(up, idp, token)
    finally:
        up.stop()
        asyncio.run(_database("drop", name))


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    yield from production_stack(tmp_path_factory.mktemp("secauth"))
