"""Pure helpers that turn stored rows into what readers and events see (no I/O).

Activation *views*: a world's stored activation entries as a reader sees them. When the
world is gated — deleted, SUSPENDED, circuit breaker engaged, or (for reads only)
frozen by an apply in flight — every entry reads ``active: false, weight: 0`` (orders
gated off). A view's etag is the stored entry's etag when the world has never been
gated, and otherwise a digest of it with the gate and the world's ``gate_epoch``, so
that it changes whenever what a reader sees changes and never repeats an older value.
A view's ``ts`` is the later of the entry's change and the world's last gate change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from qmtl.common.statehash import activation_state_hash, canonical_json
from qmtl.contracts.constants import WorldState
from qmtl.worldservice.store import utc

GATE_APPLY = "apply"
GATE_SUSPENDED = "suspended"
GATE_CIRCUIT_BREAKER = "circuit_breaker"
GATE_DELETED = "deleted"


def now_utc() -> datetime:
    return datetime.now(UTC)


def iso(ts: datetime) -> str:
    """RFC 3339 UTC with microseconds and ``Z``."""
    return utc(ts).isoformat(timespec="microseconds").replace("+00:00", "Z")  # type: ignore[union-attr]


def parse_ts(value: str | datetime) -> datetime:
    """An RFC 3339 timestamp → aware UTC datetime (a naive one is taken as UTC).
    ValueError when it is not one or falls outside the representable range."""
    try:
        if isinstance(value, datetime):
            return utc(value)  # type: ignore[return-value]
        text = value.strip()
        if text.endswith(("z", "Z")):
            text = text[:-1] + "+00:00"
        return utc(datetime.fromisoformat(text))  # type: ignore[return-value]
    except OverflowError:
        raise ValueError(f"timestamp out of range: {value!r}") from None


def require_storable_text(body: Any) -> None:
    """422 (Unprocessable) when a request body holds a string a database cannot store."""
    from qmtl.common.errors import Unprocessable

    errors = check_text(body)
    if errors:
        raise Unprocessable(f"request body: {errors[0]['message']} at {errors[0]['pointer'] or '/'}", ext={"errors": errors})


def check_text(value: Any, pointer: str = "") -> list[dict]:
    """Strings a database cannot store (NUL, unpaired surrogates), as problem ``errors``."""
    errors: list[dict] = []
    if isinstance(value, str):
        if "\x00" in value:
            errors.append({"pointer": pointer, "message": "must not contain NUL characters"})
        else:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                errors.append({"pointer": pointer, "message": "must not contain unpaired surrogates"})
    elif isinstance(value, dict):
        for k, v in value.items():
            part = str(k).replace("~", "~0").replace("/", "~1")
            errors += check_text(k, pointer + "/" + part)
            errors += check_text(v, pointer + "/" + part)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            errors += check_text(v, f"{pointer}/{i}")
    return errors


def digest(value: Any, length: int = 32) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()[:length]


def entry_etag(world_id: str, strategy_id: str, side: str, active: bool, weight: float, rev: int) -> str:
    """Etag of a stored entry; ``rev`` (the world's write revision) makes every change unique."""
    return digest([world_id, strategy_id, side, bool(active), float(weight), int(rev)])


def decision_etag(world_id: str, policy_version: int, mode: str, reason: str) -> str:
    return digest(["decision", world_id, int(policy_version), mode, reason])


def gate_of(world: Mapping[str, Any], *, include_freeze: bool) -> str | None:
    """Why every activation of ``world`` reads inactive, or None."""
    if world["state"] == WorldState.DELETED:
        return GATE_DELETED
    if world["state"] == WorldState.SUSPENDED:
        return GATE_SUSPENDED
    if world["circuit_breaker"]:
        return GATE_CIRCUIT_BREAKER
    if include_freeze and world["apply_run_id"]:
        return GATE_APPLY
    return None


def entry_from_row(row: Mapping[str, Any]) -> dict:
    return {
        "strategy_id": row["strategy_id"],
        "side": row["side"],
        "active": bool(row["active"]),
        "weight": float(row["weight"]),
        "etag": row["etag"],
        "run_id": row["run_id"],
        "ts": utc(row["ts"]),
    }


def entry_to_json(entry: Mapping[str, Any]) -> dict:
    """A stored entry as JSON (apply snapshots)."""
    return dict(entry, ts=iso(entry["ts"]))


def entry_from_json(data: Mapping[str, Any]) -> dict:
    return dict(data, ts=parse_ts(data["ts"]))


def envelope(world: Mapping[str, Any], entry: Mapping[str, Any], gate: str | None) -> dict:
    """The ActivationEnvelope readers see for ``entry`` of ``world`` under ``gate``."""
    active, weight, etag = entry["active"], entry["weight"], entry["etag"]
    epoch = int(world.get("gate_epoch") or 0)
    if gate is not None:
        active, weight = False, 0.0
    if gate is not None or epoch:
        etag = digest([etag, gate or "", epoch])
    ts = entry["ts"]
    changed = utc(world.get("gate_changed_at"))
    if changed is not None and changed > ts:
        ts = changed
    env = {
        "world_id": world["world_id"],
        "strategy_id": entry["strategy_id"],
        "side": entry["side"],
        "active": bool(active),
        "weight": float(weight),
        "etag": etag,
        "ts": iso(ts),
    }
    if entry.get("run_id"):
        env["run_id"] = entry["run_id"]
    return env


def absent_envelope(world: Mapping[str, Any], strategy_id: str, side: str) -> dict:
    """An entry the world has never had: inactive, weight 0, with a stable etag."""
    return {
        "world_id": world["world_id"],
        "strategy_id": strategy_id,
        "side": side,
        "active": False,
        "weight": 0.0,
        "etag": digest(["absent", world["world_id"], strategy_id, side]),
        "ts": iso(world["created_at"]),
    }


def view(world: Mapping[str, Any], entries: Iterable[Mapping[str, Any]], *, include_freeze: bool) -> dict[tuple[str, str], dict]:
    """(strategy_id, side) → envelope, for every stored entry of the world."""
    gate = gate_of(world, include_freeze=include_freeze)
    return {(e["strategy_id"], e["side"]): envelope(world, e, gate) for e in entries}


def state_hash(view_: Mapping[tuple[str, str], Mapping[str, Any]]) -> str:
    return activation_state_hash(view_.values())


def activation_events(
    before: Mapping[tuple[str, str], Mapping[str, Any]],
    after: Mapping[tuple[str, str], Mapping[str, Any]],
    *,
    run_id: str | None = None,
) -> list[dict]:
    """One ActivationUpdated per entry whose view changed, in (strategy_id, side) order.

    Each carries ``state_hash``: the hash of the world's activation set after the whole
    change (all events of one apply carry the same, final hash)."""
    changed = sorted(k for k, env in after.items() if (before.get(k) or {}).get("etag") != env["etag"])
    if not changed:
        return []
    final_hash = state_hash(after)
    out = []
    for k in changed:
        env = after[k]
        event = {
            "type": "ActivationUpdated",
            "version": 1,
            "world_id": env["world_id"],
            "strategy_id": env["strategy_id"],
            "side": env["side"],
            "active": env["active"],
            "weight": env["weight"],
            "etag": env["etag"],
            "ts": env["ts"],
            "state_hash": final_hash,
        }
        if run_id:
            event["run_id"] = run_id
        out.append(event)
    return out


def policy_event(world_id: str, version: int, checksum: str, status: str, ts: datetime) -> dict:
    return {
        "type": "PolicyUpdated",
        "version": 1,
        "world_id": world_id,
        "policy_version": int(version),
        "checksum": checksum,
        "status": status,
        "ts": iso(ts),
    }
