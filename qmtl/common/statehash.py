"""State hashes shared by WorldService (which publishes them) and the Gateway (which
recomputes them from events) so that a client can confirm convergence without a
snapshot (SPEC §5, "state_hash probe").

Both hashes are the SHA-256 hex digest of canonical JSON (``sort_keys``, compact
separators, UTF-8, non-ASCII kept) of a small, fixed structure:

* activation: the list of ``{strategy_id, side, active, weight}`` of every entry
  of a world's activation set (inactive ones included), sorted by
  ``(strategy_id, side)``; ``weight`` as a float, ``active`` as a bool. An empty
  set hashes the empty list.
* policy: ``{world_id, policy_version, checksum, status}`` of the world's
  *default* policy (status ``ACTIVE``). A world without a default policy hashes
  ``{world_id, policy_version: 0, checksum: "", status: "NONE"}``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["NO_POLICY_STATUS", "activation_state_hash", "canonical_json", "policy_state_hash"]

NO_POLICY_STATUS = "NONE"


def canonical_json(value: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _sha256(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()


def activation_state_hash(entries: Iterable[Mapping[str, Any]]) -> str:
    """Hash of a world's activation set; each entry needs strategy_id, side, active, weight."""
    items = sorted(
        (
            {
                "strategy_id": str(e["strategy_id"]),
                "side": str(e["side"]),
                "active": bool(e["active"]),
                "weight": float(e["weight"]),
            }
            for e in entries
        ),
        key=lambda e: (e["strategy_id"], e["side"]),
    )
    return _sha256(items)


def policy_state_hash(world_id: str, policy_version: int | None, checksum: str | None, status: str | None) -> str:
    """Hash of a world's default policy (see module docstring for the no-policy case)."""
    if not policy_version:
        policy_version, checksum, status = 0, "", NO_POLICY_STATUS
    return _sha256(
        {
            "world_id": world_id,
            "policy_version": int(policy_version),
            "checksum": checksum or "",
            "status": status or NO_POLICY_STATUS,
        }
    )
