"""The world policy engine (pure functions): parsing, gates, score, constraints,
currency, samples, hysteresis, decisions and plans."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from qmtl.common.statehash import activation_state_hash, policy_state_hash
from qmtl.contracts.loader import load_schema_files
from qmtl.worldservice import policy as pol
from qmtl.worldservice.policy import HysteresisState, Policy, PolicyParser, StrategyInput

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
parse_policy = PolicyParser().parse  # the compiled validator, built once for this module


def minutes(n: float) -> timedelta:
    return timedelta(minutes=n)


FULL = """
description: full example
data_currency: {max_lag: 15m}
samples: {min_samples: 100}
gates:
  all:
    - {metric: sharpe, op: ">=", value: 1.0}
    - any:
        - {metric: max_drawdown, op: "<=", value: 0.2}
        - {metric: win_rate, op: ">", value: 0.55}
score: {weights: {sharpe: 0.5, win_rate: 1.0}, bias: 0.1}
constraints: {min_score: 0.9, max_active: 2, max_weight: 0.4}
hysteresis: {promote_after: 3, demote_after: 2, min_dwell: 1h, max_mode: live}
"""


# --------------------------------------------------------------------------- parsing


def test_parse_full_policy_and_build():
    doc = parse_policy(FULL)
    p = Policy.from_document(doc, version=3)
    assert p.version == 3
    assert p.max_lag == 900 and p.min_samples == 100
    assert p.weights == {"sharpe": 0.5, "win_rate": 1.0} and p.bias == 0.1
    assert (p.min_score, p.max_active, p.max_weight) == (0.9, 2, 0.4)
    assert (p.promote_after, p.demote_after, p.min_dwell, p.max_mode) == (3, 2, 3600, "live")


def test_schema_examples_parse_as_policies():
    import yaml

    for example in load_schema_files()["policy_document.schema.json"]["examples"]:
        assert parse_policy(yaml.safe_dump(example)) == example


def test_empty_mapping_is_a_policy_that_imposes_nothing():
    p = Policy.from_document(parse_policy("{}"))
    j = pol.judge(p, metrics={}, samples=None, data_end=None, now=T0)
    assert j.passed and j.score == 0.0


def test_yaml_syntax_error_names_line_and_column():
    with pytest.raises(pol.PolicyError) as info:
        parse_policy("gates:\n  all: [\n    {metric: a, op: '>', value: 1}\n  oops\n")
    err = info.value.errors[0]
    assert err["line"] == 4 and err["column"] >= 1
    assert "line 4" in str(info.value)


@pytest.mark.parametrize("text,kind", [("", "empty"), ("- a\n- b\n", "list"), ("42", "int")])
def test_policy_must_be_a_mapping(text, kind):
    with pytest.raises(pol.PolicyError, match=f"mapping, got {kind}"):
        parse_policy(text)


@pytest.mark.parametrize(
    "text,pointer",
    [
        ("gates: {metric: sharpe, op: '=>', value: 1}", "/gates/op"),
        ("constraints: {max_weight: 1.5}", "/constraints/max_weight"),
        ("hysteresis: {promote_after: 0}", "/hysteresis/promote_after"),
        ("data_currency: {max_lag: soon}", "/data_currency/max_lag"),
        ("samples: {min_samples: -1}", "/samples/min_samples"),
        ("unknown_section: 1", ""),
        ("hysteresis: {max_mode: production}", "/hysteresis/max_mode"),
    ],
)
def test_schema_violations_name_the_json_pointer(text, pointer):
    with pytest.raises(pol.PolicyError) as info:
        parse_policy(text)
    assert info.value.errors[0]["pointer"] == pointer


def test_nested_gate_violation_is_reported_inside_the_nesting():
    text = "gates:\n  all:\n    - any:\n        - {metric: a, op: '>', value: x}\n"
    with pytest.raises(pol.PolicyError) as info:
        parse_policy(text)
    pointers = [e["pointer"] for e in info.value.errors]
    assert "/gates/all/0/any/0/value" in pointers


def test_duplicate_keys_are_rejected():
    with pytest.raises(pol.PolicyError, match="duplicate key 'gates'"):
        parse_policy("gates: {metric: a, op: '>', value: 1}\ngates: {metric: b, op: '>', value: 1}\n")


def test_aliases_are_rejected():
    with pytest.raises(pol.PolicyError, match="aliases are not allowed"):
        parse_policy("score: {weights: &w {a: 1}}\nx: *w\n")


@pytest.mark.parametrize("text", ["gates: {metric: a, op: '>', value: .nan}", "score: {bias: .inf}"])
def test_non_finite_numbers_are_rejected(text):
    with pytest.raises(pol.PolicyError, match="non-finite"):
        parse_policy(text)


def test_checksum_is_sha256_of_the_text():
    assert pol.checksum("a") == "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"


# --------------------------------------------------------------------------- gates and score


@pytest.mark.parametrize(
    "op,value,expected",
    [(">", 1.0, True), (">", 1.5, False), (">=", 1.5, True), ("<", 2.0, True), ("<=", 1.4, False), ("==", 1.5, True), ("!=", 1.5, False)],
)
def test_threshold_ops(op, value, expected):
    ok, desc = pol.check_gate({"metric": "m", "op": op, "value": value}, {"m": 1.5})
    assert ok is expected
    assert desc.startswith(f"m {op}") and "(got 1.5)" in desc


def test_missing_metric_fails_its_threshold():
    ok, desc = pol.check_gate({"metric": "sharpe", "op": ">", "value": 0}, {})
    assert not ok and desc == "metric 'sharpe' not reported"


def test_and_or_nesting():
    gate = parse_policy(FULL)["gates"]
    assert pol.check_gate(gate, {"sharpe": 1.2, "max_drawdown": 0.1})[0]  # all + any(first)
    assert pol.check_gate(gate, {"sharpe": 1.2, "max_drawdown": 0.5, "win_rate": 0.6})[0]  # any(second)
    ok, desc = pol.check_gate(gate, {"sharpe": 1.2, "max_drawdown": 0.5, "win_rate": 0.5})
    assert not ok and desc.startswith("none of any(")
    ok, desc = pol.check_gate(gate, {"sharpe": 0.5, "max_drawdown": 0.1})
    assert not ok and "sharpe >= 1 (got 0.5)" in desc
    ok, desc = pol.check_gate(gate, {"sharpe": 0.5, "max_drawdown": 0.9})
    assert not ok and desc.startswith("all(")  # both branches of the AND failed


def test_deep_nesting_is_evaluated():
    gate = {"any": [{"all": [{"any": [{"metric": "a", "op": ">", "value": 1}]}, {"metric": "b", "op": "<", "value": 0}]}]}
    assert pol.check_gate(gate, {"a": 2, "b": -1})[0]
    assert not pol.check_gate(gate, {"a": 2, "b": 1})[0]


def test_linear_score():
    p = Policy(weights={"a": 2.0, "b": -1.0}, bias=0.5)
    assert pol.compute_score(p, {"a": 3, "b": 1, "c": 9}) == (5.5, [])
    assert pol.compute_score(p, {"a": 3}) == (None, ["b"])
    assert pol.compute_score(Policy(), {"a": 1}) == (0.0, [])


# --------------------------------------------------------------------------- judge: currency, samples, min_score


def test_judge_passes_with_reason_and_score():
    p = Policy.from_document(parse_policy(FULL))
    j = pol.judge(p, metrics={"sharpe": 1.2, "win_rate": 0.6, "max_drawdown": 0.1}, samples=100, data_end=T0 - minutes(15), now=T0)
    assert j.passed
    assert j.score == pytest.approx(0.1 + 0.6 + 0.6)
    assert j.reasons == ("all checks passed (score 1.3)",)


def test_judge_data_currency():
    p = Policy(max_lag=900)
    assert pol.judge(p, metrics={}, samples=None, data_end=T0 - minutes(15), now=T0).passed  # exactly max_lag
    j = pol.judge(p, metrics={}, samples=None, data_end=T0 - minutes(20), now=T0)
    assert not j.passed and j.reasons == ("data stale: lag 20m > max_lag 15m",)
    j = pol.judge(p, metrics={}, samples=None, data_end=None, now=T0)
    assert not j.passed and "data_end not reported" in j.reasons[0]


def test_judge_sample_sufficiency():
    p = Policy(min_samples=100)
    assert pol.judge(p, metrics={}, samples=100, data_end=None, now=T0).passed
    j = pol.judge(p, metrics={}, samples=99, data_end=None, now=T0)
    assert not j.passed and j.reasons == ("insufficient samples: 99 < 100",)
    j = pol.judge(p, metrics={}, samples=None, data_end=None, now=T0)
    assert not j.passed and "samples not reported" in j.reasons[0]


def test_judge_min_score_and_missing_score_metric():
    p = Policy(weights={"a": 1.0}, min_score=0.5)
    j = pol.judge(p, metrics={"a": 0.4}, samples=None, data_end=None, now=T0)
    assert not j.passed and j.reasons == ("score 0.4 < min_score 0.5",) and j.score == 0.4
    j = pol.judge(p, metrics={}, samples=None, data_end=None, now=T0)
    assert not j.passed and j.score is None and "score needs 'a'" in j.reasons[0]


def test_judge_fails_a_score_that_overflows():
    p = Policy(weights={"a": 1e300, "b": -1e300})
    j = pol.judge(p, metrics={"a": 1e300, "b": 1e300}, samples=None, data_end=None, now=T0)
    assert not j.passed and j.score is None and "not a finite number" in j.reasons[0]


def test_judge_reports_every_failure():
    p = Policy.from_document(parse_policy(FULL))
    j = pol.judge(p, metrics={"sharpe": 0.1, "win_rate": 0.1}, samples=5, data_end=T0 - timedelta(hours=1), now=T0)
    assert not j.passed
    assert [r.split(":")[0] for r in j.reasons] == ["data stale", "insufficient samples", "gate failed", "score 0.25 < min_score 0.9"]


# --------------------------------------------------------------------------- hysteresis


def run(policy, outcomes, *, allow_live=True, start=None, step=timedelta(minutes=1)):
    state = start or pol.initial_state(T0)
    now = T0
    modes = []
    for passed in outcomes:
        now += step
        state, _why = pol.step_hysteresis(policy, state, passed, now, allow_live=allow_live)
        modes.append(state.mode)
    return state, modes


def test_promotes_after_consecutive_passes_one_step_at_a_time():
    p = Policy(promote_after=3, demote_after=2)
    state, modes = run(p, [True] * 6)
    assert modes == ["backtest", "backtest", "dryrun", "dryrun", "dryrun", "live"]
    assert state.mode_reason == "promoted to live after 3 consecutive passing observation(s)"


def test_demotes_after_consecutive_failures():
    p = Policy(promote_after=1, demote_after=2)
    _state, modes = run(p, [True, True, False, False, False, False])
    assert modes == ["dryrun", "live", "live", "dryrun", "dryrun", "backtest"]


def test_alternating_results_never_flap():
    p = Policy(promote_after=2, demote_after=2)
    start = HysteresisState(mode="dryrun", since=T0 - timedelta(days=1))
    state, modes = run(p, [True, False] * 10, start=start)
    assert set(modes) == {"dryrun"} and state.since == start.since


def test_min_dwell_delays_promotion_and_demotion():
    p = Policy(promote_after=1, demote_after=1, min_dwell=3600)
    state = pol.initial_state(T0)
    state, why = pol.step_hysteresis(p, state, True, T0 + minutes(10), allow_live=True)
    assert state.mode == "backtest" and "waits for min_dwell (10m < 1h)" in why and state.passes == 1
    state, _ = pol.step_hysteresis(p, state, True, T0 + minutes(61), allow_live=True)
    assert state.mode == "dryrun" and state.since == T0 + minutes(61)
    state, why = pol.step_hysteresis(p, state, False, T0 + minutes(62), allow_live=True)
    assert state.mode == "dryrun" and "demotion to backtest waits for min_dwell" in why
    state, _ = pol.step_hysteresis(p, state, False, T0 + minutes(122), allow_live=True)
    assert state.mode == "backtest"


def test_never_live_without_allow_live_and_never_above_max_mode():
    p = Policy(promote_after=1)
    _state, modes = run(p, [True] * 5, allow_live=False)
    assert modes[-1] == "dryrun" and "live" not in modes
    _state, modes = run(Policy(promote_after=1, max_mode="backtest"), [True] * 3)
    assert modes == ["backtest"] * 3


def test_a_mode_above_the_ceiling_is_capped_at_once():
    p = Policy(promote_after=5, demote_after=5, max_mode="dryrun")
    state, why = pol.step_hysteresis(p, HysteresisState("live", T0), True, T0 + minutes(1), allow_live=True)
    assert state.mode == "dryrun" and why.startswith("capped to dryrun")


def test_step_reasons_say_what_is_left():
    p = Policy(promote_after=3, demote_after=2)
    _s, why = pol.step_hysteresis(p, pol.initial_state(T0), True, T0, allow_live=True)
    assert why == "stays backtest: promote to dryrun after 2 more passing observation(s)"
    _s, why = pol.step_hysteresis(p, HysteresisState("live", T0), True, T0, allow_live=True)
    assert why == "stays live: highest allowed mode"
    _s, why = pol.step_hysteresis(p, pol.initial_state(T0), False, T0, allow_live=True)
    assert why == "stays backtest: lowest mode"


# --------------------------------------------------------------------------- decide


def test_decide_guards_in_order():
    state = HysteresisState("live", T0, mode_reason="promoted")
    p = Policy(max_lag=600)
    args = {"data_end": T0, "as_of": T0 + minutes(1), "allow_live": True}
    assert pol.decide(p, state, suspended=True, **args) == ("backtest", "world suspended")
    assert pol.decide(p, state, circuit_breaker=True, **args) == ("backtest", "circuit breaker engaged")
    assert pol.decide(None, state, **args) == ("backtest", "no default policy")
    assert pol.decide(p, None, **args) == ("backtest", "no observation recorded")
    mode, reason = pol.decide(p, state, **args)
    assert mode == "live" and reason.endswith(": promoted")


def test_decide_checks_currency_at_as_of_with_a_stable_reason():
    state = HysteresisState("dryrun", T0)
    p = Policy(max_lag=600)
    assert pol.decide(p, state, data_end=T0, as_of=T0 + minutes(10), allow_live=False)[0] == "dryrun"
    a = pol.decide(p, state, data_end=T0, as_of=T0 + minutes(11), allow_live=False)
    b = pol.decide(p, state, data_end=T0, as_of=T0 + minutes(500), allow_live=False)
    assert a[0] == "backtest" and a == b and "data stale" in a[1]


def test_decide_never_live_without_allow_live_and_caps_at_max_mode():
    state = HysteresisState("live", T0)
    assert pol.decide(Policy(), state, data_end=T0, as_of=T0, allow_live=False) == (
        "dryrun", "live not allowed for this world (allow_live is false)")
    assert pol.decide(Policy(max_mode="dryrun"), state, data_end=T0, as_of=T0, allow_live=True)[0] == "dryrun"


def test_decide_reason_does_not_depend_on_as_of():
    state = HysteresisState("dryrun", T0, mode_reason="x")
    a = pol.decide(Policy(), state, data_end=T0, as_of=T0, allow_live=True)
    b = pol.decide(Policy(), state, data_end=T0, as_of=T0 + timedelta(days=3), allow_live=True)
    assert a == b


# --------------------------------------------------------------------------- plans (constraints)


def s(sid, **metrics):
    return StrategyInput(strategy_id=sid, metrics=metrics)


def test_plan_ranks_by_score_and_respects_max_active_and_max_weight():
    p = Policy(weights={"q": 1.0}, min_score=0.5, max_active=2, max_weight=0.4)
    plan = pol.make_plan(p, [s("a", q=0.6), s("b", q=0.9), s("c", q=0.7), s("d", q=0.1)], {}, T0)
    assert {(e["strategy_id"], e["side"], e["weight"]) for e in plan.activate} == {
        ("b", "long", 0.4), ("b", "short", 0.4), ("c", "long", 0.4), ("c", "short", 0.4)}
    assert plan.deactivate == []
    assert plan.reasons["a"].startswith("rejected: max_active 2 reached (rank 3")
    assert plan.reasons["d"] == "rejected: score 0.1 < min_score 0.5"
    assert plan.scores == {"a": 0.6, "b": 0.9, "c": 0.7, "d": 0.1}


def test_plan_ties_are_broken_by_id():
    p = Policy(weights={"q": 1.0}, max_active=1)
    plan = pol.make_plan(p, [s("z", q=1), s("a", q=1)], {}, T0)
    assert {e["strategy_id"] for e in plan.activate} == {"a"}


def test_plan_deactivates_rejected_active_strategies_and_keeps_unevaluated_ones():
    p = Policy(gates={"metric": "q", "op": ">", "value": 0}, weights={"q": 1.0}, max_active=2)
    current = {("old", "long"): (True, 1.0), ("bad", "long"): (True, 1.0), ("bad", "short"): (False, 0.0)}
    plan = pol.make_plan(p, [s("bad", q=-1), s("new1", q=1), s("new2", q=2)], current, T0)
    assert plan.deactivate == [{"strategy_id": "bad", "side": "long", "weight": 0.0}]
    assert plan.reasons["old"] == "kept: active and not evaluated"
    # "old" takes one of the two slots: only the better new strategy is selected
    assert {e["strategy_id"] for e in plan.activate} == {"new2"}
    assert "max_active 2 reached" in plan.reasons["new1"]


def test_plan_leaves_already_active_entries_alone_and_reweights_others():
    p = Policy(max_weight=0.5)
    current = {("a", "long"): (True, 0.5), ("a", "short"): (True, 0.5), ("b", "long"): (True, 1.0)}
    plan = pol.make_plan(p, [s("a"), StrategyInput("b", {}, sides=("long",))], current, T0)
    assert plan.activate == [{"strategy_id": "b", "side": "long", "weight": 0.5}]
    assert plan.reasons["a"].startswith("selected (no change)")


def test_plan_switches_off_sides_a_strategy_does_not_trade():
    current = {("a", "short"): (True, 1.0)}
    plan = pol.make_plan(Policy(), [StrategyInput("a", {}, sides=("long",))], current, T0)
    assert plan.activate == [{"strategy_id": "a", "side": "long", "weight": 1.0}]
    assert plan.deactivate == [{"strategy_id": "a", "side": "short", "weight": 0.0}]


def test_plan_uses_currency_and_samples_per_strategy():
    p = Policy(max_lag=60, min_samples=10)
    fresh = StrategyInput("fresh", {}, samples=10, data_end=T0)
    stale = StrategyInput("stale", {}, samples=10, data_end=T0 - minutes(5))
    few = StrategyInput("few", {}, samples=3, data_end=T0)
    plan = pol.make_plan(p, [fresh, stale, few], {}, T0)
    assert {e["strategy_id"] for e in plan.activate} == {"fresh"}
    assert "data stale" in plan.reasons["stale"] and "insufficient samples" in plan.reasons["few"]


def test_expand_plan_entries():
    assert pol.expand_plan_entries(["a", {"strategy_id": "b", "side": "short", "weight": 0.2}, {"strategy_id": "c", "side": "long"}]) == [
        ("a", "long", 1.0), ("a", "short", 1.0), ("b", "short", 0.2), ("c", "long", 1.0)]


# --------------------------------------------------------------------------- state hashes


def test_activation_state_hash_is_canonical():
    a = [{"strategy_id": "s2", "side": "long", "active": True, "weight": 1, "etag": "x"},
         {"strategy_id": "s1", "side": "short", "active": False, "weight": 0.0}]
    b = [{"strategy_id": "s1", "side": "short", "active": 0, "weight": 0},
         {"strategy_id": "s2", "side": "long", "active": True, "weight": 1.0, "etag": "other"}]
    assert activation_state_hash(a) == activation_state_hash(b)
    assert len(activation_state_hash(a)) == 64
    assert activation_state_hash(a) != activation_state_hash(a[:1])
    changed = [dict(a[0], weight=0.5), a[1]]
    assert activation_state_hash(changed) != activation_state_hash(a)
    import hashlib
    assert activation_state_hash([]) == hashlib.sha256(b"qmtl.activation.v2:" + bytes(32)).hexdigest()


def test_policy_state_hash():
    h = policy_state_hash("w", 2, "abc", "ACTIVE")
    assert h != policy_state_hash("w", 3, "abc", "ACTIVE") != policy_state_hash("w", 2, "abc", "DEPRECATED")
    assert policy_state_hash("w", 0, None, None) == policy_state_hash("w", None, "ignored", "ACTIVE")
    import hashlib
    import json
    expected = hashlib.sha256(json.dumps({"checksum": "abc", "policy_version": 2, "status": "ACTIVE", "world_id": "w"},
                                         separators=(",", ":"), sort_keys=True).encode()).hexdigest()
    assert h == expected
