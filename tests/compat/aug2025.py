"""What the compatibility suite shares: a live ``qmtl up`` and the Aug-2025 wire contract
written out literally (bodies as bytes, node ids and CRC32 as the era's SDK sent them).

Nothing here is built with our SDK: node ids are the SHA-256 hex of
``node_type:code_hash:config_hash:schema_hash`` (SPEC §2), written out as literals; the
CRC32 is zlib's over the ids in DAG order, also a literal; ``dag_json`` is the base64 of the
literal DAG text.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import httpx
import pytest

from tests.sdk.live import QmtlUp

# --- the DAG of an Aug-2025 strategy: a price feed, a TagQueryNode WITHOUT match_mode, a signal
PRICE_ID = "75c168baf8a0463213e52a7f5cb1886927aa008391fe30aef7ce1870ba1d3ebc"  # StreamInput:aug25-price-code:aug25-price-cfg:aug25-price-schema
TAGQ_ID = "4055a8073c2ffd4f2d3ebc7e7b82077eba771d59c7868162ed4ebe49be1957de"  # TagQueryNode:aug25-tq-code:aug25-tq-cfg:aug25-tq-schema
SIGNAL_ID = "1669eb1c83716a26e1a6607819951cc589b1e9a94eeaf7689f69a2459d2fe3a9"  # Compute:aug25-sig-code:aug25-sig-cfg:aug25-sig-schema
CRC_ALL = 4276701204  # zlib.crc32 over PRICE_ID, TAGQ_ID, SIGNAL_ID
CRC_PRICE_SIGNAL = 2282365461  # over PRICE_ID, SIGNAL_ID

DAG_TEXT = (
    '{"nodes": ['
    '{"node_id": "75c168baf8a0463213e52a7f5cb1886927aa008391fe30aef7ce1870ba1d3ebc", "node_type": "StreamInput", '
    '"code_hash": "aug25-price-code", "config_hash": "aug25-price-cfg", "schema_hash": "aug25-price-schema", '
    '"interval": 60, "period": 30, "tags": ["aug25-price"], "inputs": [], "name": "price"}, '
    '{"node_id": "4055a8073c2ffd4f2d3ebc7e7b82077eba771d59c7868162ed4ebe49be1957de", "node_type": "TagQueryNode", '
    '"code_hash": "aug25-tq-code", "config_hash": "aug25-tq-cfg", "schema_hash": "aug25-tq-schema", '
    '"interval": 60, "period": 1, "tags": ["aug25-price", "aug25-absent"], "inputs": [], "name": "peers"}, '
    '{"node_id": "1669eb1c83716a26e1a6607819951cc589b1e9a94eeaf7689f69a2459d2fe3a9", "node_type": "Compute", '
    '"code_hash": "aug25-sig-code", "config_hash": "aug25-sig-cfg", "schema_hash": "aug25-sig-schema", '
    '"interval": 60, "period": 20, "tags": ["aug25-signal"], '
    '"inputs": ["75c168baf8a0463213e52a7f5cb1886927aa008391fe30aef7ce1870ba1d3ebc", '
    '"4055a8073c2ffd4f2d3ebc7e7b82077eba771d59c7868162ed4ebe49be1957de"], "name": "signal", "pre_warmup": false}'
    ']}'
)

# The era's SDK computed ids with config_hash but left the field out of the node it sent.
DAG_WITHOUT_CONFIG_HASH = (
    '{"nodes": ['
    '{"node_id": "75c168baf8a0463213e52a7f5cb1886927aa008391fe30aef7ce1870ba1d3ebc", "node_type": "StreamInput", '
    '"code_hash": "aug25-price-code", "schema_hash": "aug25-price-schema", '
    '"interval": 60, "period": 30, "tags": ["aug25-price"], "inputs": []}, '
    '{"node_id": "1669eb1c83716a26e1a6607819951cc589b1e9a94eeaf7689f69a2459d2fe3a9", "node_type": "Compute", '
    '"code_hash": "aug25-sig-code", "config_hash": "aug25-sig-cfg", "schema_hash": "aug25-sig-schema", '
    '"interval": 60, "period": 20, "tags": ["aug25-signal"], '
    '"inputs": ["75c168baf8a0463213e52a7f5cb1886927aa008391fe30aef7ce1870ba1d3ebc"]}'
    ']}'
)


def submission_bytes(dag_text: str, crc: int, *, run_type: str = "backtest", raw: bool = False) -> bytes:
    """``POST /strategies`` as that era's SDK sent it: ``dag_json`` base64 of the DAG text
    (or the text itself), ``meta``, ``run_type``, ``node_ids_crc32``."""
    dag_json = dag_text if raw else base64.b64encode(dag_text.encode()).decode()
    return (
        '{"dag_json": ' + json.dumps(dag_json) + ', "meta": {"strategy": "aug25"}, '
        '"run_type": "' + run_type + '", "node_ids_crc32": ' + str(crc) + '}'
    ).encode()


JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def up(tmp_path_factory) -> Iterator[QmtlUp]:
    """One embedded ``qmtl up`` per test module (a fresh data directory each). The tests post
    the era DAG Manager's callbacks, which carry no credential: as an operator would for such a
    DAG Manager, the Gateway trusts its network (here the loopback address) for callbacks."""
    data = tmp_path_factory.mktemp("compat") / "data"
    stack = QmtlUp(data)
    stack.extra_env = {"QMTL__DAGMANAGER__GATEWAY_CALLBACK_URL": stack.url,
                       "QMTL__GATEWAY__CALLBACKS__TRUSTED_NETWORKS": '["127.0.0.1/32"]'}
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def ws_url(up: QmtlUp) -> str:
    """The Gateway as a ``ws://`` URL without a path (the legacy client adds ``/ws``)."""
    return up.url.replace("http://", "ws://")


async def wait_status(client: httpx.AsyncClient, sid: str, timeout: float = 30.0) -> dict:
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while True:
        r = await client.get(f"/strategies/{sid}/status")
        assert r.status_code == 200, r.text
        body = r.json()
        if body["status"] in ("completed", "failed"):
            return body
        assert time.monotonic() < deadline, f"{sid} still {body['status']}"
        await asyncio.sleep(0.05)
