"""The worlds API as the Aug-2025 clients spoke it (issue 12 items 3 and 6, and the refused
activation read without ``strategy_id``): against ``qmtl up``, bodies as literal bytes."""

from __future__ import annotations

import httpx
import pytest

from tests.compat.aug2025 import JSON, up  # noqa: F401 - the module's qmtl up

pytestmark = pytest.mark.asyncio

WORLD = b'{"world_id": "aug25-world", "name": "Aug 2025 world"}'
POLICY = (
    b'{"set_default": true, "yaml": "data_currency: {max_lag: 1h}\\nsamples: {min_samples: 100}\\n'
    b'gates:\\n  all:\\n    - {metric: sharpe, op: \\">=\\", value: 1.0}\\nscore: {weights: {sharpe: 1.0}}\\n'
    b'constraints: {min_score: 0.5, max_active: 2, max_weight: 0.5}\\n"}'
)
# The world's latest data, with the latest metrics of the strategies it runs.
OBSERVATION = (
    b'{"data_end": "2025-08-28T08:55:00Z", "samples": 500, "metrics": {"sharpe": 1.3}, "strategies": ['
    b'{"strategy_id": "s1", "samples": 500, "data_end": "2025-08-28T08:55:00Z", "metrics": {"sharpe": 2.0}}, '
    b'{"strategy_id": "s2", "samples": 500, "data_end": "2025-08-28T08:55:00Z", "metrics": {"sharpe": 1.5}}, '
    b'{"strategy_id": "s3", "samples": 500, "data_end": "2025-08-28T08:55:00Z", "metrics": {"sharpe": 1.2}}, '
    b'{"strategy_id": "s9", "samples": 500, "data_end": "2025-08-28T08:55:00Z", "metrics": {"sharpe": 0.2}}]}'
)
EVALUATE = b'{"as_of": "2025-08-28T09:00:00Z"}'  # the documented body, exactly
APPLY = b'{"run_id": "aug25-run-1", "plan": {"activate": ["s9"], "deactivate": []}}'
LIVE = {**JSON, "X-Allow-Live": "true"}


async def _world(c: httpx.AsyncClient) -> None:
    r = await c.post("/worlds", content=WORLD, headers=JSON)
    assert r.status_code in (201, 409), r.text
    if r.status_code == 201:
        r = await c.post("/worlds/aug25-world/policies", content=POLICY, headers=JSON)
        assert r.status_code == 201, r.text


async def test_decide_then_apply_as_the_era_client_did(up):
    async with httpx.AsyncClient(base_url=up.url, timeout=15) as c:
        await _world(c)
        r = await c.get("/worlds/aug25-world/decide")
        assert r.status_code == 200, r.text
        decision = r.json()
        assert decision["world_id"] == "aug25-world" and decision["effective_mode"] in ("backtest", "dryrun", "live")
        assert decision["policy_version"] == 1 and r.headers["etag"]
        r = await c.post("/worlds/aug25-world/apply", content=APPLY, headers=JSON)  # no consent
        assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json", r.text
        assert "X-Allow-Live" in r.json()["detail"]
        r = await c.post("/worlds/aug25-world/apply", content=APPLY, headers=LIVE)
        assert r.status_code == 200, r.text
        result = r.json()
        assert result["ok"] is True and result["run_id"] == "aug25-run-1"
        again = await c.post("/worlds/aug25-world/apply", content=APPLY, headers=LIVE)  # idempotent by run_id
        assert again.status_code == 200 and again.json() == result and again.headers["idempotent-replayed"] == "true"
        r = await c.get("/worlds/aug25-world/activation", params={"strategy_id": "s9", "side": "long"})
        assert r.status_code == 200 and r.json()["active"] is True and r.json()["weight"] == 1.0, r.text


async def test_activation_read_without_strategy_id_is_refused_naming_it(up):
    async with httpx.AsyncClient(base_url=up.url, timeout=15) as c:
        await _world(c)
        for params in ({}, {"side": "long"}):
            r = await c.get("/worlds/aug25-world/activation", params=params)
            assert r.status_code == 400, (params, r.text)
            assert r.headers["content-type"] == "application/problem+json"
            assert "strategy_id" in r.json()["detail"], r.text


async def test_evaluate_with_the_documented_as_of_body(up):
    async with httpx.AsyncClient(base_url=up.url, timeout=15) as c:
        await _world(c)
        r = await c.post("/worlds/aug25-world/apply", content=APPLY, headers=LIVE)  # s9 active (see the test above)
        assert r.status_code == 200, r.text
        r = await c.put("/worlds/aug25-world/observations", content=OBSERVATION, headers=JSON)
        assert r.status_code == 200, r.text
        r = await c.post("/worlds/aug25-world/evaluate", content=EVALUATE, headers=JSON)
        assert r.status_code == 200, r.text  # was 422 "'strategies' is a required property"
        plan = r.json()
        # the documented answer's fields, ranked by score with the policy's top-k (max_active 2)
        assert plan["topk"] == ["s1", "s2"] and plan["promote"] == ["s1", "s2"] and plan["demote"] == ["s9"]
        assert isinstance(plan["notes"], str) and "known from observations" in plan["notes"]
        # and today's plan besides
        assert plan["as_of"].startswith("2025-08-28T09:00:00") and plan["policy_version"] == 1
        assert {(e["strategy_id"], e["side"]) for e in plan["activate"]} == {("s1", "long"), ("s1", "short"), ("s2", "long"), ("s2", "short")}
        assert {(e["strategy_id"], e["side"]) for e in plan["deactivate"]} == {("s9", "long"), ("s9", "short")}
        assert "max_active 2 reached" in plan["reasons"]["s3"] and plan["scores"]["s1"] == 2.0
        # read-only: s9 is still active
        r = await c.get("/worlds/aug25-world/activation", params={"strategy_id": "s9", "side": "long"})
        assert r.json()["active"] is True
        # caller-supplied strategies stay an option
        r = await c.post("/worlds/aug25-world/evaluate", headers=JSON, content=(
            b'{"as_of": "2025-08-28T09:00:00Z", "strategies": [{"strategy_id": "s3", "samples": 500, '
            b'"data_end": "2025-08-28T08:55:00Z", "metrics": {"sharpe": 3.0}}]}'))
        assert r.status_code == 200 and r.json()["topk"] == ["s3"], r.text
