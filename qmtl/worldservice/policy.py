"""The world policy engine: pure functions, no I/O.

A policy is a YAML document whose format is ``specs/schemas/policy_document.schema.json``
(PolicyDocument). This module parses and validates one (:class:`PolicyParser`), turns it
into a :class:`Policy`, and applies it:

* :func:`judge` — does one set of data (a world observation, or one strategy's metrics)
  pass? Data currency, sample sufficiency, gates (AND/OR of metric thresholds), the
  linear score and ``min_score``; every failure comes with a reason.
* :func:`step_hysteresis` — advance a world's mode (backtest < dryrun < live) by one
  observation: up one step after ``promote_after`` consecutive passes, down one step
  after ``demote_after`` consecutive failures, never before ``min_dwell`` in the current
  mode, never above the ceiling (``max_mode``, and ``dryrun`` without ``allow_live``).
* :func:`decide` — the effective mode at ``as_of`` from the stored hysteresis state:
  a pure read that re-checks data currency at ``as_of`` and the world's guards.
* :func:`make_plan` — which strategy sides to switch on and off, given per-strategy
  metrics and the current activation, under the score ranking and the constraints
  (``max_active``, ``min_score``, ``max_weight``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import yaml
from jsonschema import Draft202012Validator

from qmtl.common.durations import format_duration, parse_duration
from qmtl.contracts.connexion31 import schema_errors
from qmtl.contracts.constants import MODES, SIDES, Mode
from qmtl.contracts.loader import load_schema_files, schema_registry

POLICY_SCHEMA_FILE = "policy_document.schema.json"
# MODES (promotion order) and SIDES are the enums of decision_envelope / activation_envelope.

# --------------------------------------------------------------------------- parsing


class PolicyError(ValueError):
    """A policy document that cannot be used; ``errors`` say where (line/column or pointer)."""

    def __init__(self, message: str, errors: list[dict]) -> None:
        super().__init__(message)
        self.errors = errors


def _num(v: float) -> str:
    return f"{v:g}"


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML without aliases (no expansion bombs) and without duplicate keys."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases are not allowed in a policy", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                duplicate = False
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            try:
                seen.add(key)
            except TypeError:
                pass
        return super().construct_mapping(node, deep=deep)


class PolicyParser:
    """Parses and validates policy YAML against PolicyDocument; owns the compiled validator
    (built once, from the spec's schema files, when the parser is made)."""

    def __init__(self) -> None:
        schema = load_schema_files()[POLICY_SCHEMA_FILE]
        self._validator = Draft202012Validator(schema, registry=schema_registry(), format_checker=Draft202012Validator.FORMAT_CHECKER)

    def parse(self, text: str) -> dict:
        """The parsed document, or :class:`PolicyError`.

        A syntax error names its line and column (1-based); a schema violation names the
        JSON pointer of the offending member.
        """
        try:
            doc = yaml.load(text, Loader=_StrictLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else None
            column = mark.column + 1 if mark else None
            problem = exc.problem or exc.context or "invalid YAML"
            where = f" at line {line}, column {column}" if mark else ""
            raise PolicyError(f"policy is not valid YAML: {problem}{where}", [{"line": line, "column": column, "message": problem}]) from exc
        except yaml.YAMLError as exc:
            raise PolicyError(f"policy is not valid YAML: {exc}", [{"message": str(exc)}]) from exc
        if not isinstance(doc, dict):
            kind = "empty" if doc is None else type(doc).__name__
            raise PolicyError(f"policy must be a YAML mapping, got {kind}", [{"pointer": "", "message": "expected a mapping"}])
        bad = _non_finite(doc)
        if bad is not None:
            raise PolicyError(f"policy has a non-finite number at {bad or '(root)'}", [{"pointer": bad, "message": "numbers must be finite"}])
        errors = schema_errors(self._validator, doc)
        if errors:
            first = errors[0]
            raise PolicyError(f"policy does not conform to PolicyDocument: {first['message']} at {first['pointer'] or '(root)'}", errors)
        return doc


def _non_finite(value: Any, pointer: str = "") -> str | None:
    """JSON pointer of the first NaN/infinite number (YAML has .nan and .inf), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return pointer
    if isinstance(value, dict):
        for k, v in value.items():
            found = _non_finite(v, f"{pointer}/{k}")
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _non_finite(v, f"{pointer}/{i}")
            if found is not None:
                return found
    return None


def checksum(text: str) -> str:
    """SHA-256 hex of a policy's YAML text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- the policy


@dataclass(frozen=True)
class Policy:
    version: int = 0
    max_lag: float | None = None
    min_samples: int | None = None
    gates: Mapping[str, Any] | None = None
    weights: Mapping[str, float] = field(default_factory=dict)
    bias: float = 0.0
    min_score: float | None = None
    max_active: int | None = None
    max_weight: float | None = None
    promote_after: int = 1
    demote_after: int = 1
    min_dwell: float = 0.0
    max_mode: str = Mode.LIVE

    @classmethod
    def from_document(cls, doc: Mapping[str, Any], version: int = 0) -> Policy:
        cur = doc.get("data_currency") or {}
        samples = doc.get("samples") or {}
        score = doc.get("score") or {}
        cons = doc.get("constraints") or {}
        hyst = doc.get("hysteresis") or {}
        return cls(
            version=version,
            max_lag=parse_duration(cur["max_lag"]) if "max_lag" in cur else None,
            min_samples=samples.get("min_samples"),
            gates=doc.get("gates"),
            weights=dict(score.get("weights") or {}),
            bias=float(score.get("bias", 0.0)),
            min_score=cons.get("min_score"),
            max_active=cons.get("max_active"),
            max_weight=cons.get("max_weight"),
            promote_after=int(hyst.get("promote_after", 1)),
            demote_after=int(hyst.get("demote_after", 1)),
            min_dwell=parse_duration(hyst["min_dwell"]) if "min_dwell" in hyst else 0.0,
            max_mode=str(hyst.get("max_mode", Mode.LIVE)),
        )


# --------------------------------------------------------------------------- judging


_OPS = {
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}


def check_gate(gate: Mapping[str, Any], metrics: Mapping[str, float]) -> tuple[bool, str]:
    """``(holds, description)``; the description says what failed (or what held)."""
    if "all" in gate:
        results = [check_gate(g, metrics) for g in gate["all"]]
        failed = [d for ok, d in results if not ok]
        if failed:
            return False, failed[0] if len(failed) == 1 else "all(" + "; ".join(failed) + ")"
        return True, "all(" + "; ".join(d for _, d in results) + ")"
    if "any" in gate:
        results = [check_gate(g, metrics) for g in gate["any"]]
        held = [d for ok, d in results if ok]
        if held:
            return True, held[0]
        return False, "none of any(" + "; ".join(d for _, d in results) + ")"
    metric, op, value = gate["metric"], gate["op"], gate["value"]
    if metric not in metrics:
        return False, f"metric {metric!r} not reported"
    got = metrics[metric]
    ok = _OPS[op](got, value)
    return ok, f"{metric} {op} {_num(value)} (got {_num(got)})"


def compute_score(policy: Policy, metrics: Mapping[str, float]) -> tuple[float | None, list[str]]:
    """``bias + Σ weight × metric``; None and the missing metric names when one is absent."""
    missing = sorted(m for m in policy.weights if m not in metrics)
    if missing:
        return None, missing
    return policy.bias + sum(w * metrics[m] for m, w in policy.weights.items()), []


@dataclass(frozen=True)
class Judgement:
    passed: bool
    score: float | None
    reasons: tuple[str, ...]


def judge(
    policy: Policy,
    *,
    metrics: Mapping[str, float],
    samples: int | None,
    data_end: datetime | None,
    now: datetime,
) -> Judgement:
    """Whether the data passes the policy's currency, samples, gates and min_score."""
    failures: list[str] = []
    if policy.max_lag is not None:
        if data_end is None:
            failures.append(f"data_end not reported (max_lag {format_duration(policy.max_lag)})")
        else:
            lag = (now - data_end).total_seconds()
            if lag > policy.max_lag:
                failures.append(f"data stale: lag {format_duration(lag)} > max_lag {format_duration(policy.max_lag)}")
    if policy.min_samples is not None:
        if samples is None:
            failures.append(f"samples not reported (min_samples {policy.min_samples})")
        elif samples < policy.min_samples:
            failures.append(f"insufficient samples: {samples} < {policy.min_samples}")
    if policy.gates is not None:
        ok, desc = check_gate(policy.gates, metrics)
        if not ok:
            failures.append(f"gate failed: {desc}")
    score, missing = compute_score(policy, metrics)
    if score is None:
        failures.append("score needs " + ", ".join(repr(m) for m in missing) + " (not reported)")
    elif not math.isfinite(score):
        failures.append("score is not a finite number (metrics too large)")
        score = None
    elif policy.min_score is not None and score < policy.min_score:
        failures.append(f"score {_num(score)} < min_score {_num(policy.min_score)}")
    if failures:
        return Judgement(False, score, tuple(failures))
    assert score is not None  # no failures: the score was computed
    return Judgement(True, score, (f"all checks passed (score {_num(score)})",))


# --------------------------------------------------------------------------- hysteresis


@dataclass(frozen=True)
class HysteresisState:
    mode: str
    since: datetime
    passes: int = 0
    fails: int = 0
    mode_reason: str = "initial mode"


def ceiling(policy: Policy, allow_live: bool) -> str:
    """The highest mode the world may reach: ``max_mode``, and never live without allow_live."""
    top = policy.max_mode
    if top == Mode.LIVE and not allow_live:
        top = Mode.DRYRUN
    return top


def initial_state(now: datetime) -> HysteresisState:
    return HysteresisState(mode=Mode.BACKTEST, since=now)


def step_hysteresis(
    policy: Policy,
    state: HysteresisState,
    passed: bool,
    now: datetime,
    *,
    allow_live: bool,
) -> tuple[HysteresisState, str]:
    """Advance the state by one observation; ``(new state, what happened)``."""
    idx = MODES.index(state.mode)
    top = ceiling(policy, allow_live)
    top_idx = MODES.index(top)
    dwell = (now - state.since).total_seconds()
    if idx > top_idx:
        why = f"capped to {top} (highest allowed mode)"
        return HysteresisState(top, now, 0, 0, why), why
    if passed:
        passes, fails = state.passes + 1, 0
        if idx == top_idx:
            return HysteresisState(state.mode, state.since, passes, fails, state.mode_reason), f"stays {state.mode}: highest allowed mode"
        target = MODES[idx + 1]
        if passes < policy.promote_after:
            left = policy.promote_after - passes
            return (
                HysteresisState(state.mode, state.since, passes, fails, state.mode_reason),
                f"stays {state.mode}: promote to {target} after {left} more passing observation(s)",
            )
        if dwell < policy.min_dwell:
            return (
                HysteresisState(state.mode, state.since, passes, fails, state.mode_reason),
                f"stays {state.mode}: promotion to {target} waits for min_dwell ({format_duration(dwell)} < {format_duration(policy.min_dwell)})",
            )
        why = f"promoted to {target} after {passes} consecutive passing observation(s)"
        return HysteresisState(target, now, 0, 0, why), why
    passes, fails = 0, state.fails + 1
    if idx == 0:
        return HysteresisState(state.mode, state.since, passes, fails, state.mode_reason), f"stays {MODES[0]}: lowest mode"
    target = MODES[idx - 1]
    if fails < policy.demote_after:
        left = policy.demote_after - fails
        return (
            HysteresisState(state.mode, state.since, passes, fails, state.mode_reason),
            f"stays {state.mode}: demote to {target} after {left} more failing observation(s)",
        )
    if dwell < policy.min_dwell:
        return (
            HysteresisState(state.mode, state.since, passes, fails, state.mode_reason),
            f"stays {state.mode}: demotion to {target} waits for min_dwell ({format_duration(dwell)} < {format_duration(policy.min_dwell)})",
        )
    why = f"demoted to {target} after {fails} consecutive failing observation(s)"
    return HysteresisState(target, now, 0, 0, why), why


# --------------------------------------------------------------------------- decide


def _iso(ts: datetime) -> str:
    return ts.isoformat().replace("+00:00", "Z")


def decide(
    policy: Policy | None,
    state: HysteresisState | None,
    *,
    data_end: datetime | None,
    as_of: datetime,
    allow_live: bool,
    suspended: bool = False,
    circuit_breaker: bool = False,
) -> tuple[str, str]:
    """``(effective_mode, reason)`` at ``as_of``. Reasons are stable while the decision is
    (they do not contain ``as_of`` or the current lag), so an etag over them changes only
    when the decision changes."""
    if suspended:
        return Mode.BACKTEST, "world suspended"
    if circuit_breaker:
        return Mode.BACKTEST, "circuit breaker engaged"
    if policy is None:
        return Mode.BACKTEST, "no default policy"
    if state is None:
        return Mode.BACKTEST, "no observation recorded"
    if policy.max_lag is not None:
        if data_end is None:
            return Mode.BACKTEST, "data currency unknown: no data_end recorded"
        if (as_of - data_end).total_seconds() > policy.max_lag:
            return Mode.BACKTEST, f"data stale: data_end {_iso(data_end)} is more than {format_duration(policy.max_lag)} old"
    mode = state.mode
    if MODES.index(mode) > MODES.index(policy.max_mode):
        return policy.max_mode, f"capped to {policy.max_mode} by the policy's max_mode"
    if mode == Mode.LIVE and not allow_live:
        return Mode.DRYRUN, "live not allowed for this world (allow_live is false)"
    return mode, f"{mode} since {_iso(state.since)}: {state.mode_reason}"


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class StrategyInput:
    strategy_id: str
    metrics: Mapping[str, float]
    samples: int | None = None
    data_end: datetime | None = None
    sides: tuple[str, ...] = SIDES


@dataclass(frozen=True)
class PlanResult:
    activate: list[dict]
    deactivate: list[dict]
    reasons: dict[str, str]
    scores: dict[str, float]
    topk: list[str] = field(default_factory=list)  # selected ids, best score first (ties by id)
    promote: list[str] = field(default_factory=list)  # selected, with no active side before
    demote: list[str] = field(default_factory=list)  # had an active side, switched off entirely
    kept: list[str] = field(default_factory=list)  # active, not evaluated: left as they are


def make_plan(
    policy: Policy,
    strategies: Sequence[StrategyInput],
    current: Mapping[tuple[str, str], tuple[bool, float]],
    now: datetime,
) -> PlanResult:
    """The changes that bring the activation set in line with the policy.

    ``current`` maps ``(strategy_id, side)`` → ``(active, weight)``. Passing strategies are
    ranked by score (then id) and at most ``max_active`` are selected — strategies that are
    active but not evaluated stay as they are and take their slots. A selected strategy's
    sides (``sides``, default both) are set active with weight ``min(1, max_weight)``;
    its other sides and every side of a rejected strategy are switched off.
    """
    reasons: dict[str, str] = {}
    scores: dict[str, float] = {}
    judged: list[tuple[StrategyInput, Judgement]] = []
    for s in strategies:
        j = judge(policy, metrics=s.metrics, samples=s.samples, data_end=s.data_end, now=now)
        judged.append((s, j))
        if j.score is not None:
            scores[s.strategy_id] = j.score
        if not j.passed:
            reasons[s.strategy_id] = "rejected: " + "; ".join(j.reasons)
    evaluated = {s.strategy_id for s in strategies}
    kept = sorted({sid for (sid, _side), (active, _w) in current.items() if active and sid not in evaluated})
    for sid in kept:
        reasons[sid] = "kept: active and not evaluated"
    passing = sorted(
        ((s, j) for s, j in judged if j.passed),
        key=lambda sj: (-(sj[1].score or 0.0), sj[0].strategy_id),
    )
    slots = len(passing) if policy.max_active is None else max(0, policy.max_active - len(kept))
    selected = passing[:slots]
    for rank, (s, j) in enumerate(passing[slots:], start=slots + 1):
        reasons[s.strategy_id] = f"rejected: max_active {policy.max_active} reached (rank {rank} by score {_num(j.score or 0.0)})"
    weight = min(1.0, policy.max_weight if policy.max_weight is not None else 1.0)
    activate: list[dict] = []
    deactivate: list[dict] = []
    selected_ids = set()
    for s, j in selected:
        selected_ids.add(s.strategy_id)
        changed = False
        for side in SIDES:
            active, w = current.get((s.strategy_id, side), (False, 0.0))
            if side in s.sides:
                if not active or not math.isclose(w, weight, abs_tol=1e-12):
                    activate.append({"strategy_id": s.strategy_id, "side": side, "weight": weight})
                    changed = True
            elif active:
                deactivate.append({"strategy_id": s.strategy_id, "side": side, "weight": 0.0})
                changed = True
        reasons[s.strategy_id] = ("selected: " if changed else "selected (no change): ") + "; ".join(j.reasons)
    for s, _j in judged:
        if s.strategy_id in selected_ids:
            continue
        for side in SIDES:
            active, _w = current.get((s.strategy_id, side), (False, 0.0))
            if active:
                deactivate.append({"strategy_id": s.strategy_id, "side": side, "weight": 0.0})
    topk = [s.strategy_id for s, _j in selected]
    was_active = {sid for (sid, _side), (active, _w) in current.items() if active}
    promote = [sid for sid in topk if sid not in was_active]
    demote = sorted({s.strategy_id for s, _j in judged if s.strategy_id in was_active and s.strategy_id not in selected_ids})
    return PlanResult(activate, deactivate, reasons, scores, topk, promote, demote, kept)


def expand_plan_entries(entries: Iterable[Any]) -> list[tuple[str, str, float]]:
    """Plan entries → ``(strategy_id, side, weight)``: a bare id means both sides, weight 1.0."""
    out: list[tuple[str, str, float]] = []
    for e in entries:
        if isinstance(e, str):
            out.extend((e, side, 1.0) for side in SIDES)
        else:
            out.append((e["strategy_id"], e["side"], float(e.get("weight", 1.0))))
    return out
