"""Fixtures of the SDK tests: one live ``qmtl up`` (embedded defaults) shared by the module
tests that only need a Gateway, with its event stream reachable through TCP proxies so a
test can cut or close the stream while HTTP keeps working.

The shared Gateway runs with ``events.token_ttl = 3`` s (so every stream test lives
through token refreshes), ``public_url`` = the stream proxy (so ``stream_url`` goes through
it) and ``events.fallback_url`` = the fallback proxy's ``/ws``.
"""

from __future__ import annotations

import uuid

import pytest

from tests.sdk.live import QmtlUp, TcpProxy


class LiveGateway:
    def __init__(self, up: QmtlUp, stream_proxy: TcpProxy, fallback_proxy: TcpProxy) -> None:
        self.up = up
        self.url = up.url
        self.stream_proxy = stream_proxy
        self.fallback_proxy = fallback_proxy

    @staticmethod
    def world_id(prefix: str = "w") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:10]}"


# The shared service token of the live stack (what its DAG Manager presents on callbacks);
# tests that play the DAG Manager post /callbacks/dag-event with it.
LIVE_SERVICE_TOKEN = "sdk-live-service-token"


def embedded_env(**extra: str) -> dict[str, str]:
    """Environment of an embedded ``qmtl up`` (no QMTL_* from the caller's environment)."""
    return dict(extra)


@pytest.fixture(scope="session")
def live(tmp_path_factory) -> LiveGateway:
    data = tmp_path_factory.mktemp("sdk") / "data"
    up = QmtlUp(data)
    stream_proxy = TcpProxy(up.ports[0])
    fallback_proxy = TcpProxy(up.ports[0])
    up.extra_env = embedded_env(
        QMTL__GATEWAY__EVENTS__TOKEN_TTL="3",
        QMTL__GATEWAY__EVENTS__HEARTBEAT_INTERVAL="2",
        QMTL__GATEWAY__PUBLIC_URL=stream_proxy.url,
        QMTL__GATEWAY__EVENTS__FALLBACK_URL=f"ws://127.0.0.1:{fallback_proxy.port}/ws",
        QMTL__DAGMANAGER__GATEWAY_CALLBACK_URL=up.url,
        QMTL__GATEWAY__SERVICE_TOKEN=LIVE_SERVICE_TOKEN,
    )
    try:
        up.start()
        yield LiveGateway(up, stream_proxy, fallback_proxy)
    finally:
        up.stop()
        stream_proxy.shutdown()
        fallback_proxy.shutdown()


@pytest.fixture
def proxies(live: LiveGateway):
    """The shared Gateway's proxies, open again after the test whatever it did."""
    yield live
    live.stream_proxy.open()
    live.fallback_proxy.open()
