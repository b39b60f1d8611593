"""Rate limits at the Gateway, attacked as a caller floods: token buckets per verified
subject and class, 429 problem+json with ``Retry-After``, recovery after it, isolation
between callers and between the read and write budgets, and one budget shared by two
Gateway processes on the same Redis. The stack is production-configured and in separate
processes (tests/helpers/secstack.py): ``qmtl gw`` in JWT mode (ES256), WorldService on
``rbac: enforce``, Redis as the Gateway's key-value store.

Budgets are small so the tests take seconds: reads 4 per bucket refilled at 0.5/s, writes
3 refilled at 0.5/s. Every caller is a fresh subject, so runs never share a bucket.
"""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from qmtl.common.config import load_config
from qmtl.gateway.ratelimit import MemoryBuckets
from tests.helpers.secstack import SecureStack
from tests.helpers.wsproc import metric

READ_BURST, WRITE_BURST, RATE = 4, 3, 0.5
LIMITS = {
    "QMTL__GATEWAY__RATE_LIMIT__READ__RATE": str(RATE), "QMTL__GATEWAY__RATE_LIMIT__READ__BURST": str(READ_BURST),
    "QMTL__GATEWAY__RATE_LIMIT__WRITE__RATE": str(RATE), "QMTL__GATEWAY__RATE_LIMIT__WRITE__BURST": str(WRITE_BURST),
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = SecureStack(tmp_path_factory.mktemp("ratelimit"), extra={"gateway": LIMITS})
    try:
        s.start(gateways=2)
        yield s
    finally:
        s.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_429(r: httpx.Response, rate_class: str) -> int:
    assert r.status_code == 429, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/problem+json")
    retry_after = int(r.headers["retry-after"])
    problem = r.json()
    assert problem["status"] == 429 and problem["rate_class"] == rate_class and problem["retry_after"] == retry_after
    assert 1 <= retry_after <= 1 / RATE + 1
    return retry_after


def test_a_flooding_subject_gets_429_with_retry_after_and_recovers(stack):
    url = stack.gateway.url
    flooder = stack.token(f"flood-{uuid.uuid4().hex[:6]}", world_roles={})
    other = stack.token(f"other-{uuid.uuid4().hex[:6]}", world_roles={})
    with httpx.Client(base_url=url, timeout=10) as c:
        statuses = [c.get("/worlds", headers=bearer(flooder)).status_code for _ in range(READ_BURST)]
        assert statuses == [200] * READ_BURST
        retry_after = assert_429(c.get("/worlds", headers=bearer(flooder)), "read")
        # another caller is not affected, nor is the flooder's write budget
        assert c.get("/worlds", headers=bearer(other)).status_code == 200
        r = c.post("/worlds", headers=bearer(flooder), json={"world_id": f"rl-{uuid.uuid4().hex[:8]}", "name": "x"})
        assert r.status_code != 429
        # health and metrics are never limited
        assert all(c.get("/health").status_code == 200 for _ in range(10))
        time.sleep(retry_after)
        assert c.get("/worlds", headers=bearer(flooder)).status_code == 200  # recovered
        metrics = c.get("/metrics").text
    assert metric(metrics, "gateway_rate_limited_total", rate_class="read", caller="subject") >= 1


def test_writes_have_their_own_budget(stack):
    url = stack.gateway.url
    owner = stack.token(f"writer-{uuid.uuid4().hex[:6]}", world_roles={"*": ["owner"]})
    with httpx.Client(base_url=url, timeout=10) as c:
        for _ in range(WRITE_BURST):
            r = c.post("/worlds", headers=bearer(owner), json={"world_id": f"rl-{uuid.uuid4().hex[:8]}", "name": "x"})
            assert r.status_code == 201, r.text
        r = c.post("/worlds", headers=bearer(owner), json={"world_id": f"rl-{uuid.uuid4().hex[:8]}", "name": "x"})
        assert_429(r, "write")
        assert c.get("/worlds", headers=bearer(owner)).status_code == 200  # reads still go


def test_anonymous_callers_are_limited_by_address(stack):
    with httpx.Client(base_url=stack.gateway.url, timeout=10) as c:
        # no token: 401, but the attempts still spend the address's budget, then 429 before any work
        codes = [c.get("/worlds/x/decide").status_code for _ in range(READ_BURST + 8)]
    assert set(codes) <= {401, 429} and 429 in codes, codes
    assert codes.count(401) <= READ_BURST + 2  # parallel tests from this address may have spent some


def test_two_gateways_on_one_redis_share_the_budget(stack):
    gw1, gw2 = stack.gateways
    token = stack.token(f"shared-{uuid.uuid4().hex[:6]}", world_roles={})
    with httpx.Client(timeout=10) as c:
        got = []
        for i in range(READ_BURST):
            gw = gw1 if i % 2 == 0 else gw2
            got.append(c.get(gw.url + "/worlds", headers=bearer(token)).status_code)
        assert got == [200] * READ_BURST
        # each Gateway alone has served only half the burst, yet both now refuse
        assert_429(c.get(gw1.url + "/worlds", headers=bearer(token)), "read")
        retry_after = assert_429(c.get(gw2.url + "/worlds", headers=bearer(token)), "read")
        time.sleep(retry_after)
        assert c.get(gw2.url + "/worlds", headers=bearer(token)).status_code == 200


def test_memory_buckets_refill_at_the_rate_and_never_exceed_the_burst():
    now = [100.0]
    buckets = MemoryBuckets(max_buckets=2, clock=lambda: now[0])
    assert [buckets.take_now("a", 2.0, 3)[0] for _ in range(4)] == [True, True, True, False]
    allowed, wait = buckets.take_now("a", 2.0, 3)
    assert not allowed and wait == pytest.approx(0.5)
    now[0] += 0.5
    assert buckets.take_now("a", 2.0, 3)[0] is True
    now[0] += 100  # a long pause refills to the burst, not beyond
    assert [buckets.take_now("a", 2.0, 3)[0] for _ in range(4)] == [True, True, True, False]
    buckets.take_now("b", 2.0, 3)
    buckets.take_now("c", 2.0, 3)  # bounded: the least recently used bucket ("a") is forgotten
    assert "a" not in buckets.buckets and len(buckets.buckets) == 2


def test_rate_limit_config_is_checked():
    with pytest.raises(Exception, match=r"rate_limit\.mode"):
        load_config(environ={"QMTL__GATEWAY__RATE_LIMIT__MODE": "sometimes"})
    with pytest.raises(Exception, match=r"rate_limit\.read"):
        load_config(environ={"QMTL__GATEWAY__RATE_LIMIT__READ__RATE": "0"})
    cfg = load_config(environ={})
    assert cfg.gateway.rate_limit.mode == "auto"  # enforced in JWT mode, disabled in development mode
